"""Hugging Face model directories <-> our (ModelConfig, params), and HF tokenizers.

`from_hf` needs neither torch nor transformers when the directory holds safetensors;
`to_hf` writes config.json + model.safetensors with numpy only. Params are our loop layout
(`layer_i`) as numpy arrays; `stack_layers` turns them into the scan layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
from absl import logging

from lm.convert import files, hf_bert, hf_gpt2, hf_t5
from lm.convert.layout import HFInfo
from lm.models.config import ModelConfig
from lm.models.transformer import unstack_layers

_CONVERTERS = {"bert": hf_bert, "gpt2": hf_gpt2, "t5": hf_t5}
EXPORT_KINDS = hf_bert.KINDS + hf_gpt2.KINDS + hf_t5.KINDS


def from_hf(path: str) -> tuple[ModelConfig, dict[str, Any], HFInfo]:
    """Reads an HF model directory (BertModel / BertForPreTraining / BertForMaskedLM /
    BertFor{Sequence,Token}Classification / GPT2Model / GPT2LMHeadModel /
    T5ForConditionalGeneration / T5EncoderModel).

    Returns our config, the params tree of `info.model_class` (numpy, loop layout) and
    `info` (see `HFInfo`; `info.build_model(cfg)` gives the matching Flax module).
    """
    hf = files.read_hf_config(path)
    model_type = hf.get("model_type")
    if model_type not in _CONVERTERS:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported "
                         f"(supported: {sorted(_CONVERTERS)})")
    tensors = files.read_hf_weights(path)
    cfg, params, info = _CONVERTERS[model_type].params_from_hf(tensors, hf, path)
    if info.unused:
        logging.warning("%s: %d tensors not converted: %s", path, len(info.unused),
                        ", ".join(info.unused))
    return cfg, params, info


def host_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Any params tree of ours (boxed or not, device arrays, scan or loop layout) -> nested
    numpy dict in the loop layout."""
    return unstack_layers(files.unflatten(files.flatten(nn.meta.unbox(params))))


def infer_kind(cfg: ModelConfig, params: Mapping[str, Any]) -> str:
    """The HF class that holds what `params` has (pooler-less classifiers -> token level)."""
    if "decoder" in params:
        return "T5ForConditionalGeneration"
    if cfg.position == "relative" and "encoder" not in params:
        return "T5EncoderModel"
    if "mlm" in params:
        return "BertForPreTraining" if "nsp_head" in params else "BertForMaskedLM"
    if "classifier" in params:
        return ("BertForSequenceClassification" if "pooler" in params
                else "BertForTokenClassification")
    if "encoder" in params or not cfg.pre_norm:
        return "BertModel"
    return "GPT2LMHeadModel"


def to_hf(model_cfg: ModelConfig, params: Mapping[str, Any], out_dir: str,
          kind: str | None = None) -> str:
    """Writes `out_dir/{config.json, model.safetensors}` loadable by transformers' `kind`
    (one of EXPORT_KINDS; None: inferred from the params). Returns the kind written.

    Heads the kind has no place for are dropped (e.g. BertModel from a BertPretrainer);
    missing biases (`use_bias=False`) and a missing token-type table are written as zeros,
    which computes the same function.
    """
    params = host_params(params)
    kind = kind or infer_kind(model_cfg, params)
    if kind in hf_bert.KINDS:
        hf_cfg, tensors = hf_bert.params_to_hf(model_cfg, params, kind)
    elif kind in hf_gpt2.KINDS:
        hf_cfg, tensors = hf_gpt2.params_to_hf(model_cfg, params, kind)
    elif kind in hf_t5.KINDS:
        hf_cfg, tensors = hf_t5.params_to_hf(model_cfg, params, kind)
    else:
        raise ValueError(f"unknown export kind {kind!r}; known: {EXPORT_KINDS}")
    files.write_hf(out_dir, hf_cfg, tensors)
    return kind


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _t5_extra_ids(path: str, tc: Mapping[str, Any]) -> int:
    """T5 sentinels: tokenizer_config's `extra_ids`, else the `<extra_id_N>` tokens it lists,
    else 100 for a T5 model directory (transformers' default) and 0 otherwise."""
    if "extra_ids" in tc:
        return int(tc["extra_ids"])
    listed = [t for key in ("additional_special_tokens", "extra_special_tokens")
              for t in tc.get(key) or () if "<extra_id_" in str(t)]
    if listed:
        return len(listed)
    return 100 if _read_json(os.path.join(path, files.HF_CONFIG)).get("model_type") == "t5" else 0


def load_hf_tokenizer(path: str):
    """The tokenizer of an HF model directory, as one of ours: `vocab.txt` -> WordPiece
    (honouring do_lower_case / strip_accents of tokenizer_config.json), `vocab.json` +
    `merges.txt` -> GPT-2 byte-level BPE, `spiece.model` -> SentencePiece with T5's extra
    ids (`<extra_id_0>` the last id)."""
    tc = _read_json(os.path.join(path, "tokenizer_config.json"))
    if os.path.isfile(os.path.join(path, "spiece.model")):
        from lm.data.tokenizers import SentencePieceTokenizer

        return SentencePieceTokenizer.from_model_file(os.path.join(path, "spiece.model"),
                                                      _t5_extra_ids(path, tc))
    if os.path.isfile(os.path.join(path, "vocab.txt")):
        from lm.data.wordpiece import WordPieceTokenizer

        return WordPieceTokenizer.from_vocab_file(
            os.path.join(path, "vocab.txt"), lowercase=tc.get("do_lower_case", True),
            strip_accents=tc.get("strip_accents"))
    if all(os.path.isfile(os.path.join(path, n)) for n in ("vocab.json", "merges.txt")):
        from lm.convert.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer.load(path)
    raise FileNotFoundError(f"{path}: no spiece.model, vocab.txt or vocab.json + merges.txt "
                            "tokenizer files")
