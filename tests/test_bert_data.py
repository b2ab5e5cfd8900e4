"""BERT pretraining data: WordPiece, document readers, NSP/SOP pairs, MLM masking."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lm.data.bert import (
    IS_NEXT,
    NO_LABEL,
    NOT_NEXT,
    BertPretrainingSource,
    BertSpecials,
    Pair,
    build_bert_examples,
    encode_pair,
    make_mlm_example,
    make_nsp_pairs,
    mask_tokens,
)
from lm.data.documents import (
    read_blank_line_documents,
    read_wikitext,
    read_wikitext_articles,
    split_sentences,
)
from lm.data.wordpiece import WordPieceTokenizer, basic_tokenize

WIKITEXT2_TRAIN = Path(__file__).resolve().parents[2] / "shared/data/wikitext2/train.txt"

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "un",
    "##aff",
    "##able",
    "want",
    "##want",
    "##ed",
    "runn",
    "##ing",
    ",",
    ".",
    "!",
    "?",
    "hello",
    "world",
    "cafe",
    "naive",
    "你",
    "好",
    "a",
    "##a",
    "the",
    "cat",
    "sat",
]


@pytest.fixture
def tiny_tok(tmp_path: Path) -> WordPieceTokenizer:
    path = tmp_path / "vocab.txt"
    path.write_text("".join(t + "\n" for t in SPECIALS + WORDS), encoding="utf-8")
    return WordPieceTokenizer.from_vocab_file(path)


def pieces(tok: WordPieceTokenizer, text: str) -> list[str]:
    return tok.tokens_of(tok.encode(text))


# ---------------------------------------------------------------------------- WordPiece


def test_wordpiece_greedy_longest_match(tiny_tok):
    assert pieces(tiny_tok, "unaffable") == ["un", "##aff", "##able"]
    assert pieces(tiny_tok, "UNwant\u00e9d,running") == [
        "un",
        "##want",
        "##ed",
        ",",
        "runn",
        "##ing",
    ]
    assert tiny_tok.decode(tiny_tok.encode("unaffable running")) == "unaffable running"


def test_wordpiece_punctuation_unknown_and_long_words(tiny_tok):
    assert pieces(tiny_tok, "hello,world!") == ["hello", ",", "world", "!"]
    assert pieces(tiny_tok, "hello xyz world") == ["hello", "[UNK]", "world"]
    assert pieces(tiny_tok, "unxyz") == ["[UNK]"]  # a partly matched word is [UNK] as a whole
    assert pieces(tiny_tok, "a" * 100) == ["a"] + ["##a"] * 99
    assert pieces(tiny_tok, "a" * 101) == ["[UNK]"]
    assert tiny_tok.decode(tiny_tok.encode("hello xyz")) == "hello"  # specials skipped


def test_wordpiece_lowercase_accents_cjk_and_cleaning(tmp_path, tiny_tok):
    assert pieces(tiny_tok, "Café  NAÏVE") == ["cafe", "naive"]
    assert pieces(tiny_tok, "你好world") == ["你", "好", "world"]
    assert pieces(tiny_tok, "hel\x00lo\tworld\u00ad\n") == ["hello", "world"]
    assert basic_tokenize("Héllo, World", lowercase=False) == ["Héllo", ",", "World"]
    cased = WordPieceTokenizer.from_vocab_file(tmp_path / "vocab.txt", lowercase=False)
    assert pieces(cased, "Hello hello café") == ["[UNK]", "hello", "[UNK]"]


def test_wordpiece_protocol_word_ids_and_roundtrip(tmp_path, tiny_tok):
    assert tiny_tok.pad_id == 0 and tiny_tok.vocab_size == len(SPECIALS) + len(WORDS)
    assert [tiny_tok.special_id(t) for t in SPECIALS] == [0, 1, 2, 3, 4]
    assert tiny_tok.special_id("<s>") is None and tiny_tok.special_id("</s>") is None
    ids, words = tiny_tok.word_ids("the unaffable cat")
    assert tiny_tok.tokens_of(ids) == ["the", "un", "##aff", "##able", "cat"]
    assert words == [0, 1, 1, 1, 2]
    assert [tiny_tok.is_continuation(i) for i in ids] == [False, False, True, True, False]
    tiny_tok.save(tmp_path / "saved")
    manifest = json.loads((tmp_path / "saved/tokenizer.json").read_text())
    assert manifest["kind"] == "wordpiece"
    loaded = WordPieceTokenizer.load(tmp_path / "saved")
    assert loaded.tokens == tiny_tok.tokens
    assert loaded.encode("UNwanted, running!") == tiny_tok.encode("UNwanted, running!")


def test_wordpiece_vocab_errors(tmp_path):
    bad = tmp_path / "bad_vocab.txt"
    bad.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad_vocab\.txt.*\[CLS\]"):
        WordPieceTokenizer.from_vocab_file(bad)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        WordPieceTokenizer.from_vocab_file(tmp_path / "missing.txt")


def test_first_regular_id_skips_reserved_tokens():
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + SPECIALS[1:] + ["[unused3]", "a"]
    assert WordPieceTokenizer(vocab).first_regular_id == len(vocab) - 1


def _corpus(path: Path) -> Path:
    rng = np.random.default_rng(0)
    stems = ["play", "walk", "talk", "jump", "read", "write", "sing", "run", "cook", "paint"]
    ends = ["", "s", "ed", "ing", "er", "ers"]
    lines = []
    for _ in range(400):
        words = [stems[rng.integers(10)] + ends[rng.integers(6)] for _ in range(12)]
        lines.append(" ".join(words) + ", Déjà vu! 東京 (ok).")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_wordpiece_train_specials_first(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = _corpus(tmp_path / "corpus.txt")
    tok = WordPieceTokenizer.train(corpus, 120, tmp_path / "t1")
    assert tok.tokens[:5] == SPECIALS and 100 < tok.vocab_size <= 120
    assert (tmp_path / "t1/vocab.txt").read_text().split("\n")[:5] == SPECIALS
    assert WordPieceTokenizer.load(tmp_path / "t1").tokens == tok.tokens
    # The Rust trainer breaks frequency ties in hash order: runs agree only nearly.
    again = WordPieceTokenizer.train(corpus, 120, tmp_path / "t2")
    assert len(set(tok.tokens) & set(again.tokens)) >= 0.9 * tok.vocab_size
    assert tok.decode(tok.encode("Walking, singers!")) == "walking , singers !"


def test_wordpiece_matches_reference_implementation(tmp_path):
    """Our Python WordPiece agrees with the Rust BertWordPieceTokenizer on tricky text."""
    tokenizers = pytest.importorskip("tokenizers")
    corpus = _corpus(tmp_path / "corpus.txt")
    tok = WordPieceTokenizer.train(corpus, 150, tmp_path / "t")
    ref = tokenizers.BertWordPieceTokenizer(str(tmp_path / "t/vocab.txt"), lowercase=True)
    texts = corpus.read_text().split("\n")[:50] + [
        "Ünïcödé  ÀÉÎ\tplaying\u3000jumps",
        "a\u200bb \ufffd c\x07d",
        "東京タワー",
        "zzz" * 40,
        "x" * 101,
        "walk-ers' (talk) [sing] {cook}",
        "¿Qué? ¡Sí! — «ok»",
    ]
    for text in texts:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False).ids, text


# ---------------------------------------------------------------------------- documents

# Blank lines are ' ' and every line ends in a space, as in the WikiText files.
WIKI_SAMPLE = "\n".join([
    "", " = Alpha = ", " ", " Alpha is a thing . It has two sentences ? Yes ! ", " ",
    " = = History = = ", " ", " = = = Early years = = = ", " ",
    " Alpha began in 1 @,@ 900 in St. Louis . ", " Table row ", " = Played , W = ", " ",
    " = Beta = ", " ", " Beta is another thing . ", "",
])


def test_split_sentences():
    assert split_sentences("A b . C d ? E ! tail", spaced=True) == ["A b .", "C d ?", "E !", "tail"]
    assert split_sentences("Media.Vision is 1 @.@ 5 . Next", spaced=True) == [
        "Media.Vision is 1 @.@ 5 .",
        "Next",
    ]
    assert split_sentences('He said "Hi." Then (he left.) end') == [
        'He said "Hi."',
        "Then (he left.)",
        "end",
    ]


def test_read_wikitext_sample(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI_SAMPLE, encoding="utf-8")
    articles = read_wikitext_articles(path)
    assert [title for title, _ in articles] == ["Alpha", "Beta"]
    assert read_wikitext(path) == [
        [
            "Alpha is a thing .",
            "It has two sentences ?",
            "Yes !",
            "Alpha began in 1 @,@ 900 in St. Louis .",
            "Table row",
            "= Played , W =",
        ],
        ["Beta is another thing ."],
    ]
    with_headings = read_wikitext(path, keep_headings=True)[0]
    assert with_headings[3:5] == ["History", "Early years"]


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_wikitext(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        read_blank_line_documents(tmp_path / "empty.txt")
    (tmp_path / "plain.txt").write_text("Just text.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="WikiText"):
        read_wikitext(tmp_path / "plain.txt")


def test_read_blank_line_documents(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("One. Two!\nThree\n\n\n  \nFour?\n\nFive. Six.\n", encoding="utf-8")
    assert read_blank_line_documents(path) == [
        ["One.", "Two!", "Three"],
        ["Four?"],
        ["Five.", "Six."],
    ]
    assert read_blank_line_documents(path, line_per_sentence=True)[2] == ["Five. Six."]


@pytest.mark.skipif(not WIKITEXT2_TRAIN.is_file(), reason=f"{WIKITEXT2_TRAIN} not present")
def test_wikitext2_train_article_count():
    articles = read_wikitext_articles(WIKITEXT2_TRAIN)
    assert len(articles) == 600  # the published figure; titles with blank lines around
    assert articles[0][0] == "Valkyria Chronicles III"
    assert all(sentences for _, sentences in articles)


# ---------------------------------------------------------------------------- pairs


def synthetic_docs(n_docs: int, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [
        [
            rng.integers(5, 1000, size=rng.integers(3, 40)).tolist()
            for _ in range(rng.integers(1, 30))
        ]
        for _ in range(n_docs)
    ]


def is_slice_of(part: np.ndarray, sentences: list[list[int]]) -> bool:
    whole = [t for s in sentences for t in s]
    n = len(part)
    return any(list(part) == whole[i : i + n] for i in range(len(whole) - n + 1))


def test_nsp_pairs_balanced_consecutive_and_fitting():
    docs, max_len = synthetic_docs(1000), 64
    pairs = make_nsp_pairs(docs, max_seq_len=max_len, seed=3)
    labels = np.array([p.label for p in pairs])
    assert len(pairs) >= 5000
    assert abs((labels == IS_NEXT).mean() - 0.5) < 0.02
    assert set(labels.tolist()) == {IS_NEXT, NOT_NEXT}
    for p in pairs:
        assert len(p.tokens_a) >= 1 and len(p.tokens_b) >= 1
        assert len(p.tokens_a) + len(p.tokens_b) + 3 <= max_len
        assert is_slice_of(p.tokens_a, docs[p.doc][slice(*p.a_span)])
        assert is_slice_of(p.tokens_b, docs[p.b_doc][slice(*p.b_span)])
        if p.label == IS_NEXT:
            assert p.b_doc == p.doc and p.a_span[1] == p.b_span[0]
        else:
            assert p.b_doc != p.doc
    # Short targets happen; without them every chunk reaches the target or a document's end.
    lengths = np.array([len(p.tokens_a) + len(p.tokens_b) for p in pairs])
    assert (lengths == max_len - 3).mean() > 0.3 and (lengths < 20).any()


def test_sop_and_single_segment_pairs():
    docs = synthetic_docs(300)
    sop = make_nsp_pairs(docs, max_seq_len=64, nsp_mode="sop", seed=1)
    assert abs(np.mean([p.label == NOT_NEXT for p in sop]) - 0.5) < 0.03
    for p in sop:
        assert p.b_doc == p.doc
        if p.label == IS_NEXT:
            assert p.a_span[1] == p.b_span[0]
        else:  # swapped consecutive spans: A is the later one
            assert p.b_span[1] == p.a_span[0]
        assert is_slice_of(p.tokens_a, docs[p.doc][slice(*p.a_span)])
    single = make_nsp_pairs(docs, max_seq_len=64, nsp_mode="none", seed=1)
    assert all(
        p.label == NO_LABEL and len(p.tokens_b) == 0 and len(p.tokens_a) <= 62 for p in single
    )
    # Every sentence of every document is used exactly once as a segment start..end.
    covered = sum(p.a_span[1] - p.a_span[0] for p in single)
    assert covered == sum(len(d) for d in docs)


def test_encode_pair_truth_table():
    specials = BertSpecials(
        vocab_size=100,
        pad_id=0,
        cls_id=2,
        sep_id=3,
        mask_id=4,
        special_ids=(0, 1, 2, 3, 4),
        random_token_low=5,
    )
    pair = Pair(0, (0, 1), 0, (1, 2), np.array([10, 11]), np.array([20, 21, 22]), IS_NEXT)
    ex = encode_pair(pair, specials, 10)
    assert ex["input_ids"].tolist() == [2, 10, 11, 3, 20, 21, 22, 3, 0, 0]
    assert ex["segment_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert ex["valid"].tolist() == [1] * 8 + [0, 0]
    assert ex["attention_mask"].tolist() == ex["valid"].tolist()
    assert int(ex["nsp_label"]) == 0
    single = Pair(0, (0, 1), -1, (1, 1), np.array([10, 11]), np.zeros(0, np.int32), NO_LABEL)
    ex = encode_pair(single, specials, 6)
    assert ex["input_ids"].tolist() == [2, 10, 11, 3, 0, 0]
    assert ex["segment_ids"].tolist() == [0] * 6 and int(ex["nsp_label"]) == -1
    with pytest.raises(ValueError, match="max_seq_len"):
        encode_pair(pair, specials, 7)


# ---------------------------------------------------------------------------- masking

VOCAB, MASK_ID, SPECIAL_IDS = 1000, 4, (0, 1, 2, 3, 4)


def synthetic_batch(n: int, length: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, VOCAB, size=(n, length)).astype(np.int32)
    valid = np.zeros((n, length), np.int32)
    for row in range(n):
        real = int(rng.integers(length // 2, length + 1))
        sep = int(rng.integers(2, real - 1))
        ids[row, 0], ids[row, sep], ids[row, real - 1] = 2, 3, 3
        ids[row, real:] = 0
        valid[row, :real] = 1
    return ids, valid


def test_masking_statistics_and_invariants():
    ids, valid = synthetic_batch(2000, 128)
    rng = np.random.default_rng(0)
    chosen = eligible = n_mask = n_random = n_same = 0
    for row in range(len(ids)):
        out = mask_tokens(
            ids[row],
            valid[row],
            rng=rng,
            vocab_size=VOCAB,
            mask_id=MASK_ID,
            special_ids=SPECIAL_IDS,
            max_predictions=128,
            random_token_low=5,
        )
        w = out["masked_weights"]
        m = int(w.sum())
        pos = out["masked_positions"][:m]
        is_eligible = (valid[row] == 1) & (ids[row] > 4)
        assert is_eligible[pos].all()  # never specials, never padding
        assert len(set(pos.tolist())) == m and (np.diff(pos) > 0).all()
        assert (out["masked_ids"][:m] == ids[row][pos]).all()
        assert (out["masked_positions"][m:] == 0).all() and (w[m:] == 0).all()
        untouched = np.ones(128, bool)
        untouched[pos] = False
        assert (out["input_ids"][untouched] == ids[row][untouched]).all()
        new = out["input_ids"][pos]
        assert ((new == MASK_ID) | (new >= 5)).all()  # random replacements are not specials
        chosen, eligible = chosen + m, eligible + int(is_eligible.sum())
        n_mask += int((new == MASK_ID).sum())
        n_same += int((new == ids[row][pos]).sum())
        n_random += int(((new != MASK_ID) & (new != ids[row][pos])).sum())
    assert abs(chosen / eligible - 0.15) < 0.01
    assert abs(n_mask / chosen - 0.8) < 0.02
    assert abs(n_random / chosen - 0.1) < 0.02
    assert abs(n_same / chosen - 0.1) < 0.02


def test_masking_cap_and_at_least_one():
    ids, valid = synthetic_batch(200, 128, seed=1)
    rng = np.random.default_rng(1)
    for row in range(len(ids)):
        out = mask_tokens(
            ids[row],
            valid[row],
            rng=rng,
            vocab_size=VOCAB,
            mask_id=MASK_ID,
            special_ids=SPECIAL_IDS,
            max_predictions=5,
        )
        assert out["masked_weights"].sum() == 5 and out["masked_positions"].shape == (5,)
    short = np.array([2, 50, 3, 0, 0], np.int32)
    out = mask_tokens(
        short,
        short > 0,
        rng=rng,
        vocab_size=VOCAB,
        mask_id=MASK_ID,
        special_ids=SPECIAL_IDS,
        max_predictions=3,
    )
    assert out["masked_positions"].tolist() == [1, 0, 0]
    assert out["masked_weights"].tolist() == [1, 0, 0]


def test_whole_word_masking_all_pieces_or_none():
    continuation = np.arange(VOCAB) >= 600  # ids 600.. are "##" pieces
    ids, valid = synthetic_batch(300, 128, seed=2)
    total_chosen = total_eligible = 0
    for row in range(len(ids)):
        kwargs = dict(
            vocab_size=VOCAB,
            mask_id=MASK_ID,
            special_ids=SPECIAL_IDS,
            max_predictions=30,
            whole_word=True,
            random_token_low=5,
        )
        out = mask_tokens(
            ids[row],
            valid[row],
            rng=np.random.default_rng(row),
            is_continuation=continuation,
            **kwargs,
        )
        same = mask_tokens(
            ids[row],
            valid[row],
            rng=np.random.default_rng(row),
            is_continuation=lambda i: i >= 600,
            **kwargs,
        )
        assert (out["masked_positions"] == same["masked_positions"]).all()
        m = int(out["masked_weights"].sum())
        assert m <= 30
        picked = set(out["masked_positions"][:m].tolist())
        eligible = [i for i in range(128) if valid[row, i] and ids[row, i] > 4]
        words: list[list[int]] = []
        for i in eligible:
            if words and continuation[ids[row, i]] and words[-1][-1] == i - 1:
                words[-1].append(i)
            else:
                words.append([i])
        for word in words:
            assert len(picked & set(word)) in (0, len(word))
        total_chosen, total_eligible = total_chosen + m, total_eligible + len(eligible)
    assert 0.12 < total_chosen / total_eligible <= 0.155


# ---------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def pairs_and_specials() -> tuple[list[Pair], BertSpecials]:
    specials = BertSpecials(
        vocab_size=VOCAB,
        pad_id=0,
        cls_id=2,
        sep_id=3,
        mask_id=4,
        special_ids=SPECIAL_IDS,
        random_token_low=5,
        continuation=np.arange(VOCAB) >= 600,
    )
    return make_nsp_pairs(synthetic_docs(60), max_seq_len=64, seed=7), specials


def same_examples(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_pairs_deterministic_per_seed():
    docs = synthetic_docs(50)
    a = make_nsp_pairs(docs, max_seq_len=64, seed=5)
    b = make_nsp_pairs(docs, max_seq_len=64, seed=5)
    c = make_nsp_pairs(docs, max_seq_len=64, seed=6)
    key = lambda ps: [
        (p.doc, p.a_span, p.b_doc, p.b_span, p.label, p.tokens_a.tolist(), p.tokens_b.tolist())
        for p in ps
    ]
    assert key(a) == key(b) and key(a) != key(c)
    two = make_nsp_pairs(docs, max_seq_len=64, seed=5, dupe_factor=2)
    assert key(two[: len(a)]) == key(a) and key(two[len(a) :]) != key(a)


def test_static_vs_dynamic_masking(pairs_and_specials):
    pairs, specials = pairs_and_specials
    common = dict(specials=specials, max_seq_len=64, max_predictions=10, seed=1)
    static = [make_mlm_example(pairs, i, e, **common) for e in (0, 3) for i in range(20)]
    assert all(same_examples(static[i], static[20 + i]) for i in range(20))
    dyn = [make_mlm_example(pairs, i, e, dynamic=True, **common) for e in (0, 3) for i in range(20)]
    differs = [
        not np.array_equal(dyn[i]["masked_positions"], dyn[20 + i]["masked_positions"])
        for i in range(20)
    ]
    assert sum(differs) >= 18
    assert all(np.array_equal(dyn[i]["segment_ids"], dyn[20 + i]["segment_ids"]) for i in range(20))


def test_source_random_access_equals_sequential(pairs_and_specials):
    pairs, specials = pairs_and_specials
    src = BertPretrainingSource(
        pairs, specials, 64, 10, whole_word=True, dynamic=True, seed=4, num_epochs=2
    )
    n = len(pairs)
    assert len(src) == 2 * n
    sequential = [src[i] for i in range(len(src))]
    fresh = BertPretrainingSource(
        pairs, specials, 64, 10, whole_word=True, dynamic=True, seed=4, num_epochs=2
    )
    order = np.random.default_rng(0).permutation(len(src))
    for i in order:
        assert same_examples(fresh[int(i)], sequential[i])
    ex = sequential[0]
    shapes = {k: (v.shape, v.dtype.name) for k, v in ex.items()}
    assert shapes == {
        "input_ids": ((64,), "int32"),
        "segment_ids": ((64,), "int32"),
        "valid": ((64,), "int32"),
        "positions": ((64,), "int32"),
        "masked_positions": ((10,), "int32"),
        "masked_ids": ((10,), "int32"),
        "masked_weights": ((10,), "float32"),
        "nsp_label": ((), "int32"),
    }
    assert ex["positions"].tolist() == list(range(64))
    assert same_examples(
        {k: v for k, v in sequential[n + 3].items() if k in ("segment_ids", "nsp_label")},
        {k: v for k, v in sequential[3].items() if k in ("segment_ids", "nsp_label")},
    )
    static = BertPretrainingSource(pairs, specials, 64, 10, num_epochs=5)
    assert len(static) == n
    with pytest.raises(IndexError):
        static[n]


def test_source_with_grain_loader(pairs_and_specials):
    grain = pytest.importorskip("grain")
    from grain import samplers, sharding, transforms

    pairs, specials = pairs_and_specials
    src = BertPretrainingSource(pairs, specials, 64, 10, seed=2)
    sampler = samplers.IndexSampler(
        len(src),
        sharding.ShardOptions(0, 1, drop_remainder=True),
        shuffle=True,
        num_epochs=1,
        seed=0,
    )
    loader = grain.DataLoader(
        data_source=src,
        sampler=sampler,
        operations=[transforms.Batch(8, drop_remainder=True)],
        worker_count=0,
    )
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 64) and batch["nsp_label"].shape == (8,)


def test_build_bert_examples_from_docs_and_paths(tmp_path, tiny_tok):
    docs = [
        ["the cat sat .", "hello world !", "the cat .", "unaffable cat ."],
        ["hello .", "world .", "cafe naive ."],
        ["the the .", "sat sat ."],
    ]
    from_docs = build_bert_examples(docs, tiny_tok, max_seq_len=12, seed=0)
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    from_path = build_bert_examples([path], tiny_tok, max_seq_len=12, seed=0, reader="blank_line")
    assert [p.tokens_a.tolist() for p in from_docs] == [p.tokens_a.tolist() for p in from_path]
    assert len(from_docs) > 0
    specials = BertSpecials.from_tokenizer(tiny_tok)
    assert specials.random_token_low == 5 and specials.continuation is not None
    src = BertPretrainingSource(from_docs, specials, 12, 3, whole_word=True)
    assert tiny_tok.tokens[src[0]["input_ids"][0]] == "[CLS]"
