"""BERT pretraining examples: sentence pairs for NSP/SOP and masked-LM masking.

Follows the BERT paper / reference ``create_pretraining_data`` but every random choice comes
from a generator seeded by the example's identity, so examples are reproducible and can be
built in any order (random access, exact resumption):

* pairs of document ``d`` in duplicate ``k`` use ``default_rng([seed, 0x4E5350, k, d])``;
* masking of pair ``i`` in epoch ``e`` uses ``default_rng([seed, i, e])``, with ``e = 0`` for
  static masking (the same mask every epoch) and the real epoch for dynamic masking.

Two deliberate departures from the reference, both so that NSP labels are balanced: the label
is drawn first (IsNext with probability 0.5), and a chunk holding a single sentence takes the
next sentence too, so it can always be split at a sentence boundary. A document's trailing
single sentence (and a one-sentence document) therefore yields no pair of its own; it still
serves as a random B of other documents' NotNext pairs.

Labels follow Hugging Face ``BertForPreTraining``: 0 = B follows A (IsNext / in order),
1 = B is random (NotNext) or, in SOP mode, A and B are swapped; -1 when there is no label.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from lm.data.documents import looks_like_wikitext, read_blank_line_documents, read_wikitext

NspMode = Literal["nsp", "sop", "none"]
IS_NEXT, NOT_NEXT, NO_LABEL = 0, 1, -1
_PAIR_STREAM = 0x4E5350  # separates pair-creation seeds from masking seeds


class _SpecialsTokenizer(Protocol):
    vocab_size: int

    def special_id(self, token: str) -> int | None: ...


@dataclass(frozen=True, eq=False)
class Pair:
    """One example before masking. Spans are half-open sentence ranges [start, end) of
    the source documents, before truncation; `tokens_a`/`tokens_b` are after truncation.
    In SOP negatives A is the later span. In 'none' mode B is empty and b_doc is -1."""

    doc: int
    a_span: tuple[int, int]
    b_doc: int
    b_span: tuple[int, int]
    tokens_a: np.ndarray
    tokens_b: np.ndarray
    label: int


@dataclass(frozen=True, eq=False)
class BertSpecials:
    """The token ids example building needs. `random_token_low`: random MLM replacements are
    drawn from [random_token_low, vocab_size) minus `special_ids`. `continuation[id]` is True
    for word-continuing pieces (``##x``); needed only for whole-word masking."""

    vocab_size: int
    pad_id: int
    cls_id: int
    sep_id: int
    mask_id: int
    special_ids: tuple[int, ...]
    random_token_low: int
    continuation: np.ndarray | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: _SpecialsTokenizer) -> BertSpecials:
        """Reads the ids from a project tokenizer; it must have [CLS], [SEP] and [MASK]."""
        ids = {}
        for name in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>"):
            ids[name] = tokenizer.special_id(name)  # every reserved id stays unmasked
        lacking = [n for n in ("[CLS]", "[SEP]", "[MASK]") if ids[n] is None]
        if lacking:
            raise ValueError(f"tokenizer has no {lacking} tokens, which BERT examples need")
        specials = tuple(sorted({i for i in ids.values() if i is not None}))
        low = getattr(tokenizer, "first_regular_id", max(specials) + 1)
        cont = getattr(tokenizer, "continuation_mask", None)
        return cls(
            vocab_size=tokenizer.vocab_size, pad_id=ids["[PAD]"] or 0, cls_id=ids["[CLS]"],
            sep_id=ids["[SEP]"], mask_id=ids["[MASK]"], special_ids=specials,
            random_token_low=low, continuation=None if cont is None else np.asarray(cont, bool),
        )


# ---------------------------------------------------------------------------- pairs


def _trim_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """How many tokens to drop from A and B: the longer side loses one token at a time
    (B on ties), as the reference's truncate_seq_pair does."""
    drop_a = drop_b = 0
    while len_a - drop_a + len_b - drop_b > max_tokens:
        if len_a - drop_a > len_b - drop_b:
            drop_a += 1
        else:
            drop_b += 1
    return drop_a, drop_b


def _trim(tokens: np.ndarray, drop: int, rng: np.random.Generator) -> np.ndarray:
    """Drops `drop` tokens, each one from the front or the back with probability 1/2."""
    if drop == 0:
        return tokens
    front = int(rng.binomial(drop, 0.5))
    return tokens[front : len(tokens) - (drop - front)]


