"""Data layer: tokenizers, the LocalText tfds builder, LM windows, grain iterators, entry point."""

from __future__ import annotations

import os
import random

import grain
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from lm.data import pipeline, sources, tokenizers
from lm.data.tokenizers import SPECIAL_TOKENS

MIXED = "Hi  there,\n\n\tworld! é 日本語 🙂 [MASK] [CLS] <s> </s>  \r\nend \n"


def _words_text(num_lines: int = 300, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda"]
    lines = []
    for _ in range(num_lines):
        line = " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))
        lines.append(line + rng.choice([".", "!", "?", "", "  "]))
    return "\n".join(lines) + "\n"


def _write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def _data_cfg(**overrides) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(
        dict(
            path="",
            val_path="",
            val_fraction=0.1,
            tfds_name="",
            tfds_data_dir="",
            text_key="text",
            tokenizer="char",
            vocab_size=0,
            tokenizer_path="",
            pack="chunk",
            worker_count=0,
            eval_max_batches=0,
        )
    )
    cfg.update(overrides)
    return cfg


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer(tmp_path):
    tok = tokenizers.CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 7 + len(set("hello world")) == 15
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.pad_id == 0 and tok.special_id("[NOPE]") is None
    assert tok.encode(" dehlorw") == list(range(7, 15))  # sorted characters after specials
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.encode("hz") == [tok.encode("h")[0], 1]  # unknown -> [UNK], dropped by decode
    assert tok.decode([5, *tok.encode("held"), 6, 0]) == "held"
    tok.save(str(tmp_path))
    again = tokenizers.load_tokenizer(str(tmp_path))
    assert isinstance(again, tokenizers.CharTokenizer)
    assert again.encode("hello world") == tok.encode("hello world")


def test_byte_tokenizer():
    tok = tokenizers.ByteTokenizer()
    ids = tok.encode(MIXED)
    assert tok.vocab_size == 263 and min(ids) >= 7 and max(ids) <= 262
    assert tok.decode(ids) == MIXED
    assert tok.encode("A") == [7 + 65]
    assert 4 not in tok.encode("[MASK]")


def test_sentencepiece_lossless_specials_deterministic(tmp_path):
    corpus = _write(tmp_path / "corpus.txt", _words_text())
    tok = tokenizers.SentencePieceTokenizer.train(corpus, 300)
    assert tok.vocab_size == 300
    assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    for text in [MIXED, "alpha  beta\n\n gamma ", "  leading and trailing  "]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert not set(ids) & set(range(7))  # raw text never yields a special id
    # No dummy prefix: separately tokenized pieces concatenate losslessly.
    assert tok.decode(tok.encode("alpha beta\n") + tok.encode("gamma")) == "alpha beta\ngamma"
    assert tok.decode([5, *tok.encode("delta"), 6, 0]) == "delta"
    tok.save(str(tmp_path / "a"))
    tokenizers.SentencePieceTokenizer.train(corpus, 300).save(str(tmp_path / "b"))
    model_a = (tmp_path / "a" / "spm.model").read_bytes()
    assert model_a == (tmp_path / "b" / "spm.model").read_bytes()
    # A path with commas (study run directories: "width=64,seed=0") trains the same model.
    (tmp_path / "width=64,seed=0").mkdir()
    comma = _write(tmp_path / "width=64,seed=0" / "corpus.txt", _words_text())
    tokenizers.SentencePieceTokenizer.train(comma, 300).save(str(tmp_path / "c"))
    assert model_a == (tmp_path / "c" / "spm.model").read_bytes()
    again = tokenizers.load_tokenizer(str(tmp_path / "a"))
    assert isinstance(again, tokenizers.SentencePieceTokenizer)
    assert again.encode(MIXED) == tok.encode(MIXED)
    from_file = tokenizers.build_tokenizer(
        "sentencepiece", directory=str(tmp_path / "c"), model_path=str(tmp_path / "a/spm.model")
    )
    assert from_file.encode(MIXED) == tok.encode(MIXED)


def test_build_tokenizer_reuses_saved_vocabulary(tmp_path):
    directory = str(tmp_path / "tok")
    first = tokenizers.build_tokenizer(
        "char", directory=directory, corpus_path=_write(tmp_path / "a.txt", "abc")
    )
    second = tokenizers.build_tokenizer(
        "char", directory=directory, corpus_path=_write(tmp_path / "b.txt", "xyz")
    )
    assert first.vocab_size == second.vocab_size == 10
    assert second.encode("abcx") == [7, 8, 9, 1]
    with pytest.raises(ValueError, match="already holds a 'char'"):
        tokenizers.build_tokenizer("byte", directory=directory)
    with pytest.raises(ValueError, match="data.tokenizer"):
        tokenizers.build_tokenizer("bpe", directory=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="data.vocab_size"):
        tokenizers.build_tokenizer(
            "sentencepiece", directory=str(tmp_path / "sp"), corpus_path=str(tmp_path / "a.txt")
        )
    fp = tokenizers.tokenizer_fingerprint(directory)
    assert fp == tokenizers.tokenizer_fingerprint(directory) and len(fp) == 64


def test_wordpiece_dispatch(tmp_path):
    wordpiece = pytest.importorskip("lm.data.wordpiece")
    vocab = _write(tmp_path / "vocab.txt", "\n".join([*wordpiece.SPECIAL_TOKENS, "hello", "##s"]))
    tok = tokenizers.build_tokenizer("wordpiece", directory=str(tmp_path / "wp"), model_path=vocab)
    assert tok.encode("hellos") == [5, 6]
    again = tokenizers.load_tokenizer(str(tmp_path / "wp"))
    assert type(again).__name__ == "WordPieceTokenizer" and again.encode("hello") == [5]


# ----------------------------------------------------------------------------- sources


def test_local_text_split_boundary_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "CHUNK_CHARS", 4096)
    text = "".join(f"line {i} é日\n" if i % 7 else f"{i}" for i in range(3000))
    path = _write(tmp_path / "input.txt", text)
    splits = sources.load_local_text(path, data_dir=str(tmp_path / "data"))
    train = "".join(splits["train"].texts())
    val = "".join(splits["validation"].texts())
    cut = int(len(text) * 0.9)
    assert train == text[:cut] and val == text[cut:]
    assert len(splits["train"]) > 5 and splits["train"].joined
    assert all(len(t) <= 4096 for t in splits["train"].texts())
    # Same content and fraction -> same prepared copy; any change -> a new config name.
    name = sources.local_text_config(path).name
    assert sources.local_text_config(path).name == name
    assert sources.local_text_config(path, val_fraction=0.2).name != name
    _write(tmp_path / "input.txt", text + "x")
    assert sources.local_text_config(path).name != name


