"""BERT pretraining data for the trainer: documents -> tokenizer -> sentence pairs (cached) ->
masked examples -> a resumable grain iterator, plus deterministic evaluation batches.

The pieces (readers, WordPiece, pairs, masking) live in `lm.data.bert`; this module wires them
to the loop. Batch keys follow the model's naming (`BertPretrainer`), not `lm.data.bert`'s:

  input_ids         int32 [B, L]  masked ``[CLS] A [SEP] B [SEP]``, then [PAD]
  token_types       int32 [B, L]  sentence A/B types (lm.data.bert calls them segment_ids)
  segment_ids       int32 [B, L]  1 on tokens, 0 on padding (lm.data.bert's `valid`)
  positions         int32 [B, L]
  masked_positions  int32 [B, P]  masked_ids int32 [B, P]  masked_weights float32 [B, P]
  nsp_label         int32 [B]     0 IsNext / in order, 1 NotNext / swapped, -1 none

Pairs are built once per (corpus, tokenizer, pair options, seed) and cached as .npz under
`workdir/data/bert/`, so a resumed run skips reading and tokenizing (WikiText-2, 11 MB:
5.6 s to train the vocabulary, tokenize and pair, 0.2 s from the cache; the Python tokenizer
scales linearly, so a larger corpus gains more). Masks are not cached: they are a pure
function of (seed, pair, epoch) and cost ~0.2 ms per example.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from lm.data import tokenizers as tok_lib
from lm.data.bert import (
    NO_LABEL,
    BertPretrainingSource,
    BertSpecials,
    Pair,
    make_nsp_pairs,
    read_documents,
    tokenize_documents,
)
from lm.data.sources import check_file, sha256_file

CACHE_VERSION = 1
READERS = ("auto", "wikitext", "blank_line", "labelled")
NSP_MODES = ("nsp", "sop", "none")
# Dynamic masking: epochs a source spans before masks repeat (only sets its length).
MAX_EPOCHS = 1 << 20
_EVAL_ORDER_STREAM = 0xE7A1  # the fixed shuffle of evaluation pairs
_SPLIT_STREAM = 0x5B1F  # the held-out documents when there is no val_path
BATCH_KEYS = ("input_ids", "token_types", "segment_ids", "positions", "masked_positions",
              "masked_ids", "masked_weights", "nsp_label")


@dataclasses.dataclass(frozen=True)
class BertDataOptions:
    """The `config.data` fields BERT reads, validated (a bad value names its field)."""

    path: str
    val_path: str = ""
    val_fraction: float = 0.1
    reader: str = "auto"
    tokenizer: str = "wordpiece"
    tokenizer_path: str = ""
    vocab_size: int = 8192
    seq_len: int = 128
    max_predictions: int = 20
    mask_prob: float = 0.15
    whole_word: bool = False
    dynamic_masking: bool = True
    nsp_mode: str = "nsp"
    short_seq_prob: float = 0.1
    dupe_factor: int = 1
    worker_count: int = 0
    # reader="labelled": the texts of a labelled corpus (TSV/JSONL, labels unused), split as
    # the fine-tuning objectives split it, `texts_per_document` texts to a document
    format: str = ""
    text_key: str = "text"
    label_key: str = "label"
    val_split: str = "random"
    val_size: int = 0
    split_seed: int = 0
    texts_per_document: int = 16

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"data.{field}: {why}")

        if not self.path:
            bad("path", "no corpus given (set --config.data.path=FILE)")
        if not self.val_path and not 0.0 < self.val_fraction < 1.0:
            bad("val_fraction", f"must be in (0, 1) without a val_path, got {self.val_fraction}")
        if self.reader not in READERS:
            bad("reader", f"{self.reader!r} is not one of {READERS}")
        if self.tokenizer not in tok_lib.KINDS:
            bad("tokenizer", f"{self.tokenizer!r} is not one of {tok_lib.KINDS}")
        if self.nsp_mode not in NSP_MODES:
            bad("nsp_mode", f"{self.nsp_mode!r} is not one of {NSP_MODES}")
        if self.seq_len < (4 if self.nsp_mode == "none" else 5):
            bad("seq_len", f"{self.seq_len} is too short for BERT examples")
        if not 1 <= self.max_predictions <= self.seq_len:
            bad("max_predictions", f"must be in [1, seq_len={self.seq_len}], got "
                f"{self.max_predictions}")
        if not 0.0 < self.mask_prob <= 1.0:
            bad("mask_prob", f"must be in (0, 1], got {self.mask_prob}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            bad("short_seq_prob", f"must be in [0, 1], got {self.short_seq_prob}")
        if self.dupe_factor < 1:
            bad("dupe_factor", f"must be >= 1, got {self.dupe_factor}")
        if self.whole_word and self.tokenizer != "wordpiece":
            bad("whole_word", "whole-word masking needs the 'wordpiece' tokenizer")

    @classmethod
    def from_config(cls, data_cfg: Any) -> BertDataOptions:
        """Picks this class' fields out of `config.data` (absent ones keep their defaults)."""
        values = {f.name: data_cfg[f.name] for f in dataclasses.fields(cls) if f.name in data_cfg}
        return cls(**values)


