"""Sequence-to-sequence data: (source, target) pairs read, tokenized, packed into rows.

Pairs come from a TSV with a header or JSONL (`source_key` / `target_key`), or from two
line-aligned parallel text files `PATH.SRC` and `PATH.TGT` (`.gz` read too). An example row is

  inputs, input_segment_ids, input_positions                 int32 [S]  encoder side
  decoder_inputs, targets, target_segment_ids, target_positions   int32 [T]  decoder side
  weights                                                    float32 [T]

`decoder_inputs` are the targets shifted right within each pair (the first is 0, the decoder
start id). With packing, several pairs share a row under segment ids 1, 2, ... on both sides
(pair k is segment k in the encoder and in the decoder), positions restart per pair, and
attention never crosses pairs; padding has segment 0 and weight 0. Packing is first-fit in a
seeded order, done once, so rows are fixed and the grain iterator over them resumes exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm.data import labelled
from lm.data import tokenizers as tok_lib

FIELDS = ("inputs", "input_segment_ids", "input_positions", "decoder_inputs", "targets",
          "target_segment_ids", "target_positions", "weights")
FORMATS = ("parallel", "tsv", "jsonl")


@dataclasses.dataclass(frozen=True)
class Pair:
    source: str
    target: str


def padding_example(inputs_length: int, targets_length: int) -> dict[str, np.ndarray]:
    """A row that counts for nothing (segment 0, weight 0)."""
    out = {k: np.zeros(inputs_length if k.startswith("input") else targets_length, np.int32)
           for k in FIELDS}
    out["weights"] = np.zeros(targets_length, np.float32)
    return out


# ----------------------------------------------------------------------------- reading


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="\n")
    return open(path, encoding="utf-8", newline="\n")


def _lines(path: str, field: str) -> list[str]:
    labelled._check_file(path, field)
    try:
        with _open_text(path) as f:
            return [line.rstrip("\r\n") for line in f]
    except UnicodeDecodeError as e:
        raise ValueError(f"{field}: {path} is not UTF-8 text ({e.reason} at byte {e.start})"
                         ) from None


def parallel_path(prefix: str, lang: str) -> str:
    """PREFIX.LANG, or PREFIX.LANG.gz when only that exists."""
    path = f"{prefix}.{lang}"
    return path if os.path.exists(path) or not os.path.exists(path + ".gz") else path + ".gz"


def read_pairs(data: Any, path: str, field: str) -> list[Pair]:
    """The pairs of one split; `data` is the config's `data` (format, keys, languages)."""
    fmt = data.get("format", "parallel")
    if fmt not in FORMATS:
        raise ValueError(f"data.format: unknown format {fmt!r} (expected one of {FORMATS})")
    if fmt == "parallel":
        src_path = parallel_path(path, data.source_lang)
        tgt_path = parallel_path(path, data.target_lang)
        src, tgt = _lines(src_path, field), _lines(tgt_path, field)
        if len(src) != len(tgt):
            raise ValueError(f"{field}: {src_path} has {len(src)} lines but {tgt_path} has "
                             f"{len(tgt)}; parallel files must be line-aligned")
        return [Pair(s, t) for s, t in zip(src, tgt, strict=True) if s.strip() and t.strip()]
    skey, tkey = data.get("source_key", "source"), data.get("target_key", "target")
    if fmt == "tsv":
        rows = labelled.read_tsv(path, text_key=skey, label_key=tkey, field=field)
        return [Pair(r.text, r.label) for r in rows]
    rows = labelled.read_jsonl(path, text_key=skey, label_key=tkey, field=field)
    return [Pair(r.text, r.label) for r in rows]


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(config: Any, workdir: str, train: Sequence[Pair]) -> tok_lib.Tokenizer:
    """`labelled.build_tokenizer` (saved, given, the init run's, or trained) with a joint
    vocabulary over both sides of the training pairs; it needs `</s>` (every side's end)."""
    def corpus():
        for pair in train:
            yield pair.source
            yield pair.target

    return labelled.build_tokenizer(config, workdir, corpus, default_kind="sentencepiece",
                                    required=("</s>",))


def encode(tokenizer: tok_lib.Tokenizer, text: str, length: int) -> np.ndarray:
    """Token ids + `</s>`, cut to `length` (the `</s>` kept)."""
    ids = tokenizer.encode(text)[: length - 1]
    return np.asarray([*ids, tokenizer.special_id("</s>")], np.int32)


# ----------------------------------------------------------------------------- packing


def pack(encoded: Sequence[tuple[np.ndarray, np.ndarray]], inputs_length: int,
         targets_length: int, *, packed: bool, max_per_row: int = 0) -> dict[str, np.ndarray]:
    """Rows from (source ids, target ids) pairs in the given order: each pair goes into the
    first open row with room on both sides (first fit), or one pair per row unpacked."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []
    for k, (src, tgt) in enumerate(encoded):
        placed = False
        if packed:
            for r, (s_left, t_left) in enumerate(room):
                fits = len(src) <= s_left and len(tgt) <= t_left
                if fits and (not max_per_row or len(rows[r]) < max_per_row):
                    rows[r].append(k)
                    room[r] = (s_left - len(src), t_left - len(tgt))
                    placed = True
                    break
        if not placed:
            rows.append([k])
            room.append((inputs_length - len(src), targets_length - len(tgt)))
    out = {key: np.zeros((len(rows), inputs_length if key.startswith("input")
                          else targets_length), np.float32 if key == "weights" else np.int32)
           for key in FIELDS}
    for r, members in enumerate(rows):
        s_at = t_at = 0
        for seg, k in enumerate(members, 1):
            src, tgt = encoded[k]
            ns, nt = len(src), len(tgt)
            out["inputs"][r, s_at:s_at + ns] = src
            out["input_segment_ids"][r, s_at:s_at + ns] = seg
            out["input_positions"][r, s_at:s_at + ns] = np.arange(ns)
            out["targets"][r, t_at:t_at + nt] = tgt
            out["decoder_inputs"][r, t_at + 1:t_at + nt] = tgt[:-1]  # decoder start 0 first
            out["target_segment_ids"][r, t_at:t_at + nt] = seg
            out["target_positions"][r, t_at:t_at + nt] = np.arange(nt)
            out["weights"][r, t_at:t_at + nt] = 1.0
            s_at, t_at = s_at + ns, t_at + nt
    return out


def encode_pairs(tokenizer: tok_lib.Tokenizer, pairs: Sequence[Pair], inputs_length: int,
                 targets_length: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(encode(tokenizer, p.source, inputs_length), encode(tokenizer, p.target,
                                                               targets_length)) for p in pairs]


def pair_source(tokenizer: tok_lib.Tokenizer, pairs: Sequence[Pair], inputs_length: int,
                targets_length: int, *, packed: bool, seed: int) -> labelled.ArraySource:
    """The rows of a split: pairs shuffled by `seed` then packed (unshuffled when unpacked)."""
    encoded = encode_pairs(tokenizer, pairs, inputs_length, targets_length)
    if packed:
        order = np.random.default_rng(seed & 0xFFFFFFFF).permutation(len(encoded))
        encoded = [encoded[i] for i in order]
    return labelled.ArraySource(pack(encoded, inputs_length, targets_length, packed=packed))
