"""grain pipelines for causal-LM pretraining: tokenize once, cut fixed windows, batch, resume.

A split is tokenized once into a flat int32 token array (documents separated by `</s>`) plus a
parallel document-index array, cached as .npy files. Window i is tokens[i*L : i*L + L + 1]; an
example is

  inputs   int32 [L]  window[:-1]
  targets  int32 [L]  window[1:]
  weights  float32 [L]  1 where the target counts in the loss, 0 otherwise
  segment_ids int32 [L]  'chunk': all 1; 'documents': 1, 2, ... per document in the window
  positions int32 [L]  'chunk': 0..L-1; 'documents': restart at 0 at each document start

In 'documents' mode the target that crosses a document boundary (the input is the last token
of a document, the `</s>`) gets weight 0. Padding rows (eval only) are all 0, weights included.
Batches are dicts of numpy arrays [rows, L] with rows = batch_size // process_count.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grain
import jax
import numpy as np

from lm.data import sources as sources_lib
from lm.data import tokenizers as tok_lib

PACK_MODES = ("chunk", "documents")
# Trained tokenizers see at most this much of the train split (SentencePiece samples lines anyway).
TOKENIZER_CORPUS_MAX_CHARS = 100_000_000
FIELDS = ("inputs", "targets", "weights", "segment_ids", "positions")


# ----------------------------------------------------------------------------- tokenization


def _save_npy_atomic(path: str, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    with os.fdopen(fd, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def tokenize_texts(
    texts: Iterable[str], tokenizer: tok_lib.Tokenizer, *, joined: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 tokens and document indices of a split.

    `joined`: the texts are pieces of one document (no separators). Otherwise each text is a
    document; documents are separated by `</s>` (`[SEP]` for tokenizers without one), which
    belongs to the document it ends. Empty documents are skipped.
    """
    eos = tokenizer.special_id("</s>")
    eos = tokenizer.special_id("[SEP]") if eos is None else eos  # e.g. WordPiece has no </s>
    if eos is None and not joined:
        raise ValueError("the tokenizer has neither '</s>' nor '[SEP]' to separate documents")
    tokens: list[np.ndarray] = []
    docs: list[np.ndarray] = []
    num_docs = 0
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int32)
        if not len(ids):
            continue
        if joined:
            num_docs = 1
        else:
            if num_docs:  # close the previous document
                tokens.append(np.array([eos], np.int32))
                docs.append(np.array([num_docs - 1], np.int32))
            num_docs += 1
        tokens.append(ids)
        docs.append(np.full(len(ids), num_docs - 1, np.int32))
    if not tokens:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(tokens), np.concatenate(docs)


def tokenize_split(
    split: sources_lib.TextSplit,
    tokenizer: tok_lib.Tokenizer,
    *,
    cache_dir: str | None = None,
    tokenizer_key: str = "",
) -> tuple[np.ndarray, np.ndarray, str | None]:
    """`tokenize_texts` over a split, cached as two .npy files (memory-mapped on reuse).

    The cache key is (split fingerprint, tokenizer_key): a different tokenizer or different data
    never reuses stale tokens. Returns (tokens, doc_ids, cache path prefix or None).
    """
    prefix = None
    if cache_dir is not None:
        if not tokenizer_key:
            raise ValueError("tokenize_split: a cache needs a tokenizer_key")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", split.fingerprint)
        prefix = os.path.join(cache_dir, name, tokenizer_key[:16])
        if os.path.exists(prefix + ".tokens.npy") and os.path.exists(prefix + ".docs.npy"):
            tokens, docs = _load_cached(prefix)
            return tokens, docs, prefix
    tokens, docs = tokenize_texts(split.texts(), tokenizer, joined=split.joined)
    if prefix is not None:
        os.makedirs(os.path.dirname(prefix), exist_ok=True)
        _save_npy_atomic(prefix + ".docs.npy", docs)
        _save_npy_atomic(prefix + ".tokens.npy", tokens)  # written last: marks the pair done
    return tokens, docs, prefix


def _load_cached(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.load(prefix + ".tokens.npy", mmap_mode="r"),
        np.load(prefix + ".docs.npy", mmap_mode="r"),
    )


# ----------------------------------------------------------------------------- windows


