"""T5 (`model_type: t5`) <-> our `EncoderDecoder` (T5ForConditionalGeneration) and
`Encoder` (T5EncoderModel).

HF names and ours (stack = encoder | decoder; HF Linear weights are [out, in], ours [in, out]
with the heads split out):

  shared                                          embedder/token (the encoder-only Encoder:
                                                  embedder/token at the top)
  {stack}.block.0.layer.0.SelfAttention.relative_attention_bias
                                                  {stack}/relative_bias (one table shared by
                                                  every layer of the stack)
  {stack}.block.i.layer.0.SelfAttention.{q,k,v,o} {stack}/layer_i/attention/{query,key,value,out}
  {stack}.block.i.layer.0.layer_norm              {stack}/layer_i/attention_norm
  decoder.block.i.layer.1.EncDecAttention.*       decoder/layer_i/cross_attention/*
  decoder.block.i.layer.1.layer_norm              decoder/layer_i/cross_attention_norm
  {stack}.block.i.layer.-1.DenseReluDense.wi      {stack}/layer_i/mlp/wi   (v1.0 ReLU / GELU)
  {stack}.block.i.layer.-1.DenseReluDense.wi_0/1  {stack}/layer_i/mlp/wi, wi_up (gated, v1.1)
  {stack}.block.i.layer.-1.DenseReluDense.wo      {stack}/layer_i/mlp/wo
  {stack}.block.i.layer.-1.layer_norm             {stack}/layer_i/mlp_norm
  {stack}.final_layer_norm                        {stack}/final_norm
  lm_head (untied, v1.1)                          decoder/lm_head/kernel [D, V]

T5 has no biases, RMSNorm without mean subtraction, no 1/sqrt(K) attention scaling
(`scale_attention=False`) and, when the output is tied, hidden * d_model**-0.5 before the
output projection (`scale_tied_logits`; T5 v1.1 is untied and unscaled). Our `init_std`
is written as T5's `initializer_factor` (init_std / 0.05).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lm.convert import layout
from lm.convert.layout import HFInfo, Weights
from lm.models.config import ModelConfig

KINDS = ("T5ForConditionalGeneration", "T5EncoderModel")
# HF feed_forward_proj -> our activation ("gated-gelu" is the tanh-approximated GELU in HF).
_FF_FROM_HF = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh",
               "gelu_pytorch_tanh": "gelu_tanh", "gated-gelu": "geglu_tanh",
               "gated-gelu_new": "geglu_tanh", "gated-gelu_pytorch_tanh": "geglu_tanh",
               "gated-silu": "swiglu"}
_FF_TO_HF = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new",
             "geglu_tanh": "gated-gelu", "swiglu": "gated-silu"}
_INIT_STD_PER_FACTOR = 0.05  # our preset init_std for initializer_factor 1.0
_STACKS = ("encoder", "decoder")


def config_from_hf(hf: Mapping[str, Any], tie: bool) -> ModelConfig:
    """HF T5Config dict -> ModelConfig (one-line ValueError naming what we cannot run).

    `tie`: the checkpoint's lm_head is the shared table (absent or equal). The output
    scaling is read from the config: `scale_decoder_outputs` where written (transformers
    >= 5, which always writes tie_word_embeddings=true), else tie_word_embeddings (v1.1:
    false, so unscaled)."""
    ff = hf.get("feed_forward_proj", "relu")
    if ff not in _FF_FROM_HF:
        raise ValueError(f"t5: feed_forward_proj={ff!r} is not supported "
                         f"(supported: {sorted(_FF_FROM_HF)})")
    if hf.get("is_decoder"):
        raise ValueError("t5: is_decoder=true (a decoder-only T5 stack) is not supported")
    scale = bool(hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)))
    layers = hf.get("num_layers", 6)
    decoder_layers = hf.get("num_decoder_layers") or layers
    dropout = hf.get("dropout_rate", 0.1)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["d_model"], num_layers=layers,
        num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
        num_decoder_layers=None if decoder_layers == layers else decoder_layers,
        max_len=hf.get("n_positions", 512), position="relative",
        relative_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_max_distance=hf.get("relative_attention_max_distance", 128),
        norm="rmsnorm", norm_eps=hf.get("layer_norm_epsilon", 1e-6),
        activation=_FF_FROM_HF[ff], pre_norm=True, embed_norm=False, use_bias=False,
        tie_embeddings=tie, scale_tied_logits=scale, scale_attention=False,
        dropout_rate=dropout, attention_dropout_rate=dropout,
        init_std=round(_INIT_STD_PER_FACTOR * hf.get("initializer_factor", 1.0), 12))


# ---- one attention / MLP / stack
def _attention_from_hf(w: Weights, name: str, h: int) -> dict[str, Any]:
    out = {ours: layout.heads_in(w.get(f"{name}.{theirs}.weight").T, None, h)
           for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
    out["out"] = layout.heads_out(w.get(f"{name}.o.weight").T, None, h)
    return out


def _attention_to_hf(p: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
    out = {f"{name}.{theirs}.weight": layout.flat_in(p[ours])[0].T
           for ours, theirs in (("query", "q"), ("key", "k"), ("value", "v"))}
    out[f"{name}.o.weight"] = layout.flat_out(p["out"])[0].T
    return out


def _mlp_from_hf(w: Weights, name: str, cfg: ModelConfig) -> dict[str, Any]:
    def lin(n: str) -> dict[str, np.ndarray]:
        return {"kernel": w.get(f"{name}.{n}.weight").T}

    if cfg.gated:
        return {"wi": lin("wi_0"), "wi_up": lin("wi_1"), "wo": lin("wo")}
    return {"wi": lin("wi"), "wo": lin("wo")}


def _mlp_to_hf(p: Mapping[str, Any], name: str, cfg: ModelConfig) -> dict[str, np.ndarray]:
    names = (("wi", "wi_0"), ("wi_up", "wi_1"), ("wo", "wo")) if cfg.gated else (
        ("wi", "wi"), ("wo", "wo"))
    return {f"{name}.{theirs}.weight": p[ours]["kernel"].T for ours, theirs in names}


def _stack_from_hf(w: Weights, cfg: ModelConfig, stack: str) -> dict[str, Any]:
    h, decoder = cfg.num_heads, stack == "decoder"
    out: dict[str, Any] = {"relative_bias": {"embedding": w.get(
        f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight")}}
    for i in range(cfg.decoder_layers if decoder else cfg.num_layers):
        b = f"{stack}.block.{i}.layer"
        ff = 2 if decoder else 1
        layer = {"attention": _attention_from_hf(w, f"{b}.0.SelfAttention", h),
                 "attention_norm": {"scale": w.get(f"{b}.0.layer_norm.weight")},
                 "mlp": _mlp_from_hf(w, f"{b}.{ff}.DenseReluDense", cfg),
                 "mlp_norm": {"scale": w.get(f"{b}.{ff}.layer_norm.weight")}}
        if decoder:
            layer["cross_attention"] = _attention_from_hf(w, f"{b}.1.EncDecAttention", h)
            layer["cross_attention_norm"] = {"scale": w.get(f"{b}.1.layer_norm.weight")}
        out[f"layer_{i}"] = layer
    out["final_norm"] = {"scale": w.get(f"{stack}.final_layer_norm.weight")}
    return out


def _stack_to_hf(cfg: ModelConfig, p: Mapping[str, Any], stack: str) -> dict[str, np.ndarray]:
    decoder = stack == "decoder"
    out = {f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
           p["relative_bias"]["embedding"]}
    for i in range(cfg.decoder_layers if decoder else cfg.num_layers):
        b, layer = f"{stack}.block.{i}.layer", p[f"layer_{i}"]
        ff = 2 if decoder else 1
        out |= _attention_to_hf(layer["attention"], f"{b}.0.SelfAttention")
        out[f"{b}.0.layer_norm.weight"] = layer["attention_norm"]["scale"]
        if decoder:
            out |= _attention_to_hf(layer["cross_attention"], f"{b}.1.EncDecAttention")
            out[f"{b}.1.layer_norm.weight"] = layer["cross_attention_norm"]["scale"]
        out |= _mlp_to_hf(layer["mlp"], f"{b}.{ff}.DenseReluDense", cfg)
        out[f"{b}.{ff}.layer_norm.weight"] = layer["mlp_norm"]["scale"]
    out[f"{stack}.final_layer_norm.weight"] = p["final_norm"]["scale"]
    return out


# ---- whole models
def params_from_hf(tensors: Mapping[str, np.ndarray], hf: Mapping[str, Any], source: str
                   ) -> tuple[ModelConfig, dict[str, Any], HFInfo]:
    """HF T5 tensors -> (config, EncoderDecoder or Encoder params, info)."""
    w = Weights(tensors, source)
    table = w.get("shared.weight")
    tie = "lm_head.weight" not in w or np.array_equal(w.get("lm_head.weight"), table)
    cfg = config_from_hf(hf, tie)
    for stack in _STACKS:  # per-stack copies of the shared table (tied in HF)
        w.same_as(f"{stack}.embed_tokens.weight", table, "shared.weight")
    embedder = {"token": {"embedding": table}}
    encoder = _stack_from_hf(w, cfg, "encoder")
    has_decoder = "decoder.final_layer_norm.weight" in w
    if not has_decoder:
        params = {"embedder": embedder, **encoder}
        return cfg, params, HFInfo(model_class="Encoder", hf_class="T5EncoderModel",
                                   unused=w.unused())
    decoder = _stack_from_hf(w, cfg, "decoder")
    if not cfg.tie_embeddings:
        decoder["lm_head"] = {"kernel": np.ascontiguousarray(w.get("lm_head.weight").T)}
    params = {"embedder": embedder, "encoder": encoder, "decoder": decoder}
    return cfg, params, HFInfo(model_class="EncoderDecoder",
                               hf_class="T5ForConditionalGeneration", unused=w.unused())


def config_to_hf(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    layout.check_exportable(cfg, kind, {
        "position": "relative", "norm": "rmsnorm", "pre_norm": True, "embed_norm": False,
        "use_bias": False, "scale_attention": False, "activation": tuple(_FF_TO_HF),
        "num_kv_heads": (None, cfg.num_heads), "type_vocab_size": 0,
        "scale_embeddings": False})
    if cfg.tie_embeddings and not cfg.scale_tied_logits:
        raise ValueError(f"model.scale_tied_logits=False cannot be exported to {kind} "
                         "(a tied T5 output scales the hidden states by d_model**-0.5)")
    return {
        "architectures": [kind], "model_type": "t5", "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model, "d_kv": cfg.head_size, "d_ff": cfg.mlp_dim,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.decoder_layers,
        "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.relative_buckets,
        "relative_attention_max_distance": cfg.relative_max_distance,
        "dropout_rate": cfg.dropout_rate, "layer_norm_epsilon": cfg.norm_eps,
        "initializer_factor": round(cfg.init_std / _INIT_STD_PER_FACTOR, 12),
        "feed_forward_proj": _FF_TO_HF[cfg.activation], "n_positions": cfg.max_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "scale_decoder_outputs": cfg.tie_embeddings and cfg.scale_tied_logits,
        "is_encoder_decoder": True,
        "use_cache": True, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "dtype": "float32",
    }


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any], kind: str
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our EncoderDecoder (either kind) or Encoder (T5EncoderModel) params, loop layout,
    numpy -> (HF config, HF tensors). The tied per-stack embedding copies are not stored."""
    if kind not in KINDS:
        raise ValueError(f"unknown T5 export kind {kind!r}; known: {KINDS}")
    if kind == "T5ForConditionalGeneration" and "decoder" not in params:
        raise ValueError(f"{kind} needs our EncoderDecoder parameters; these params lack "
                         "'decoder'")
    hf_cfg = config_to_hf(cfg, kind)
    encoder = params["encoder"] if "decoder" in params else params
    out = {"shared.weight": params["embedder"]["token"]["embedding"],
           **_stack_to_hf(cfg, encoder, "encoder")}
    if kind == "T5ForConditionalGeneration":
        out |= _stack_to_hf(cfg, params["decoder"], "decoder")
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = params["decoder"]["lm_head"]["kernel"].T
    return hf_cfg, out
