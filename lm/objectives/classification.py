"""Sequence classification (GLUE-style fine-tuning): one label per sentence or sentence pair.

Data (`config.data`): `path` (TSV with a header, or JSONL; `format` picks, else the file
extension), `text_key` / `text_pair_key` / `label_key` (column names or JSON keys; an empty
`text_pair_key` means single sentences), `val_path`, or else a fixed seeded validation split
of `val_size` training examples (`val_fraction` when 0; `split_seed`; `val_split`
'random', or 'sentences' for phrase-level data such as SST: whole sentences, with the
phrases inside them kept out of training, see `labelled.sentence_split`), `backbone` ('encoder':
BERT-style, [CLS] + pooler; 'decoder': a causal stack read at the last real token, whose
parameters are a causal LM's, e.g. to share one decoder with LM in a mixture), `labels` (the label
list, comma-separated; empty: the sorted labels of the data), `label_map` ('0=negative,...':
renames raw labels when reading), `seq_len`, and the tokenizer fields (see
`lm.data.labelled.build_tokenizer`). The label list is saved to workdir/labels.json.

`LabelledObjective` holds what classification and tagging share: tokenizer, label list,
pipelines, model init and FLOPs; the subclasses add their examples, loss, metrics and
prediction.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from lm.data import labelled
from lm.data import tokenizers as tok_lib
from lm.data.pipeline import EvalBatches, make_train_iterator
from lm.models.config import ModelConfig
from lm.models.heads import DecoderClassifier, SequenceClassifier
from lm.objectives.base import Batch, Data, Metrics, Objective

PREDICT_BATCH = 32


class LabelledObjective(Objective, abc.ABC):
    """Shared parts of the fine-tuning objectives (labels known after `build_data` or
    `load_inference`, or from `data.labels` before)."""

    fields: Sequence[str] = ()  # batch fields, in the order dummy_batch builds them

    def __init__(self, config):
        super().__init__(config)
        self.labels: list[str] = labelled.parse_list(config.data.get("labels", ""))
        self.tokenizer: tok_lib.Tokenizer | None = None

    @property
    def seq_len(self) -> int:
        return int(self.config.data.seq_len)

    @property
    def num_classes(self) -> int:
        if not self.labels:
            raise ValueError("data.labels: the label list is unknown before the data is read "
                             "(set data.labels or build the data first)")
        return len(self.labels)

    # ------------------------------------------------------------------ data
    def _pipelines(self, workdir: str, train: labelled.ArraySource,
                   val: labelled.ArraySource, process_index: int, process_count: int) -> Data:
        cfg = self.config
        logging.info("%s: %d training and %d validation examples, labels %s",
                     type(self).__name__, len(train), len(val), self.labels)
        train_iter = make_train_iterator(
            train, batch_size=cfg.train.batch_size, seed=cfg.seed,
            process_index=process_index, process_count=process_count,
            worker_count=cfg.data.get("worker_count", 0))
        def eval_batches() -> EvalBatches:  # the loop applies evals.max_batches
            return EvalBatches(val, self.eval_batch_size, None, process_index,
                                        process_count)

        return Data(self.tokenizer, train_iter, eval_batches, len(train))

    def _val_indices(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        return labelled.validation_indices(self.config.data, n)

    def _split(self, examples: Sequence[labelled.TextExample]
               ) -> tuple[np.ndarray, np.ndarray]:
        return labelled.split_examples(self.config.data, examples)

    def load_inference(self, workdir: str) -> None:
        """Tokenizer and label list of a trained run (for prediction)."""
        self.tokenizer = tok_lib.load_tokenizer(os.path.join(workdir, "tokenizer"))
        self.labels = labelled.load_labels(workdir)

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": data.tokenizer.vocab_size}

    # ------------------------------------------------------------------ model
    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        return {"inputs": np.zeros(shape, np.int32), "token_types": np.zeros(shape, np.int32),
                "segment_ids": np.ones(shape, np.int32), **self._dummy_targets(batch_size)}

    @abc.abstractmethod
    def _dummy_targets(self, batch_size: int) -> dict[str, np.ndarray]: ...

    def init(self, model: nn.Module, rng: jax.Array, batch: Batch) -> Any:
        return model.init(rng, batch["inputs"], batch["segment_ids"], batch["token_types"])

    def apply(self, model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None = None,
              train: bool = False) -> jnp.ndarray:
        return model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                           batch["token_types"], deterministic=not train,
                           rngs={"dropout": rng} if train and rng is not None else None)

    def tokens_per_example(self) -> int:
        return self.seq_len

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return model_cfg.flops_per_token(self.seq_len, kind="encoder", vocab_fraction=0.0)

    # ------------------------------------------------------------------ prediction
    def logits_fn(self, model: nn.Module):
        """A jitted (params, batch) -> logits for prediction."""
        return jax.jit(lambda params, batch: self.apply(model, params, batch))

    @abc.abstractmethod
    def predict(self, model: nn.Module, params: Any, texts: Sequence[str]) -> list[str]:
        """One output line per text (after `load_inference`)."""


def weighted_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray
                           ) -> Metrics:
    """Loss and accuracy as (sum, count) over the weighted positions; fp32."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    ce = jnp.where(weights > 0, ce, 0.0)  # padding rows never bring a NaN in
    count = weights.sum()
    return {"loss": ((ce * weights).sum(), count),
            "accuracy": ((correct * weights).sum(), count)}