def _concat(sentences: Sequence[Sequence[int]], start: int, end: int) -> np.ndarray:
    parts = [np.asarray(s, dtype=np.int32) for s in sentences[start:end]]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def _document_pairs(
    docs: Sequence[Sequence[Sequence[int]]],
    d: int,
    others: np.ndarray,
    rng: np.random.Generator,
    max_seq_len: int,
    short_seq_prob: float,
    nsp_mode: NspMode,
) -> list[Pair]:
    doc = docs[d]
    lengths = [len(s) for s in doc]
    max_tokens = max_seq_len - (2 if nsp_mode == "none" else 3)
    target = max_tokens
    if rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    pairs: list[Pair] = []
    start = i = 0
    length = 0
    while i < len(doc):
        length += lengths[i]
        if not (i == len(doc) - 1 or length >= target):
            i += 1
            continue
        end = i + 1  # chunk = sentences [start, end)
        if nsp_mode == "none":
            tokens = _concat(doc, start, end)
            tokens = _trim(tokens, max(0, len(tokens) - max_tokens), rng)
            if len(tokens):
                pairs.append(Pair(d, (start, end), -1, (end, end), tokens,
                                  np.zeros(0, np.int32), NO_LABEL))
            start = i = end
            length = 0
            continue
        if end - start == 1 and end < len(doc):
            end += 1  # a lone (long) sentence takes its successor, so it can be split
        if end - start < 2:
            start = i = end  # a trailing single sentence: no pair
            length = 0
            continue
        a_end = int(rng.integers(start + 1, end))  # A = [start, a_end), at least one sentence
        negative = rng.random() < 0.5
        tokens_a = _concat(doc, start, a_end)
        if nsp_mode == "nsp" and negative:
            j = int(rng.integers(0, len(others) - 1))  # uniform over the others but d
            b_doc = int(others[j + (j >= np.searchsorted(others, d))])
            b_sentences = docs[b_doc]
            target_b = max(1, target - len(tokens_a))
            b_start = b_end = int(rng.integers(0, len(b_sentences)))
            b_len = 0
            while b_end < len(b_sentences) and b_len < target_b:
                b_len += len(b_sentences[b_end])
                b_end += 1
            tokens_b = _concat(b_sentences, b_start, b_end)
            a_span, b_span, label = (start, a_end), (b_start, b_end), NOT_NEXT
            next_start = a_end  # the unused sentences of the chunk are put back
        else:
            b_doc = d
            tokens_b = _concat(doc, a_end, end)
            a_span, b_span, label = (start, a_end), (a_end, end), IS_NEXT
            if nsp_mode == "sop" and negative:
                tokens_a, tokens_b = tokens_b, tokens_a
                a_span, b_span, label = b_span, a_span, NOT_NEXT
            next_start = end
        drop_a, drop_b = _trim_lengths(len(tokens_a), len(tokens_b), max_tokens)
        tokens_a, tokens_b = _trim(tokens_a, drop_a, rng), _trim(tokens_b, drop_b, rng)
        if len(tokens_a) and len(tokens_b):
            pairs.append(Pair(d, a_span, b_doc, b_span, tokens_a, tokens_b, label))
        start = i = next_start
        length = 0
    return pairs


