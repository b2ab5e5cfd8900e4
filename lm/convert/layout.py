"""What a conversion produced (`HFInfo`) and the weight-layout rules shared by the BERT,
GPT-2 and T5 converters: torch `Linear` [out, in] and GPT-2 `Conv1D` [in, out] versus our
kernels ([D, H, K] for query/key/value, [H, K, D] for the attention output, [in, out]
otherwise)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import numpy as np

from lm.models.config import ModelConfig

MODEL_CLASSES = ("Encoder", "BertPretrainer", "SequenceClassifier", "TokenClassifier", "Decoder",
                 "EncoderDecoder")

# HF activation names -> ours (tanh-approximated GELUs all compute the same formula).
ACT_FROM_HF = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_fast": "gelu_tanh", "relu": "relu"}


@dataclasses.dataclass(frozen=True)
class HFInfo:
    """Which of our model classes a converted params tree belongs to.

    model_class: 'Encoder' | 'BertPretrainer' | 'SequenceClassifier' | 'TokenClassifier'
    | 'Decoder' | 'EncoderDecoder'; `num_classes` for the classifiers, `nsp` for
    BertPretrainer (pooler + NSP head present). `extras` holds converted weights the class
    has no place for, under our path names (e.g. the pooler of a plain BertModel:
    `{'pooler': {'dense': ...}}`); init_from offers them to models that have those paths.
    `unused` lists HF tensors not converted.
    """

    model_class: str
    hf_class: str
    num_classes: int = 0
    nsp: bool = False
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    unused: tuple[str, ...] = ()

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        """The Flax module whose `params` the converted tree is."""
        from lm.models import heads, transformer

        if self.model_class == "Encoder":
            return transformer.Encoder(cfg)
        if self.model_class == "Decoder":
            return transformer.Decoder(cfg)
        if self.model_class == "EncoderDecoder":
            return transformer.EncoderDecoder(cfg)
        if self.model_class == "BertPretrainer":
            return heads.BertPretrainer(cfg, nsp=self.nsp)
        if self.model_class == "SequenceClassifier":
            return heads.SequenceClassifier(cfg, self.num_classes)
        if self.model_class == "TokenClassifier":
            return heads.TokenClassifier(cfg, self.num_classes)
        raise ValueError(f"unknown model class {self.model_class!r}; known: {MODEL_CLASSES}")


class Weights:
    """HF tensors by name, recording which were taken (the rest end up in `unused`)."""

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str):
        self.tensors = dict(tensors)
        self.source = source
        self.taken: set[str] = set()

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise ValueError(f"{self.source}: missing tensor {name!r}")
        self.taken.add(name)
        return np.asarray(self.tensors[name], np.float32)

    def same_as(self, name: str, reference: np.ndarray, why: str) -> None:
        """A tied copy (e.g. an MLM decoder): must equal `reference` if it is stored."""
        if name in self.tensors:
            if not np.array_equal(self.get(name), reference):
                raise ValueError(f"{self.source}: {name} differs from {why}; our model ties them")

    def unused(self, ignore_suffixes: tuple[str, ...] = ()) -> tuple[str, ...]:
        return tuple(sorted(n for n in self.tensors
                            if n not in self.taken and not n.endswith(ignore_suffixes)))


def check_exportable(cfg: ModelConfig, kind: str, required: Mapping[str, Any]) -> None:
    """One-line ValueError naming the first ModelConfig field `kind` cannot represent."""
    for field, allowed in required.items():
        value = getattr(cfg, field)
        ok = value in allowed if isinstance(allowed, tuple) else value == allowed
        if not ok:
            raise ValueError(f"model.{field}={value!r} cannot be exported to {kind} "
                             f"(needs {allowed!r})")


# ---- torch Linear [out, in] <-> our Dense kernel [in, out] ----
def dense_from_linear(w: Weights, name: str) -> dict[str, np.ndarray]:
    return {"kernel": w.get(f"{name}.weight").T, "bias": w.get(f"{name}.bias")}


def dense_to_linear(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    out = {f"{name}.weight": p["kernel"].T}
    out[f"{name}.bias"] = p["bias"] if "bias" in p else np.zeros(p["kernel"].shape[1], np.float32)
    return out


def norm_from_hf(w: Weights, name: str) -> dict[str, np.ndarray]:
    return {"scale": w.get(f"{name}.weight"), "bias": w.get(f"{name}.bias")}


def norm_to_hf(p: Mapping[str, np.ndarray], name: str) -> dict[str, np.ndarray]:
    bias = p["bias"] if "bias" in p else np.zeros_like(p["scale"])  # norm_bias=False
    return {f"{name}.weight": p["scale"], f"{name}.bias": bias}


# ---- attention: [in, H*K] columns (head-major) <-> our [D, H, K] / [H, K, D] ----
def heads_in(kernel_DX: np.ndarray, bias_X: np.ndarray | None, h: int
             ) -> dict[str, np.ndarray]:
    d, x = kernel_DX.shape
    out = {"kernel": kernel_DX.reshape(d, h, x // h)}
    if bias_X is not None:
        out["bias"] = bias_X.reshape(h, x // h)
    return out


def heads_out(kernel_XD: np.ndarray, bias_D: np.ndarray | None, h: int
              ) -> dict[str, np.ndarray]:
    x, d = kernel_XD.shape
    out = {"kernel": kernel_XD.reshape(h, x // h, d)}
    if bias_D is not None:
        out["bias"] = bias_D
    return out


def flat_in(p: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Our query/key/value [D, H, K] (+ [H, K]) -> kernel [D, H*K], bias [H*K] (0 if none)."""
    d, h, k = p["kernel"].shape
    bias = p["bias"].reshape(h * k) if "bias" in p else np.zeros(h * k, np.float32)
    return p["kernel"].reshape(d, h * k), bias


def flat_out(p: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Our attention output [H, K, D] (+ [D]) -> kernel [H*K, D], bias [D] (0 if none)."""
    h, k, d = p["kernel"].shape
    bias = p["bias"] if "bias" in p else np.zeros(d, np.float32)
    return p["kernel"].reshape(h * k, d), bias