def pack_window(window: np.ndarray, docs: np.ndarray | None) -> dict[str, np.ndarray]:
    """One example from L+1 tokens; `docs` (L+1 document indices) selects 'documents' mode."""
    length = len(window) - 1
    example = {
        "inputs": np.asarray(window[:-1], np.int32),
        "targets": np.asarray(window[1:], np.int32),
    }
    if docs is None:
        example["weights"] = np.ones(length, np.float32)
        example["segment_ids"] = np.ones(length, np.int32)
        example["positions"] = np.arange(length, dtype=np.int32)
        return example
    docs = np.asarray(docs)
    starts = np.concatenate([[True], docs[1:length] != docs[: length - 1]])
    idx = np.arange(length, dtype=np.int32)
    example["weights"] = (docs[1:] == docs[:-1]).astype(np.float32)
    example["segment_ids"] = np.cumsum(starts, dtype=np.int32)
    example["positions"] = idx - np.maximum.accumulate(np.where(starts, idx, 0)).astype(np.int32)
    return example


def padding_example(seq_len: int) -> dict[str, np.ndarray]:
    """A row that counts for nothing: every field 0 (segment 0 marks padding)."""
    return {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in FIELDS}


class LMWindows:
    """Random-access grain data source of fixed-length LM windows over a token array.

    Picklable cheaply when built from a cache prefix: workers re-open the memory maps.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        doc_ids: np.ndarray | None,
        seq_len: int,
        *,
        pack: str = "chunk",
        cache_prefix: str | None = None,
        stride: int = 0,
    ):
        """`stride` between window starts (0 = seq_len: non-overlapping). A stride of 1
        makes every offset a window, so shuffled training sees windows at random offsets,
        as nanoGPT's sampler does, instead of the same aligned chunks every epoch."""
        if pack not in PACK_MODES:
            raise ValueError(f"data.pack: unknown mode {pack!r} (expected one of {PACK_MODES})")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if pack == "documents" and (doc_ids is None or len(doc_ids) != len(tokens)):
            raise ValueError("data.pack='documents' needs document indices for every token")
        self.tokens, self.doc_ids = tokens, doc_ids
        self.seq_len, self.pack, self.cache_prefix = seq_len, pack, cache_prefix
        self.stride = stride or seq_len

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1 - self.seq_len) // self.stride + 1)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        lo = index * self.stride
        hi = lo + self.seq_len + 1
        docs = self.doc_ids[lo:hi] if self.pack == "documents" else None
        return pack_window(self.tokens[lo:hi], docs)

    def batch(self, keys: list[int]) -> dict[str, np.ndarray]:
        """The windows `keys`, stacked: one gather in 'chunk' mode, else window by window."""
        if self.pack == "documents":
            return stack_records([self[k] for k in keys])
        starts = np.asarray(keys, np.int64)
        if starts.size and not (0 <= starts.min() and starts.max() < len(self)):
            raise IndexError(f"windows {keys} out of range [0, {len(self)})")
        tokens = np.asarray(self.tokens[(starts * self.stride)[:, None]
                                        + np.arange(self.seq_len + 1)], np.int32)
        n = len(keys)
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                "weights": np.ones((n, self.seq_len), np.float32),
                "segment_ids": np.ones((n, self.seq_len), np.int32),
                "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32),
                                             (n, self.seq_len)).copy()}

    def padding(self) -> dict[str, np.ndarray]:
        """An all-zero row (weights 0) that fills the last eval batch."""
        return padding_example(self.seq_len)

    def __repr__(self) -> str:
        return f"LMWindows(windows={len(self)}, seq_len={self.seq_len}, pack={self.pack!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if self.cache_prefix is not None:
            state["tokens"] = state["doc_ids"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self.tokens is None:
            self.tokens, self.doc_ids = _load_cached(self.cache_prefix)


# ----------------------------------------------------------------------------- iterators


def _rows_per_process(batch_size: int, process_count: int) -> int:
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"train.batch_size={batch_size} must be a positive multiple of the number of "
            f"processes ({process_count}): each process feeds batch_size // process_count rows"
        )
    return batch_size // process_count


