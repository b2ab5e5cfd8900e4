"""Causal language modelling (GPT): predict token t+1 from tokens <= t."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from lm.models.config import ModelConfig
from lm.models.transformer import Decoder
from lm.objectives.base import Batch, Data, Metrics, Objective
from lm.objectives.losses import fused_cross_entropy, token_cross_entropy


class CausalLM(Objective):
    """Batches: inputs / targets / weights / segment_ids / positions, all [B, L]."""

    perplexities = {"loss": "ppl"}

    @property
    def seq_len(self) -> int:
        return int(self.config.data.seq_len)

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        from lm.data.pipeline import build_lm_data  # noqa: PLC0415 (keeps grain/tfds off
        # the import path of model-only uses such as benchmarks and sampling)

        cfg = self.config
        lm_data = build_lm_data(cfg.data, workdir=workdir, seq_len=self.seq_len,
                                batch_size=cfg.train.batch_size, seed=cfg.seed,
                                process_index=process_index, process_count=process_count,
                                eval_batch_size=self.eval_batch_size)
        return Data(lm_data.tokenizer, lm_data.train_iter, lm_data.eval_batches,
                    lm_data.num_train_windows)

    def model_overrides(self, data: Data) -> dict[str, Any]:
        return {"vocab_size": data.tokenizer.vocab_size}

    def build_model(self, model_cfg: ModelConfig) -> Decoder:
        return Decoder(model_cfg)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        shape = (batch_size, self.seq_len)
        ids = np.zeros(shape, np.int32)
        return {"inputs": ids, "targets": ids, "weights": np.ones(shape, np.float32),
                "segment_ids": np.ones(shape, np.int32),
                "positions": np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), shape)}

    def init(self, model: Decoder, rng: jax.Array, batch: Batch) -> Any:
        return model.init(rng, batch["inputs"])

    def metrics(self, model: Decoder, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        # Chunked streams have one unpadded sequence per row: no segment ids lets the
        # fused kernels use a plain causal mask.
        packed = self.config.data.pack != "chunk"
        chunk = int(self.config.train.get("loss_chunk", -1))
        out = model.apply(
            {"params": params}, batch["inputs"], batch["segment_ids"] if packed else None,
            batch["positions"], deterministic=not train, return_hidden=chunk >= 0,
            rngs={"dropout": rng} if train and rng is not None else None)
        if chunk < 0:  # materialised logits: the reference path
            return token_cross_entropy(out, batch["targets"], batch["weights"],
                                       accuracy=not train)
        table, scale = Decoder.output_table(model.cfg, params)
        return fused_cross_entropy(out * scale, table, batch["targets"], batch["weights"],
                                   chunk, accuracy=not train)

    def tokens_per_example(self) -> int:
        return self.seq_len

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return model_cfg.flops_per_token(self.seq_len)