# ----------------------------------------------------------------------------- documents


def held_out_split(docs: Sequence[Any], fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random `fraction` of the documents (at least one) is held
    out; both keep file order."""
    n = len(docs)
    n_val = min(n - 1, max(1, round(fraction * n)))
    if n_val < 1:
        raise ValueError(f"data.path: {n} document(s) cannot be split into train and validation "
                         "(set data.val_path)")
    held = set(np.random.default_rng([seed, _SPLIT_STREAM]).permutation(n)[:n_val].tolist())
    return ([d for i, d in enumerate(docs) if i not in held],
            [d for i, d in enumerate(docs) if i in held])


class _Documents:
    """Train/validation documents (lists of sentences), read on first use only."""

    def __init__(self, opts: BertDataOptions, seed: int):
        self.opts, self.seed = opts, seed
        self._splits: tuple[list, list] | None = None

    def splits(self) -> tuple[list, list]:
        if self._splits is None:
            opts = self.opts
            if opts.reader == "labelled":
                self._splits = labelled_documents(opts)
                return self._splits
            train = read_documents(opts.path, opts.reader)
            if opts.val_path:
                self._splits = train, read_documents(opts.val_path, opts.reader)
            else:
                self._splits = held_out_split(train, opts.val_fraction, self.seed)
        return self._splits


def labelled_documents(opts: BertDataOptions) -> tuple[list, list]:
    """(train, validation) documents from a labelled corpus: task-adaptive pretraining
    (Gururangan et al. 2020) on exactly the texts its fine-tuning run trains on."""
    from lm.data import labelled  # noqa: PLC0415 (only this reader needs it)

    data = dataclasses.asdict(opts)
    examples = labelled.read_examples(data, opts.path, "data.path")
    train, val = labelled.split_examples(data, examples)
    k = max(opts.texts_per_document, 1)

    def documents(idx) -> list[list[str]]:
        return [[examples[i].text for i in idx[j:j + k]] for j in range(0, len(idx), k)]

    return documents(train), documents(val)


# ----------------------------------------------------------------------------- tokenizer


def get_tokenizer(opts: BertDataOptions, docs: _Documents, workdir: str, process_index: int,
                  process_count: int) -> tok_lib.Tokenizer:
    """workdir/tokenizer/ if saved there, else built by process 0 (trained on the train
    documents, or loaded from data.tokenizer_path) and read by the others after a barrier:
    WordPiece training is not bit-reproducible, so processes must not train their own."""
    directory = os.path.join(workdir, "tokenizer")
    if process_index == 0 and not os.path.exists(os.path.join(directory, tok_lib.MANIFEST)):
        corpus = None
        if not opts.tokenizer_path and opts.tokenizer != "byte":
            os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
            fd, corpus = tempfile.mkstemp(dir=os.path.join(workdir, "data"), prefix=".corpus-",
                                          suffix=".txt")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for doc in docs.splits()[0]:
                    f.writelines(s + "\n" for s in doc)
        try:
            tok_lib.build_tokenizer(opts.tokenizer, directory=directory, corpus_path=corpus,
                                    vocab_size=opts.vocab_size,
                                    model_path=opts.tokenizer_path or None)
        finally:
            if corpus:
                os.remove(corpus)
    if process_count > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415 (multi-process only)

        multihost_utils.sync_global_devices("lm.bert.tokenizer")
    return tok_lib.build_tokenizer(opts.tokenizer, directory=directory)


def bert_specials(tokenizer: tok_lib.Tokenizer) -> BertSpecials:
    """BertSpecials of a tokenizer. Non-WordPiece kinds reserve ids 0..6 (incl. <s>, </s>),
    which random MLM replacements must avoid too."""
    specials = BertSpecials.from_tokenizer(tokenizer)
    if getattr(tokenizer, "kind", "wordpiece") == "wordpiece":
        return specials
    return dataclasses.replace(specials, special_ids=tuple(range(tok_lib.NUM_SPECIALS)),
                               random_token_low=tok_lib.NUM_SPECIALS)


# ----------------------------------------------------------------------------- pair cache


def save_pairs(path: str, pairs: Sequence[Pair]) -> None:
    """Pairs as one .npz (flat token arrays + lengths), written atomically."""
    arrays = {
        "tokens_a": np.concatenate([p.tokens_a for p in pairs]).astype(np.int32),
        "tokens_b": np.concatenate([p.tokens_b for p in pairs]).astype(np.int32),
        "len_a": np.array([len(p.tokens_a) for p in pairs], np.int64),
        "len_b": np.array([len(p.tokens_b) for p in pairs], np.int64),
        "doc": np.array([p.doc for p in pairs], np.int64),
        "b_doc": np.array([p.b_doc for p in pairs], np.int64),
        "a_span": np.array([p.a_span for p in pairs], np.int64).reshape(-1, 2),
        "b_span": np.array([p.b_span for p in pairs], np.int64).reshape(-1, 2),
        "label": np.array([p.label for p in pairs], np.int64),
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def load_pairs(path: str) -> list[Pair]:
    with np.load(path) as z:
        a = np.split(z["tokens_a"], np.cumsum(z["len_a"])[:-1])
        b = np.split(z["tokens_b"], np.cumsum(z["len_b"])[:-1])
        return [Pair(int(d), (int(s[0]), int(s[1])), int(bd), (int(t[0]), int(t[1])), ta, tb,
                     int(label))
                for d, s, bd, t, ta, tb, label in zip(
                    z["doc"], z["a_span"], z["b_doc"], z["b_span"], a, b, z["label"],
                    strict=True)]


def _pairs_key(opts: BertDataOptions, seed: int, tokenizer_dir: str) -> str:
    key = {
        "version": CACHE_VERSION,
        "train": sha256_file(opts.path),
        "val": sha256_file(opts.val_path) if opts.val_path else None,
        "val_fraction": None if opts.val_path else opts.val_fraction,
        "reader": opts.reader,
        "tokenizer": tok_lib.tokenizer_fingerprint(tokenizer_dir),
        "seq_len": opts.seq_len,
        "short_seq_prob": opts.short_seq_prob,
        "nsp_mode": opts.nsp_mode,
        "dupe_factor": opts.dupe_factor,
        "seed": seed,
    }
    if opts.reader == "labelled":
        key.update({f: getattr(opts, f) for f in ("format", "text_key", "label_key", "val_split",
                                                   "val_size", "split_seed",
                                                   "texts_per_document")})
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def build_pairs(opts: BertDataOptions, docs: _Documents, tokenizer: tok_lib.Tokenizer,
                seed: int, cache_dir: str, tokenizer_dir: str) -> dict[str, list[Pair]]:
    """{'train', 'validation'} sentence pairs, from the cache when present."""
    key = _pairs_key(opts, seed, tokenizer_dir)
    paths = {s: os.path.join(cache_dir, f"{key}.{s}.npz") for s in ("train", "validation")}
    if all(os.path.exists(p) for p in paths.values()):
        return {s: load_pairs(p) for s, p in paths.items()}
    out = {}
    for (split, split_docs), split_seed in zip(
            zip(("train", "validation"), docs.splits(), strict=True), (seed, seed + 1),
            strict=True):
        tokens = tokenize_documents(split_docs, tokenizer)
        field = "path" if split == "train" or not opts.val_path else "val_path"
        if opts.nsp_mode == "nsp" and sum(1 for d in tokens if d) < 2:
            raise ValueError(f"data.{field}: the {split} split needs at least two non-empty "
                             "documents for next-sentence prediction")
        pairs = make_nsp_pairs(tokens, max_seq_len=opts.seq_len,
                               short_seq_prob=opts.short_seq_prob, nsp_mode=opts.nsp_mode,
                               seed=split_seed, dupe_factor=opts.dupe_factor)
        if not pairs:
            raise ValueError(f"data.{field}: the {split} split gave no sentence pairs")
        save_pairs(paths[split], pairs)
        out[split] = pairs
    return out


# ----------------------------------------------------------------------------- iterators


def to_model_fields(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """lm.data.bert's example -> the model's naming (see the module docstring)."""
    return {
        "input_ids": example["input_ids"],
        "token_types": example["segment_ids"],
        "segment_ids": example["valid"],
        "positions": example["positions"],
        "masked_positions": example["masked_positions"],
        "masked_ids": example["masked_ids"],
        "masked_weights": example["masked_weights"],
        "nsp_label": example["nsp_label"],
    }


class _ToModelFields(grain.transforms.Map):
    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return to_model_fields(element)


class EpochSampler:
    """grain's IndexSampler (this process' shard, reshuffled every epoch, endless) whose record
    keys also carry the epoch for dynamic masking: key = epoch * num_pairs + pair, which
    `BertPretrainingSource(dynamic=True)` reads as "pair, masked for that epoch". Static
    masking passes the pair index through. grain gives a source only the record key, so the
    epoch has to travel in it."""

    def __init__(self, num_pairs: int, *, shard_options: grain.sharding.ShardOptions,
                 seed: int, dynamic: bool):
        self.num_pairs, self.dynamic = num_pairs, dynamic
        self.shard_options = shard_options
        self.per_shard = num_pairs // shard_options.shard_count  # drop_remainder
        self._inner = grain.samplers.IndexSampler(num_pairs, shard_options, shuffle=True,
                                                  num_epochs=None, seed=seed)

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        meta = self._inner[index]
        if not self.dynamic:
            return meta
        epoch = (index // self.shard_options.shard_count) // self.per_shard % MAX_EPOCHS
        return grain.RecordMetadata(index=meta.index, rng=meta.rng,
                                    record_key=epoch * self.num_pairs + meta.record_key)

    def __repr__(self) -> str:  # grain checks it against a restored iterator's state
        return f"EpochSampler({self._inner!r}, dynamic={self.dynamic})"


def make_train_iterator(source: BertPretrainingSource, *, batch_size: int, seed: int,
                        process_index: int, process_count: int,
                        worker_count: int = 0) -> grain.DataLoaderIterator:
    """This process' batches [batch_size // process_count, ...], endless, exactly resumable
    through get_state() / set_state(). Each process sees a disjoint 1/process_count of the
    pairs per epoch (the remainder is dropped); partial batches are dropped."""
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the "
                         f"number of processes ({process_count})")
    num_pairs = len(source.pairs)
    if num_pairs < process_count:
        raise ValueError(f"data.path: {num_pairs} training pairs cannot be shared by "
                         f"{process_count} processes")
    shard = grain.sharding.ShardOptions(shard_index=process_index, shard_count=process_count,
                                        drop_remainder=True)
    sampler = EpochSampler(num_pairs, shard_options=shard, seed=seed & 0xFFFFFFFF,
                           dynamic=source.dynamic)
    loader = grain.DataLoader(
        data_source=source, sampler=sampler, shard_options=shard,
        operations=[_ToModelFields(),
                    grain.transforms.Batch(batch_size // process_count, drop_remainder=True)],
        worker_count=worker_count,
        # ~0.1 ms per example: reader threads cost more than they save on a small host.
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return iter(loader)


def padding_example(seq_len: int, max_predictions: int) -> dict[str, np.ndarray]:
    """An evaluation row that counts for nothing (no token, no masked weight, no label)."""
    out = {k: np.zeros(seq_len, np.int32) for k in BATCH_KEYS[:4]}
    out.update(masked_positions=np.zeros(max_predictions, np.int32),
               masked_ids=np.zeros(max_predictions, np.int32),
               masked_weights=np.zeros(max_predictions, np.float32),
               nsp_label=np.asarray(NO_LABEL, np.int32))
    return out


@dataclasses.dataclass(frozen=True)
class BertEvalBatches:
    """One deterministic pass over the validation pairs with static masks, in a fixed seeded
    order (so a pass capped at N batches is a random sample, the same every time). Global
    batch b holds pairs order[b*B : (b+1)*B]; process p takes rows [p*R, (p+1)*R). The last
    batch is padded with rows that count for nothing."""

    source: BertPretrainingSource
    order: np.ndarray
    batch_size: int
    process_index: int
    process_count: int

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rows = self.batch_size // self.process_count
        pad = padding_example(self.source.max_seq_len, self.source.max_predictions)
        for b in range(len(self)):
            start = b * self.batch_size + self.process_index * rows
            examples = [to_model_fields(self.source[int(self.order[i])])
                        if i < len(self.order) else pad for i in range(start, start + rows)]
            yield {k: np.stack([ex[k] for ex in examples]) for k in BATCH_KEYS}


def masked_token_baseline(batches: Iterable[dict[str, np.ndarray]]) -> tuple[int, float]:
    """(token id, accuracy) of always predicting the most frequent masked token: the MLM
    accuracy a model gets without reading its input."""
    counts: dict[int, float] = {}
    for batch in batches:
        ids, w = batch["masked_ids"].ravel(), batch["masked_weights"].ravel()
        for i, c in zip(*np.unique(ids[w > 0], return_counts=True), strict=True):
            counts[int(i)] = counts.get(int(i), 0) + int(c)
    if not counts:
        return -1, 0.0
    best = max(counts, key=counts.__getitem__)
    return best, counts[best] / sum(counts.values())


# ----------------------------------------------------------------------------- entry point


@dataclasses.dataclass
class BertData:
    tokenizer: tok_lib.Tokenizer
    train_iter: grain.DataLoaderIterator
    eval_batches: Callable[[], BertEvalBatches]
    train_source: BertPretrainingSource
    eval_source: BertPretrainingSource


def build_bert_data(opts: BertDataOptions, *, workdir: str, batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1,
                    eval_batch_size: int | None = None) -> BertData:
    """Files -> tokenizer (workdir/tokenizer/) -> pairs (cached in workdir/data/bert/) ->
    train iterator (masks from `seed`) and evaluation batches (static masks)."""
    check_file(opts.path, "data.path")
    if opts.val_path:
        check_file(opts.val_path, "data.val_path")
    if seed < 0:
        raise ValueError(f"seed: must be non-negative, got {seed}")
    docs = _Documents(opts, seed)
    tokenizer = get_tokenizer(opts, docs, workdir, process_index, process_count)
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    pairs = build_pairs(opts, docs, tokenizer, seed, os.path.join(workdir, "data", "bert"),
                        tokenizer_dir)
    specials = bert_specials(tokenizer)
    common = dict(tokenizer_specials=specials, max_seq_len=opts.seq_len,
                  max_predictions=opts.max_predictions, mask_prob=opts.mask_prob,
                  whole_word=opts.whole_word, seed=seed)
    train_source = BertPretrainingSource(pairs["train"], dynamic=opts.dynamic_masking,
                                         num_epochs=MAX_EPOCHS, **common)
    eval_source = BertPretrainingSource(pairs["validation"], dynamic=False, **common)
    logging.info("BERT data: %d train / %d validation pairs, vocabulary %d",
                 len(pairs["train"]), len(pairs["validation"]), tokenizer.vocab_size)
    train_iter = make_train_iterator(train_source, batch_size=batch_size, seed=seed,
                                     process_index=process_index, process_count=process_count,
                                     worker_count=opts.worker_count)
    order = np.random.default_rng([seed, _EVAL_ORDER_STREAM]).permutation(
        len(pairs["validation"]))

    def eval_batches() -> BertEvalBatches:
        return BertEvalBatches(eval_source, order, eval_batch_size or batch_size,
                               process_index, process_count)

    return BertData(tokenizer, train_iter, eval_batches, train_source, eval_source)
