"""BERT (`model_type: bert`) <-> our post-LN `Encoder` and its heads.

HF names (prefix `bert.` except in a bare BertModel) and ours:

  embeddings.{word,position,token_type}_embeddings   embedder/{token,position,segment}
  embeddings.LayerNorm                               embedder/norm
  encoder.layer.i.attention.self.{query,key,value}   layer_i/attention/{query,key,value}
  encoder.layer.i.attention.output.dense / LayerNorm layer_i/attention/out, attention_norm
  encoder.layer.i.intermediate.dense                 layer_i/mlp/wi
  encoder.layer.i.output.dense / LayerNorm           layer_i/mlp/wo, mlp_norm
  pooler.dense                                       pooler/dense
  cls.predictions.transform.dense / LayerNorm, bias  mlm/transform, mlm/norm, mlm/bias
  cls.seq_relationship                               nsp_head/dense
  classifier                                         classifier/dense

The heads present decide the class: MLM (+ NSP) -> BertPretrainer (BertForPreTraining /
BertForMaskedLM), `classifier` -> SequenceClassifier (TokenClassifier without a pooler or
for *TokenClassification), none -> Encoder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from lm.convert import layout
from lm.convert.layout import HFInfo, Weights
from lm.models.config import ModelConfig

KINDS = ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
         "BertForTokenClassification")
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
_BUFFERS = ("position_ids", "token_type_ids")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """HF BertConfig dict -> ModelConfig (one-line ValueError for what we cannot run)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"bert: position_embedding_type={hf['position_embedding_type']!r} "
                         "is not supported (only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise ValueError("bert: decoder / cross-attention BERT is not supported")
    act = hf.get("hidden_act", "gelu")
    if act not in layout.ACT_FROM_HF:
        raise ValueError(f"bert: hidden_act={act!r} is not supported "
                         f"(known: {sorted(layout.ACT_FROM_HF)})")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"], max_len=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2), position="learned", norm="layernorm",
        norm_eps=hf.get("layer_norm_eps", 1e-12), activation=layout.ACT_FROM_HF[act],
        pre_norm=False, embed_norm=True, use_bias=True, tie_embeddings=True,
        dropout_rate=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout_rate=hf.get("attention_probs_dropout_prob", 0.1),
        init_std=hf.get("initializer_range", 0.02))


