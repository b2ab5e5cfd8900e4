"""The device side of serving: a KV cache of fixed slots that sequences join and leave.

One cache holds `slots` rows of `context` columns. Every decode step writes one column,
`c`, shared by all rows, and the write column advances cyclically (c = step mod context).
Rows are independent sequences: the cache stores each key's segment id and absolute
position, and the attention mask is built from those, so where in the row a key sits does
not matter. A new sequence is prefilled on its own (a fresh row) and its row is rotated
so that its tokens end just before the current write column; from there it advances with
everyone else. Its live tokens never wrap onto themselves because a sequence is at most
`context` tokens long. Empty slots feed segment id 0 and their outputs are ignored.

A sequence's last prompt token is not prefilled: it is the first token a decode step
feeds, so every sampled token comes out of the same compiled step.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lm.generate import greedy_token, order_keys, pick_head, threshold
from lm.kernels import filters as filters_kernel
from lm.kernels import pick as pick_kernel
from lm.kernels.build import on_cpu
from lm.models.cache import INDEX_LEAVES, SEQ_AFTER_ROW, leaf_name, merge_rows, row_axis, split_rows
from lm.models.layers import tied_logits
from lm.models.transformer import Decoder

TOP_N = 20  # alternatives returned per position (the API's maximum `logprobs`)


def empty_cache(model: Decoder, slots: int) -> Any:
    """Zeros of the decode cache for `slots` rows of `model.cache_len` columns."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                               jnp.zeros((slots, 1), jnp.int32)))
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


def _set_index(cache, column):
    """Points every cache write index at `column` (the next write goes there)."""
    def put(path, leaf):
        if leaf_name(path) in INDEX_LEAVES:
            return jnp.full(leaf.shape, column, leaf.dtype)
        return leaf
    return jax.tree_util.tree_map_with_path(put, cache)


@functools.partial(jax.jit, static_argnames=("model",))
def prefill(model: Decoder, params, ids_BL, lengths_B):
    """Fresh cache rows for right-padded prompts (`lengths_B` real tokens each; 0 is
    allowed: an empty row)."""
    b, length = ids_BL.shape
    seg_BL = (jnp.arange(length)[None] < lengths_B[:, None]).astype(jnp.int32)
    pos_BL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    cache = empty_cache(model, b)
    _, mutated = model.apply({"params": params, "cache": cache}, ids_BL, seg_BL, pos_BL,
                             mutable=["cache"], return_hidden=True)
    return mutated["cache"]


@functools.partial(jax.jit, donate_argnums=(0,))
def insert(cache, rows, slots_K, shifts_K):
    """Writes prefilled `rows` (K of them) into `cache` at `slots_K`, each rolled right by
    `shifts_K` columns. A slot index out of range (padding rows) is dropped."""
    cache, rows = split_rows(cache), split_rows(rows)

    def put(path, big, row):
        b_axis = row_axis(path, big)
        if b_axis is None:
            return big
        seq_axis = b_axis + SEQ_AFTER_ROW[leaf_name(path)] - 1  # in a row without its row axis
        row = jnp.moveaxis(row, b_axis, 0)
        rolled = jax.vmap(lambda r, s: jnp.roll(r, s, axis=seq_axis))(row, shifts_K)
        big = jnp.moveaxis(big, b_axis, 0)
        big = big.at[slots_K].set(rolled.astype(big.dtype), mode="drop")
        return jnp.moveaxis(big, 0, b_axis)
    return merge_rows(jax.tree_util.tree_map_with_path(put, cache, rows))


def tempered(temperature_B):
    """The temperature each row divides its logits by: 0 (greedy) stays 0, others at least
    1e-6. The kernel and the logits path use the same, so they draw the same token."""
    return jnp.where(temperature_B > 0, jnp.maximum(temperature_B, 1e-6), 0.0)


def gumbel_rows(keys_B, vocab: int):
    """jax.random.gumbel(key_b, (vocab,)) per row: on the CPU the noise `lm.kernels.pick`
    adds (one vectorised pass; XLA's threefry and logarithms cost more than a decode
    step), elsewhere jax's own."""
    if on_cpu():
        return pick_kernel.gumbel(keys_B, vocab)
    return jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(keys_B)


def sample_rows(logits_BV, keys_B, temperature_B, top_k_B, top_p_B):
    """Per-row sampling: greedy where temperature == 0, else a draw from the tempered
    softmax restricted to the top-k logits (0 = all) and then to the nucleus `top_p`
    (the same filters as `lm.generate.filter_logits`, with settings per row). A draw is
    jax.random.categorical(key_b, filtered logits / t_b): the first argmax of
    gumbel(key_b) + logits / t_b, the token the pick kernel draws for an unfiltered row,
    so a row's tokens do not depend on which branch its batch took. The filters'
    thresholds (`lm.kernels.filters` on the CPU, elsewhere `lm.generate.threshold`'s
    bisection) run only when some row asks for one, and nothing but an argmax runs when
    every row is greedy."""
    v = logits_BV.shape[-1]
    neg = jnp.finfo(logits_BV.dtype).min
    greedy = greedy_token(logits_BV)  # on the CPU lm's argmax kernel

    def filtered(x):  # thresholds by radix (CPU kernel) or bisection: no sort of the vocabulary
        if filters_kernel.usable(x):
            return filters_kernel.filter_rows(x, top_k_B, top_p_B)
        keys = order_keys(x)
        k = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, v), v)
        kth = threshold(jnp.ones((), jnp.int32), keys, k[:, None])
        x = jnp.where(keys < kth, neg, x)
        cut = threshold(jax.nn.softmax(x, axis=-1), keys, top_p_B[:, None])
        return jnp.where((keys < cut) & (top_p_B[:, None] < 1.0), neg, x)

    def draw(_):
        x = logits_BV / jnp.maximum(tempered(temperature_B), 1e-6)[:, None]
        needs_filter = jnp.any((temperature_B > 0) & ((top_k_B > 0) | (top_p_B < 1.0)))
        x = jax.lax.cond(needs_filter, filtered, lambda x: x, x)
        drawn = greedy_token(gumbel_rows(keys_B, v) + x)
        return jnp.where(temperature_B == 0, greedy, drawn)

    return jax.lax.cond(jnp.all(temperature_B == 0), lambda _: greedy, draw, None)


