"""Scores of generated text against references: sacreBLEU (BLEU, chrF) and ROUGE-1/2/L.

Inputs are detokenized strings, one hypothesis and one reference per example. BLEU and chrF
are corpus-level as sacreBLEU reports them (its default 13a tokenization, so numbers compare
with published sacreBLEU figures); ROUGE is the mean over examples of rouge-score's F-measure
(with stemming, as summarization papers report it), scaled to 0-100 like BLEU.
"""

from __future__ import annotations

from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _check(hyps: Sequence[str], refs: Sequence[str]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} references")


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus BLEU (0-100)."""
    import sacrebleu  # noqa: PLC0415

    _check(hyps, refs)
    return float(sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score)


def chrf(hyps: Sequence[str], refs: Sequence[str]) -> float:
    """Corpus chrF (0-100)."""
    import sacrebleu  # noqa: PLC0415

    _check(hyps, refs)
    return float(sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score)


def rouge(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-100)."""
    from rouge_score import rouge_scorer  # noqa: PLC0415

    _check(hyps, refs)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, ref in zip(hyps, refs, strict=True):
        for name, s in scorer.score(ref, hyp).items():
            totals[name] += s.fmeasure
    n = max(len(hyps), 1)
    return {name: 100.0 * total / n for name, total in totals.items()}


def all_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """{'bleu', 'chrf', 'rouge1', 'rouge2', 'rougeL'}."""
    return {"bleu": bleu(hyps, refs), "chrf": chrf(hyps, refs), **rouge(hyps, refs)}