class GlobalBatchRows:
    """A sampler over this process' rows of each global batch of `inner`'s order: local
    step k is row k % R of global batch k // R, i.e. global position
    (k // R) * B + process_index * R + k % R with R = B // process_count. Each process reads
    only its own records, yet P processes together see exactly the batches one would."""

    def __init__(self, inner: grain.samplers.IndexSampler, batch_size: int,
                 process_index: int, process_count: int):
        self.inner, self.batch_size = inner, batch_size
        self.rows = batch_size // process_count
        self.offset = process_index * self.rows

    def __len__(self) -> int:
        return len(self.inner) // self.batch_size * self.rows

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        batch, row = divmod(index, self.rows)
        meta = self.inner[batch * self.batch_size + self.offset + row]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:  # grain checks it against a restored iterator's state
        return (f"GlobalBatchRows({self.inner!r}, batch_size={self.batch_size}, "
                f"rows={self.rows}, offset={self.offset})")


def make_train_iterator(
    source: LMWindows,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    process_index: int,
    process_count: int,
    worker_count: int = 0,
    transforms: tuple[grain.transforms.Transformation, ...] = (),
) -> SampledBatches | grain.DataLoaderIterator:
    """This process' training batches [batch_size // process_count, L], resumable exactly.

    `transforms` run on each record before batching; a `grain.transforms.RandomMap` gets a
    generator fixed by the seed and the record's position in the stream (new every epoch,
    the same after a resume).

    Every process walks the same seeded global order and reads only its rows of each global
    batch (`GlobalBatchRows`), so the global batch, and hence training, does not depend on
    the number of processes; partial batches are dropped. Save/restore with the iterator's
    get_state() / set_state().
    """
    rows = _rows_per_process(batch_size, process_count)
    if len(source) < process_count:
        raise ValueError(
            f"{len(source)} training windows cannot be shared by {process_count} processes "
            "(more data or a shorter seq_len needed)"
        )
    sampler = GlobalBatchRows(grain.samplers.IndexSampler(
        num_records=len(source),
        shard_options=grain.sharding.NoSharding(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed & 0xFFFFFFFF,  # grain wants a non-negative 32-bit seed
    ), batch_size, process_index, process_count)
    if not transforms and worker_count == 0:
        return SampledBatches(source, sampler, rows)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.sharding.NoSharding(),  # the sampler yields only this process' rows
        operations=[*transforms, grain.transforms.Batch(rows, drop_remainder=True)],
        worker_count=worker_count,
        # A window costs ~10 us to cut: grain's default 16 reader threads with a 500-deep
        # prefetch cost more than they save (10 ms vs 2 ms per 32x512 batch on 2 vCPUs).
        read_options=grain.ReadOptions(num_threads=0, prefetch_buffer_size=0),
    )
    return iter(loader)


def stack_records(records: list[Any]) -> Any:
    """Records (dicts of arrays, nested or not) stacked field by field, as grain's Batch."""
    return jax.tree.map(lambda *xs: np.stack(xs), *records)


