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


def _forward(model: Decoder, params, cache, ids_BL, positions_BL):
    logits, mutated = model.apply({"params": params, "cache": cache}, ids_BL, None, positions_BL,
                                  mutable=["cache"])
    return logits[:, -1], mutated["cache"]


@functools.partial(jax.jit, static_argnames=(
    "model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id", "windowed"))
def _decode(model: Decoder, params, prompt_BP, ctx_BC, rng, *, max_new_tokens: int,
            temperature: float, top_k: int, top_p: float, eos_id: int | None,
            windowed: bool):
    """The whole decode on the device: prefill once, then a while loop that samples a token,
    writes it into the output buffer and runs one cached step (or, with a full sliding
    window, prefills its last half again). Returns (tokens [B, P + N], tokens made)."""
    b, lp = prompt_BP.shape
    cache_len = model.cache_len
    keep = cache_len // 2

    def fresh_cache():
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ctx_BC[:, :1]))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def prefill(ids_BL):
        pos = jnp.broadcast_to(jnp.arange(ids_BL.shape[1], dtype=jnp.int32), ids_BL.shape)
        return _forward(model, params, fresh_cache(), ids_BL, pos)

    logits, cache = prefill(ctx_BC)
    buf = jnp.concatenate([prompt_BP, jnp.zeros((b, max_new_tokens), jnp.int32)], axis=1)
    done = jnp.zeros((b,), bool)
    state = (jnp.int32(0), buf, cache, logits, jnp.int32(ctx_BC.shape[1]), rng, done)

    def cond(state):
        i, *_, done = state
        go = i < max_new_tokens
        return go if eos_id is None else go & ~jnp.all(done)

    def body(state):
        i, buf, cache, logits, next_pos, rng, done = state
        rng, sub = jax.random.split(rng)
        tok = sample_token(sub, logits, temperature=temperature, top_k=top_k, top_p=top_p)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], lp + i, axis=1)

        def step(cache, next_pos):
            pos = jnp.full((b, 1), next_pos, jnp.int32)
            logits, cache = _forward(model, params, cache, tok[:, None], pos)
            return logits, cache, next_pos + 1

        def refill(cache, next_pos):  # window full: keep the last half and prefill again
            window = jax.lax.dynamic_slice_in_dim(buf, lp + i + 1 - keep, keep, axis=1)
            logits, cache = prefill(window)
            return logits, cache, jnp.int32(keep)

        if windowed:
            logits, cache, next_pos = jax.lax.cond(next_pos >= cache_len, refill, step, cache,
                                                   next_pos)
        else:
            logits, cache, next_pos = step(cache, next_pos)
        return i + 1, buf, cache, logits, next_pos, rng, done

    n, buf, *_ = jax.lax.while_loop(cond, body, state)
    return buf, n


def generate(cfg: ModelConfig, params: Any, prompt_ids: np.ndarray, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: int | None = None) -> np.ndarray:
    """prompt [B, Lp] -> [B, Lp + max_new_tokens] (stops early once every row emitted
    `eos_id`; later positions of finished rows repeat eos). One compiled call per shape and
    sampling setting; no host round trip per token."""
    prompt = np.asarray(prompt_ids, np.int32)
    b, lp = prompt.shape
    if lp == 0:
        raise ValueError("prompt: at least one token is needed")
    windowed = cfg.position == "learned"
    cache_len = cfg.max_len if windowed else lp + max_new_tokens
    ctx = prompt[:, -cfg.max_len:] if windowed and lp > cfg.max_len else prompt
    model = Decoder(cfg, decode=True, cache_len=cache_len)
    buf, n = _decode(model, params, jnp.asarray(prompt), jnp.asarray(ctx), jax.random.key(seed),
                     max_new_tokens=max_new_tokens, temperature=float(temperature),
                     top_k=int(top_k), top_p=float(top_p), eos_id=eos_id, windowed=windowed)
    return np.asarray(buf)[:, : lp + int(n)]
