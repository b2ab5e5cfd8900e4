"""Fine-tuning: entity F1 against hand-counted answers (and the on-device counts against the
reference), file readers, the fixed validation split, first-sub-token labels, a few training
steps of each objective and the predict command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from lm import metrics
from lm.data import labelled
from lm.data.wordpiece import WordPieceTokenizer
from lm.objectives.tagging import entity_counts, split_words, tag_tables

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["the", "film", "was", "good", "great", "bad", "dull", "fun", "plot", "john", "paris",
         "acme", "visited", "works", "at", "in", "and", "a", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "johan", "##son", "##s"]


def vocab_file(tmp_path: Path) -> str:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n")
    return str(path)


# ------------------------------------------------------------------ entity F1
@pytest.mark.parametrize("gold,pred,counts", [
    (["B-PER", "I-PER", "O", "B-LOC"], ["B-PER", "I-PER", "O", "B-LOC"], (2, 2, 2)),
    # boundary errors: too short, too long
    (["B-PER", "I-PER", "O"], ["B-PER", "O", "O"], (0, 1, 1)),
    (["B-PER", "O", "O"], ["B-PER", "I-PER", "I-PER"], (0, 1, 1)),
    # type error: same span, other type
    (["B-ORG", "I-ORG"], ["B-LOC", "I-LOC"], (0, 1, 1)),
    # an I- without a B- opens an entity (conlleval), here the same span as the gold B- I-
    (["O", "B-PER", "I-PER", "O"], ["O", "I-PER", "I-PER", "O"], (1, 1, 1)),
    # I- of another type ends the entity and opens a new one
    (["B-PER", "I-LOC"], ["B-PER", "I-PER"], (0, 1, 2)),
    # two adjacent entities of one type need a B- to be two
    (["B-PER", "B-PER"], ["B-PER", "I-PER"], (0, 1, 2)),
    # IOB1 gold (B- only between adjacent same-type entities) against IOB2 predictions
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], ["B-PER", "I-PER", "B-PER", "O", "B-LOC"],
     (3, 3, 3)),
    # IOBES
    (["S-PER", "B-LOC", "E-LOC", "O"], ["S-PER", "B-LOC", "I-LOC", "E-LOC"], (1, 2, 2)),
    (["O", "O"], ["O", "O"], (0, 0, 0)),
])
def test_entity_counts_known_answers(gold, pred, counts):
    assert metrics.entity_counts([gold], [pred]) == counts


def test_entities_and_scores_by_hand():
    assert metrics.get_entities(["O", "I-PER", "I-PER", "B-PER", "O", "B-LOC", "I-ORG"]) == [
        ("PER", 1, 2), ("PER", 3, 3), ("LOC", 5, 5), ("ORG", 6, 6)]
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O", "B-MISC", "I-MISC"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O", "B-MISC", "O"]]
    # gold 4 entities, predicted 4, correct 2 (PER, ORG): P = R = F1 = 0.5
    assert metrics.entity_scores(gold, pred) == {"precision": 0.5, "recall": 0.5, "f1": 0.5}
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "O", "O", "O"]]  # 2 of 2 correct
    scores = metrics.entity_scores(gold, pred)
    assert scores["precision"] == 1.0 and scores["recall"] == 0.5
    assert scores["f1"] == pytest.approx(2 / 3)
    assert metrics.entity_scores([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0,
                                                        "f1": 0.0}
    with pytest.raises(ValueError, match="length"):
        metrics.entity_counts([["O"]], [["O", "O"]])


def test_iob1_to_iob2_keeps_entities():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG"]
    iob2 = metrics.iob1_to_iob2(iob1)
    assert iob2 == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG"]
    assert metrics.get_entities(iob1) == metrics.get_entities(iob2)


@pytest.mark.parametrize("labels", [
    ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"],
    ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "I-B", "E-B", "S-B"],
    ["O", "I-PER", "I-LOC", "B-LOC"],  # IOB1
])
def test_device_entity_counts_match_reference(labels):
    rng = np.random.default_rng(len(labels))
    gold = rng.integers(0, len(labels), (64, 12))
    pred = np.where(rng.random((64, 12)) < 0.6, gold, rng.integers(0, len(labels), (64, 12)))
    weights = (rng.random((64, 12)) < 0.7).astype(np.float32)  # unscored sub-tokens between
    prefix, kind = tag_tables(labels)
    got = entity_counts(jnp.asarray(gold), jnp.asarray(pred), jnp.asarray(weights), prefix,
                        kind)
    words = [[[labels[t] for t, w in zip(row, wrow, strict=True) if w] for row, wrow in
              zip(x, weights, strict=True)] for x in (gold, pred)]
    assert tuple(int(x) for x in got) == metrics.entity_counts(*words)


# ------------------------------------------------------------------ readers
def test_conll_reader(tmp_path):
    path = tmp_path / "sample.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n"
                    "German JJ B-NP B-MISC\n\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n"
                    "\n-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP B-LOC")  # no final newline
    sentences = labelled.read_conll(str(path))
    assert [s.words for s in sentences] == [("EU", "rejects", "German"), ("Peter", "Blackburn"),
                                            ("BRUSSELS",)]
    assert sentences[0].tags == ("B-ORG", "O", "B-MISC")
    assert labelled.read_conll(str(path), tag_column=2)[1].tags == ("B-NP", "I-NP")
    tags = {t for s in sentences for t in s.tags}
    assert labelled.tag_order(tags) == ["O", "B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER"]
    bad = tmp_path / "bad.txt"
    bad.write_text("EU B-ORG\nlonely\n")
    with pytest.raises(ValueError, match=r"data.path: .*bad.txt:2"):
        labelled.read_conll(str(bad))


def test_tsv_jsonl_readers_and_fixed_validation_split(tmp_path):
    tsv = tmp_path / "train.tsv"
    tsv.write_text('sentence\tlabel\nit \'s "great" \t1\nso dull\t0\n\n')
    examples = labelled.read_tsv(str(tsv))
    assert examples == [labelled.TextExample('it \'s "great"', None, "1"),
                        labelled.TextExample("so dull", None, "0")]
    with pytest.raises(ValueError, match="data.path: .* no column 'text'"):
        labelled.read_tsv(str(tsv), text_key="text")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"q": "a", "p": "b", "y": 1}\n\n{"q": "c", "p": "d", "y": "x"}\n')
    got = labelled.read_jsonl(str(jsonl), text_key="q", text_pair_key="p", label_key="y")
    assert got[0] == labelled.TextExample("a", "b", "1") and got[1].label == "x"
    jsonl.write_text('{"q": "a"}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1 has no key 'y'"):
        labelled.read_jsonl(str(jsonl), text_key="q", label_key="y")

    train, val = labelled.validation_split(1000, 100, seed=0)
    again_train, again_val = labelled.validation_split(1000, 100, seed=0)
    np.testing.assert_array_equal(val, again_val)
    np.testing.assert_array_equal(train, again_train)
    assert len(val) == 100 and len(train) == 900
    assert not set(train) & set(val) and set(train) | set(val) == set(range(1000))
    assert set(labelled.validation_split(1000, 100, seed=1)[1]) != set(val)
    with pytest.raises(ValueError, match="data.val_size"):
        labelled.validation_split(10, 10, seed=0)


# Three parse trees: every phrase of each sentence is an example, as in SST's train.tsv.
PHRASES = ["a great film .", "a great film", "great film", "a", "great", "film", ".",
           "a dull plot .", "a dull plot", "dull plot", "dull", "plot",
           "the film ends .", "the film ends", "the film", "the", "ends"]


@pytest.mark.parametrize("seed", range(4))
def test_sentence_split_keeps_validation_sentences_out_of_training(seed):
    train, val = labelled.sentence_split(PHRASES, 1, seed)
    sentence = PHRASES[val[0]]
    assert sentence in ("a great film .", "a dull plot .", "the film ends .")
    train_texts = {PHRASES[i] for i in train}
    # nothing of the validation tree is trained on unless another sentence has it too
    others = [s for s in ("a great film .", "a dull plot .", "the film ends .")
              if s != sentence]
    for phrase in PHRASES:
        in_other = any(f" {phrase} " in f" {s} " for s in others)
        assert (phrase in train_texts) == in_other, (sentence, phrase)
    assert labelled.sentence_split(PHRASES, 1, seed)[1].tolist() == val.tolist()
    with pytest.raises(ValueError, match="data.val_size=3 must be in \\(0, 3\\)"):
        labelled.sentence_split(PHRASES, 3, seed)


def test_labels_are_saved_and_reused(tmp_path):
    assert labelled.resolve_labels(str(tmp_path), [], {"b", "a"}) == ["a", "b"]
    assert json.loads((tmp_path / "labels.json").read_text()) == ["a", "b"]
    assert labelled.resolve_labels(str(tmp_path), [], {"a"}) == ["a", "b"]  # resumed run
    with pytest.raises(ValueError, match=r"data.labels: .*\['c'\]"):
        labelled.resolve_labels(str(tmp_path), [], {"a", "c"})


def test_tokenizer_comes_from_the_init_run(tmp_path):
    from ml_collections import ConfigDict

    run = tmp_path / "pretrain"
    WordPieceTokenizer.from_vocab_file(vocab_file(tmp_path)).save(run / "tokenizer")
    for spec in (str(run), f"{run}@100"):
        c = ConfigDict({"init_from": spec, "data": dict(
            tokenizer="wordpiece", tokenizer_path="", tokenizer_from_init=True, vocab_size=0)})
        workdir = tmp_path / f"ft{len(spec)}"
        workdir.mkdir()
        tok = labelled.build_tokenizer(c, str(workdir), lambda: [])
        assert tok.vocab_size == len(VOCAB)
        assert (workdir / "tokenizer" / "vocab.txt").read_text().split() == VOCAB
    c.init_from = ""
    with pytest.raises(ValueError, match="--config.init_from="):
        labelled.build_tokenizer(c, str(tmp_path), lambda: [])


# ------------------------------------------------------------------ encoding
def test_first_subtoken_labels(tmp_path):
    tok = WordPieceTokenizer.from_vocab_file(vocab_file(tmp_path))
    words = ["Johanson", "visited", "Paris", "Johans"]
    ids, first = labelled.encode_words(tok, words, seq_len=16)
    assert tok.tokens_of(ids) == ["[CLS]", "johan", "##son", "visited", "paris", "johan", "##s",
                                  "[SEP]"]
    assert first.tolist() == [-1, 0, -1, 1, 2, 3, -1, -1]
    labels = ["O", "B-LOC", "B-PER"]
    source, cut = labelled.tagging_source(
        tok, [labelled.TaggedSentence(tuple(words), ("B-PER", "O", "B-LOC", "B-PER"))],
        labels, seq_len=10)
    row = source[0]
    assert cut == 0
    assert row["weights"].tolist() == [0, 1, 0, 1, 1, 1, 0, 0, 0, 0]
    assert row["labels"][row["weights"] > 0].tolist() == [2, 0, 1, 2]
    assert row["segment_ids"].tolist() == [1] * 8 + [0] * 2 and row["num_entities"] == 3
    # Truncation: the last word does not fit; its entity still counts as gold.
    short, cut = labelled.tagging_source(
        tok, [labelled.TaggedSentence(tuple(words), ("B-PER", "O", "B-LOC", "B-PER"))],
        labels, seq_len=6)
    assert cut == 1 and short[0]["num_entities"] == 3 and short[0]["entity_cut"] == 0
    # ... and when the cut splits an entity, the row says so: it can never be matched.
    split, _ = labelled.tagging_source(
        tok, [labelled.TaggedSentence(tuple(words), ("B-PER", "O", "B-LOC", "I-LOC"))],
        ["O", "B-LOC", "I-LOC", "B-PER"], seq_len=6)
    assert split[0]["entity_cut"] == 1 and split[0]["num_entities"] == 2
    prefix, kind = tag_tables(["O", "B-LOC", "I-LOC", "B-PER"])
    batch = {k: jnp.asarray(v[None]) for k, v in split[0].items()}
    counts = [entity_counts(batch["labels"], batch["labels"], batch["weights"], prefix, kind,
                            cut) for cut in (None, batch["entity_cut"])]
    assert [int(c[0]) for c in counts] == [2, 1]  # PER only; LOC 2..3 was cut at 2
    assert tok.tokens_of(short[0]["inputs"]) == ["[CLS]", "johan", "##son", "visited", "paris",
                                                 "[SEP]"]
    assert split_words("Acme's U.S. office, 1996-08-22!") == [
        "Acme's", "U.S", ".", "office", ",", "1996-08-22", "!"]


def test_sentence_pair_encoding(tmp_path):
    tok = WordPieceTokenizer.from_vocab_file(vocab_file(tmp_path))
    ids, types = labelled.encode_pair(tok, "the film was good", "a dull plot", seq_len=16)
    assert tok.tokens_of(ids) == ["[CLS]", "the", "film", "was", "good", "[SEP]", "a", "dull",
                                  "plot", "[SEP]"]
    assert types.tolist() == [0] * 6 + [1] * 4
    ids, types = labelled.encode_pair(tok, "the film was good", "a dull plot", seq_len=7)
    assert tok.tokens_of(ids) == ["[CLS]", "the", "film", "[SEP]", "a", "dull", "[SEP]"]
    ids, _ = labelled.encode_pair(tok, "the film was good and fun", None, seq_len=5)
    assert tok.tokens_of(ids) == ["[CLS]", "the", "film", "was", "[SEP]"]


# ------------------------------------------------------------------ training + predict
def load_config(name: str, arg: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def tiny(c, tmp_path, **data):
    c.model.update(num_layers=2, d_model=32, num_heads=2, mlp_dim=64, dropout_rate=0.0,
                   attention_dropout_rate=0.0)
    c.data.update(tokenizer_path=vocab_file(tmp_path), vocab_size=0, seq_len=16, **data)
    c.mesh.num_devices = 1
    c.train.update(steps=2, batch_size=4, log_every=1, eval_every=2, checkpoint_every=2,
                   async_checkpoint=False)
    return c


def read_metrics(workdir) -> dict[str, float]:
    out = {}
    for line in Path(workdir, "metrics.jsonl").read_text().splitlines():
        out.update(json.loads(line))
    return out


def predict(workdir, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm.predict", f"--workdir={workdir}", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    from lm import train

    tmp = tmp_path_factory.mktemp("cls")
    rng = np.random.default_rng(0)
    lines = ["text\tother\tlabel"]
    for _ in range(40):
        good = rng.random() < 0.5
        words = rng.choice(["good", "great", "fun"] if good else ["bad", "dull"], 2)
        lines.append(f"the film was {' '.join(words)}\tthe plot\t{'pos' if good else 'neg'}")
    (tmp / "train.tsv").write_text("\n".join(lines) + "\n")
    c = tiny(load_config("finetune_sst2", "random,runlocal"), tmp, path=str(tmp / "train.tsv"),
             text_key="text", text_pair_key="other", labels="", label_map="", val_size=8)
    train.train_and_evaluate(c, str(tmp / "run"))
    return tmp / "run"


@pytest.fixture(scope="module")
def tagging_run(tmp_path_factory):
    from lm import train

    tmp = tmp_path_factory.mktemp("tag")
    sentences = ["john B-PER\nvisited O\nparis B-LOC\n. O",
                 "acme B-ORG\nworks O\nin O\nparis B-LOC",
                 "john B-PER\njohanson I-PER\nworks O\nat O\nacme B-ORG"]
    text = "-DOCSTART- O\n\n" + "\n\n".join(sentences * 6) + "\n"
    (tmp / "train.txt").write_text(text)
    (tmp / "valid.txt").write_text(text)
    c = tiny(load_config("finetune_conll03", "random,runlocal"), tmp,
             path=str(tmp / "train.txt"), val_path=str(tmp / "valid.txt"), labels="")
    train.train_and_evaluate(c, str(tmp / "run"))
    return tmp / "run"


def test_classification_trains_and_predicts(classification_run):
    m = read_metrics(classification_run)
    assert m["step"] == 2 and 0.0 <= m["eval/accuracy"] <= 1.0 and np.isfinite(m["eval/loss"])
    assert "eval/ppl" not in m
    labels = json.loads((classification_run / "labels.json").read_text())
    assert labels == ["neg", "pos"]
    proc = predict(classification_run, "--text", "the film was great", "--text",
                   "dull\tthe plot", "--text", "so bad")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    for line, text in zip(lines, ["the film was great", "dull\tthe plot", "so bad"],
                          strict=True):
        label, score, rest = line.split("\t", 2)
        assert label in labels and 0.5 <= float(score) <= 1.0 and rest == text


def test_tagging_trains_and_predicts(tagging_run):
    m = read_metrics(tagging_run)
    for key in ("eval/f1", "eval/precision", "eval/recall", "eval/accuracy"):
        assert 0.0 <= m[key] <= 1.0, key
    assert not any(k.startswith("eval/entity_") for k in m)
    labels = json.loads((tagging_run / "labels.json").read_text())
    assert labels == ["O", "B-LOC", "B-ORG", "B-PER", "I-PER"]
    proc = predict(tagging_run, "--text", "John Johanson visited Paris.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = proc.stdout.strip().splitlines()
    pairs = [p.rsplit("/", 1) for p in line.split(" ")]
    assert [w for w, _ in pairs] == ["John", "Johanson", "visited", "Paris", "."]
    assert all(t in labels for _, t in pairs)


def test_predict_errors_are_one_line(tmp_path, classification_run):
    for args in ([f"--workdir={tmp_path / 'none'}", "--text", "x"],
                 [f"--workdir={tmp_path}", "--text", "x"],
                 [f"--workdir={classification_run}"]):
        proc = subprocess.run([sys.executable, "-m", "lm.predict", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and last.startswith("error: --"), proc.stderr[-1000:]


def test_labelled_reader_pretrains_on_exactly_the_finetuning_training_texts(tmp_path):
    """Task-adaptive pretraining (reader=labelled) sees the fine-tuning run's training texts,
    never its validation sentences (nor phrases found only inside them)."""
    from lm.data import labelled
    from lm.data.bert_pipeline import BertDataOptions, labelled_documents

    sentences = [f"w{i} a{i % 7} b{i % 5} c{i % 3}" for i in range(40)]
    rows = sentences + [" ".join(s.split()[1:3]) for s in sentences[:20]]  # inner phrases
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    opts = BertDataOptions(path=str(path), reader="labelled", format="tsv", text_key="sentence",
                           val_split="sentences", val_size=6, split_seed=3, texts_per_document=4,
                           nsp_mode="none")
    train_docs, val_docs = labelled_documents(opts)
    examples = labelled.read_tsv(str(path), text_key="sentence")
    tr, va = labelled.split_examples(opts.__dict__, examples)
    assert [t for d in train_docs for t in d] == [examples[i].text for i in tr]
    assert [t for d in val_docs for t in d] == [examples[i].text for i in va]
    assert len(va) == 6 and all(len(d) <= 4 for d in train_docs)
    val_texts = {examples[i].text for i in va}
    assert not val_texts & {t for d in train_docs for t in d}
