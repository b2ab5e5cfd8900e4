"""Sequence-to-sequence training (translation, summarization) of an `EncoderDecoder`.

Teacher forcing: the decoder reads the targets shifted right and predicts each target
token; the loss is token cross-entropy (optionally label-smoothed in training), padding never
counted. Data (`config.data`): `format` ('parallel' files PATH.SRC / PATH.TGT, 'tsv' or
'jsonl' with `source_key` / `target_key`), `path`, `val_path` (else `val_size` pairs drawn
with `split_seed`), `source_lang` / `target_lang` (the direction, saved with the run),
`inputs_length` / `targets_length` (tokens per row on each side, `</s>` included), `pack_pairs`
(several pairs per row), and the tokenizer fields (`tokenizer`, `vocab_size`,
`tokenizer_path`, `tokenizer_from_init`).

Every `evals.decode_every` steps the first `evals.decode_examples` validation pairs are
decoded with beam search (`evals.beam_size`, `evals.length_penalty`) and scored with
sacreBLEU (BLEU, chrF) and ROUGE-1/2/L against the detokenized references.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lm.data import labelled
from lm.data import seq2seq as s2s
from lm.data.pipeline import EvalBatches, make_train_iterator
from lm.models.config import ModelConfig
from lm.models.transformer import EncoderDecoder
from lm.objectives.base import Batch, Data, Metrics, Objective
from lm.objectives.losses import token_cross_entropy

TASK_FILE = "seq2seq.json"  # the direction and lengths, for lm.translate


class Seq2Seq(Objective):
    """Batches hold `lm.data.seq2seq.FIELDS`."""

    perplexities = {"loss": "ppl"}

    def __init__(self, config):
        super().__init__(config)
        self.tokenizer = None
        self.val_pairs: list[s2s.Pair] = []

    @property
    def inputs_length(self) -> int:
        return int(self.config.data.inputs_length)

    @property
    def targets_length(self) -> int:
        return int(self.config.data.targets_length)

    # ------------------------------------------------------------------ data
    def _read(self) -> tuple[list[s2s.Pair], list[s2s.Pair]]:
        data = self.config.data
        train = s2s.read_pairs(data, data.path, "data.path")
        if data.get("val_path", ""):
            return train, s2s.read_pairs(data, data.val_path, "data.val_path")
        val_idx, train_idx = labelled.validation_split(len(train), int(data.val_size),
                                                       int(data.split_seed))
        return [train[i] for i in train_idx], [train[i] for i in val_idx]

    def build_data(self, workdir: str, process_index: int, process_count: int) -> Data:
        cfg = self.config
        train, val = self._read()
        if not train:
            raise ValueError(f"data.path: no training pairs in {cfg.data.path}")
        if not val:
            raise ValueError("data.val_path: the validation split holds no pair")
        self.tokenizer = s2s.build_tokenizer(cfg, workdir, train)
        self.val_pairs = val
        self._save_task(workdir)
        packed = bool(cfg.data.get("pack_pairs", True))
        train_src = s2s.pair_source(self.tokenizer, train, self.inputs_length,
                                    self.targets_length, packed=packed, seed=cfg.seed)
        val_src = s2s.pair_source(self.tokenizer, val, self.inputs_length, self.targets_length,
                                  packed=False, seed=0)
        logging.info("seq2seq: %d training pairs in %d rows, %d validation pairs", len(train),
                     len(train_src), len(val))
        train_iter = make_train_iterator(
            train_src, batch_size=cfg.train.batch_size, seed=cfg.seed,
            process_index=process_index, process_count=process_count,
            worker_count=cfg.data.get("worker_count", 0))

        def eval_batches() -> EvalBatches:
            return EvalBatches(val_src, cfg.train.batch_size, None, process_index,
                               process_count)

        return Data(self.tokenizer, train_iter, eval_batches)

    def _save_task(self, workdir: str) -> None:
        data = self.config.data
        info = {"source_lang": data.get("source_lang", ""),
                "target_lang": data.get("target_lang", ""),
                "inputs_length": self.inputs_length, "targets_length": self.targets_length}
        if jax.process_index() == 0:
            with open(os.path.join(workdir, TASK_FILE), "w") as f:
                json.dump(info, f, indent=1)

    def model_overrides(self, data: Data) -> dict[str, Any]:
        # `data.extra_ids`: sentinel ids above the tokenizer's, kept when fine-tuning a
        # span-corruption run so that its embedding table loads unchanged.
        return {"vocab_size": data.tokenizer.vocab_size + int(self.config.data.get(
            "extra_ids", 0))}

    # ----------------------------------------------------------------- model
    def build_model(self, model_cfg: ModelConfig) -> EncoderDecoder:
        return EncoderDecoder(model_cfg)

    def dummy_batch(self, batch_size: int) -> dict[str, np.ndarray]:
        row = s2s.padding_example(self.inputs_length, self.targets_length)
        row["input_segment_ids"][:] = 1
        row["target_segment_ids"][:] = 1
        return {k: np.broadcast_to(v, (batch_size, *v.shape)).copy() for k, v in row.items()}

    def init(self, model: EncoderDecoder, rng: jax.Array, batch: Batch) -> Any:
        return model.init(rng, batch["inputs"], batch["decoder_inputs"])

    def logits(self, model: EncoderDecoder, params: Any, batch: Batch, rng=None,
               train: bool = False) -> jnp.ndarray:
        return model.apply(
            {"params": params}, batch["inputs"], batch["decoder_inputs"],
            input_segment_ids=batch["input_segment_ids"],
            input_positions=batch["input_positions"],
            target_segment_ids=batch["target_segment_ids"],
            target_positions=batch["target_positions"], deterministic=not train,
            rngs={"dropout": rng} if train and rng is not None else None)

    def metrics(self, model: EncoderDecoder, params: Any, batch: Batch, rng: jax.Array | None,
                train: bool) -> Metrics:
        logits = self.logits(model, params, batch, rng, train)
        smoothing = float(self.config.train.get("label_smoothing", 0.0)) if train else 0.0
        return token_cross_entropy(logits, batch["targets"], batch["weights"],
                                   accuracy=not train, label_smoothing=smoothing)

    def tokens_per_example(self) -> int:
        return self.inputs_length + self.targets_length

    def flops_per_token(self, model_cfg: ModelConfig) -> float:
        return model_cfg.flops_per_token(self.targets_length, kind="encoder_decoder")

    # ------------------------------------------------------------- decoding
    def generation_metrics(self, model_cfg: ModelConfig, params: Any) -> dict[str, float]:
        """Beam-search the first `evals.decode_examples` validation sources; corpus BLEU,
        chrF and ROUGE against their references."""
        from lm import text_metrics  # noqa: PLC0415 (sacrebleu / rouge only when decoding)

        ev = self.config.evals
        pairs = self.val_pairs[: int(ev.get("decode_examples", 0)) or len(self.val_pairs)]
        if not pairs:
            return {}
        hyps = translate(model_cfg, params, self.tokenizer, [p.source for p in pairs],
                         inputs_length=self.inputs_length, max_len=self.targets_length,
                         beam_size=int(ev.get("beam_size", 4)),
                         alpha=float(ev.get("length_penalty", 0.6)),
                         batch_size=int(ev.get("decode_batch_size", 32)))
        refs = [p.target for p in pairs]
        return {f"eval/{k}": v for k, v in text_metrics.all_scores(hyps, refs).items()}


def translate(model_cfg: ModelConfig, params: Any, tokenizer, texts: list[str], *,
              inputs_length: int, max_len: int, beam_size: int = 4, alpha: float = 0.6,
              batch_size: int = 32) -> list[str]:
    """Beam-search outputs for `texts`, detokenized (batches padded to one shape, so the
    search compiles once)."""
    from lm.generate import beam_search  # noqa: PLC0415

    eos = tokenizer.special_id("</s>")
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        ids = np.zeros((batch_size, inputs_length), np.int32)
        ids[:, 0] = eos  # rows past the texts: a lone </s>, never an all-padding source
        for r, text in enumerate(chunk):
            enc = s2s.encode(tokenizer, text, inputs_length)
            ids[r, :len(enc)] = enc
        seqs, _ = beam_search(model_cfg, params, ids, beam_size=beam_size, alpha=alpha,
                              max_len=max_len, eos_id=eos)
        for row in seqs[: len(chunk), 0]:
            row = [int(t) for t in row]
            row = row[: row.index(eos)] if eos in row else row
            out.append(tokenizer.decode([t for t in row if t < tokenizer.vocab_size]))
    return out