def _legacy_names(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Original TF-converted checkpoints call LayerNorm parameters gamma / beta."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        out[name] = value
    return out


def _encoder_from_hf(w: Weights, cfg: ModelConfig, p: str) -> dict[str, Any]:
    h = cfg.num_heads
    e = f"{p}embeddings."
    embedder: dict[str, Any] = {
        "token": {"embedding": w.get(f"{e}word_embeddings.weight")},
        "position": {"embedding": w.get(f"{e}position_embeddings.weight")},
        "norm": layout.norm_from_hf(w, f"{e}LayerNorm"),
    }
    if cfg.type_vocab_size:
        embedder["segment"] = {"embedding": w.get(f"{e}token_type_embeddings.weight")}
    enc: dict[str, Any] = {"embedder": embedder}
    for i in range(cfg.num_layers):
        lp = f"{p}encoder.layer.{i}."
        attn = {}
        for name in ("query", "key", "value"):
            lin = layout.dense_from_linear(w, f"{lp}attention.self.{name}")
            attn[name] = layout.heads_in(lin["kernel"], lin["bias"], h)
        out = layout.dense_from_linear(w, f"{lp}attention.output.dense")
        attn["out"] = layout.heads_out(out["kernel"], out["bias"], h)
        enc[f"layer_{i}"] = {
            "attention": attn,
            "attention_norm": layout.norm_from_hf(w, f"{lp}attention.output.LayerNorm"),
            "mlp": {"wi": layout.dense_from_linear(w, f"{lp}intermediate.dense"),
                    "wo": layout.dense_from_linear(w, f"{lp}output.dense")},
            "mlp_norm": layout.norm_from_hf(w, f"{lp}output.LayerNorm"),
        }
    return enc


def params_from_hf(tensors: Mapping[str, np.ndarray], hf: Mapping[str, Any], source: str
                   ) -> tuple[ModelConfig, dict[str, Any], HFInfo]:
    """HF BERT tensors -> (config, params of the detected class, info)."""
    cfg = config_from_hf(hf)
    w = Weights(_legacy_names(tensors), source)
    p = "bert." if any(k.startswith("bert.") for k in w.tensors) else ""
    encoder = _encoder_from_hf(w, cfg, p)
    heads: dict[str, Any] = {}
    if f"{p}pooler.dense.weight" in w:
        heads["pooler"] = {"dense": layout.dense_from_linear(w, f"{p}pooler.dense")}
    if "cls.predictions.transform.dense.weight" in w:
        heads["mlm"] = {"transform": layout.dense_from_linear(w, "cls.predictions.transform.dense"),
                        "norm": layout.norm_from_hf(w, "cls.predictions.transform.LayerNorm"),
                        "bias": w.get("cls.predictions.bias")}
        table = encoder["embedder"]["token"]["embedding"]
        w.same_as("cls.predictions.decoder.weight", table, "the word embeddings")
        w.same_as("cls.predictions.decoder.bias", heads["mlm"]["bias"], "cls.predictions.bias")
    if "cls.seq_relationship.weight" in w:
        heads["nsp_head"] = {"dense": layout.dense_from_linear(w, "cls.seq_relationship")}
    if "classifier.weight" in w:
        heads["classifier"] = {"dense": layout.dense_from_linear(w, "classifier")}

    archs = " ".join(hf.get("architectures") or [])
    if "mlm" in heads:
        nsp = "nsp_head" in heads and "pooler" in heads
        keep = ("mlm", "pooler", "nsp_head") if nsp else ("mlm",)
        info_kw: dict[str, Any] = dict(model_class="BertPretrainer", nsp=nsp,
                                       hf_class="BertForPreTraining" if nsp else "BertForMaskedLM")
    elif "classifier" in heads:
        n = heads["classifier"]["dense"]["kernel"].shape[1]
        token = "TokenClassification" in archs or "pooler" not in heads
        keep = ("classifier",) if token else ("pooler", "classifier")
        info_kw = dict(model_class="TokenClassifier" if token else "SequenceClassifier",
                       num_classes=n, hf_class="BertForTokenClassification" if token
                       else "BertForSequenceClassification")
    else:
        keep, info_kw = (), dict(model_class="Encoder", hf_class="BertModel")
    extras = {k: v for k, v in heads.items() if k not in keep}
    params = encoder if not keep else {"encoder": encoder, **{k: heads[k] for k in keep}}
    return cfg, params, HFInfo(**info_kw, extras=extras, unused=w.unused(_BUFFERS))


def config_to_hf(cfg: ModelConfig, kind: str, num_classes: int = 0) -> dict[str, Any]:
    layout.check_exportable(cfg, kind, {
        "pre_norm": False, "embed_norm": True, "position": "learned", "norm": "layernorm",
        "activation": tuple(_ACT_TO_HF), "num_kv_heads": (None, cfg.num_heads),
        "head_dim": (None, cfg.d_model // cfg.num_heads), "scale_tied_logits": False,
        "scale_embeddings": False})
    out: dict[str, Any] = {
        "architectures": [kind], "model_type": "bert", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "intermediate_size": cfg.mlp_dim,
        "hidden_act": _ACT_TO_HF[cfg.activation], "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "max_position_embeddings": cfg.max_len, "type_vocab_size": max(cfg.type_vocab_size, 1),
        "initializer_range": cfg.init_std, "layer_norm_eps": cfg.norm_eps, "pad_token_id": 0,
        "position_embedding_type": "absolute", "tie_word_embeddings": True,
        "dtype": "float32",
    }
    if num_classes:
        out["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        out["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    return out


def _encoder_to_hf(cfg: ModelConfig, enc: Mapping[str, Any], p: str) -> dict[str, np.ndarray]:
    emb = enc["embedder"]
    e = f"{p}embeddings."
    segment = (emb["segment"]["embedding"] if "segment" in emb
               else np.zeros((1, cfg.d_model), np.float32))  # no token types: one zero row
    out = {f"{e}word_embeddings.weight": emb["token"]["embedding"],
           f"{e}position_embeddings.weight": emb["position"]["embedding"],
           f"{e}token_type_embeddings.weight": segment,
           **layout.norm_to_hf(emb["norm"], f"{e}LayerNorm")}
    for i in range(cfg.num_layers):
        lp, layer = f"{p}encoder.layer.{i}.", enc[f"layer_{i}"]
        for name in ("query", "key", "value"):
            kernel, bias = layout.flat_in(layer["attention"][name])
            out |= layout.dense_to_linear({"kernel": kernel, "bias": bias},
                                          f"{lp}attention.self.{name}")
        kernel, bias = layout.flat_out(layer["attention"]["out"])
        out |= layout.dense_to_linear({"kernel": kernel, "bias": bias},
                                      f"{lp}attention.output.dense")
        out |= layout.norm_to_hf(layer["attention_norm"], f"{lp}attention.output.LayerNorm")
        out |= layout.dense_to_linear(layer["mlp"]["wi"], f"{lp}intermediate.dense")
        out |= layout.dense_to_linear(layer["mlp"]["wo"], f"{lp}output.dense")
        out |= layout.norm_to_hf(layer["mlp_norm"], f"{lp}output.LayerNorm")
    return out


_NEEDS = {"BertModel": (), "BertForPreTraining": ("mlm", "pooler", "nsp_head"),
          "BertForMaskedLM": ("mlm",), "BertForSequenceClassification": ("pooler", "classifier"),
          "BertForTokenClassification": ("classifier",)}


def params_to_hf(cfg: ModelConfig, params: Mapping[str, Any], kind: str
                 ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Our params (any encoder class, loop layout, numpy) -> (HF config, HF tensors)."""
    if kind not in KINDS:
        raise ValueError(f"unknown BERT export kind {kind!r}; known: {KINDS}")
    missing = [h for h in _NEEDS[kind] if h not in params]
    if missing:
        raise ValueError(f"{kind} needs our {'/'.join(_NEEDS[kind])} parameters; "
                         f"these params lack {missing[0]!r}")
    num_classes = params["classifier"]["dense"]["kernel"].shape[1] if "classifier" in _NEEDS[
        kind] else 0
    hf_cfg = config_to_hf(cfg, kind, num_classes)
    p = "" if kind == "BertModel" else "bert."
    out = _encoder_to_hf(cfg, params.get("encoder", params), p)
    if "pooler" in params and kind in ("BertModel", "BertForPreTraining",
                                       "BertForSequenceClassification"):
        out |= layout.dense_to_linear(params["pooler"]["dense"], f"{p}pooler.dense")
    if "mlm" in _NEEDS[kind]:
        mlm = params["mlm"]
        out |= layout.dense_to_linear(mlm["transform"], "cls.predictions.transform.dense")
        out |= layout.norm_to_hf(mlm["norm"], "cls.predictions.transform.LayerNorm")
        out["cls.predictions.bias"] = mlm["bias"]  # the decoder weight is tied (not stored)
    if "nsp_head" in _NEEDS[kind]:
        out |= layout.dense_to_linear(params["nsp_head"]["dense"], "cls.seq_relationship")
    if "classifier" in _NEEDS[kind]:
        out |= layout.dense_to_linear(params["classifier"]["dense"], "classifier")
    return hf_cfg, out