def _first_rows(cache, rows: int):
    def take(path, leaf):
        axis = row_axis(path, leaf)
        return leaf if axis is None else jax.lax.slice_in_dim(leaf, 0, rows, axis=axis)
    return merge_rows(jax.tree_util.tree_map_with_path(take, split_rows(cache)))


def _put_first_rows(cache, part):
    def put(path, big, small):
        axis = row_axis(path, big)
        return small if axis is None else jax.lax.dynamic_update_slice_in_dim(big, small, 0,
                                                                               axis=axis)
    return merge_rows(jax.tree_util.tree_map_with_path(put, split_rows(cache),
                                                       split_rows(part)))


def pick_table(model: Decoder, params):
    """The output table's int8 form for `step`'s picks (`lm.kernels.pick`), made
    once per engine; None where the kernel does not apply (see `pick_head`;
    `step` checks its own number of rows)."""
    return jax.jit(lambda p: pick_head(model.cfg, p, 1))(params)


@functools.partial(jax.jit, static_argnames=("model", "rows"), donate_argnums=(2,))
def step(model: Decoder, params, cache, ids_S, positions_B, active_B, column, seeds_B,
         counters_B, temperature_B, top_k_B, top_p_B, want_top, head=None, *, rows: int):
    """One token for each of the first `rows` slots (the occupied ones; the engine fills
    slots lowest first, so few clients cost a small batch): feeds `ids_S[:rows]` at
    `positions_B` (written at `column`) and samples the next token per row. Returns
    (cache, ids_S with the next tokens, their logprobs, top-N ids, top-N logprobs);
    logprobs are of the untempered model distribution, computed only when `want_top`
    (some row asked for logprobs; zeros otherwise). Per-row inputs (`_B`) have `rows` entries.

    With `head` (`pick_table`), a step where no row filters (top-k, top-p) and none wants
    logprobs picks its tokens from the hidden state through the int8 table and computes
    no logits: greedy rows the logits' argmax, sampled rows the same draw as
    `sample_rows` (bit for bit, both)."""
    full = cache
    cache = _set_index(_first_rows(cache, rows), column)
    ids_B = ids_S[:rows]
    seg = active_B.astype(jnp.int32)[:, None]
    fast = head is not None and pick_kernel.usable(rows, head[0])
    out, mutated = model.apply({"params": params, "cache": cache}, ids_B[:, None], seg,
                               positions_B[:, None], mutable=["cache"], return_hidden=fast)
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds_B, counters_B)
    b, n = rows, min(TOP_N, model.cfg.vocab_size)

    def logprobs(logits_BV, tok):
        logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
        tok_lp = jnp.take_along_axis(logp_BV, tok[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(logp_BV, n)
        return tok_lp, top_lp, top_ids.astype(jnp.int32)

    def nothing(logits_BV, tok):
        return (jnp.zeros((b,), jnp.float32), jnp.zeros((b, n), jnp.float32),
                jnp.zeros((b, n), jnp.int32))

    def from_logits(logits_BV):
        tok = sample_rows(logits_BV, keys, temperature_B, top_k_B, top_p_B)
        return (tok, *jax.lax.cond(want_top, logprobs, nothing, logits_BV, tok))

    if fast:
        table, quantized, scale = head
        h_BD = out[:, -1] * scale  # as Embedder.attend scales it before the product

        def pick(h_BD):
            tok = pick_kernel.sample(h_BD, table, quantized, tempered(temperature_B), keys)
            return (tok, *nothing(None, tok))

        def full_head(h_BD):
            return from_logits(tied_logits(h_BD, table, model.cfg.compute_dtype))

        v = model.cfg.vocab_size
        unfiltered = (temperature_B == 0) | (((top_k_B == 0) | (top_k_B >= v)) & (top_p_B >= 1.0))
        tok, tok_lp, top_lp, top_ids = jax.lax.cond(
            jnp.all(unfiltered) & ~want_top, pick, full_head, h_BD)
    else:
        tok, tok_lp, top_lp, top_ids = from_logits(out[:, -1].astype(jnp.float32))
    return (_put_first_rows(full, mutated["cache"]), ids_S.at[:rows].set(tok), tok_lp,
            top_ids.astype(jnp.int32), top_lp)


@functools.partial(jax.jit, static_argnames=("model",))
def score(model: Decoder, params, ids_BL, lengths_B):
    """A full forward pass over right-padded prompts: for every position i >= 1, the
    logprob of token i given tokens < i, and the top-N alternatives there."""
    b, length = ids_BL.shape
    seg = (jnp.arange(length)[None] < lengths_B[:, None]).astype(jnp.int32)
    logits = model.apply({"params": params}, ids_BL, seg)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    tok_lp = jnp.take_along_axis(logp, ids_BL[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, min(TOP_N, logp.shape[-1]))
    return tok_lp, top_ids.astype(jnp.int32), top_lp
