"""T5 pretraining by span corruption, for an `EncoderDecoder` or (prefix LM) a `Decoder`.

Running text is tokenized once (the causal-LM data layer: `data.path` / `tfds_name`, its
tokenizer fields), cut into chunks of the raw length that corrupts to exactly
`data.inputs_length` inputs (`lm.data.span_corruption.span_lengths`), and each chunk is
corrupted on the fly (`data.noise_density`, `data.mean_span_length`). Sentinels are the top
`data.extra_ids` ids of the model's vocabulary: the tokenizer's ids, then `extra_ids` more
(0 when the tokenizer already ends with them, as T5's does).

`prefix_lm`: the same corrupted examples in one decoder row, `inputs ++ targets`, the inputs
a bidirectional prefix and the loss on the targets (the T5 paper's prefix-LM architecture).
"""

from __future__ import annotations

from typing import Any

import grain
import jax
import numpy as np

from lm.data import span_corruption as sc
from lm.data.pipeline import EvalBatches, make_train_iterator
from lm.models.config import ModelConfig
from lm.models.transformer import Decoder
from lm.objectives.base import Batch, Data, Metrics
from lm.objectives.causal_lm import CausalLM
from lm.objectives.losses import token_cross_entropy
from lm.objectives.seq2seq import Seq2Seq


def _span_data(objective, workdir: str, process_index: int, process_count: int,
               to_row=None) -> tuple[Data, sc.SpanConfig]:
    """Tokenized text -> raw chunks -> corrupted examples (`to_row` reshapes each one)."""
    from lm.data.pipeline import build_lm_data  # noqa: PLC0415

    cfg = objective.config
    d = cfg.data
    raw, _ = sc.span_lengths(int(d.inputs_length), float(d.noise_density),
                             float(d.mean_span_length))
    lm_data = build_lm_data(d, workdir=workdir, seq_len=raw - 1,
                            batch_size=cfg.train.batch_size, seed=cfg.seed,
                            process_index=process_index, process_count=process_count)
    tok = lm_data.tokenizer
    eos = tok.special_id("</s>")
    if eos is None:
        raise ValueError(f"data.tokenizer: the {d.tokenizer!r} tokenizer has no </s> token")
    span = sc.make_span_config(int(d.inputs_length), float(d.noise_density),
                               float(d.mean_span_length), tok.vocab_size + int(d.extra_ids),
                               eos)
    _, spans = sc._counts(raw, span.noise_density, span.mean_span_length)
    if int(d.extra_ids) and spans > int(d.extra_ids):
        raise ValueError(f"data.extra_ids: {d.extra_ids} sentinels, but an example has "
                         f"{spans} noise spans")
    train = sc.RawChunks(lm_data.train_source.tokens, raw)
    val = sc.CorruptedEval(sc.RawChunks(lm_data.eval_source.tokens, raw), span, cfg.seed)
    transforms: tuple = (sc.Corrupt(span),)
    if to_row is not None:
        transforms = (*transforms, to_row)
        val = _Mapped(val, to_row)
    train_iter = make_train_iterator(train, batch_size=cfg.train.batch_size, seed=cfg.seed,
                                     process_index=process_index, process_count=process_count,
                                     worker_count=d.get("worker_count", 0),
                                     transforms=transforms)

    def eval_batches() -> EvalBatches:
        return EvalBatches(val, cfg.train.batch_size, d.get("eval_max_batches", 0) or None,
                           process_index, process_count)

    return Data(tok, train_iter, eval_batches), span


class _Mapped:
    """A random-access source with a map applied to each example and its padding row."""

    def __init__(self, source, fn):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        return self.fn.map(self.source[index])

    def padding(self):
        row = self.fn.map(self.source[0])
        return {k: np.zeros_like(v) for k, v in row.items()}


class SpanCorruption(Seq2Seq):
    """Encoder-decoder T5 pretraining; batches as `Seq2Seq`'s."""

    @property
    def targets_length(self) -> int:
        d = self.config.data
        return sc.span_lengths(int(d.inputs_length), float(d.noise_density),
                               float(d.mean_span_length))[1]

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        data, self.span = _span_data(self, workdir, process_index, process_count)
        self.tokenizer = data.tokenizer
        self._save_task(workdir)
        return data

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": self.span.vocab_size}

    def generation_metrics(self, model_cfg: ModelConfig, params: Any) -> dict[str, float]:
        return {}  # denoising has no references to score decoded text against


class PrefixRow(grain.transforms.Map):
    """A corrupted example -> its decoder-only row (`as_prefix_lm`)."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def map(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return sc.as_prefix_lm(element, self.seq_len)


class PrefixLM(CausalLM):
    """Decoder-only span corruption: the causal-LM batch plus `prefix`, all
    [B, inputs_length + targets_length]; model, init and FLOPs are the causal LM's."""

    @property
    def seq_len(self) -> int:
        d = self.config.data
        return int(d.inputs_length) + sc.span_lengths(
            int(d.inputs_length), float(d.noise_density), float(d.mean_span_length))[1]

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        data, self.span = _span_data(self, workdir, process_index, process_count,
                                     to_row=PrefixRow(self.seq_len))
        return data

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": self.span.vocab_size}

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        batch = super().dummy_batch(batch_size)
        return {**batch, "prefix": np.ones_like(batch["segment_ids"])}

    def metrics(self, model: Decoder, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        logits = model.apply({"params": params}, batch["inputs"], batch["segment_ids"],
                             batch["positions"], prefix=batch["prefix"],
                             deterministic=not train,
                             rngs={"dropout": rng} if train and rng is not None else None)
        return token_cross_entropy(logits, batch["targets"], batch["weights"],
                                   accuracy=not train)
