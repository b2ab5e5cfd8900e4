"""BLEU / chrF / ROUGE: hand-computed values and the reference libraries."""

import math

import pytest

from lm import text_metrics

HYP = "the cat sat on the mat"
REF = "the cat sat on a mat"


def test_bleu_by_hand():
    # n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty)
    want = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 2 / 4, 1 / 3)) / 4)
    assert text_metrics.bleu([HYP], [REF]) == pytest.approx(want, abs=1e-3)
    assert text_metrics.bleu([REF], [REF]) == pytest.approx(100.0)
    # brevity penalty exp(1 - r / c) when the hypothesis is shorter
    short = text_metrics.bleu(["the cat sat on"], ["the cat sat on the mat"])
    assert short == pytest.approx(100 * math.exp(1 - 6 / 4), abs=1e-3)


def test_corpus_bleu_pools_counts_and_matches_sacrebleu():
    import sacrebleu

    hyps = [HYP, "a dog runs in the park", "two men are talking"]
    refs = [REF, "a dog is running in the park", "two men talk"]
    assert text_metrics.bleu(hyps, refs) == pytest.approx(
        sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert text_metrics.chrf(hyps, refs) == pytest.approx(
        sacrebleu.corpus_chrf(hyps, [refs]).score)
    mean_sentence = sum(text_metrics.bleu([h], [r]) for h, r in zip(hyps, refs, strict=True)) / 3
    assert text_metrics.bleu(hyps, refs) != pytest.approx(mean_sentence)


def test_rouge_by_hand():
    r = text_metrics.rouge([HYP], [REF])
    assert r["rouge1"] == pytest.approx(100 * 5 / 6)  # 5 of 6 unigrams on each side
    assert r["rouge2"] == pytest.approx(100 * 3 / 5)
    assert r["rougeL"] == pytest.approx(100 * 5 / 6)  # LCS "the cat sat on mat"
    two = text_metrics.rouge([HYP, REF], [REF, REF])
    assert two["rouge2"] == pytest.approx(100 * (3 / 5 + 1) / 2)  # mean over examples


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        text_metrics.bleu(["a", "b"], ["a"])
