"""GPT-2 (`model_type: gpt2`) <-> our pre-LN `Decoder`.

HF names (prefix `transformer.` in GPT2LMHeadModel) and ours:

  wte, wpe                    embedder/token, embedder/position
  h.i.ln_1, h.i.ln_2          layer_i/attention_norm, layer_i/mlp_norm
  h.i.attn.c_attn [D, 3D]     layer_i/attention/{query,key,value} (columns q | k | v)
  h.i.attn.c_proj             layer_i/attention/out
  h.i.mlp.c_fc, h.i.mlp.c_proj  layer_i/mlp/wi, layer_i/mlp/wo
  ln_f                        final_norm
  lm_head (only when untied)  lm_head/kernel [D, V]

GPT-2's `Conv1D` stores weights as [in, out], our layout, so only the fused q|k|v needs
splitting and the heads need reshaping.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lm.convert import layout
from lm.convert.layout import HFInfo, Weights
from lm.models.config import ModelConfig

KINDS = ("GPT2LMHeadModel", "GPT2Model")
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints
_GPT2_EOS = 50256


def config_from_hf(hf: Mapping[str, Any], tie: bool) -> ModelConfig:
    """HF GPT2Config dict -> ModelConfig (one-line ValueError for what we cannot run)."""
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2: only attention scaled by 1/sqrt(head_dim) is supported "
                         "(scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false)")
    if hf.get("add_cross_attention"):
        raise ValueError("gpt2: add_cross_attention is not supported")
    act = hf.get("activation_function", "gelu_new")
    if act not in layout.ACT_FROM_HF:
        raise ValueError(f"gpt2: activation_function={act!r} is not supported "
                         f"(known: {sorted(layout.ACT_FROM_HF)})")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"],
        num_heads=hf["n_head"], mlp_dim=hf.get("n_inner") or 4 * d,
        max_len=hf.get("n_positions", 1024), position="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), activation=layout.ACT_FROM_HF[act],
        pre_norm=True, embed_norm=False, use_bias=True, tie_embeddings=tie,
        dropout_rate=hf.get("resid_pdrop", 0.1), attention_dropout_rate=hf.get("attn_pdrop", 0.1),
        init_std=hf.get("initializer_range", 0.02))


def _conv(w: Weights, name: str) -> dict[str, np.ndarray]:
    return {"kernel": w.get(f"{name}.weight"), "bias": w.get(f"{name}.bias")}


def params_from_hf(tensors: Mapping[str, np.ndarray], hf: Mapping[str, Any], source: str
                   ) -> tuple[ModelConfig, dict[str, Any], HFInfo]:
    """HF GPT-2 tensors -> (config, Decoder params, info)."""
    w = Weights(tensors, source)
    p = "transformer." if any(k.startswith("transformer.") for k in w.tensors) else ""
    wte = w.get(f"{p}wte.weight")
    head = w.get("lm_head.weight") if "lm_head.weight" in w else None
    tie = head is None or (hf.get("tie_word_embeddings", True) and np.array_equal(head, wte))
    cfg = config_from_hf(hf, tie)
    h = cfg.num_heads
    params: dict[str, Any] = {"embedder": {"token": {"embedding": wte},
                                           "position": {"embedding": w.get(f"{p}wpe.weight")}}}
    for i in range(cfg.num_layers):
        lp = f"{p}h.{i}."
        qkv = _conv(w, f"{lp}attn.c_attn")
        kernels = np.split(qkv["kernel"], 3, axis=1)
        biases = np.split(qkv["bias"], 3)
        proj = _conv(w, f"{lp}attn.c_proj")
        attn = {name: layout.heads_in(kernels[j], biases[j], h)
                for j, name in enumerate(("query", "key", "value"))}
        attn["out"] = layout.heads_out(proj["kernel"], proj["bias"], h)
        params[f"layer_{i}"] = {
            "attention_norm": layout.norm_from_hf(w, f"{lp}ln_1"),
            "attention": attn,
            "mlp_norm": layout.norm_from_hf(w, f"{lp}ln_2"),
            "mlp": {"wi": _conv(w, f"{lp}mlp.c_fc"), "wo": _conv(w, f"{lp}mlp.c_proj")},
        }
    params["final_norm"] = layout.norm_from_hf(w, f"{p}ln_f")
    if not tie:
        params["lm_head"] = {"kernel": np.ascontiguousarray(head.T)}
    info = HFInfo(model_class="Decoder", hf_class="GPT2LMHeadModel" if p else "GPT2Model",
                  unused=w.unused(_BUFFERS))
    return cfg, params, info


def config_to_hf(cfg: ModelConfig, kind: str) -> dict[str, Any]:
    layout.check_exportable(cfg, kind, {
        "pre_norm": True, "embed_norm": False, "position": "learned", "norm": "layernorm",
        "activation": tuple(_ACT_TO_HF), "num_kv_heads": (None, cfg.num_heads),
        "head_dim": (None, cfg.d_model // cfg.num_heads), "type_vocab_size": 0,
        "scale_tied_logits": False, "scale_embeddings": False})
    eos = _GPT2_EOS if cfg.vocab_size > _GPT2_EOS else None
    return {
        "architectures": [kind], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
        "n_embd": cfg.d_model, "n_layer": cfg.num_layers, "n_head": cfg.num_heads,
        "n_inner": cfg.mlp_dim, "n_positions": cfg.max_len,
        "activation_function": _ACT_TO_HF[cfg.activation], "layer_norm_epsilon": cfg.norm_eps,
        "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate, "initializer_range": cfg.init_std,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos, "eos_token_id": eos, "dtype": "float32",
    }


def _to_conv(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    bias = p["bias"] if "bias" in p else np.zeros(p["kernel"].shape[1], np.float32)
    return {f"{name}.weight": p["kernel"], f"{name}.bias": bias}


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any], kind: str
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our Decoder params (loop layout, numpy) -> (HF config, HF tensors). Without biases
    (`use_bias=False`) zero biases are written: the same function."""
    if kind not in KINDS:
        raise ValueError(f"unknown GPT-2 export kind {kind!r}; known: {KINDS}")
    hf_cfg = config_to_hf(cfg, kind)
    p = "transformer." if kind == "GPT2LMHeadModel" else ""
    emb = params["embedder"]
    out = {f"{p}wte.weight": emb["token"]["embedding"],
           f"{p}wpe.weight": emb["position"]["embedding"]}
    for i in range(cfg.num_layers):
        lp, layer = f"{p}h.{i}.", params[f"layer_{i}"]
        flat = [layout.flat_in(layer["attention"][n]) for n in ("query", "key", "value")]
        qkv = {"kernel": np.concatenate([k for k, _ in flat], axis=1),
               "bias": np.concatenate([b for _, b in flat])}
        proj_kernel, proj_bias = layout.flat_out(layer["attention"]["out"])
        out |= layout.norm_to_hf(layer["attention_norm"], f"{lp}ln_1")
        out |= _to_conv(qkv, f"{lp}attn.c_attn")
        out |= _to_conv({"kernel": proj_kernel, "bias": proj_bias}, f"{lp}attn.c_proj")
        out |= layout.norm_to_hf(layer["mlp_norm"], f"{lp}ln_2")
        out |= _to_conv(layer["mlp"]["wi"], f"{lp}mlp.c_fc")
        out |= _to_conv(layer["mlp"]["wo"], f"{lp}mlp.c_proj")
    out |= layout.norm_to_hf(params["final_norm"], f"{p}ln_f")
    if not cfg.tie_embeddings and kind == "GPT2LMHeadModel":
        out["lm_head.weight"] = params["lm_head"]["kernel"].T
    return hf_cfg, out
