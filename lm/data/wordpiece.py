"""BERT-compatible WordPiece tokenizer over a plain ``vocab.txt``.

Encoding is our own Python implementation of BERT's algorithm (basic tokenization, then greedy
longest-match-first WordPiece with ``##`` continuations), so a vocabulary imported from a BERT
checkpoint and one trained here behave identically. Training a new vocabulary uses the
``tokenizers`` library (Rust) when it is installed; only its vocabulary is kept.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
# Written first by `train`, so a trained vocabulary has [PAD]=0 ... [MASK]=4.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
MAX_CHARS_PER_WORD = 100
VOCAB_FILE = "vocab.txt"
MANIFEST_FILE = "tokenizer.json"

# CJK Unified Ideographs blocks, as in BERT: each such character is a word of its own.
_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def _is_punctuation(ch: str) -> bool:
    """BERT counts all non-alphanumeric printable ASCII as punctuation, plus Unicode P*."""
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class _CleanTable(dict):
    """`str.translate` table, filled lazily: drops control chars, maps whitespace to ' ',
    and surrounds CJK ideographs with spaces. Lazy so that no Unicode scan is needed."""

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        if ch in " \t\n\r":
            out: str | None = " "
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(ch).startswith("C"):
            out = None
        elif unicodedata.category(ch) == "Zs":
            out = " "
        elif _is_cjk(cp):
            out = f" {ch} "
        else:
            out = ch
        self[cp] = out
        return out


class _PunctTable(dict):
    """`str.translate` table that puts spaces around every punctuation character."""

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        out = f" {ch} " if _is_punctuation(ch) else ch
        self[cp] = out
        return out


class _AccentTable(dict):
    """`str.translate` table that drops combining marks (category Mn) after NFD."""

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        out = None if unicodedata.category(ch) == "Mn" else ch
        self[cp] = out
        return out


_CLEAN, _PUNCT, _ACCENTS = _CleanTable(), _PunctTable(), _AccentTable()


def basic_tokenize(
    text: str, lowercase: bool = True, strip_accents: bool | None = None
) -> list[str]:
    """BERT's BasicTokenizer: clean, isolate CJK chars, (lowercase, strip accents), split on
    whitespace and punctuation. `strip_accents=None` follows `lowercase`, as BERT does."""
    text = text.translate(_CLEAN)
    if lowercase:
        text = text.lower()
    if lowercase if strip_accents is None else strip_accents:
        if not text.isascii():
            text = unicodedata.normalize("NFD", text).translate(_ACCENTS)
    text = text.translate(_PUNCT)
    # split(" ") rather than split(): BERT's whitespace is exactly what _CLEAN mapped to " ".
    return [w for w in text.split(" ") if w]


class WordPieceTokenizer:
    """WordPiece tokenizer following the project's `Tokenizer` protocol (pad_id is 0).

    Ids are line numbers of `vocab.txt`. `decode` skips the special tokens and glues
    ``##`` pieces to the previous piece.
    """

    def __init__(
        self,
        vocab: Sequence[str],
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        max_chars_per_word: int = MAX_CHARS_PER_WORD,
        source: str = "<vocab>",
    ) -> None:
        self.tokens: list[str] = list(vocab)
        self.vocab: dict[str, int] = {}
        for i, tok in enumerate(self.tokens):
            self.vocab.setdefault(tok, i)  # keep the first id of a duplicated line
        missing = [t for t in SPECIAL_TOKENS if t not in self.vocab]
        if missing:
            raise ValueError(f"{source}: WordPiece vocabulary lacks special tokens {missing}")
        if self.vocab[PAD] != 0:
            raise ValueError(f"{source}: [PAD] must have id 0, found {self.vocab[PAD]}")
        self.lowercase = lowercase
        self.strip_accents = strip_accents
        self.max_chars_per_word = max_chars_per_word
        self.vocab_size = len(self.tokens)
        self.pad_id = 0
        self.unk_id = self.vocab[UNK]
        self.special_ids = frozenset(self.vocab[t] for t in SPECIAL_TOKENS)
        self.continuation_mask = np.array(
            [t.startswith(CONTINUATION_PREFIX) for t in self.tokens], dtype=bool
        )
        self._word_cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_vocab_file(
        cls, path: str | os.PathLike, lowercase: bool = True, strip_accents: bool | None = None
    ) -> WordPieceTokenizer:
        """Loads a BERT `vocab.txt` (one token per line, id = line number)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"WordPiece vocabulary file not found: {path}")
        lines = path.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # trailing newline
        tokens = [line.rstrip("\r") for line in lines]
        return cls(tokens, lowercase=lowercase, strip_accents=strip_accents, source=str(path))

    def save(self, directory: str | os.PathLike) -> None:
        """Writes `vocab.txt` and the `tokenizer.json` manifest into `directory`."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / VOCAB_FILE).write_text("".join(t + "\n" for t in self.tokens), encoding="utf-8")
        manifest = {
            "kind": "wordpiece",
            "vocab_file": VOCAB_FILE,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
            "strip_accents": self.strip_accents,
            "max_chars_per_word": self.max_chars_per_word,
        }
        (d / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, directory: str | os.PathLike) -> WordPieceTokenizer:
        """Reads a directory written by `save` (or `train`)."""
        d = Path(directory)
        manifest_path = d / MANIFEST_FILE
        if not manifest_path.is_file():
            raise FileNotFoundError(f"tokenizer manifest not found: {manifest_path}")
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("kind") != "wordpiece":
            raise ValueError(f"{manifest_path}: kind is {manifest.get('kind')!r}, not 'wordpiece'")
        tok = cls.from_vocab_file(
            d / manifest.get("vocab_file", VOCAB_FILE),
            lowercase=manifest.get("lowercase", True),
            strip_accents=manifest.get("strip_accents"),
        )
        tok.max_chars_per_word = manifest.get("max_chars_per_word", MAX_CHARS_PER_WORD)
        return tok

    @classmethod
    def train(
        cls,
        corpus_path: str | os.PathLike | Sequence[str | os.PathLike],
        vocab_size: int,
        directory: str | os.PathLike,
        lowercase: bool = True,
        *,
        min_frequency: int = 2,
        limit_alphabet: int = 1000,
    ) -> WordPieceTokenizer:
        """Trains a WordPiece vocabulary with the `tokenizers` library, saves it to `directory`
        (specials first: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4) and loads it back.

        Not bit-reproducible: the Rust trainer breaks frequency ties in hash-map order, so two
        runs may differ in a few tokens and in their order. The saved vocab.txt is the artifact
        to keep; encoding with it is deterministic."""
        try:
            from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                "training a WordPiece vocabulary needs the `tokenizers` package "
                "(pip install tokenizers); loading vocab.txt files does not"
            ) from e
        paths = [corpus_path] if isinstance(corpus_path, str | os.PathLike) else list(corpus_path)
        for p in paths:
            if not Path(p).is_file():
                raise FileNotFoundError(f"WordPiece training corpus not found: {p}")
            if Path(p).stat().st_size == 0:
                raise ValueError(f"WordPiece training corpus is empty: {p}")
        hf = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
        hf.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
            lowercase=lowercase,
        )
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
            continuing_subword_prefix="##",
        )
        hf.train([str(p) for p in paths], trainer)
        by_id = sorted(hf.get_vocab().items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in by_id]
        if tokens[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise RuntimeError(f"trainer did not put the specials first: {tokens[:5]}")
        tok = cls(tokens, lowercase=lowercase)
        tok.save(directory)
        return tok

    # ------------------------------------------------------------------ encoding
    def _wordpiece(self, word: str) -> tuple[int, ...]:
        """Greedy longest-match-first split of one word; an unsplittable word is [UNK]."""
        cached = self._word_cache.get(word)
        if cached is not None:
            return cached
        if len(word) > self.max_chars_per_word:
            out: tuple[int, ...] = (self.unk_id,)
        else:
            pieces: list[int] = []
            start, n, vocab = 0, len(word), self.vocab
            while start < n:
                end = n
                piece_id = None
                while end > start:
                    sub = word[start:end] if start == 0 else CONTINUATION_PREFIX + word[start:end]
                    piece_id = vocab.get(sub)
                    if piece_id is not None:
                        break
                    end -= 1
                if piece_id is None:
                    pieces = [self.unk_id]
                    break
                pieces.append(piece_id)
                start = end
            out = tuple(pieces)
        if len(self._word_cache) < 1_000_000:
            self._word_cache[word] = out
        return out

    def tokenize_words(self, text: str) -> list[str]:
        """The words of BERT's basic tokenization (before WordPiece)."""
        return basic_tokenize(text, self.lowercase, self.strip_accents)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, no [CLS]/[SEP] added."""
        ids: list[int] = []
        for word in self.tokenize_words(text):
            ids.extend(self._wordpiece(word))
        return ids

    def word_ids(self, text: str) -> tuple[list[int], list[int]]:
        """Ids plus, for each id, the index of the word it came from (for whole-word masking)."""
        ids: list[int] = []
        words: list[int] = []
        for w, word in enumerate(self.tokenize_words(text)):
            pieces = self._wordpiece(word)
            ids.extend(pieces)
            words.extend([w] * len(pieces))
        return ids, words

    def is_continuation(self, token_id: int) -> bool:
        """True for a ``##`` piece, which continues the word of the previous piece."""
        return bool(self.continuation_mask[token_id])

    def tokens_of(self, ids: Sequence[int]) -> list[str]:
        """Ids -> vocabulary strings (for inspection and tests)."""
        return [self.tokens[i] for i in ids]

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, skipping special ids; ``##`` pieces are joined to the previous piece."""
        out: list[str] = []
        for i in ids:
            i = int(i)
            if i in self.special_ids:
                continue
            tok = self.tokens[i]
            if tok.startswith(CONTINUATION_PREFIX) and out:
                out[-1] += tok[len(CONTINUATION_PREFIX):]
            else:
                out.append(tok)
        return " ".join(out)

    def special_id(self, token: str) -> int | None:
        """Id of a special token ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'); None for
        others such as '<s>'/'</s>', which WordPiece vocabularies lack."""
        return self.vocab[token] if token in SPECIAL_TOKENS else None

    @property
    def first_regular_id(self) -> int:
        """Smallest id above every bracketed reserved token ([PAD], [unused7], [MASK], ...).

        BERT vocabularies reserve ids 0..998 for such tokens; random MLM replacements are
        drawn from ids at or above this one."""
        last = max(
            (i for i, t in enumerate(self.tokens)
             if len(t) > 2 and t.startswith("[") and t.endswith("]")),
            default=-1,
        )
        return last + 1
