"""Entity-level precision / recall / F1 over tag sequences, with conlleval's semantics.

An entity (chunk) is a maximal run of tags that conlleval would group: it starts at `B-X`,
at `I-X` after a tag that is not part of an `X` chunk (so an `I-` without a `B-` still
opens an entity), and ends where the next tag does not continue it. An entity counts as
correct only if the predicted and the gold one have the same start, the same end and the
same type. The rules cover IOB2 (every entity opens with `B-`), IOB1 (`B-` only between
two adjacent entities of one type) and IOBES (`E-`/`S-`), so files in any of these schemes
are scored as they are, without conversion.

This module is the plain reference (numpy / Python). The tagging objective computes the same
counts on device (`lm.objectives.tagging.entity_counts`); the tests hold the two together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PREFIXES = ("O", "B", "I", "E", "S")


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''). A bare type ('PER') is read as 'I-PER',
    as conlleval does with its default settings."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if sep and prefix in PREFIXES[1:]:
        return prefix, kind
    return "I", tag


def starts_chunk(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    """Whether a chunk starts at `tag` given the previous tag (conlleval's startOfChunk)."""
    if tag in ("B", "S"):
        return True
    if tag in ("I", "E") and prev in ("O", "E", "S"):
        return True
    return tag != "O" and prev_type != kind


def ends_chunk(prev: str, prev_type: str, tag: str, kind: str) -> bool:
    """Whether the chunk holding `prev` ends before `tag` (conlleval's endOfChunk)."""
    if prev in ("E", "S"):
        return True
    if prev in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev != "O" and prev_type != kind


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Chunks of one sentence as (type, start, end) with `end` inclusive."""
    out: list[tuple[str, int, int]] = []
    prev, prev_type, start = "O", "", -1
    for i, tag in enumerate([*tags, "O"]):  # a trailing O closes the last chunk
        prefix, kind = split_tag(tag)
        if start >= 0 and ends_chunk(prev, prev_type, prefix, kind):
            out.append((prev_type, start, i - 1))
            start = -1
        if starts_chunk(prev, prev_type, prefix, kind):
            start = i
        prev, prev_type = prefix, kind
    return out


def entity_counts(gold: Iterable[Sequence[str]], predicted: Iterable[Sequence[str]]
                  ) -> tuple[int, int, int]:
    """(correct, predicted, gold) entity counts summed over sentences."""
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, predicted, strict=True):
        if len(g) != len(p):
            raise ValueError(f"gold and predicted sentences differ in length ({len(g)} vs "
                             f"{len(p)})")
        gold_set, pred_set = set(get_entities(g)), set(get_entities(p))
        tp += len(gold_set & pred_set)
        n_pred += len(pred_set)
        n_gold += len(gold_set)
    return tp, n_pred, n_gold


def precision_recall_f1(tp: float, n_pred: float, n_gold: float) -> dict[str, float]:
    """Micro-averaged scores from counts; 0 where a denominator is 0 (as conlleval)."""
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(gold: Iterable[Sequence[str]], predicted: Iterable[Sequence[str]]
                  ) -> dict[str, float]:
    """Entity-level precision, recall and F1 (micro-averaged over all types)."""
    return precision_recall_f1(*entity_counts(gold, predicted))


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
    """Rewrites IOB1 tags so that every entity opens with `B-` (the entities are unchanged)."""
    out = []
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        if prefix == "I":
            prev_prefix, prev_kind = split_tag(tags[i - 1]) if i else ("O", "")
            if prev_prefix == "O" or prev_kind != kind:
                tag = f"B-{kind}"
        out.append(tag)
    return out


def confusion_matrix(gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]
                     ) -> np.ndarray:
    """counts[i, j]: examples of gold label i predicted as label j (labels in that order)."""
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), np.int64)
    for g, p in zip(gold, predicted, strict=True):
        counts[index[g], index[p]] += 1
    return counts

