"""Optimizer and learning-rate schedules from `config.optim`.

AdamW with decoupled weight decay applied only to matmul kernels by default (not to
norms, biases or embeddings; `decay_embeddings=True` adds the embedding tables, as
nanoGPT does), global-norm clipping, warmup followed by cosine / linear / constant decay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr` over `warmup_steps`, then decay to `end_lr` at `decay_steps`
    (default: the run length). Update k (0-based) uses the value at k + 1, so the first
    update already moves the weights (lr / warmup_steps), as in nanoGPT."""
    base = _base_schedule(cfg, total_steps)
    return lambda step: jnp.maximum(base(step + 1), 0.0)  # no rounding below zero


def _base_schedule(cfg: Mapping[str, Any], total_steps: int) -> optax.Schedule:
    lr, end_lr, warmup = cfg["lr"], cfg["end_lr"], cfg["warmup_steps"]
    decay_steps = cfg.get("decay_steps") or total_steps
    kind = cfg["schedule"]
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(decay_steps, warmup + 1),
                                                  end_lr)
    if kind == "linear":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, lr, warmup),
             optax.linear_schedule(lr, end_lr, max(decay_steps - warmup, 1))], [warmup])
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup),
                                     optax.constant_schedule(lr)], [warmup])
    raise ValueError(f"optim.schedule: {kind!r} is not one of cosine, linear, constant")


def decay_mask(params: Any, decay_embeddings: bool) -> Any:
    """True for weights that get weight decay: kernels (ndim >= 2) and, optionally, the
    embedding tables; never norms or biases."""

    def decide(path, x) -> bool:
        names = [getattr(p, "key", str(p)) for p in path]
        is_embedding = names[-1] == "embedding"
        if is_embedding:
            return decay_embeddings
        return names[-1] == "kernel" and x.ndim >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def build(cfg: Mapping[str, Any], total_steps: int) -> tuple[optax.GradientTransformation,
                                                             optax.Schedule]:
    """The optimizer chain and its schedule (the schedule is also logged as train/lr)."""
    if cfg["name"] != "adamw":
        raise ValueError(f"optim.name: {cfg['name']!r} is not supported (adamw)")
    lr = schedule(cfg, total_steps)
    chain = []
    if cfg["grad_clip"] and cfg["grad_clip"] > 0:
        chain.append(optax.clip_by_global_norm(cfg["grad_clip"]))
    chain.append(optax.adamw(
        lr, b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=cfg["weight_decay"],
        mask=lambda p: decay_mask(p, cfg["decay_embeddings"])))
    return optax.chain(*chain), lr