def make_nsp_pairs(
    docs_tokens: Sequence[Sequence[Sequence[int]]],
    *,
    max_seq_len: int,
    short_seq_prob: float = 0.1,
    nsp_mode: NspMode = "nsp",
    seed: int,
    dupe_factor: int = 1,
) -> list[Pair]:
    """Documents of tokenized sentences -> sentence pairs (see the module docstring).

    Sentences of a document are gathered into chunks of about `max_seq_len - 3` tokens (with
    probability `short_seq_prob` a shorter target drawn from [2, max]); each chunk is split at
    a random sentence boundary into A and B. 'nsp': with probability 1/2 B is replaced by
    sentences from a random other document (label 1) and the chunk's unused sentences are put
    back. 'sop': with probability 1/2 A and B are swapped (label 1). 'none': the chunk is one
    segment (max_seq_len - 2 tokens, label -1). Pairs are trimmed to fit, longer side first,
    each token from the front or back at random. `dupe_factor` repeats the whole pass with
    different random choices, as the reference does.
    """
    if nsp_mode not in ("nsp", "sop", "none"):
        raise ValueError(f"nsp_mode must be 'nsp', 'sop' or 'none', got {nsp_mode!r}")
    if max_seq_len < (4 if nsp_mode == "none" else 5):
        raise ValueError(f"max_seq_len={max_seq_len} is too short for BERT examples")
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    others = np.array([d for d, doc in enumerate(docs_tokens) if len(doc)], dtype=np.int64)
    if nsp_mode == "nsp" and len(others) < 2:
        raise ValueError("next-sentence prediction needs at least two non-empty documents")
    pairs: list[Pair] = []
    for k in range(dupe_factor):
        for d in range(len(docs_tokens)):
            rng = np.random.default_rng([seed, _PAIR_STREAM, k, d])
            pairs.extend(_document_pairs(
                docs_tokens, d, others, rng, max_seq_len, short_seq_prob, nsp_mode))
    return pairs


def encode_pair(pair: Pair, specials: BertSpecials, max_seq_len: int) -> dict[str, np.ndarray]:
    """``[CLS] A [SEP] B [SEP]`` (or ``[CLS] A [SEP]`` without B), padded with [PAD].

    segment_ids: 0 on [CLS], A and its [SEP]; 1 on B and its [SEP]; 0 on padding.
    valid: 1 on real tokens, 0 on padding."""
    a, b = pair.tokens_a, pair.tokens_b
    n = len(a) + len(b) + (3 if len(b) else 2)
    if n > max_seq_len:
        raise ValueError(f"pair of {n} tokens does not fit max_seq_len={max_seq_len}")
    input_ids = np.full(max_seq_len, specials.pad_id, np.int32)
    segment_ids = np.zeros(max_seq_len, np.int32)
    input_ids[0] = specials.cls_id
    input_ids[1 : 1 + len(a)] = a
    input_ids[1 + len(a)] = specials.sep_id
    if len(b):
        b0 = 2 + len(a)
        input_ids[b0 : b0 + len(b)] = b
        input_ids[b0 + len(b)] = specials.sep_id
        segment_ids[b0:n] = 1
    valid = np.zeros(max_seq_len, np.int32)
    valid[:n] = 1
    return {
        "input_ids": input_ids,
        "segment_ids": segment_ids,
        "valid": valid,
        "attention_mask": valid,
        "nsp_label": np.asarray(pair.label, np.int32),
    }


# ---------------------------------------------------------------------------- masking


def _continuation_flags(
    ids: np.ndarray, is_continuation: np.ndarray | Callable[[int], bool]
) -> np.ndarray:
    if callable(is_continuation):
        return np.array([bool(is_continuation(int(i))) for i in ids], dtype=bool)
    return np.asarray(is_continuation, bool)[ids]


