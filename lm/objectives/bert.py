"""BERT pretraining: masked-LM plus next-sentence (or sentence-order) prediction.

loss = mlm_loss + nsp_weight * nsp_loss, each a mean over its own items (masked tokens with
weight 1; examples with a label), as in the reference implementation. The MLM loss and
accuracy count only the chosen positions (`masked_weights`); the model projects only those
to the vocabulary. With data.nsp_mode='none' there is no NSP head and no NSP metric.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm.data.bert_pipeline import BertDataOptions, build_bert_data
from lm.models.config import ModelConfig
from lm.models.heads import BertPretrainer
from lm.objectives.base import Batch, Data, Metrics, Objective
from lm.objectives.losses import cross_entropy_sums


def mlm_metrics(logits_BPV: jnp.ndarray, ids_BP: jnp.ndarray, weights_BP: jnp.ndarray
                ) -> Metrics:
    """Masked-LM loss and accuracy as (sum, count) over the positions with weight > 0."""
    loss, correct = cross_entropy_sums(logits_BPV, ids_BP, weights_BP)
    count = weights_BP.astype(jnp.float32).sum()
    return {"mlm_loss": (loss, count), "mlm_accuracy": (correct, count)}


def nsp_metrics(logits_B2: jnp.ndarray, labels_B: jnp.ndarray) -> Metrics:
    """NSP / SOP loss and accuracy as (sum, count) over examples with a label (>= 0)."""
    has_label = labels_B >= 0
    labels = jnp.maximum(labels_B, 0)
    ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_B2.astype(jnp.float32), labels)
    correct_B = (jnp.argmax(logits_B2, -1) == labels).astype(jnp.float32)
    count = has_label.astype(jnp.float32).sum()
    return {"nsp_loss": (jnp.where(has_label, ce_B, 0.0).sum(), count),
            "nsp_accuracy": (jnp.where(has_label, correct_B, 0.0).sum(), count)}


def pretraining_metrics(mlm_logits_BPV: jnp.ndarray, nsp_logits_B2: jnp.ndarray | None,
                        batch: Batch, nsp_weight: float) -> Metrics:
    """All metrics plus the differentiated "loss" = mean MLM + nsp_weight * mean NSP.

    "loss" is reported as (value, 1): its two means have different denominators, so an
    evaluation pass averages it over batches (the per-task sums stay exact)."""
    out = mlm_metrics(mlm_logits_BPV, batch["masked_ids"], batch["masked_weights"])
    total, count = out["mlm_loss"]
    loss = total / jnp.maximum(count, 1.0)
    if nsp_logits_B2 is not None:
        out.update(nsp_metrics(nsp_logits_B2, batch["nsp_label"]))
        total, count = out["nsp_loss"]
        loss = loss + nsp_weight * total / jnp.maximum(count, 1.0)
    out["loss"] = (loss, jnp.ones((), jnp.float32))
    return out


class BertPretraining(Objective):
    """Batches as `lm.data.bert_pipeline` documents them (input_ids, token_types,
    segment_ids, positions [B, L]; masked_positions/ids/weights [B, P]; nsp_label [B])."""

    perplexities = {"mlm_loss": "mlm_ppl"}  # the combined MLM + NSP loss has none

    def __init__(self, config):
        super().__init__(config)
        self.opts = BertDataOptions.from_config(config.data)
        self.nsp_weight = float(config.data.get("nsp_weight", 1.0))
        if self.nsp_weight < 0:
            raise ValueError(f"data.nsp_weight: must be >= 0, got {self.nsp_weight}")
        max_len = config.model.get("max_len", 0)
        if max_len and self.opts.seq_len > max_len:
            raise ValueError(f"data.seq_len={self.opts.seq_len} exceeds model.max_len={max_len}")

    @property
    def seq_len(self) -> int:
        return self.opts.seq_len

    @property
    def nsp(self) -> bool:
        return self.opts.nsp_mode != "none"

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        data = build_bert_data(self.opts, workdir=workdir, batch_size=self.config.train.batch_size,
                               seed=self.config.seed, process_index=process_index,
                               process_count=process_count,
                               eval_batch_size=self.eval_batch_size)
        return Data(data.tokenizer, data.train_iter, data.eval_batches, len(data.train_source))

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": data.tokenizer.vocab_size}

    def build_model(self, model_cfg: ModelConfig) -> BertPretrainer:
        return BertPretrainer(model_cfg, nsp=self.nsp)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        seq = (batch_size, self.seq_len)
        pred = (batch_size, self.opts.max_predictions)
        return {"input_ids": np.zeros(seq, np.int32), "token_types": np.zeros(seq, np.int32),
                "segment_ids": np.ones(seq, np.int32),
                "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), seq),
                "masked_positions": np.zeros(pred, np.int32),
                "masked_ids": np.zeros(pred, np.int32),
                "masked_weights": np.zeros(pred, np.float32),
                "nsp_label": np.zeros(batch_size, np.int32)}

    def init(self, model: BertPretrainer, rng: jax.Array, batch: Batch) -> Any:
        return model.init(rng, batch["input_ids"], batch["masked_positions"],
                          batch["segment_ids"], batch["token_types"], batch["positions"])

    def metrics(self, model: BertPretrainer, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        mlm_logits, nsp_logits = model.apply(
            {"params": params}, batch["input_ids"], batch["masked_positions"],
            batch["segment_ids"], batch["token_types"], batch["positions"],
            deterministic=not train,
            rngs={"dropout": rng} if train and rng is not None else None)
        return pretraining_metrics(mlm_logits, nsp_logits, batch, self.nsp_weight)

    def tokens_per_example(self) -> int:
        return self.seq_len

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return model_cfg.flops_per_token(
            self.seq_len, kind="encoder", vocab_fraction=self.opts.max_predictions / self.seq_len)