class SampledBatches:
    """The batches `grain.DataLoader` yields for a source without per-record transforms
    or worker processes (records `sampler[i]`, `rows` at a time, partial batches dropped),
    without grain's per-record pipeline: a `char_lm:baby` batch of 12 windows took 0.78 ms
    through grain, ~0.25 ms here (the sampler's shuffled index is most of it). A source
    with `batch(keys)` cuts the whole batch at once. `get_state` / `set_state` write and
    read grain's iterator state, so a checkpoint of either resumes the other exactly."""

    def __init__(self, source: Any, sampler: GlobalBatchRows, rows: int):
        self.source, self.sampler, self.rows = source, sampler, rows
        self._cut = getattr(source, "batch", None) or (
            lambda keys: stack_records([source[k] for k in keys]))
        self._next = 0  # the next record index in the sampler's order

    def __iter__(self) -> SampledBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self._next
        if start + self.rows > len(self.sampler):
            raise StopIteration
        keys = [self.sampler[i].record_key for i in range(start, start + self.rows)]
        self._next = start + self.rows
        return self._cut(keys)

    def _reprs(self) -> dict[str, str]:
        """What grain's state names the sampler and source by (grain's private rule)."""
        source = self.source
        shown = str(type(source)) if isinstance(source, list | tuple | np.ndarray) else repr(
            source)
        return {"sampler": repr(self.sampler), "data_source": shown}

    def get_state(self) -> bytes:
        state = {"version": 2, "last_seen_indices": {"0": self._next - 1},
                 "last_worker_index": -1, "worker_count": 0, **self._reprs()}
        return json.dumps(state, indent=4).encode()  # grain's format, byte for byte

    def set_state(self, state: bytes) -> None:
        loaded = json.loads(state.decode())
        if loaded.get("worker_count") != 0:
            raise ValueError(f"data state: written with {loaded.get('worker_count')} grain "
                             "workers, this run reads in-process (data.worker_count=0)")
        for key, want in self._reprs().items():
            if loaded.get(key) != want:
                raise ValueError(f"data state: the checkpoint's {key} {loaded.get(key)!r} "
                                 f"is not this run's {want!r}")
        self._next = int(loaded["last_seen_indices"]["0"]) + 1


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """A deterministic full pass over a source in order, re-iterable, the same on every call.

    Global batch b holds examples [b*B, (b+1)*B); process p gets rows [p*R, (p+1)*R) of it
    (R = B // process_count). The last partial batch is padded with `source.padding()` rows
    (which count for nothing), so every example counts exactly once and every process yields
    the same number of batches. Any random-access source with `padding()` works.
    """

    source: Any
    batch_size: int
    max_batches: int | None
    process_index: int
    process_count: int

    def __len__(self) -> int:
        n = -(-len(self.source) // self.batch_size)
        return n if self.max_batches is None else min(n, self.max_batches)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        rows = self.batch_size // self.process_count
        pad = self.source.padding()
        for b in range(len(self)):
            start = b * self.batch_size + self.process_index * rows
            examples = [
                self.source[i] if i < len(self.source) else pad for i in range(start, start + rows)
            ]
            yield stack_records(examples)


def make_eval_batches(
    source: LMWindows,
    *,
    batch_size: int,
    max_batches: int | None = None,
    process_index: int,
    process_count: int,
) -> EvalBatches:
    """Unshuffled, padded eval batches (see `EvalBatches`); `max_batches` caps the pass."""
    _rows_per_process(batch_size, process_count)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"eval max_batches must be >= 1 or None, got {max_batches}")
    return EvalBatches(source, batch_size, max_batches, process_index, process_count)


# ----------------------------------------------------------------------------- entry point


@dataclasses.dataclass
class LMData:
    """What the trainer needs from the data layer."""

    tokenizer: tok_lib.Tokenizer
    train_iter: SampledBatches | grain.DataLoaderIterator
    eval_batches: Callable[[], Iterable[dict[str, np.ndarray]]]
    num_train_windows: int
    train_source: LMWindows
    eval_source: LMWindows


def _open_splits(data_cfg: Any, data_dir: str) -> dict[str, sources_lib.TextSplit]:
    path, tfds_name = data_cfg.get("path", ""), data_cfg.get("tfds_name", "")
    if not path and data_cfg.get("python_stdlib", False):
        return sources_lib.load_python_stdlib(
            include_tests=data_cfg.get("stdlib_tests", False),
            val_fraction=data_cfg.get("val_fraction", 0.05),
        )
    if not path and data_cfg.get("url", ""):
        path = sources_lib.fetch_url(data_cfg.url, data_cfg.get("sha256", ""))
    if path:
        return sources_lib.load_local_text(
            path,
            data_dir=data_dir,
            val_path=data_cfg.get("val_path", ""),
            val_fraction=data_cfg.get("val_fraction", 0.1),
            doc_separator=data_cfg.get("doc_separator", ""),
        )
    if tfds_name:
        return sources_lib.load_tfds_catalogue(
            tfds_name,
            data_dir=data_cfg.get("tfds_data_dir", ""),
            text_key=data_cfg.get("text_key", "text"),
        )
    raise ValueError(
        "data.path: no data source given (set --config.data.path=FILE, data.url or "
        "data.tfds_name)"
    )


def _extra_texts(paths: str) -> Iterator[str]:
    """Lines of the comma-separated `data.tokenizer_extra_corpus` files (.gz read too)."""
    import gzip  # noqa: PLC0415

    for path in filter(None, (p.strip() for p in paths.split(","))):
        sources_lib.check_file(path, "data.tokenizer_extra_corpus")
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            yield from f


