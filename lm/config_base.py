"""Defaults shared by every experiment file in `configs/`.

Top-level keys: seed, objective, model, data, optim, mesh, train, evals, init_from.
`config.model` lists every `ModelConfig` field (filled from a named preset), so any of
them can be overridden on the command line, and misspelt ones fail (lock_config=True).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ml_collections import ConfigDict, FieldReference

from lm.models.config import ModelConfig
from lm.models.presets import preset

_OPTIONAL_INT = ("num_kv_heads", "head_dim", "num_decoder_layers")


def model_config(preset_name: str, **overrides: Any) -> ConfigDict:
    """All ModelConfig fields of a preset (+ overrides) as an overridable ConfigDict.

    `vocab_size=0` means "take it from the tokenizer".
    """
    vocab = overrides.pop("vocab_size", None)
    cfg = preset(preset_name, **overrides)
    values: dict[str, Any] = dataclasses.asdict(cfg)
    if vocab is not None:
        values["vocab_size"] = vocab
    for name in _OPTIONAL_INT:
        values[name] = FieldReference(values[name], field_type=int)
    return ConfigDict({"preset": preset_name, **values})


def to_model_config(model: ConfigDict, **decided: Any) -> ModelConfig:
    """`config.model` -> ModelConfig; `decided` fills fields the data fixes (vocab size)
    when the config leaves them at 0."""
    values = model.to_dict()
    for key, value in decided.items():
        if not values.get(key):
            values[key] = value
        elif key == "vocab_size" and values[key] < value:
            raise ValueError(f"model.vocab_size={values[key]} is smaller than the tokenizer's "
                             f"vocabulary ({value})")
    return ModelConfig.from_dict(values)


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.objective = "causal_lm"
    c.model = ConfigDict()  # filled by each experiment with model_config(...)
    # data.path (a local file) wins; else data.url is downloaded once and checked against
    # data.sha256; else data.tfds_name is read from the tfds catalogue.
    c.data = ConfigDict(dict(
        path="", url="", sha256="", val_path="", val_fraction=0.1, tfds_name="",
        tfds_data_dir="", text_key="text",
        tokenizer="char", vocab_size=0, tokenizer_path="", pack="chunk", doc_separator="",
        seq_len=128, train_stride=0, worker_count=0))
    c.optim = ConfigDict(dict(
        name="adamw", lr=1e-3, end_lr=1e-4, schedule="cosine", warmup_steps=100, decay_steps=0,
        b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.1, decay_embeddings=False, grad_clip=1.0,
        grad_accum_steps=1))
    # One axis may be -1 (the remaining devices). rules: dp | fsdp | fsdp_tp.
    # num_devices: use the first N devices only (0 = all).
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules="dp", num_devices=0))
    # loss_chunk: tokens per chunk of the fused output projection + cross-entropy
    # (0 = one chunk; -1 = materialise the logits and let autodiff differentiate them).
    c.train = ConfigDict(dict(
        steps=1000, batch_size=32, log_every=50, eval_every=500, checkpoint_every=500,
        keep_checkpoints=3, async_checkpoint=True, distributed=False,
        preemption_sync_every=10, loss_chunk=512,
        # a jax.profiler trace of steps [profile_start, profile_start + profile_steps) into
        # WORKDIR/profile (xprof / TensorBoard's profile plugin); 0 steps = off
        profile_start=0, profile_steps=0,
        # optimizer steps per compiled call (lax.scan over that many batches); every step is
        # still logged, and calls end on eval / checkpoint steps (see lm/train.py)
        steps_per_call=1,
        # a Weights & Biases project to log to as well ('' = none; `pip install -e .[wandb]`)
        wandb_project=""))
    # max_batches: 0 = the whole validation split; batch_size: 0 = train.batch_size
    c.evals = ConfigDict(dict(max_batches=0, batch_size=0))
    c.init_from = ""
    return c


def bert_finetune_schedule(c: ConfigDict, steps: int, lr: float, runlocal: bool,
                           evals: int) -> None:
    """BERT's fine-tuning recipe on `c`: AdamW (0.9, 0.999, eps 1e-6, weight decay 0.01,
    clip 1.0), linear decay to 0 after 10 % warmup, batch 32, `evals` evaluations and
    checkpoints per run (2 kept); `runlocal`: 20 steps of 8 and 4 evaluation batches."""
    batch = 32
    if runlocal:
        steps, batch = 20, 8
        c.evals.max_batches = 4
    c.optim.update(lr=lr, end_lr=0.0, schedule="linear", warmup_steps=max(steps // 10, 1),
                   b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.01, grad_clip=1.0)
    c.train.update(steps=steps, batch_size=batch, log_every=max(steps // 40, 1),
                   eval_every=max(steps // evals, 1), checkpoint_every=max(steps // evals, 1),
                   keep_checkpoints=2)


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> dict[str, Any]:
    """'small' or 'size=small,runlocal' -> {'variant': 'small', 'runlocal': True, ...}."""
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key] = value
        elif part in defaults and isinstance(defaults[part], bool):
            out[part] = True
        else:
            out["variant"] = part
    return out
