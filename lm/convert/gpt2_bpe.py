"""GPT-2's byte-level BPE over `vocab.json` + `merges.txt`, behind our tokenizer protocol.

Text is split by GPT-2's pre-tokenization pattern, each piece's UTF-8 bytes are spelled
with one printable character per byte, and the ranked merges are applied greedily (lowest
rank first) inside each piece. Differences from HF's GPT2Tokenizer, on purpose: a literal
"<|endoftext|>" in text is ordinary characters (raw text never yields a special id), and
`decode` drops special ids. `pad_id` is 0 as everywhere in `lm` (GPT-2 has no padding token;
id 0 is also "!", so padding must be marked by `segment_ids`, as our models do).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cache

VOCAB_FILE, MERGES_FILE, MANIFEST_FILE = "vocab.json", "merges.txt", "tokenizer.json"
ENDOFTEXT = "<|endoftext|>"
# GPT-2's pre-tokenizer: contractions, letter runs, number runs, other-symbol runs (each
# with at most one leading space), then whitespace (a run before a word leaves its last
# space to the word).
PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@cache
def byte_alphabet() -> tuple[str, ...]:
    """Character spelling byte b: itself when printable Latin-1 ('!'..'~', '¡'..'¬',
    '®'..'ÿ'), else chr(256 + n) for the n-th remaining byte in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    out, extra = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return tuple(out)


class GPT2BPETokenizer:
    """Byte-level BPE (GPT-2, RoBERTa-style vocabularies) following `lm`'s Tokenizer protocol."""

    kind = "gpt2_bpe"

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
                 specials: Sequence[str] = (ENDOFTEXT,)):
        try:
            import regex
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("GPT2BPETokenizer needs the `regex` package "
                              "(pip install -e .[hf])") from e
        self._split = regex.compile(PATTERN).findall
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.tokens = {i: t for t, i in self.vocab.items()}
        self.ranks = {pair: r for r, pair in enumerate(self.merges)}
        self.specials = tuple(s for s in specials if s in self.vocab)
        self.special_ids = frozenset(self.vocab[s] for s in self.specials)
        self.vocab_size = max(self.vocab.values()) + 1
        self.pad_id = 0
        self.eos_id = self.vocab.get(ENDOFTEXT)
        self._bytes = byte_alphabet()
        self._byte_of = {c: b for b, c in enumerate(self._bytes)}
        self._cache: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------------ files
    @classmethod
    def from_files(cls, vocab_file: str, merges_file: str) -> GPT2BPETokenizer:
        with open(vocab_file, encoding="utf-8") as f:
            vocab = json.load(f)
        merges = []
        with open(merges_file, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.startswith("#version") or not line.strip():
                    continue
                a, b = line.split(" ")
                merges.append((a, b))
        return cls(vocab, merges)

    @classmethod
    def load(cls, directory: str) -> GPT2BPETokenizer:
        """A directory holding vocab.json + merges.txt (HF's or one written by `save`)."""
        return cls.from_files(os.path.join(directory, VOCAB_FILE),
                              os.path.join(directory, MERGES_FILE))

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, VOCAB_FILE), "w", encoding="utf-8") as f:
            json.dump(self.vocab, f, ensure_ascii=False)
        with open(os.path.join(directory, MERGES_FILE), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        with open(os.path.join(directory, MANIFEST_FILE), "w", encoding="utf-8") as f:
            json.dump({"kind": self.kind, "vocab_file": VOCAB_FILE, "merges_file": MERGES_FILE,
                       "vocab_size": self.vocab_size}, f, indent=1)

    # ------------------------------------------------------------------ encoding
    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        parts = list(word)
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        unk = self.eos_id if self.eos_id is not None else 0
        out = tuple(self.vocab.get(p, unk) for p in parts)
        if len(self._cache) < 1_000_000:
            self._cache[word] = out
        return out

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split(text):
            ids.extend(self._bpe("".join(self._bytes[b] for b in piece.encode("utf-8"))))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        chars = "".join(self.tokens[int(i)] for i in ids if int(i) not in self.special_ids)
        return bytes(self._byte_of[c] for c in chars).decode("utf-8", "replace")

    def special_id(self, token: str) -> int | None:
        """'<|endoftext|>' (also answering for '<s>' and '</s>': GPT-2 uses it as both)."""
        if token in (ENDOFTEXT, "<s>", "</s>"):
            return self.eos_id
        return self.vocab[token] if token in self.specials else None