def _write_corpus(split: sources_lib.TextSplit, directory: str, extra: str = "") -> str:
    """The train split (+ `extra` files: text the vocabulary must also cover, such as a later
    fine-tuning language) as a text file (capped) for tokenizer training; caller deletes it."""
    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=directory, prefix=".corpus-", suffix=".txt")
    written = 0
    texts = itertools.chain(split.texts(), _extra_texts(extra))
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        for text in texts:
            if not split.joined and not text.endswith("\n"):
                text += "\n"  # one document never shares a line with the next
            f.write(text[: TOKENIZER_CORPUS_MAX_CHARS - written])
            written += len(text)
            if written >= TOKENIZER_CORPUS_MAX_CHARS:
                break
    return path


def _get_tokenizer(data_cfg: Any, train: sources_lib.TextSplit, workdir: str) -> tok_lib.Tokenizer:
    kind = data_cfg.get("tokenizer", "char")
    directory = os.path.join(workdir, "tokenizer")
    model_path = data_cfg.get("tokenizer_path", "") or None
    needs_corpus = (
        not os.path.exists(os.path.join(directory, tok_lib.MANIFEST))
        and not model_path
        and kind in ("char", "bpe", "sentencepiece", "wordpiece")
    )
    extra = data_cfg.get("tokenizer_extra_corpus", "")
    corpus = _write_corpus(train, os.path.join(workdir, "data"), extra) if needs_corpus else None
    try:
        return tok_lib.build_tokenizer(
            kind,
            directory=directory,
            corpus_path=corpus,
            vocab_size=data_cfg.get("vocab_size", None),
            model_path=model_path,
        )
    finally:
        if corpus:
            os.remove(corpus)


def build_lm_data(
    data_cfg: Any,
    *,
    workdir: str,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    eval_batch_size: int | None = None,
) -> LMData:
    """Sources -> tokenizer (workdir/tokenizer/) -> cached tokens -> windows -> iterators.

    `data_cfg` is the config's `data` ConfigDict (path, val_path, val_fraction, tfds_name,
    tfds_data_dir, text_key, tokenizer, vocab_size, tokenizer_path, pack, worker_count,
    eval_max_batches; optional doc_separator); evaluation batches have `eval_batch_size`
    rows (default: `batch_size`). Prepared data and token caches go to
    workdir/data/; running again reuses all of it.
    """
    pack = data_cfg.get("pack", "chunk")
    if pack not in PACK_MODES:
        raise ValueError(f"data.pack: unknown mode {pack!r} (expected one of {PACK_MODES})")
    _rows_per_process(batch_size, process_count)
    data_dir = os.path.join(workdir, "data")
    splits = _open_splits(data_cfg, data_dir)
    tokenizer = _get_tokenizer(data_cfg, splits["train"], workdir)
    key = tok_lib.tokenizer_fingerprint(os.path.join(workdir, "tokenizer"))
    windows = {}
    for name, split in splits.items():
        tokens, docs, prefix = tokenize_split(
            split, tokenizer, cache_dir=os.path.join(data_dir, "tokens"), tokenizer_key=key
        )
        stride = data_cfg.get("train_stride", 0) if name == "train" else 0
        windows[name] = LMWindows(tokens, docs, seq_len, pack=pack, cache_prefix=prefix,
                                  stride=stride)
        if not len(windows[name]):
            raise ValueError(
                f"data: the {name} split has {len(tokens)} tokens, too few for one window of "
                f"seq_len + 1 = {seq_len + 1} (use more data or a shorter seq_len)"
            )
    train_iter = make_train_iterator(
        windows["train"],
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        worker_count=data_cfg.get("worker_count", 0),
    )
    max_batches = data_cfg.get("eval_max_batches", 0) or None

    def eval_batches() -> EvalBatches:
        return make_eval_batches(
            windows["validation"],
            batch_size=eval_batch_size or batch_size,
            max_batches=max_batches,
            process_index=process_index,
            process_count=process_count,
        )

    return LMData(
        tokenizer=tokenizer,
        train_iter=train_iter,
        eval_batches=eval_batches,
        num_train_windows=len(windows["train"]),
        train_source=windows["train"],
        eval_source=windows["validation"],
    )
