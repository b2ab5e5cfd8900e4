"""Tokenizers behind one small protocol: char, byte, byte-level BPE and SentencePiece
(WordPiece lives apart).

Every tokenizer reserves the same seven special tokens at ids 0..6 ([PAD]=0, [UNK], [CLS], [SEP],
[MASK], <s>, </s>) so objectives can rely on them across kinds. Raw text never produces a special
id (a literal "[MASK]" in text is ordinary characters), and `decode` drops special ids.

A tokenizer is saved as files in a directory plus a `tokenizer.json` manifest {"kind": ...};
`build_tokenizer` reuses an existing manifest so a resumed run gets exactly the same vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<s>", "</s>")
PAD_ID = 0
UNK_ID = 1
NUM_SPECIALS = len(SPECIAL_TOKENS)
MANIFEST = "tokenizer.json"
KINDS = ("char", "byte", "bpe", "sentencepiece", "wordpiece")
# SentencePiece training samples at most this many lines: enough for a good vocab, bounded time.
SPM_INPUT_SENTENCE_SIZE = 2_000_000


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of `lm` may assume about a tokenizer."""

    vocab_size: int  # size of the id space (model vocab must be >= this)
    pad_id: int  # always 0

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def special_id(self, token: str) -> int | None: ...

    def save(self, directory: str) -> None: ...


def _write_atomic(path: str, data: bytes) -> None:
    """Write bytes via a temp file + rename so concurrent readers never see a partial file."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_manifest(directory: str, manifest: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    text = json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=True) + "\n"
    _write_atomic(os.path.join(directory, MANIFEST), text.encode())


def _read_manifest(directory: str) -> dict:
    with open(os.path.join(directory, MANIFEST)) as f:
        return json.load(f)


def _drop_specials(ids: Sequence[int]) -> list[int]:
    return [int(i) for i in ids if int(i) >= NUM_SPECIALS]


class CharTokenizer:
    """Character vocabulary (nanoGPT style): specials at 0..6, then the corpus' sorted chars."""

    kind = "char"

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: every vocabulary entry must be one character")
        self.chars = chars
        self.pad_id = PAD_ID
        self.vocab_size = NUM_SPECIALS + len(chars)
        self._stoi = {c: i + NUM_SPECIALS for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @classmethod
    def train(cls, corpus_path: str) -> CharTokenizer:
        chars: set[str] = set()
        try:
            with open(corpus_path, encoding="utf-8", newline="") as f:
                while block := f.read(1 << 20):
                    chars.update(block)
        except UnicodeDecodeError as e:
            raise ValueError(f"{corpus_path}: not UTF-8 text ({e.reason})") from None
        return cls(sorted(chars))

    @classmethod
    def load(cls, directory: str) -> CharTokenizer:
        return cls(_read_manifest(directory)["chars"])

    def encode(self, text: str) -> list[int]:
        get = self._stoi.get
        return [get(c, UNK_ID) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - NUM_SPECIALS] for i in _drop_specials(ids))

    def special_id(self, token: str) -> int | None:
        return SPECIAL_TOKENS.index(token) if token in SPECIAL_TOKENS else None

    def save(self, directory: str) -> None:
        _write_manifest(
            directory, {"kind": self.kind, "vocab_size": self.vocab_size, "chars": self.chars}
        )


class ByteTokenizer:
    """UTF-8 bytes: specials at 0..6, byte b at id 7 + b (263 ids); lossless for any text."""

    kind = "byte"

    def __init__(self) -> None:
        self.pad_id = PAD_ID
        self.vocab_size = NUM_SPECIALS + 256

    @classmethod
    def load(cls, directory: str) -> ByteTokenizer:
        del directory
        return cls()

    def encode(self, text: str) -> list[int]:
        data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return (data.astype(np.int32) + NUM_SPECIALS).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - NUM_SPECIALS for i in _drop_specials(ids)).decode("utf-8", "replace")

    def special_id(self, token: str) -> int | None:
        return SPECIAL_TOKENS.index(token) if token in SPECIAL_TOKENS else None

    def save(self, directory: str) -> None:
        _write_manifest(directory, {"kind": self.kind, "vocab_size": self.vocab_size})


