"""Where documents come from: local text files (our own tfds builder) or the tfds catalogue.

Both end as a `TextSplit`: a random-access tfds source (array_record, read by index, no
TensorFlow) plus how its records map to documents. The pipeline only sees `TextSplit`s.

Local files (`LocalText`): the train/validation split follows nanoGPT: the first
`1 - val_fraction` of the file's characters are train, the rest validation (or an explicit
`val_path` file is the validation split). Records are stored in file order and their
concatenation equals the split's span of the file exactly:
  * `doc_separator=''` (default): the file is one continuous text, stored as ~64 KiB pieces cut
    after a newline where possible; the pipeline joins the pieces without separators, so
    char-level training sees exactly the characters nanoGPT sees.
  * `doc_separator='\\n\\n'` (say): one record per document; a document keeps the separator run
    that ends it, and the pipeline puts `</s>` between documents.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds

CHUNK_CHARS = 1 << 16
# Bump when the record layout written by LocalText changes: old prepared data is then ignored.
LAYOUT_VERSION = 1
_VAL_SPLIT_NAMES = ("validation", "valid", "val", "test")


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """One split's records, readable by index, and how records map to documents."""

    records: Sequence[Any]  # tfds data source: records[i] is a dict of features
    text_key: str
    joined: bool  # True: records are consecutive pieces of ONE text (no document boundaries)
    fingerprint: str  # identity of this split's content, for cache keys

    def __len__(self) -> int:
        return len(self.records)

    def texts(self) -> Iterator[str]:
        """The records' texts in order (tfds returns Text features as bytes)."""
        for i in range(len(self.records)):
            value = self.records[i][self.text_key]
            yield value.decode("utf-8") if isinstance(value, bytes) else str(value)


# ----------------------------------------------------------------------------- local files


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """A local file and how to split it. Build with `local_text_config` (it names the config)."""

    path: str = ""
    val_path: str = ""
    val_fraction: float = 0.1
    doc_separator: str = ""


