"""Sampling from a `Decoder` through its static KV cache.

The prompt is processed in one call (prefill), then one token per call. Each shape
compiles once. With learned absolute positions the context cannot exceed `max_len`: when
the cache is full, the last `max_len // 2` tokens are prefilled again at positions
0.. (a sliding window, as nanoGPT crops its context), so any number of tokens can be
sampled.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.config import ModelConfig
from lm.models.transformer import Decoder


def filter_logits(logits_BV: jnp.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Keeps the `top_k` largest logits and the smallest set whose probability reaches
    `top_p` (nucleus); everything else becomes -inf."""
    neg = jnp.finfo(logits_BV.dtype).min
    if top_k and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
        # The smallest logit still needed to reach top_p (the first always stays).
        cutoff_idx = jnp.sum(cum < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_BV, cutoff_idx, axis=-1)
        logits_BV = jnp.where(logits_BV < cutoff, neg, logits_BV)
    return logits_BV


def sample_token(rng: jax.Array, logits_BV: jnp.ndarray, *, temperature: float, top_k: int,
                 top_p: float) -> jnp.ndarray:
    """Greedy when temperature == 0, else a draw from the filtered, tempered softmax."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = filter_logits(logits_BV / temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(model: Decoder, params, cache, ids_BL, positions_BL):
    logits, mutated = model.apply({"params": params, "cache": cache}, ids_BL, None, positions_BL,
                                  mutable=["cache"])
    return logits[:, -1], mutated["cache"]


def generate(cfg: ModelConfig, params: Any, prompt_ids: np.ndarray, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> np.ndarray:
    """prompt [B, Lp] -> [B, Lp + max_new_tokens] (stops early once every row emitted
    `eos_id`; later positions of finished rows repeat eos)."""
    prompt = np.asarray(prompt_ids, np.int32)
    b, lp = prompt.shape
    if lp == 0:
        raise ValueError("prompt: at least one token is needed")
    windowed = cfg.position == "learned"
    cache_len = cfg.max_len if windowed else lp + max_new_tokens
    if windowed and lp > cfg.max_len:
        prompt_ctx = prompt[:, -cfg.max_len:]
    else:
        prompt_ctx = prompt
    model = Decoder(cfg, decode=True, cache_len=cache_len)

    def fresh_cache():
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt_ctx[:, :1]))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def prefill(ctx: np.ndarray):
        pos = np.broadcast_to(np.arange(ctx.shape[1], dtype=np.int32), ctx.shape)
        return _forward(model, params, fresh_cache(), jnp.asarray(ctx), jnp.asarray(pos))

    logits, cache = prefill(prompt_ctx)
    next_pos = prompt_ctx.shape[1]
    rng = jax.random.key(seed)
    out = [prompt]
    done = np.zeros(b, bool)
    tokens = prompt
    for _ in range(max_new_tokens):
        rng, sub = jax.random.split(rng)
        tok = np.asarray(sample_token(sub, logits, temperature=temperature, top_k=top_k,
                                      top_p=top_p))
        if eos_id is not None:
            tok = np.where(done, eos_id, tok)
            done |= tok == eos_id
        out.append(tok[:, None])
        tokens = np.concatenate([tokens, tok[:, None]], axis=1)
        if eos_id is not None and done.all():
            break
        if next_pos >= cache_len:  # window full: keep the last half and prefill again
            keep = cache_len // 2
            logits, cache = prefill(tokens[:, -keep:])
            next_pos = keep
            continue
        pos = np.full((b, 1), next_pos, np.int32)
        logits, cache = _forward(model, params, cache, jnp.asarray(tok[:, None]),
                                 jnp.asarray(pos))
        next_pos += 1
    return np.concatenate(out, axis=1)
