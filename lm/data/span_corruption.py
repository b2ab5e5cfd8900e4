"""T5 span corruption: noise spans replaced by sentinels in the inputs, spelled out in the targets.

From `raw_length` tokens of running text, a fraction `noise_density` is chosen as noise, in
spans of mean length `mean_span_length`; noise and non-noise span lengths are each a uniformly
random composition of their token counts, and the spans interleave starting with non-noise
(so the last span is noise). Sentinels count down from the top of the vocabulary: span k is
marked by id `vocab_size - 1 - k` (`<extra_id_0>` is the last id). With `</s>` = EOS:

    tokens   a b c d e f g h            noise: c d, g h
    inputs   a b <X> e f <Y> </s>
    targets  <X> c d <Y> g h </s>

`span_lengths(inputs_length, ...)` picks the raw length whose corruption fills exactly
`inputs_length` inputs (512 inputs <- 568 raw tokens, giving 114 targets at 0.15 / 3).
Randomness comes from the grain record's generator on training (different every epoch,
deterministic from the seed and the stream position, so resume is exact) and from
(seed, index) on evaluation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from lm.data.seq2seq import padding_example as seq2seq_padding


def _counts(raw_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for `raw_length` tokens, as T5 rounds them."""
    num_noise = int(round(raw_length * noise_density))
    num_noise = min(max(num_noise, 1), raw_length - 1)
    num_spans = max(int(round(num_noise / mean_span_length)), 1)
    return num_noise, num_spans


def corrupted_lengths(raw_length: int, noise_density: float, mean_span_length: float
                      ) -> tuple[int, int]:
    """(inputs length, targets length) that `raw_length` tokens corrupt to, EOS included."""
    num_noise = int(round(raw_length * noise_density))
    num_spans = int(round(num_noise / mean_span_length))
    return raw_length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_lengths(inputs_length: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0) -> tuple[int, int]:
    """(raw tokens, targets length): the longest raw length whose inputs fit `inputs_length`."""
    if inputs_length < 2:
        raise ValueError(f"span corruption: inputs length must be >= 2, got {inputs_length}")
    raw = inputs_length - 1
    while corrupted_lengths(raw + 1, noise_density, mean_span_length)[0] <= inputs_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_span_length)[1]