def check_file(path: str, what: str) -> None:
    """One-line errors for a missing or empty input file (`what` names the config field)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{what}: file is empty: {path}")


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def local_text_config(
    path: str, *, val_path: str = "", val_fraction: float = 0.1, doc_separator: str = ""
) -> LocalTextConfig:
    """Validate the inputs and name the config after everything that determines its records.

    The name carries a hash of the file contents (sha256), `val_fraction`, the separator and the
    layout version, so changed data never reuses a stale prepared copy.
    """
    check_file(path, "data.path")
    if val_path:
        check_file(val_path, "data.val_path")
    elif not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    key = {
        "train_sha256": sha256_file(path),
        "val_sha256": sha256_file(val_path) if val_path else "",
        "val_fraction": None if val_path else float(val_fraction),
        "doc_separator": doc_separator,
        "chunk_chars": CHUNK_CHARS,
        "layout": LAYOUT_VERSION,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = re.sub(r"[^a-z0-9]+", "_", os.path.splitext(os.path.basename(path))[0].lower())
    return LocalTextConfig(
        name=f"{stem.strip('_') or 'text'}_{digest}",
        description=f"{path} (val: {val_path or f'last {val_fraction:g} of the file'})",
        path=os.path.abspath(path),
        val_path=os.path.abspath(val_path) if val_path else "",
        val_fraction=float(val_fraction),
        doc_separator=doc_separator,
    )


def _read_text(path: str) -> str:
    # newline='' keeps '\r\n' as is: the records must reproduce the file exactly.
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """nanoGPT's split: first int(n * (1 - val_fraction)) characters train, the rest val."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def chunk_text(text: str, size: int) -> list[str]:
    """Pieces of at most `size` chars, cut after the last newline in the second half if any."""
    pieces, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            newline = text.rfind("\n", start + size // 2, end)
            end = newline + 1 if newline >= 0 else end
        pieces.append(text[start:end])
        start = end
    return pieces


def split_documents(text: str, separator: str) -> list[str]:
    """Documents ending at each run of `separator` (the run stays with the document before it)."""
    if not separator:
        raise ValueError("split_documents needs a non-empty separator")
    docs, start, pos = [], 0, text.find(separator)
    while pos >= 0:
        end = pos + len(separator)
        while text.startswith(separator, end):
            end += len(separator)
        if end < len(text):
            docs.append(text[start:end])
            start = end
        pos = text.find(separator, end)
    if start < len(text):
        docs.append(text[start:])
    return docs


class LocalText(tfds.core.GeneratorBasedBuilder):
    """A local UTF-8 text file as 'train' and 'validation' splits of {'text': Text()}."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Local text file, nanoGPT-style tail validation split."}
    BUILDER_CONFIGS: list[LocalTextConfig] = []  # configs are made per file: local_text_config

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="A local text file split for language modelling.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # records must stay in file order
        )

    def _split_spans(self) -> dict[str, str]:
        cfg: LocalTextConfig = self.builder_config
        text = _read_text(cfg.path)
        if cfg.val_path:
            spans = {"train": text, "validation": _read_text(cfg.val_path)}
        else:
            train, val = split_text(text, cfg.val_fraction)
            spans = {"train": train, "validation": val}
        for name, span in spans.items():
            if not span:
                raise ValueError(
                    f"data.val_fraction={cfg.val_fraction}: the {name} split of {cfg.path} is "
                    f"empty ({len(text)} characters in the file)"
                )
        return spans

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager  # nothing to download
        return {name: self._generate_examples(span) for name, span in self._split_spans().items()}

    def _generate_examples(self, span: str) -> Iterator[tuple[int, dict[str, str]]]:
        sep = self.builder_config.doc_separator
        pieces = split_documents(span, sep) if sep else chunk_text(span, CHUNK_CHARS)
        for i, piece in enumerate(pieces):
            yield i, {"text": piece}


def load_local_text(
    path: str,
    *,
    data_dir: str,
    val_path: str = "",
    val_fraction: float = 0.1,
    doc_separator: str = "",
) -> dict[str, TextSplit]:
    """Prepare (once) and open a local file's 'train' and 'validation' splits under data_dir."""
    config = local_text_config(
        path, val_path=val_path, val_fraction=val_fraction, doc_separator=doc_separator
    )
    builder = LocalText(config=config, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        tfds.disable_progress_bar()  # tiny builds; keep training logs readable
        builder._split_spans()  # fail fast with a clear message before tfds starts writing
        try:
            builder.download_and_prepare()
        except Exception:
            # Another process may have finished the same build first: use its copy.
            builder = LocalText(config=config, data_dir=data_dir, file_format="array_record")
            if not builder.is_prepared():
                raise
    return {
        split: TextSplit(
            records=builder.as_data_source(split),
            text_key="text",
            joined=not doc_separator,
            fingerprint=f"local_text/{config.name}/{split}",
        )
        for split in ("train", "validation")
    }


# ----------------------------------------------------------------------------- python stdlib

# Folders of the standard library that hold its own tests (test/, tkinter/test/, idle_test/...).
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Installed third-party packages live below the stdlib folder too; they are not the stdlib.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def stdlib_root() -> str:
    """The running interpreter's standard library folder (sysconfig's 'stdlib' path)."""
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str, *, include_tests: bool = False) -> list[str]:
    """Relative paths of the `.py` files under `root`, sorted; third-party packages and
    (unless `include_tests`) the test folders left out."""
    skip = _STDLIB_SKIP_DIRS if include_tests else _STDLIB_SKIP_DIRS | STDLIB_TEST_DIRS
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        rel = os.path.relpath(dirpath, root)
        out.extend(os.path.normpath(os.path.join(rel, f)) for f in filenames if f.endswith(".py"))
    return sorted(out)


def is_validation_file(relpath: str, val_fraction: float) -> bool:
    """The fixed split by file: a file is validation when the first 8 hex digits of the
    sha256 of its relative path (with '/') fall below val_fraction; the same on every
    machine and Python version that has the file."""
    digest = hashlib.sha256(relpath.replace(os.sep, "/").encode()).hexdigest()
    return int(digest[:8], 16) < val_fraction * 0x1_0000_0000


def load_python_stdlib(
    *, include_tests: bool = False, val_fraction: float = 0.05, root: str = ""
) -> dict[str, TextSplit]:
    """The standard library's Python source as documents, one per file, in path order.

    Needs no download: every machine that runs `lm` has it. Files that are not UTF-8 (a few
    deliberately broken test files) are skipped. Each document starts with a comment naming
    its path (`# file: json/decoder.py`), so a model sees where one file ends and the next
    begins; the pipeline separates documents with `</s>`.
    """
    root = root or stdlib_root()
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    hashes = {"train": hashlib.sha256(), "validation": hashlib.sha256()}
    for rel in stdlib_files(root, include_tests=include_tests):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if not text.strip():
            continue  # empty __init__.py files carry nothing to learn
        name = "validation" if is_validation_file(rel, val_fraction) else "train"
        splits[name].append({"text": f"# file: {rel.replace(os.sep, '/')}\n{text}"})
        hashes[name].update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    for name, records in splits.items():
        if not records:
            raise ValueError(f"data.python_stdlib: no {name} files under {root} "
                             f"(val_fraction={val_fraction})")
    tag = "with_tests" if include_tests else "no_tests"
    return {
        name: TextSplit(records=records, text_key="text", joined=False,
                        fingerprint=f"python_stdlib/{tag}/{hashes[name].hexdigest()[:16]}/{name}")
        for name, records in splits.items()
    }


# ----------------------------------------------------------------------------- tfds catalogue


def load_tfds_catalogue(
    name: str, *, data_dir: str = "", text_key: str = "text"
) -> dict[str, TextSplit]:
    """Open a catalogue dataset's 'train' split and its first of validation/valid/val/test.

    `tfds.data_source` downloads and prepares the dataset if needed (network!) and needs it in
    array_record format. Each record is one document; its `text_key` feature holds the text.
    """
    sources = tfds.data_source(
        name,
        data_dir=data_dir or None,
        # tfds only defaults to array_record when no data_dir is given; tfrecord needs TF.
        builder_kwargs={"file_format": "array_record"},
    )
    if "train" not in sources:
        raise ValueError(f"data.tfds_name: {name} has no 'train' split (has {sorted(sources)})")
    val_name = next((s for s in _VAL_SPLIT_NAMES if s in sources), None)
    if val_name is None:
        raise ValueError(f"data.tfds_name: {name} has no validation split (has {sorted(sources)})")
    splits = {}
    for split, source in (("train", sources["train"]), ("validation", sources[val_name])):
        if len(source) == 0:
            raise ValueError(f"data.tfds_name: split {split!r} of {name} is empty")
        if text_key not in source[0]:
            raise ValueError(
                f"data.text_key: {name} records have no {text_key!r} feature "
                f"(features: {sorted(source[0])})"
            )
        info = getattr(source, "dataset_info", None)
        full_name = getattr(info, "full_name", name)  # includes config and version
        real_split = val_name if split == "validation" else split
        splits[split] = TextSplit(
            records=source,
            text_key=text_key,
            joined=False,
            fingerprint=f"tfds/{full_name}/{real_split}/{text_key}",
        )
    return splits


def fetch_url(url: str, sha256: str, cache_dir: str = "") -> str:
    """Downloads `url` once into the cache (default ~/.cache/lm or $LM_CACHE) and checks
    its sha256; returns the local path. Offline or on a checksum mismatch, a one-line
    error says so and suggests `data.path` instead."""
    import urllib.request

    cache_dir = cache_dir or os.environ.get("LM_CACHE") or os.path.expanduser("~/.cache/lm")
    os.makedirs(cache_dir, exist_ok=True)
    name = os.path.basename(url.rstrip("/")) or "download"
    path = os.path.join(cache_dir, f"{sha256[:16]}-{name}")
    if os.path.exists(path):
        return path
    tmp = f"{path}.part"
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(tmp, "wb") as out:
            out.write(response.read())
    except OSError as e:
        raise FileNotFoundError(
            f"data.url: could not download {url} ({e}); offline, pass --config.data.path=FILE"
        ) from None
    with open(tmp, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        os.remove(tmp)
        raise ValueError(f"data.sha256: {url} has sha256 {digest}, expected {sha256}")
    os.replace(tmp, path)
    return path
