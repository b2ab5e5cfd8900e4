"""Token classification (BIO tagging, e.g. CoNLL-2003 NER) with entity-level F1.

Data (`config.data`): `path` and `val_path` are CoNLL column files (the tag in column
`tag_column`, default the last); without `val_path` a fixed seeded split of `val_size`
sentences is carved out of `path`. The label list (`labels`, or the tags of the data with
'O' first) is saved to workdir/labels.json. Each word is scored on its first sub-token only.

Entity scores are computed on device, in the jitted eval step, and summed over the
validation pass like every other metric: per batch the step returns the number of
correctly predicted, predicted and gold entities, and `summarize` turns the sums into
precision, recall and F1. The entity rules are conlleval's (see `lm.metrics`, the plain
reference that the tests compare with): the scored positions of each row are gathered to
the front (word order), chunk starts and ends are found from each tag and its neighbours,
and a predicted entity is correct when a gold one starts at the same word, has the same
type and ends at the same word. Gold counts come from the whole sentence, computed when
the data is read, and a gold entity cut by truncation never matches, so the scores equal
conlleval's on the full sentences with the words past seq_len predicted 'O'.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lm import metrics as metrics_lib
from lm.data import labelled
from lm.models.config import ModelConfig
from lm.models.heads import TokenClassifier
from lm.objectives.base import Batch, Data, Metrics
from lm.objectives.classification import PREDICT_BATCH, LabelledObjective, weighted_cross_entropy

OUT, BEGIN, INSIDE, END, SINGLE = range(5)  # tag prefixes O B I E S (lm.metrics order)
ENTITY_KEYS = ("entity_correct", "entity_predicted", "entity_gold")
# Words for prediction: runs of word characters (with inner - . ' &), or one other character.
_WORD = re.compile(r"\w+(?:[-.'&]\w+)*|\S")


def tag_tables(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per label id: its prefix code (O, B, I, E, S) and its entity type (0 for 'O')."""
    parts = [metrics_lib.split_tag(t) for t in labels]
    types = {k: i + 1 for i, k in enumerate(sorted({k for p, k in parts if p != "O"}))}
    prefix = np.array([metrics_lib.PREFIXES.index(p) for p, _ in parts], np.int32)
    kind = np.array([types.get(k, 0) if p != "O" else 0 for p, k in parts], np.int32)
    return prefix, kind


