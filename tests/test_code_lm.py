"""The no-download code corpus: byte-level BPE, the stdlib source, and its pipeline."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from lm.data import pipeline, sources, tokenizers
from lm.data.tokenizers import SPECIAL_TOKENS

CODE = '''def add(a, b):
    """Add two numbers."""
    return a + b


class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def norm(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5
'''
MIXED = "Hi  there,\n\n\tworld! é 日本語 🙂 [MASK] [CLS] <s> </s>  \r\nend \n"


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def test_bpe_lossless_specials_deterministic(tmp_path):
    corpus = _write(tmp_path / "corpus.txt", CODE * 40)
    tok = tokenizers.ByteBPETokenizer.train(corpus, 400)
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert 7 + 256 < tok.vocab_size <= 400  # bytes plus learnt merges
    for text in [CODE, MIXED, "    \n        return x\n", "[PAD][UNK]"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & set(range(7))  # raw text never yields a special id
    # merges learnt: the 8-space indentation after a newline and common words are few tokens
    assert len(tok.encode(CODE)) < len(CODE.encode()) / 2.5
    assert tok.decode([5, *tok.encode("return"), 6, 0]) == "return"
    assert tok.decode(tok.encode("def f():\n") + tok.encode("    pass")) == "def f():\n    pass"
    tok.save(str(tmp_path / "a"))
    tokenizers.ByteBPETokenizer.train(corpus, 400).save(str(tmp_path / "b"))
    assert (tmp_path / "a/bpe.json").read_bytes() == (tmp_path / "b/bpe.json").read_bytes()
    again = tokenizers.load_tokenizer(str(tmp_path / "a"))
    assert isinstance(again, tokenizers.ByteBPETokenizer)
    assert again.encode(MIXED) == tok.encode(MIXED)
    built = tokenizers.build_tokenizer("bpe", directory=str(tmp_path / "c"),
                                       model_path=str(tmp_path / "a/bpe.json"))
    assert built.encode(CODE) == tok.encode(CODE)


def _fake_stdlib(root) -> dict[str, str]:
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "from .decoder import x\n",
        "json/decoder.py": CODE,
        "json/__pycache__/decoder.py": "# not source\n",
        "test/test_os.py": "def test_os():\n    assert True\n",
        "tkinter/test/test_widgets.py": "W = 1\n",
        "idlelib/idle_test/test_x.py": "X = 2\n",
        "site-packages/numpy/core.py": "third_party = True\n",
        "empty/__init__.py": "",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        _write(root / rel, text)
    with open(root / "bad.py", "wb") as f:
        f.write(b"# -*- coding: latin-1 -*-\nx = '\xe9'\n")  # not UTF-8: skipped
    return files


def test_stdlib_files_sorted_tests_optional(tmp_path):
    _fake_stdlib(tmp_path)
    assert sources.stdlib_files(str(tmp_path)) == [
        "bad.py", "empty/__init__.py", "json/__init__.py", "json/decoder.py", "os.py"]
    with_tests = sources.stdlib_files(str(tmp_path), include_tests=True)
    assert with_tests == sorted(with_tests)
    assert {"test/test_os.py", "tkinter/test/test_widgets.py",
            "idlelib/idle_test/test_x.py"} <= set(with_tests)
    assert not [p for p in with_tests if "site-packages" in p or "__pycache__" in p]
    # the real interpreter's stdlib: hundreds of modules, none from site-packages
    real = sources.stdlib_files(sources.stdlib_root())
    assert len(real) > 300 and "json/decoder.py" in real and "os.py" in real
    assert not [p for p in real if p.split("/")[0] in ("test", "site-packages")]


# m{i}.py with i in GOLDEN_VAL are the validation files at val_fraction=0.05: the split must
# never move (a moved split leaks validation files into training runs that resume).
GOLDEN_VAL = [5, 15, 61, 74, 81, 85, 90, 93]


def test_stdlib_split_by_file_is_fixed(tmp_path):
    _fake_stdlib(tmp_path)
    rels = sources.stdlib_files(str(tmp_path), include_tests=True)
    val = {r for r in rels if sources.is_validation_file(r, 0.5)}
    assert val and val != set(rels)  # both sides get files at 0.5
    # the rule is a hash of the path alone: golden values hold on every machine
    assert sources.is_validation_file("json/decoder.py", 0.05) is False
    assert [i for i in range(100) if sources.is_validation_file(f"m{i}.py", 0.05)] == GOLDEN_VAL
    splits = sources.load_python_stdlib(root=str(tmp_path), include_tests=True, val_fraction=0.5)
    texts = {name: list(s.texts()) for name, s in splits.items()}
    names = {name: [t.split("\n", 1)[0][len("# file: "):] for t in ts]
             for name, ts in texts.items()}
    assert set(names["validation"]) == val - {"bad.py", "empty/__init__.py"}
    assert names["train"] + names["validation"] != []
    assert all(names[n] == sorted(names[n]) for n in names)
    assert not splits["train"].joined
    assert f"# file: json/decoder.py\n{CODE}" in texts["train"] + texts["validation"]
    again = sources.load_python_stdlib(root=str(tmp_path), include_tests=True, val_fraction=0.5)
    assert again["train"].fingerprint == splits["train"].fingerprint
    no_tests = sources.load_python_stdlib(root=str(tmp_path), val_fraction=0.5)
    assert no_tests["train"].fingerprint != splits["train"].fingerprint or \
        no_tests["validation"].fingerprint != splits["validation"].fingerprint
    with pytest.raises(ValueError, match="val_fraction"):
        sources.load_python_stdlib(root=str(tmp_path), val_fraction=0.0)


def test_code_lm_pipeline_documents_and_bpe(tmp_path, monkeypatch):
    root = tmp_path / "stdlib"
    for i in range(40):
        _write(root / f"pkg/mod{i:02d}.py", CODE.replace("add", f"add{i}"))
    monkeypatch.setattr(sources, "stdlib_root", lambda: str(root))
    cfg = ml_collections.ConfigDict(dict(
        path="", python_stdlib=True, stdlib_tests=False, val_fraction=0.2, tokenizer="bpe",
        vocab_size=350, tokenizer_path="", pack="documents", worker_count=0))
    data = pipeline.build_lm_data(cfg, workdir=str(tmp_path / "run"), seq_len=32, batch_size=4,
                                  seed=0)
    tok = data.tokenizer
    assert isinstance(tok, tokenizers.ByteBPETokenizer)
    train, val = data.train_source, data.eval_source
    n_val = sum(sources.is_validation_file(f"pkg/mod{i:02d}.py", 0.2) for i in range(40))
    assert 0 < n_val < 40
    # documents are separated by </s> (id 6); one per file
    assert int((np.asarray(train.tokens) == 6).sum()) == 40 - n_val - 1
    assert int((np.asarray(val.tokens) == 6).sum()) == n_val - 1
    tokens = np.asarray(train.tokens)
    first = tok.decode(tokens[: int(np.argmax(tokens == 6))])
    assert first.startswith("# file: pkg/mod")
    assert first.endswith("        return (self.x ** 2 + self.y ** 2) ** 0.5\n")
    batch = next(data.train_iter)
    assert batch["inputs"].shape == (4, 32)