def mask_tokens(
    input_ids: np.ndarray,
    valid: np.ndarray,
    *,
    rng: np.random.Generator,
    vocab_size: int,
    mask_id: int,
    special_ids: Sequence[int],
    mask_prob: float = 0.15,
    max_predictions: int = 20,
    whole_word: bool = False,
    is_continuation: np.ndarray | Callable[[int], bool] | None = None,
    random_token_low: int = 0,
) -> dict[str, np.ndarray]:
    """BERT masked-LM corruption of one sequence.

    Picks ``k = min(max_predictions, max(1, round(mask_prob * n)))`` of the n eligible
    positions (real, non-special tokens). With `whole_word`, a piece flagged by
    `is_continuation` (lookup array by id, or callable) joins the word of the eligible piece
    just before it; words are taken in random order, all their pieces or none, skipping a
    word that would exceed k. Each chosen token becomes [MASK] (80 %), a random token from
    [random_token_low, vocab_size) other than `special_ids` (10 %) or stays (10 %).
    Returns masked `input_ids` and, padded to `max_predictions`, `masked_positions` (int32,
    ascending, padding 0), `masked_ids` (original ids) and `masked_weights` (float32 1/0).
    """
    ids = np.asarray(input_ids)
    specials = np.asarray(sorted(special_ids), dtype=ids.dtype)
    eligible = (np.asarray(valid) != 0) & ~np.isin(ids, specials)
    cand = np.flatnonzero(eligible)
    n = len(cand)
    k = min(max_predictions, max(1, math.floor(mask_prob * n + 0.5))) if n else 0
    if not whole_word:
        chosen = np.sort(rng.choice(cand, size=k, replace=False)) if k else cand[:0]
    else:
        if is_continuation is None:
            raise ValueError("whole-word masking needs is_continuation (e.g. a WordPiece "
                             "tokenizer's continuation_mask)")
        cont = _continuation_flags(ids[cand], is_continuation)
        # A piece starts a new word unless it is a continuation right after an eligible piece.
        starts = ~cont
        starts[1:] |= cand[1:] != cand[:-1] + 1
        if n:
            starts[0] = True
        words = np.split(cand, np.flatnonzero(starts)[1:]) if n else []
        picked: list[np.ndarray] = []
        count = 0
        for w in rng.permutation(len(words)):
            if count >= k:
                break
            if count + len(words[w]) > k:
                continue
            picked.append(words[w])
            count += len(words[w])
        chosen = np.sort(np.concatenate(picked)) if picked else cand[:0]
    m = len(chosen)
    out = ids.copy()
    u = rng.random(m)
    replacement = rng.integers(random_token_low, vocab_size, size=m)
    bad = np.isin(replacement, specials)
    while bad.any():  # rare: only when a special id lies in the replacement range
        replacement[bad] = rng.integers(random_token_low, vocab_size, size=int(bad.sum()))
        bad = np.isin(replacement, specials)
    out[chosen] = np.where(u < 0.8, mask_id, np.where(u < 0.9, replacement, ids[chosen]))
    positions = np.zeros(max_predictions, np.int32)
    masked_ids = np.zeros(max_predictions, np.int32)
    weights = np.zeros(max_predictions, np.float32)
    positions[:m] = chosen
    masked_ids[:m] = ids[chosen]
    weights[:m] = 1.0
    return {
        "input_ids": out,
        "masked_positions": positions,
        "masked_ids": masked_ids,
        "masked_weights": weights,
    }