class ByteBPETokenizer:
    """Byte-level BPE trained with the `tokenizers` library (Rust): GPT-2's pre-tokenization
    (a run of spaces or a newline plus indentation is one piece, which suits source code),
    UTF-8 bytes as the base alphabet, so every text round-trips exactly.

    Ids 0..6 are our special tokens, stored as plain vocabulary entries rather than "added
    tokens": raw text can never produce them (a literal "[MASK]" is split into bytes).
    """

    kind = "bpe"
    MODEL_FILE = "bpe.json"

    def __init__(self, serialized: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._json = serialized
        self._tok = HFTokenizer.from_str(serialized)
        self.pad_id = PAD_ID
        self.vocab_size = self._tok.get_vocab_size()
        vocab = self._tok.get_vocab()
        if any(vocab.get(t) != i for i, t in enumerate(SPECIAL_TOKENS)):
            raise ValueError("ByteBPETokenizer: ids 0..6 must be lm's special tokens")

    @classmethod
    def train(cls, corpus_path: str, vocab_size: int) -> ByteBPETokenizer:
        """Train on a UTF-8 file; fed in ~64 KiB pieces cut at line ends, so newlines and the
        indentation after them are learnt together. Deterministic for a given file."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not os.path.getsize(corpus_path):
            raise ValueError(f"BPE: corpus file is empty: {corpus_path}")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())

        def pieces():
            with open(corpus_path, encoding="utf-8", newline="") as f:
                buf: list[str] = []
                size = 0
                for line in f:
                    buf.append(line)
                    size += len(line)
                    if size >= 1 << 16:
                        yield "".join(buf)
                        buf, size = [], 0
                if buf:
                    yield "".join(buf)

        tok.train_from_iterator(pieces(), trainer=trainer)
        spec = json.loads(tok.to_str())
        spec["added_tokens"] = []  # specials stay vocabulary entries that text never reaches
        return cls(json.dumps(spec, ensure_ascii=False, sort_keys=True))

    @classmethod
    def load(cls, directory: str) -> ByteBPETokenizer:
        manifest = _read_manifest(directory)
        with open(os.path.join(directory, manifest["model"]), encoding="utf-8") as f:
            return cls(f.read())

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(_drop_specials(ids), skip_special_tokens=False)

    def special_id(self, token: str) -> int | None:
        return SPECIAL_TOKENS.index(token) if token in SPECIAL_TOKENS else None

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        data = self._json.encode("utf-8")
        _write_atomic(os.path.join(directory, self.MODEL_FILE), data)
        _write_manifest(directory, {"kind": self.kind, "model": self.MODEL_FILE,
                                    "vocab_size": self.vocab_size,
                                    "sha256": hashlib.sha256(data).hexdigest()})


class SentencePieceTokenizer:
    """SentencePiece model with lossless settings and our special-token layout.

    `extra_ids` (T5) appends that many sentinel ids after the model's pieces, `<extra_id_0>`
    being the last id; like every special id they come from `special_id`, never from text.

    Trained models use identity normalisation, keep whitespace as is, fall back to bytes for
    unseen characters and add no dummy prefix, so `decode(encode(a) + encode(b)) == a + b`
    (documents can be tokenized separately and concatenated). [CLS]/[SEP]/[MASK] are control
    symbols: reserved ids that raw text can never produce.
    """

    kind = "sentencepiece"
    MODEL_FILE = "spm.model"

    def __init__(self, model_proto: bytes, extra_ids: int = 0):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        if self._sp.pad_id() != PAD_ID:
            raise ValueError(
                f"SentencePiece model has pad_id={self._sp.pad_id()}; lm needs id 0 reserved "
                "for padding (train with pad_id=0)"
            )
        if extra_ids < 0:
            raise ValueError(f"SentencePiece: extra_ids must be >= 0, got {extra_ids}")
        pieces = self._sp.get_piece_size()
        self.pad_id = PAD_ID
        self.extra_ids = extra_ids
        self.vocab_size = pieces + extra_ids
        self._specials = {
            t: i
            for t in SPECIAL_TOKENS
            if (i := self._sp.piece_to_id(t)) < pieces and self._sp.id_to_piece(i) == t
        }
        # T5 sentinels after the pieces, counting down: <extra_id_0> is the last id.
        self._specials |= {f"<extra_id_{j}>": self.vocab_size - 1 - j for j in range(extra_ids)}
        self._special_ids = frozenset(self._specials.values()) | {
            i for i in range(pieces) if self._sp.is_control(i) or self._sp.is_unknown(i)
        }

    @classmethod
    def train(
        cls, corpus_path: str, vocab_size: int, *, model_type: str = "unigram", seed: int = 0
    ) -> SentencePieceTokenizer:
        """Train on a text file (one sentence per line); deterministic for a given file."""
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2

        if not os.path.getsize(corpus_path):
            raise ValueError(f"SentencePiece: corpus file is empty: {corpus_path}")
        spm.set_random_generator_seed(seed)
        with tempfile.TemporaryDirectory() as tmp:
            if "," in corpus_path:  # the trainer splits `input` at commas (a list of files)
                os.symlink(os.path.abspath(corpus_path), os.path.join(tmp, "corpus.txt"))
                corpus_path = os.path.join(tmp, "corpus.txt")
            spm.SentencePieceTrainer.train(
                input=corpus_path,
                model_prefix=os.path.join(tmp, "spm"),
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=1.0,
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                add_dummy_prefix=False,
                byte_fallback=True,
                pad_id=0,
                unk_id=1,
                bos_id=5,
                eos_id=6,
                pad_piece="[PAD]",
                unk_piece="[UNK]",
                bos_piece="<s>",
                eos_piece="</s>",
                control_symbols=["[CLS]", "[SEP]", "[MASK]"],
                input_sentence_size=SPM_INPUT_SENTENCE_SIZE,
                shuffle_input_sentence=True,
                max_sentence_length=1 << 16,
                hard_vocab_limit=False,  # small corpora may not support the full vocab
                num_threads=1,  # single-threaded training is reproducible bit for bit
                minloglevel=2,
            )
            model = sp_pb2.ModelProto()
            with open(os.path.join(tmp, "spm.model"), "rb") as f:
                model.ParseFromString(f.read())
        # Scrub run-specific paths so equal corpora give byte-identical models.
        model.trainer_spec.input[:] = []
        model.trainer_spec.model_prefix = ""
        return cls(model.SerializeToString(deterministic=True))

    @classmethod
    def from_model_file(cls, model_path: str, extra_ids: int = 0) -> SentencePieceTokenizer:
        with open(model_path, "rb") as f:
            return cls(f.read(), extra_ids)

    @classmethod
    def load(cls, directory: str) -> SentencePieceTokenizer:
        manifest = _read_manifest(directory)
        return cls.from_model_file(os.path.join(directory, manifest["model"]),
                                   manifest.get("extra_ids", 0))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._special_ids])

    def special_id(self, token: str) -> int | None:
        return self._specials.get(token)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_atomic(os.path.join(directory, self.MODEL_FILE), self._proto)
        manifest = {
            "kind": self.kind,
            "model": self.MODEL_FILE,
            "vocab_size": self.vocab_size,
            "sha256": hashlib.sha256(self._proto).hexdigest(),
        }
        if self.extra_ids:  # only then: manifests (and data-cache keys) of others unchanged
            manifest["extra_ids"] = self.extra_ids
        _write_manifest(directory, manifest)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(
            f"data.tokenizer: unknown tokenizer kind {kind!r} (expected one of {', '.join(KINDS)})"
        )


def load_tokenizer(directory: str) -> Tokenizer:
    """Load a tokenizer saved with `save(directory)`, dispatching on the manifest's kind."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no tokenizer manifest at {path}")
    kind = _read_manifest(directory).get("kind", "")
    if kind == "gpt2_bpe":  # imported GPT-2 vocabularies (lm.convert)
        from lm.convert.gpt2_bpe import GPT2BPETokenizer

        return GPT2BPETokenizer.load(directory)
    _check_kind(kind)
    if kind == "char":
        return CharTokenizer.load(directory)
    if kind == "byte":
        return ByteTokenizer.load(directory)
    if kind == "bpe":
        return ByteBPETokenizer.load(directory)
    if kind == "sentencepiece":
        return SentencePieceTokenizer.load(directory)
    from lm.data.wordpiece import WordPieceTokenizer  # lazy: optional module

    return WordPieceTokenizer.load(directory)


def build_tokenizer(
    kind: str,
    *,
    directory: str,
    corpus_path: str | None = None,
    vocab_size: int | None = None,
    model_path: str | None = None,
) -> Tokenizer:
    """Load `directory`'s tokenizer if saved there, else build it and save it there.

    Building: `model_path` (a saved tokenizer directory, or a .model / vocab file) is loaded;
    otherwise char/sentencepiece/wordpiece are trained on `corpus_path`. Reusing the saved one
    keeps token ids stable across restarts even if the corpus or defaults change.
    """
    _check_kind(kind)
    if os.path.exists(os.path.join(directory, MANIFEST)):
        saved = _read_manifest(directory).get("kind")
        if saved != kind:
            raise ValueError(
                f"data.tokenizer={kind!r} but {directory} already holds a {saved!r} tokenizer "
                "(use a fresh workdir or the same tokenizer kind)"
            )
        return load_tokenizer(directory)

    if model_path and os.path.isdir(model_path):
        tok = load_tokenizer(model_path)
        if getattr(tok, "kind", kind) != kind:
            raise ValueError(f"data.tokenizer_path: {model_path} holds a {tok.kind!r} tokenizer")
    elif kind == "byte":
        tok = ByteTokenizer()
    elif model_path:
        if not os.path.exists(model_path):
            raise FileNotFoundError(f"data.tokenizer_path: file not found: {model_path}")
        if kind == "sentencepiece":
            tok = SentencePieceTokenizer.from_model_file(model_path)
        elif kind == "bpe":
            with open(model_path, encoding="utf-8") as f:
                tok = ByteBPETokenizer(f.read())
        elif kind == "wordpiece":
            from lm.data.wordpiece import WordPieceTokenizer

            tok = WordPieceTokenizer.from_vocab_file(model_path)
        else:
            raise ValueError(f"data.tokenizer_path: cannot load a {kind!r} tokenizer from a file")
    else:
        if not corpus_path:
            raise ValueError(f"data.tokenizer: training a {kind!r} tokenizer needs a corpus")
        if kind == "char":
            tok = CharTokenizer.train(corpus_path)
        else:
            if not vocab_size or vocab_size <= NUM_SPECIALS:
                raise ValueError(f"data.vocab_size: a {kind!r} tokenizer needs vocab_size > 7")
            if kind == "sentencepiece":
                tok = SentencePieceTokenizer.train(corpus_path, vocab_size)
            elif kind == "bpe":
                tok = ByteBPETokenizer.train(corpus_path, vocab_size)
            else:
                from lm.data.wordpiece import WordPieceTokenizer

                tok = WordPieceTokenizer.train(corpus_path, vocab_size, directory)
    tok.save(directory)
    return tok


def tokenizer_fingerprint(directory: str) -> str:
    """sha256 over every file of a saved tokenizer: a cache key for tokenized data."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and not name.startswith("."):
            h.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()