def _chunk_bounds(prefix_BT: jnp.ndarray, kind_BT: jnp.ndarray
                  ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(starts [B, T] bool, end [B, T]: the last word of the chunk open at each word),
    with conlleval's start/end rules (lm.metrics.starts_chunk / ends_chunk)."""
    def shift(x, fill, right):
        pad = jnp.full_like(x[:, :1], fill)
        return jnp.concatenate([pad, x[:, :-1]] if right else [x[:, 1:], pad], axis=1)

    prev_p, prev_k = shift(prefix_BT, OUT, True), shift(kind_BT, 0, True)
    next_p, next_k = shift(prefix_BT, OUT, False), shift(kind_BT, 0, False)
    p, k = prefix_BT, kind_BT

    def isin(x, *codes):
        return jnp.isin(x, jnp.array(codes))

    starts = (isin(p, BEGIN, SINGLE)
              | (isin(p, INSIDE, END) & isin(prev_p, OUT, END, SINGLE))
              | ((p != OUT) & (prev_k != k)))
    ends_here = (isin(p, END, SINGLE)
                 | (isin(p, BEGIN, INSIDE) & isin(next_p, BEGIN, SINGLE, OUT))
                 | ((p != OUT) & (next_k != k)))
    T = prefix_BT.shape[1]
    end_at = jnp.where(ends_here, jnp.arange(T), T)
    return starts, jax.lax.cummin(end_at, axis=1, reverse=True)


def entity_counts(gold_BL: jnp.ndarray, pred_BL: jnp.ndarray, weights_BL: jnp.ndarray,
                  prefix_C: np.ndarray, kind_C: np.ndarray, cut_B: jnp.ndarray | None = None
                  ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """(correct, predicted, gold) entity counts over the positions with weight > 0 (each
    row read as one sentence in position order), as float32 scalars. `cut_B`: rows whose
    last scored word is inside a gold entity cut by truncation; the gold chunk that ends
    there is not the real entity, so nothing matches it."""
    L = gold_BL.shape[1]
    pos = jnp.arange(L)
    scored = weights_BL > 0
    order = jnp.argsort(jnp.where(scored, pos, L + pos), axis=1)  # scored positions first
    valid = jnp.take_along_axis(scored, order, axis=1)

    def bounds(tags_BL):
        tags = jnp.take_along_axis(tags_BL, order, axis=1)
        prefix = jnp.where(valid, jnp.asarray(prefix_C)[tags], OUT)
        kind = jnp.where(valid, jnp.asarray(kind_C)[tags], 0)
        starts, end = _chunk_bounds(prefix, kind)
        return starts, end, kind

    gs, ge, gk = bounds(gold_BL)
    ps, pe, pk = bounds(pred_BL)
    correct = gs & ps & (gk == pk) & (ge == pe)
    if cut_B is not None:
        last_B1 = valid.sum(1, keepdims=True) - 1
        correct &= ~((cut_B[:, None] > 0) & (ge == last_B1))
    f32 = jnp.float32
    return correct.sum(dtype=f32), ps.sum(dtype=f32), gs.sum(dtype=f32)


def split_words(text: str) -> list[str]:
    """Raw text -> words, close to CoNLL's tokenization (punctuation split off, but
    'U.S', '1996-08-22' and "o'neill" kept whole)."""
    return _WORD.findall(text)


class Tagging(LabelledObjective):
    """Batches: inputs / token_types / segment_ids / labels / weights [B, L], and
    num_entities / entity_cut [B] (see lm.data.labelled)."""

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        data = self.config.data
        if data.get("format", "") not in ("", "conll"):
            raise ValueError(f"data.format: {data.format!r} is not 'conll' (tagging)")
        column = data.get("tag_column", -1)
        sentences = labelled.read_conll(data.path, tag_column=column)
        if data.get("val_path", ""):
            train = sentences
            val = labelled.read_conll(data.val_path, tag_column=column, field="data.val_path")
        else:
            train_idx, val_idx = self._val_indices(len(sentences))
            train, val = [sentences[i] for i in train_idx], [sentences[i] for i in val_idx]
        found = {t for s in (*train, *val) for t in s.tags}
        self.labels = labelled.resolve_labels(workdir, self.labels, found,
                                              order=labelled.tag_order)

        def corpus() -> Iterable[str]:
            return (" ".join(s.words) for s in train)

        self.tokenizer = labelled.build_tokenizer(self.config, workdir, corpus)
        sources = []
        for name, split in (("train", train), ("validation", val)):
            source, cut = labelled.tagging_source(self.tokenizer, split, self.labels,
                                                  self.seq_len)
            if cut:
                logging.warning("tagging: %d %s words fall beyond seq_len=%d and are not "
                                "scored", cut, name, self.seq_len)
            sources.append(source)
        return self._pipelines(workdir, *sources, process_index, process_count)

    def build_model(self, model_cfg: ModelConfig) -> TokenClassifier:
        return TokenClassifier(model_cfg, self.num_classes)

    def _dummy_targets(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        return {"labels": np.zeros(shape, np.int32), "weights": np.ones(shape, np.float32),
                "num_entities": np.zeros(batch_size, np.int32),
                "entity_cut": np.zeros(batch_size, np.int32)}

    def metrics(self, model: TokenClassifier, params: Any, batch: Batch,
                rng: jax.Array | None, train: bool) -> Metrics:
        logits_BLC = self.apply(model, params, batch, rng, train)
        out = weighted_cross_entropy(logits_BLC, batch["labels"], batch["weights"])
        if not train:  # entity matching costs a sort per row: evaluation only
            prefix, kind = tag_tables(self.labels)
            correct, predicted, _ = entity_counts(batch["labels"], jnp.argmax(logits_BLC, -1),
                                                  batch["weights"], prefix, kind,
                                                  batch["entity_cut"])
            one = jnp.ones((), jnp.float32)
            out.update(entity_correct=(correct, one), entity_predicted=(predicted, one),
                       entity_gold=(batch["num_entities"].sum(dtype=jnp.float32), one))
        return out

    def summarize(self, sums: dict[str, tuple[Any, Any]], prefix: str) -> dict[str, float]:
        """Adds entity precision / recall / F1 (from summed counts) to the per-token means."""
        sums = dict(sums)
        counts = [float(sums.pop(k)[0]) for k in ENTITY_KEYS if k in sums]
        out = super().summarize(sums, prefix)
        if len(counts) == len(ENTITY_KEYS):
            scores = metrics_lib.precision_recall_f1(*counts)
            out.update({f"{prefix}/{k}": v for k, v in scores.items()})
        return out

    def predict(self, model: TokenClassifier, params: Any, texts: Sequence[str]) -> list[str]:
        """`word/TAG word/TAG ...` per text (words past seq_len are tagged O)."""
        logits_fn = self.logits_fn(model)
        lines = []
        for lo in range(0, len(texts), PREDICT_BATCH):
            chunk = [split_words(t) for t in texts[lo: lo + PREDICT_BATCH]]
            rows = [labelled.encode_words(self.tokenizer, words, self.seq_len)
                    for words in chunk]
            inputs = np.zeros((PREDICT_BATCH, self.seq_len), np.int32)
            for i, (ids, _) in enumerate(rows):
                inputs[i, : len(ids)] = ids
            batch = {"inputs": inputs, "token_types": np.zeros_like(inputs),
                     "segment_ids": (inputs != 0).astype(np.int32)}
            best = np.asarray(jnp.argmax(logits_fn(params, batch), -1))
            for words, (_, first), tags in zip(chunk, rows, best, strict=False):
                word_tags = ["O"] * len(words)
                for position in np.flatnonzero(first >= 0):
                    word_tags[first[position]] = self.labels[tags[position]]
                lines.append(" ".join(f"{w}/{t}" for w, t in zip(words, word_tags,
                                                                  strict=True)))
        return lines