def make_mlm_example(
    pairs: Sequence[Pair],
    pair_index: int,
    epoch: int,
    *,
    specials: BertSpecials,
    max_seq_len: int,
    max_predictions: int = 20,
    mask_prob: float = 0.15,
    whole_word: bool = False,
    dynamic: bool = False,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The full training example of pair `pair_index`: encoded, then masked with
    ``default_rng([seed, pair_index, epoch if dynamic else 0])``. Fixed shapes:
    input_ids, segment_ids, valid, positions [L] int32; masked_positions, masked_ids [P]
    int32; masked_weights [P] float32; nsp_label [] int32."""
    example = encode_pair(pairs[pair_index], specials, max_seq_len)
    rng = np.random.default_rng([seed, pair_index, epoch if dynamic else 0])
    masked = mask_tokens(
        example["input_ids"], example["valid"], rng=rng, vocab_size=specials.vocab_size,
        mask_id=specials.mask_id, special_ids=specials.special_ids, mask_prob=mask_prob,
        max_predictions=max_predictions, whole_word=whole_word,
        is_continuation=specials.continuation, random_token_low=specials.random_token_low,
    )
    return {
        "input_ids": masked["input_ids"],
        "segment_ids": example["segment_ids"],
        "valid": example["valid"],
        "positions": np.arange(max_seq_len, dtype=np.int32),
        "masked_positions": masked["masked_positions"],
        "masked_ids": masked["masked_ids"],
        "masked_weights": masked["masked_weights"],
        "nsp_label": example["nsp_label"],
    }


class BertPretrainingSource:
    """Random-access (grain ``RandomAccessDataSource``-compatible) BERT examples.

    How dynamic masking gets its epoch: grain samplers pass record keys in [0, len), with no
    epoch. So with ``dynamic=True`` the source is `num_epochs` times longer: record key r is
    pair ``r % len(pairs)`` masked for epoch ``r // len(pairs)``. Sample it for one epoch
    (``IndexSampler(len(source), ..., num_epochs=1)``) to see every pair `num_epochs` times,
    each time with a fresh mask. Static masking ignores `num_epochs` (length = len(pairs)).
    Items depend only on (seed, record key), so any order, worker count or resume point
    gives the same examples.
    """

    def __init__(
        self,
        pairs: Sequence[Pair],
        tokenizer_specials: BertSpecials,
        max_seq_len: int,
        max_predictions: int = 20,
        mask_prob: float = 0.15,
        whole_word: bool = False,
        dynamic: bool = False,
        seed: int = 0,
        num_epochs: int = 1,
    ) -> None:
        if not pairs:
            raise ValueError("BertPretrainingSource needs at least one pair")
        if whole_word and tokenizer_specials.continuation is None:
            raise ValueError("whole_word masking needs BertSpecials.continuation")
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1, got {num_epochs}")
        self.pairs = pairs
        self.specials = tokenizer_specials
        self.max_seq_len = max_seq_len
        self.max_predictions = max_predictions
        self.mask_prob = mask_prob
        self.whole_word = whole_word
        self.dynamic = dynamic
        self.seed = seed
        self.num_epochs = num_epochs if dynamic else 1

    def __len__(self) -> int:
        return len(self.pairs) * self.num_epochs

    def __getitem__(self, record_key: int) -> dict[str, np.ndarray]:
        record_key = int(record_key)
        if not 0 <= record_key < len(self):
            raise IndexError(f"record key {record_key} out of range [0, {len(self)})")
        epoch, index = divmod(record_key, len(self.pairs))
        return make_mlm_example(
            self.pairs, index, epoch, specials=self.specials, max_seq_len=self.max_seq_len,
            max_predictions=self.max_predictions, mask_prob=self.mask_prob,
            whole_word=self.whole_word, dynamic=self.dynamic, seed=self.seed,
        )

    def __repr__(self) -> str:
        return (f"BertPretrainingSource(pairs={len(self.pairs)}, epochs={self.num_epochs}, "
                f"max_seq_len={self.max_seq_len}, dynamic={self.dynamic}, seed={self.seed})")


# ---------------------------------------------------------------------------- convenience


class _EncodingTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


def tokenize_documents(
    docs: Sequence[Sequence[str]], tokenizer: _EncodingTokenizer
) -> list[list[list[int]]]:
    """Encodes every sentence; sentences that encode to nothing are dropped."""
    out = []
    for doc in docs:
        encoded = (tokenizer.encode(s) for s in doc)
        out.append([ids for ids in encoded if ids])
    return out


def read_documents(
    path: str | os.PathLike, reader: Literal["auto", "wikitext", "blank_line"] = "auto"
) -> list[list[str]]:
    """Reads one corpus file; 'auto' picks WikiText when the first non-blank line is a
    ``" = Title = "`` line, else blank-line-separated documents."""
    if reader == "auto":
        if not Path(path).is_file():
            raise FileNotFoundError(f"corpus file not found: {path}")
        reader = "wikitext" if looks_like_wikitext(path) else "blank_line"
    if reader == "wikitext":
        return read_wikitext(path)
    if reader == "blank_line":
        return read_blank_line_documents(path)
    raise ValueError(f"unknown reader {reader!r}")


def build_bert_examples(
    doc_paths_or_docs: Sequence[str | os.PathLike] | Sequence[Sequence[str]] | str | os.PathLike,
    tokenizer: _EncodingTokenizer,
    *,
    max_seq_len: int = 128,
    short_seq_prob: float = 0.1,
    nsp_mode: NspMode = "nsp",
    seed: int = 0,
    dupe_factor: int = 1,
    reader: Literal["auto", "wikitext", "blank_line"] = "auto",
) -> list[Pair]:
    """Corpus files (read with `read_documents`) or documents of sentence strings ->
    tokenized sentence pairs (`make_nsp_pairs`). Nothing is cached on disk."""
    if isinstance(doc_paths_or_docs, str | os.PathLike):
        doc_paths_or_docs = [doc_paths_or_docs]
    docs: list[Any] = []
    for item in doc_paths_or_docs:
        if isinstance(item, str | os.PathLike):
            docs.extend(read_documents(item, reader))
        else:
            docs.append(list(item))
    return make_nsp_pairs(
        tokenize_documents(docs, tokenizer), max_seq_len=max_seq_len,
        short_seq_prob=short_seq_prob, nsp_mode=nsp_mode, seed=seed, dupe_factor=dupe_factor,
    )