class Classification(LabelledObjective):
    """Batches: inputs / token_types / segment_ids [B, L], label [B], weights [B]."""

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        data = self.config.data
        examples = labelled.read_examples(data, data.path, "data.path")
        if data.get("val_path", ""):
            train, val = examples, labelled.read_examples(data, data.val_path, "data.val_path")
        else:
            train_idx, val_idx = self._split(examples)
            train, val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
        rename = labelled.parse_label_map(data.get("label_map", ""))
        if rename:
            train, val = ([ex.__class__(ex.text, ex.text_pair, rename.get(ex.label, ex.label))
                           for ex in split] for split in (train, val))
        self.labels = labelled.resolve_labels(workdir, self.labels,
                                              {ex.label for ex in (*train, *val)})

        def corpus() -> Iterable[str]:
            for ex in train:
                yield ex.text
                if ex.text_pair:
                    yield ex.text_pair

        self.tokenizer = labelled.build_tokenizer(self.config, workdir, corpus)
        sources = [labelled.classification_source(self.tokenizer, split, self.labels,
                                                  self.seq_len) for split in (train, val)]
        return self._pipelines(workdir, *sources, process_index, process_count)

    def build_model(self, model_cfg: ModelConfig) -> SequenceClassifier | DecoderClassifier:
        if self.config.data.get("backbone", "encoder") == "decoder":
            return DecoderClassifier(model_cfg, num_classes=self.num_classes)
        return SequenceClassifier(model_cfg, self.num_classes)

    def _dummy_targets(self, batch_size: int) -> dict[str, np.ndarray]:
        return {"label": np.zeros(batch_size, np.int32),
                "weights": np.ones(batch_size, np.float32)}

    def metrics(self, model: SequenceClassifier, params: Any, batch: Batch,
                rng: jax.Array | None, train: bool) -> Metrics:
        logits_BC = self.apply(model, params, batch, rng, train)
        return weighted_cross_entropy(logits_BC, batch["label"], batch["weights"])

    def predict(self, model: SequenceClassifier, params: Any, texts: Sequence[str]
                ) -> list[str]:
        """`LABEL\\tSCORE\\tTEXT` per text; a tab in a text separates a sentence pair."""
        logits_fn = self.logits_fn(model)
        lines = []
        for lo in range(0, len(texts), PREDICT_BATCH):
            chunk = texts[lo: lo + PREDICT_BATCH]
            examples = [labelled.TextExample(*_split_pair(t), self.labels[0]) for t in chunk]
            source = labelled.classification_source(self.tokenizer, examples, self.labels,
                                                    self.seq_len)
            batch = labelled.pad_rows(source.arrays, PREDICT_BATCH)
            probs = np.asarray(jax.nn.softmax(logits_fn(params, batch), -1))[: len(chunk)]
            for text, p in zip(chunk, probs, strict=True):
                k = int(np.argmax(p))
                lines.append(f"{self.labels[k]}\t{p[k]:.4f}\t{text}")
        return lines


def _split_pair(text: str) -> tuple[str, str | None]:
    a, sep, b = text.partition("\t")
    return (a, b) if sep else (a, None)