def test_local_text_val_path_and_documents(tmp_path):
    train_text = "doc one\nline\n\ndoc two\n\n\n\ndoc three"
    path = _write(tmp_path / "train.txt", train_text)
    val = _write(tmp_path / "valid.txt", "held out\n\nsecond\n")
    splits = sources.load_local_text(
        path, data_dir=str(tmp_path / "data"), val_path=val, doc_separator="\n\n"
    )
    assert list(splits["train"].texts()) == ["doc one\nline\n\n", "doc two\n\n\n\n", "doc three"]
    assert list(splits["validation"].texts()) == ["held out\n\n", "second\n"]
    assert not splits["train"].joined


def test_local_text_errors(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=f"data.path.*{missing}"):
        sources.local_text_config(missing)
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=f"empty.*{empty}"):
        sources.local_text_config(empty)
    path = _write(tmp_path / "a.txt", "abcdef")
    for bad in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="data.val_fraction"):
            sources.local_text_config(path, val_fraction=bad)
    one = _write(tmp_path / "one.txt", "a")
    with pytest.raises(ValueError, match="train split .* is empty"):
        sources.load_local_text(one, data_dir=str(tmp_path / "data"))


class DummyLmDocs(tfds.core.GeneratorBasedBuilder):
    """A catalogue-style builder made in memory: exercises the catalogue reader offline."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {"content": tfds.features.Text(), "id": tfds.features.Scalar(np.int32)}
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            "train": self._generate_examples(["one doc", "two doc"]),
            "test": self._generate_examples(["held"]),
        }

    def _generate_examples(self, docs):
        for i, doc in enumerate(docs):
            yield i, {"content": doc, "id": i}


def test_tfds_catalogue_reader_offline(tmp_path):
    data_dir = str(tmp_path / "tfds")
    splits = sources.load_tfds_catalogue("dummy_lm_docs", data_dir=data_dir, text_key="content")
    assert list(splits["train"].texts()) == ["one doc", "two doc"]
    assert list(splits["validation"].texts()) == ["held"]  # no 'validation': falls back to test
    assert not splits["train"].joined and "dummy_lm_docs" in splits["train"].fingerprint
    with pytest.raises(ValueError, match="data.text_key.*'text'"):
        sources.load_tfds_catalogue("dummy_lm_docs", data_dir=data_dir)


# ----------------------------------------------------------------------------- windows


def test_windows_chunk_mode_shift():
    tokens = np.arange(100, 141, dtype=np.int32)
    source = pipeline.LMWindows(tokens, None, 8)
    assert len(source) == 5
    for i in range(len(source)):
        ex = source[i]
        assert set(ex) == set(pipeline.FIELDS)
        np.testing.assert_array_equal(ex["inputs"], tokens[i * 8 : i * 8 + 8])
        np.testing.assert_array_equal(ex["targets"][:-1], ex["inputs"][1:])
        assert ex["targets"][-1] == tokens[i * 8 + 8]
        np.testing.assert_array_equal(ex["segment_ids"], np.ones(8))
        np.testing.assert_array_equal(ex["positions"], np.arange(8))
        np.testing.assert_array_equal(ex["weights"], np.ones(8))
        assert ex["inputs"].dtype == np.int32 and ex["weights"].dtype == np.float32
    with pytest.raises(IndexError):
        source[5]


def test_documents_mode_truth_table():
    tok = tokenizers.CharTokenizer.from_text("abcdef")  # a=7 ... f=12, </s>=6
    tokens, docs = pipeline.tokenize_texts(["ab", "", "cde", "f"], tok, joined=False)
    np.testing.assert_array_equal(tokens, [7, 8, 6, 9, 10, 11, 6, 12])
    np.testing.assert_array_equal(docs, [0, 0, 0, 1, 1, 1, 1, 2])
    ex = pipeline.LMWindows(tokens, docs, 7, pack="documents")[0]
    np.testing.assert_array_equal(ex["inputs"], [7, 8, 6, 9, 10, 11, 6])
    np.testing.assert_array_equal(ex["targets"], [8, 6, 9, 10, 11, 6, 12])
    np.testing.assert_array_equal(ex["segment_ids"], [1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(ex["positions"], [0, 1, 2, 0, 1, 2, 3])
    np.testing.assert_array_equal(ex["weights"], [1, 1, 0, 1, 1, 1, 0])
    # A window that starts inside a document starts at segment 1, position 0.
    short = pipeline.LMWindows(tokens, docs, 3, pack="documents")
    np.testing.assert_array_equal(short[1]["inputs"], [9, 10, 11])
    np.testing.assert_array_equal(short[1]["segment_ids"], [1, 1, 1])
    np.testing.assert_array_equal(short[1]["weights"], [1, 1, 1])
    np.testing.assert_array_equal(short[0]["weights"], [1, 1, 0])
    joined, joined_docs = pipeline.tokenize_texts(["ab", "cd"], tok, joined=True)
    np.testing.assert_array_equal(joined, [7, 8, 9, 10])
    np.testing.assert_array_equal(joined_docs, [0, 0, 0, 0])


def _window_ids(batches, seq_len: int) -> list[int]:
    return [int(x) // seq_len for b in batches for x in b["inputs"][:, 0]]


def test_train_iterator_shards_disjoint_and_complete():
    seq_len = 4
    source = pipeline.LMWindows(np.arange(16 * seq_len + 1, dtype=np.int32), None, seq_len)
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(
            source, batch_size=4, seed=3, num_epochs=1, process_index=p, process_count=2
        )
        batches = list(it)
        assert len(batches) == 4 and batches[0]["inputs"].shape == (2, seq_len)
        seen.append(_window_ids(batches, seq_len))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(16))
    assert seen[0] != sorted(seen[0])  # shuffled
    with pytest.raises(ValueError, match="train.batch_size"):
        pipeline.make_train_iterator(source, batch_size=3, seed=0, process_index=0, process_count=2)


def test_train_iterator_resumes_exactly():
    source = pipeline.LMWindows(np.arange(10 * 5 + 1, dtype=np.int32), None, 5)

    def fresh():
        return pipeline.make_train_iterator(
            source, batch_size=3, seed=7, process_index=0, process_count=1
        )

    straight = [next(it) for it in [fresh()] for _ in range(6)]
    first = fresh()
    head = [next(first) for _ in range(3)]
    state = first.get_state()
    resumed = fresh()
    resumed.set_state(state)
    tail = [next(resumed) for _ in range(3)]
    assert len(_window_ids(straight, 5)) == 18  # crosses an epoch boundary (10 windows)
    for a, b in zip(straight, head + tail, strict=True):
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(a[k], b[k])


def test_eval_batches_pad_and_split_across_processes():
    seq_len = 4
    source = pipeline.LMWindows(np.arange(7 * seq_len + 1, dtype=np.int32), None, seq_len)
    ids, weights = [], 0.0
    for p in range(2):
        batches = pipeline.make_eval_batches(source, batch_size=4, process_index=p, process_count=2)
        assert len(batches) == 2 and list(batches)[0]["inputs"].shape == (2, seq_len)
        for b in batches:
            real = b["weights"][:, 0] > 0
            ids += [int(x) // seq_len for x in b["inputs"][real, 0]]
            weights += float(b["weights"].sum())
            assert not b["segment_ids"][~real].any()
    assert sorted(ids) == list(range(7)) and weights == 7 * seq_len
    capped = pipeline.make_eval_batches(
        source, batch_size=2, max_batches=2, process_index=0, process_count=1
    )
    assert _window_ids(capped, seq_len) == [0, 1, 2, 3] == _window_ids(capped, seq_len)


# ----------------------------------------------------------------------------- entry point


def test_build_lm_data_end_to_end_and_cache(tmp_path, monkeypatch):
    text = _words_text(200, seed=1)
    cfg = _data_cfg(path=_write(tmp_path / "corpus.txt", text))
    workdir = str(tmp_path / "run")
    data = pipeline.build_lm_data(cfg, workdir=workdir, seq_len=16, batch_size=4, seed=0)
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    train_chars = int(len(text) * 0.9)
    assert data.num_train_windows == (train_chars - 1) // 16
    batch = next(data.train_iter)
    assert batch["inputs"].shape == (4, 16) and batch["targets"].dtype == np.int32
    evals = list(data.eval_batches())
    total = sum(float(b["weights"].sum()) for b in evals)
    assert total == ((len(text) - train_chars - 1) // 16) * 16
    val_text = "".join(data.tokenizer.decode(b["inputs"][i]) for b in evals for i in range(4))
    assert text[train_chars:].startswith(val_text)
    cached = os.listdir(os.path.join(workdir, "data", "tokens"))
    assert len(cached) == 2 and not [f for f in os.listdir(workdir + "/data") if "corpus" in f]

    def boom(*args, **kwargs):
        raise AssertionError("re-tokenized despite the cache")

    monkeypatch.setattr(pipeline, "tokenize_texts", boom)
    again = pipeline.build_lm_data(cfg, workdir=workdir, seq_len=16, batch_size=4, seed=0)
    np.testing.assert_array_equal(next(again.train_iter)["inputs"], batch["inputs"])


def test_build_lm_data_errors(tmp_path):
    workdir = str(tmp_path / "run")
    with pytest.raises(ValueError, match="data.path: no data source given"):
        pipeline.build_lm_data(_data_cfg(), workdir=workdir, seq_len=8, batch_size=2, seed=0)
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match=f"data.path.*{missing}"):
        pipeline.build_lm_data(
            _data_cfg(path=missing), workdir=workdir, seq_len=8, batch_size=2, seed=0
        )
    empty = _write(tmp_path / "empty.txt", "")
    with pytest.raises(ValueError, match=f"empty.*{empty}"):
        pipeline.build_lm_data(
            _data_cfg(path=empty), workdir=workdir, seq_len=8, batch_size=2, seed=0
        )
    path = _write(tmp_path / "c.txt", "abcdefgh" * 20)
    with pytest.raises(ValueError, match="data.tokenizer"):
        pipeline.build_lm_data(
            _data_cfg(path=path, tokenizer="morse"), workdir=workdir, seq_len=8, batch_size=2,
            seed=0
        )
    with pytest.raises(ValueError, match="train.batch_size"):
        pipeline.build_lm_data(
            _data_cfg(path=path),
            workdir=workdir,
            seq_len=8,
            batch_size=3,
            seed=0,
            process_count=2,
        )
    with pytest.raises(ValueError, match="validation split has .* too few"):
        pipeline.build_lm_data(
            _data_cfg(path=path), workdir=workdir, seq_len=64, batch_size=2, seed=0
        )


def test_window_stride_covers_every_offset():
    tokens = np.arange(10, dtype=np.int32)
    aligned = pipeline.LMWindows(tokens, None, 4)
    assert len(aligned) == 2 and aligned[1]["inputs"].tolist() == [4, 5, 6, 7]
    every = pipeline.LMWindows(tokens, None, 4, stride=1)
    assert len(every) == 6  # starts 0..5; the last target is token 9
    assert every[5]["inputs"].tolist() == [5, 6, 7, 8]
    assert every[5]["targets"].tolist() == [6, 7, 8, 9]


def test_fetch_url_checks_the_checksum_and_caches(tmp_path):
    import hashlib

    from lm.data.sources import fetch_url

    src = tmp_path / "input.txt"
    src.write_text("to be or not to be\n")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    path = fetch_url(src.as_uri(), digest, str(cache))
    assert open(path).read() == "to be or not to be\n"
    src.unlink()  # a second call uses the cache, not the network
    assert fetch_url(src.as_uri(), digest, str(cache)) == path
    with pytest.raises(FileNotFoundError, match="data.url"):
        fetch_url((tmp_path / "missing.txt").as_uri(), digest, str(cache))
    other = tmp_path / "other.txt"
    other.write_text("something else")
    with pytest.raises(ValueError, match="data.sha256"):
        fetch_url(other.as_uri(), digest[::-1], str(cache))


class _Same(grain.transforms.Map):
    """An identity transform: keeps make_train_iterator on grain's DataLoader."""

    def map(self, element):
        return element