def _composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` split into `parts` positive integers, uniformly over all compositions."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(length: int, noise_density: float, mean_span_length: float,
               rng: np.random.Generator) -> np.ndarray:
    """Boolean [length]: True on noise tokens (interleaved spans, non-noise first)."""
    if length < 2:
        return np.zeros(length, bool)
    num_noise, num_spans = _counts(length, noise_density, mean_span_length)
    num_spans = min(num_spans, num_noise, length - num_noise)
    noise = _composition(num_noise, num_spans, rng)
    keep = _composition(length - num_noise, num_spans, rng)
    spans = np.stack([keep, noise], axis=1).reshape(-1)
    is_noise = np.tile([False, True], num_spans)
    return np.repeat(is_noise, spans)


def corrupt(tokens: np.ndarray, mask: np.ndarray, vocab_size: int, eos_id: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of `tokens` under a noise `mask` (sentinels from the vocab top)."""
    tokens = np.asarray(tokens, np.int32)
    starts = mask & ~np.concatenate([[False], mask[:-1]])  # first token of each noise span
    sentinel = (vocab_size - np.cumsum(starts)).astype(np.int32)  # span k -> vocab - 1 - k
    inputs = np.where(starts, sentinel, tokens)[~mask | starts]
    targets = np.insert(tokens[mask], np.flatnonzero(starts[mask]), sentinel[starts])
    eos = np.asarray([eos_id], np.int32)
    return np.concatenate([inputs, eos]), np.concatenate([targets.astype(np.int32), eos])


@dataclasses.dataclass(frozen=True)
class SpanConfig:
    """What one corruption needs (picklable, for grain workers)."""

    inputs_length: int
    targets_length: int
    raw_length: int
    noise_density: float
    mean_span_length: float
    vocab_size: int  # the model's: sentinels are its top ids
    eos_id: int


def make_span_config(inputs_length: int, noise_density: float, mean_span_length: float,
                     vocab_size: int, eos_id: int) -> SpanConfig:
    raw, targets = span_lengths(inputs_length, noise_density, mean_span_length)
    return SpanConfig(inputs_length, targets, raw, noise_density, mean_span_length,
                      vocab_size, eos_id)


def _pad(ids: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros(length, np.int32)
    n = min(len(ids), length)
    out[:n] = ids[:n]
    seg = np.zeros(length, np.int32)
    seg[:n] = 1
    return out, seg


def example(tokens: np.ndarray, cfg: SpanConfig, rng: np.random.Generator
            ) -> dict[str, np.ndarray]:
    """One seq2seq example (see `lm.data.seq2seq.FIELDS`) from `cfg.raw_length` tokens."""
    mask = noise_mask(len(tokens), cfg.noise_density, cfg.mean_span_length, rng)
    inputs, targets = corrupt(tokens, mask, cfg.vocab_size, cfg.eos_id)
    enc, enc_seg = _pad(inputs, cfg.inputs_length)
    tgt, tgt_seg = _pad(targets, cfg.targets_length)
    dec_in = np.concatenate([[0], tgt[:-1]]).astype(np.int32)  # shifted right, start = 0
    pos_in = np.arange(cfg.inputs_length, dtype=np.int32) * enc_seg
    pos_tgt = np.arange(cfg.targets_length, dtype=np.int32) * tgt_seg
    return {"inputs": enc, "input_segment_ids": enc_seg, "input_positions": pos_in,
            "decoder_inputs": dec_in, "targets": tgt, "target_segment_ids": tgt_seg,
            "target_positions": pos_tgt, "weights": tgt_seg.astype(np.float32)}


class RawChunks:
    """Random-access source of non-overlapping `length`-token chunks of a token array."""

    def __init__(self, tokens: np.ndarray, length: int):
        self.tokens, self.length = tokens, length

    def __len__(self) -> int:
        return len(self.tokens) // self.length

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} out of range [0, {len(self)})")
        return np.asarray(self.tokens[index * self.length:(index + 1) * self.length], np.int32)

    def __repr__(self) -> str:
        return f"RawChunks(chunks={len(self)}, length={self.length})"


class Corrupt(grain.transforms.RandomMap):
    """Training: corrupts each chunk with the record's generator (new noise every epoch)."""

    def __init__(self, cfg: SpanConfig):
        self.cfg = cfg

    def random_map(self, element: np.ndarray, rng: np.random.Generator) -> dict[str, Any]:
        return example(element, self.cfg, rng)


@dataclasses.dataclass
class CorruptedEval:
    """Evaluation: chunk i corrupted with a generator seeded by (seed, i), the same every pass."""

    chunks: RawChunks
    cfg: SpanConfig
    seed: int

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(index)])
        return example(self.chunks[index], self.cfg, rng)

    def padding(self) -> dict[str, np.ndarray]:
        return seq2seq_padding(self.cfg.inputs_length, self.cfg.targets_length)


def as_prefix_lm(ex: dict[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """The decoder-only form of a corrupted example: `inputs ++ targets` in one row, the
    inputs a bidirectional prefix, the loss on the targets (next-token over the row)."""
    n_in = int(ex["input_segment_ids"].sum())
    n_tgt = int(ex["target_segment_ids"].sum())
    row = np.concatenate([ex["inputs"][:n_in], ex["targets"][:n_tgt]])
    ids, seg = _pad(row, seq_len + 1)
    weights = np.zeros(seq_len, np.float32)
    weights[n_in - 1:n_in - 1 + n_tgt] = 1.0  # predicting targets[0] from the last input
    weights *= seg[1:]
    return {"inputs": ids[:-1], "targets": ids[1:], "weights": weights,
            "segment_ids": seg[:-1], "positions": np.arange(seq_len, dtype=np.int32) * seg[:-1],
            "prefix": (np.arange(seq_len) < n_in).astype(np.int32) * seg[:-1]}