class _Nested:
    """A generic random-access source with nested and scalar fields."""

    def __len__(self) -> int:
        return 23

    def __getitem__(self, i: int):
        return {"a": np.full(3, i, np.int32), "meta": {"len": np.float32(i) / 2}}

    def __repr__(self) -> str:
        return "_Nested(23)"


def _windows_sources():
    tokens = np.random.default_rng(0).integers(0, 50, 400).astype(np.int32)
    docs = np.cumsum(np.random.default_rng(1).random(400) < 0.05).astype(np.int32)
    return {"chunk": pipeline.LMWindows(tokens, None, 8, stride=3),
            "documents": pipeline.LMWindows(tokens, docs, 8, pack="documents"),
            "nested": _Nested()}


@pytest.mark.parametrize("kind", ["chunk", "documents", "nested"])
@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_sampled_batches_are_grains_batches_and_states(kind, process_index, process_count):
    source = _windows_sources()[kind]

    def make(transforms=()):
        return pipeline.make_train_iterator(
            source, batch_size=4, seed=7, process_index=process_index,
            process_count=process_count, transforms=transforms)

    fast, ref = make(), make((_Same(),))
    assert isinstance(fast, pipeline.SampledBatches)
    assert not isinstance(ref, pipeline.SampledBatches)
    assert fast.get_state() == ref.get_state()
    for _ in range(9):
        got, want = next(fast), next(ref)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_array_equal(g, w, strict=True)  # values, shapes and dtypes
        assert fast.get_state() == ref.get_state()  # byte for byte
    # each resumes from the other's state: the same next batches
    state_fast, state_ref = fast.get_state(), ref.get_state()
    a, b = make(), make((_Same(),))
    a.set_state(state_ref)
    b.set_state(state_fast)
    for _ in range(3):
        jax.tree.map(np.testing.assert_array_equal, next(a), next(b))


def test_sampled_batches_end_of_epochs_and_bad_state():
    source = pipeline.LMWindows(np.arange(41, dtype=np.int32), None, 4)  # 10 windows

    def make(transforms=()):
        return pipeline.make_train_iterator(source, batch_size=3, seed=0, num_epochs=2,
                                            process_index=0, process_count=1,
                                            transforms=transforms)

    # 20 records in two epochs, in batches of 3; the partial batch is dropped as grain does
    fast, ref = list(make()), list(make((_Same(),)))
    assert len(fast) == len(ref) == 6
    jax.tree.map(np.testing.assert_array_equal, fast, ref)
    other = pipeline.make_train_iterator(source, batch_size=3, seed=1, process_index=0,
                                         process_count=1)
    with pytest.raises(ValueError, match="sampler"):
        make().set_state(other.get_state())
    with pytest.raises(IndexError):
        source.batch([0, 10])
