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
from flax import linen as nn

from lm.kernels import argmax as argmax_kernel
from lm.kernels import filters as filters_kernel
from lm.kernels import pick as pick_kernel
from lm.models.cache import gather_rows
from lm.models.config import ModelConfig
from lm.models.layers import tied_logits
from lm.models.transformer import Decoder


def order_keys(x_BV: jnp.ndarray) -> jnp.ndarray:
    """uint32 keys ordered as the fp32 values x (-0.0 as +0.0), for thresholds by bisection."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x_BV == 0, 0.0, x_BV).astype(jnp.float32),
                                        jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def threshold(weights_BV: jnp.ndarray, keys_BV: jnp.ndarray, target_B1: jnp.ndarray
              ) -> jnp.ndarray:
    """Per row, the largest key c such that the weights of the entries with key >= c sum to
    at least `target` (the row's smallest key where none does): 32 halvings of the key
    range, each one masked sum over the row. With unit weights and target k, c is the k-th
    largest value's key; with probabilities and target p, the nucleus's smallest value's
    (the smallest set of largest logits whose probability reaches p). A sort of a 50257-wide
    row took 15 ms on a 2-core CPU (412 ms for 32 rows); this, two orders of magnitude less."""
    lo = keys_BV.min(-1, keepdims=True)
    hi = keys_BV.max(-1, keepdims=True)

    def halve(_, bounds):  # the answer stays in [lo, hi]
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # in (lo, hi] while lo < hi; no overflow
        mass = jnp.sum(jnp.where(keys_BV >= mid, weights_BV, 0), axis=-1, keepdims=True)
        ok = (mass >= target_B1) & (lo < hi)
        return jnp.where(ok, mid, lo), jnp.where(ok | (lo >= hi), hi, mid - 1)

    return jax.lax.fori_loop(0, 32, halve, (lo, hi))[0]


def filter_logits(logits_BV: jnp.ndarray, *, top_k: int = 0, top_p: float = 1.0) -> jnp.ndarray:
    """Keeps the `top_k` largest logits and the smallest set whose probability reaches
    `top_p` (nucleus), ties at either boundary kept; everything else becomes the dtype's
    lowest value. No sort: on the CPU `lm.kernels.filters`' radix selection, elsewhere
    `threshold`'s bisection."""
    neg = jnp.finfo(logits_BV.dtype).min
    if (top_k or top_p < 1.0) and filters_kernel.usable(logits_BV):
        return filters_kernel.filter_rows(logits_BV, jnp.int32(top_k), jnp.float32(top_p))
    if top_k and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        keys = order_keys(logits_BV)
        cut = threshold(jax.nn.softmax(logits_BV.astype(jnp.float32), axis=-1), keys,
                        jnp.float32(top_p))
        logits_BV = jnp.where(keys < cut, neg, logits_BV)
    return logits_BV


def inverse_temperature(temperature: float) -> np.float32:
    """1 / temperature in fp32: sampling scales logits by it (XLA:CPU turns a division by a
    constant into this product anyway; written out, the top-k kernel matches it)."""
    return np.float32(1) / np.float32(temperature)


def sample_token(rng: jax.Array, logits_BV: jnp.ndarray, *, temperature: float, top_k: int,
                 top_p: float) -> jnp.ndarray:
    """Greedy when temperature == 0, else a draw from the filtered, tempered softmax.

    With `top_k` the draw is among the k largest logits only (`lax.top_k`, sorted), so the
    nucleus filter and the draw touch k values instead of the vocabulary."""
    if temperature == 0:
        return greedy_token(logits_BV)
    logits_BV = logits_BV * inverse_temperature(temperature)
    if top_k and top_k < logits_BV.shape[-1]:
        return draw_from_top_k(rng, *jax.lax.top_k(logits_BV, top_k), top_p=top_p)
    return categorical(rng, filter_logits(logits_BV, top_p=top_p))


def draw_from_top_k(rng: jax.Array, top_BK: jnp.ndarray, index_BK: jnp.ndarray, *,
                    top_p: float) -> jnp.ndarray:
    """A draw among the k largest tempered logits (sorted, as `lax.top_k` gives them and
    their vocabulary indices), restricted to the nucleus `top_p` when < 1."""
    if top_p < 1.0:  # already sorted: the nucleus is a prefix
        cum_BK = jnp.cumsum(jax.nn.softmax(top_BK, axis=-1), axis=-1)
        last_B1 = jnp.sum(cum_BK < top_p, axis=-1, keepdims=True)
        top_BK = jnp.where(jnp.arange(top_BK.shape[-1]) > last_B1, -jnp.inf, top_BK)
    pick_B = categorical(rng, top_BK)
    return jnp.take_along_axis(index_BK, pick_B[:, None], -1)[:, 0].astype(jnp.int32)


def greedy_token(logits_BV: jnp.ndarray) -> jnp.ndarray:
    """argmax's token per row (lowest index on ties), int32."""
    if argmax_kernel.usable(logits_BV):  # CPU: one vectorised kernel (lm/kernels)
        return argmax_kernel.argmax(logits_BV)
    # top_k(1) picks the same token, and XLA:CPU runs it ~3x faster than argmax
    return jax.lax.top_k(logits_BV, 1)[1][:, 0].astype(jnp.int32)


def categorical(rng: jax.Array, logits_BV: jnp.ndarray) -> jnp.ndarray:
    """One draw per row from softmax(logits), by inverting the CDF at one uniform per row.

    Exact up to fp32 rounding, like `jax.random.categorical`, but that one draws a Gumbel
    variate for every vocabulary entry (50k random numbers and two logarithms per token
    on a GPT-2 vocabulary), which costs more than the model's decode step on a CPU."""
    u_B = jax.random.uniform(rng, logits_BV.shape[:1])
    return categorical_from_uniform(u_B, logits_BV)


def categorical_from_uniform(u_B: jnp.ndarray, logits_BV: jnp.ndarray, block: int = 256
                             ) -> jnp.ndarray:
    """The token at quantile `u` of each row's softmax: the first whose cumulative
    probability exceeds u * total. Two levels (sums of blocks of `block` entries, then one
    block) keep the cumulative sums short; a token of probability 0 (a -inf logit) is
    never chosen, because the cumulative sum first exceeds any threshold at a token that
    adds to it."""
    if block == 256 and argmax_kernel.usable(logits_BV):  # CPU: the same steps in a kernel
        return argmax_kernel.sample(u_B, logits_BV)
    b, v = logits_BV.shape
    x = logits_BV.astype(jnp.float32)
    p_BV = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
    nb = -(-v // block)
    p_BNK = jnp.pad(p_BV, ((0, 0), (0, nb * block - v))).reshape(b, nb, block)
    sums_BN = p_BNK.sum(-1)
    cum_BN = jnp.cumsum(sums_BN, axis=-1)
    target_B = u_B * cum_BN[:, -1]
    blk_B = _first_above(cum_BN, target_B, sums_BN > 0)
    rest_B = target_B - (jnp.take_along_axis(cum_BN, blk_B[:, None], -1)[:, 0]
                         - jnp.take_along_axis(sums_BN, blk_B[:, None], -1)[:, 0])
    p_BK = jnp.take_along_axis(p_BNK, blk_B[:, None, None], 1)[:, 0]
    pos_B = _first_above(jnp.cumsum(p_BK, axis=-1), rest_B, p_BK > 0)
    return (blk_B * block + pos_B).astype(jnp.int32)


def _first_above(cum_BN: jnp.ndarray, t_B: jnp.ndarray, positive_BN: jnp.ndarray
                 ) -> jnp.ndarray:
    """First index with cum > t; where rounding leaves none, the last positive entry."""
    n = cum_BN.shape[-1]
    idx = jnp.arange(n)
    first_B = jnp.min(jnp.where(cum_BN > t_B[:, None], idx, n), axis=-1)
    last_B = jnp.max(jnp.where(positive_BN, idx, -1), axis=-1)
    return jnp.where(first_B < n, first_B, last_B)


def _forward(model: Decoder, params, cache, ids_BL, positions_BL, hidden_scale=None):
    """(the last position's logits [B, V], or with `hidden_scale` its hidden state times
    that scale [B, D], the output projection's input; the updated cache)."""
    out, mutated = model.apply({"params": params, "cache": cache}, ids_BL, None, positions_BL,
                               mutable=["cache"], return_hidden=hidden_scale is not None)
    out = out[:, -1]
    if hidden_scale is not None:
        out = out * hidden_scale  # as Embedder.attend scales it before the product
    return out, mutated["cache"]


def pick_head(cfg: ModelConfig, params, batch: int):
    """(table, its int8 form, scale) when tokens can come from the hidden state through
    `lm.kernels.pick` (a tied fp32 output table on a CPU with the kernels: greedy tokens
    equal to the argmax of the logits kernel, draws as jax.random.categorical of its
    logits, a quarter of the table read per token), else None."""
    if not cfg.tie_embeddings or jnp.dtype(cfg.compute_dtype) != jnp.float32:
        return None
    table, scale = Decoder.output_table(cfg, nn.meta.unbox(params))
    if not pick_kernel.usable(batch, table):
        return None
    return table, pick_kernel.quantize(table), jnp.float32(scale)


def picks_from_hidden(temperature: float, top_k: int, top_p: float, vocab: int) -> bool:
    """Whether a sampling setting needs only what `lm.kernels.pick` gives: greedy, a
    tempered draw from the whole softmax, or one among the top k (nucleus included); a
    nucleus over the whole vocabulary needs every logit."""
    return temperature == 0 or 0 < top_k < vocab or top_p >= 1.0


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
    # on the CPU, greedy, a tempered draw or top-k sampling: the loop carries the hidden
    # state and picks through the int8 table
    fast = (pick_head(model.cfg, params, b)
            if picks_from_hidden(temperature, top_k, top_p, model.cfg.vocab_size) else None)
    hidden_scale = None if fast is None else fast[2]

    def pick(rng, out):
        if fast is None:
            return sample_token(rng, out, temperature=temperature, top_k=top_k, top_p=top_p)
        table, quantized = fast[0], fast[1]
        if temperature == 0:
            return pick_kernel.greedy(out, table, quantized)
        if 0 < top_k < model.cfg.vocab_size:  # lax.top_k of the tempered logits, bit for bit
            scale = jnp.full((b,), inverse_temperature(temperature))
            top = pick_kernel.top_k(out, table, quantized, scale, top_k)

            def from_logits(h):  # a row with non-finite values: the logits for the batch
                return tuple(jax.lax.top_k(tied_logits(h, table, jnp.float32) * scale[:, None],
                                           top_k))

            top_BK, index_BK = jax.lax.cond(jnp.all(top[2]), lambda h: top[:2], from_logits, out)
            return draw_from_top_k(rng, top_BK, index_BK, top_p=top_p)
        # jax.random.categorical(key_b, logits_b / temperature) per row
        return pick_kernel.sample(out, table, quantized, jnp.full((b,), temperature, jnp.float32),
                                  jax.random.split(rng, b))

    def forward(cache, ids_BL, pos_BL):
        return _forward(model, params, cache, ids_BL, pos_BL, hidden_scale)

    def fresh_cache():
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), ctx_BC[:, :1]))
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

    def prefill(ids_BL):
        pos = jnp.broadcast_to(jnp.arange(ids_BL.shape[1], dtype=jnp.int32), ids_BL.shape)
        return forward(fresh_cache(), ids_BL, pos)

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
        tok = pick(sub, logits)
        if eos_id is not None:
            tok = jnp.where(done, eos_id, tok)
            done = done | (tok == eos_id)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tok[:, None], lp + i, axis=1)

        def step(cache, next_pos):
            pos = jnp.full((b, 1), next_pos, jnp.int32)
            logits, cache = forward(cache, tok[:, None], pos)
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
    # Learned positions end at max_len: slide a window only when the output would pass it.
    windowed = cfg.position == "learned" and lp + max_new_tokens > cfg.max_len
    cache_len = cfg.max_len if windowed else lp + max_new_tokens
    ctx = prompt[:, -cfg.max_len:] if windowed and lp > cfg.max_len else prompt
    model = Decoder(cfg, decode=True, cache_len=cache_len)
    buf, n = _decode(model, params, jnp.asarray(prompt), jnp.asarray(ctx), jax.random.key(seed),
                     max_new_tokens=max_new_tokens, temperature=float(temperature),
                     top_k=int(top_k), top_p=float(top_p), eos_id=eos_id, windowed=windowed)
    return np.asarray(buf)[:, : lp + int(n)]


# ----------------------------------------------------------------------------- beam search
NEG_INF = -jnp.inf


def length_penalty(length, alpha: float):
    """GNMT's ((5 + length) / 6) ** alpha; scores are log-probability / penalty."""
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _search(step, cache, logits_NV, *, batch: int, beams: int, max_len: int, alpha: float,
            eos_id: int):
    """The alive / finished beam loop on the device. `step(cache, tokens [B*K], i)` runs the
    decoder on the token at output position i and returns (logits [B*K, V], cache).

    Each step extends every alive beam by every token; the 2K best candidates (K when K = 1,
    i.e. greedy) are split: those ending in `eos_id`, or reaching `max_len`, join the
    finished set with score logp / length_penalty(length), the others compete for the K alive
    slots. The search stops once no alive beam can beat the worst finished one: log-probs only
    fall and, for alpha >= 0, the penalty only grows up to `max_len`, so
    logp_alive / length_penalty(max_len) bounds every continuation.
    """
    b, k = batch, beams
    n_cand = 1 if k == 1 else 2 * k
    alive_seq = jnp.zeros((b, k, max_len), jnp.int32)
    alive_lp = jnp.tile(jnp.asarray([0.0] + [NEG_INF] * (k - 1), jnp.float32), (b, 1))
    fin_seq = jnp.zeros((b, k, max_len), jnp.int32)
    fin_score = jnp.full((b, k), NEG_INF, jnp.float32)
    bound = length_penalty(max_len, alpha)

    def cond(state):
        i, _, alive_lp, _, fin_score, _, _ = state
        worst_finished = jnp.min(fin_score, axis=1)
        best_alive = alive_lp[:, 0] / bound
        hopeless = (best_alive < worst_finished) | (alive_lp[:, 0] == NEG_INF)
        return (i < max_len) & ~jnp.all(hopeless)

    def body(state):
        i, alive_seq, alive_lp, fin_seq, fin_score, cache, logits = state
        vocab = logits.shape[-1]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(b, k, vocab)
        cand = (alive_lp[:, :, None] + logp).reshape(b, k * vocab)
        cand_lp, flat = jax.lax.top_k(cand, n_cand)
        parent, tok = flat // vocab, (flat % vocab).astype(jnp.int32)
        cand_seq = jnp.take_along_axis(alive_seq, parent[:, :, None], axis=1)
        cand_seq = jax.lax.dynamic_update_slice_in_dim(cand_seq, tok[:, :, None], i, axis=2)
        ends = (tok == eos_id) | (i == max_len - 1)
        # finished: keep the K best of the old finished and the newly ended candidates
        new_score = jnp.where(ends, cand_lp / length_penalty(i + 1, alpha), NEG_INF)
        all_score = jnp.concatenate([fin_score, new_score], axis=1)
        all_seq = jnp.concatenate([fin_seq, cand_seq], axis=1)
        fin_score, top = jax.lax.top_k(all_score, k)
        fin_seq = jnp.take_along_axis(all_seq, top[:, :, None], axis=1)
        # alive: the K best candidates that did not end
        live_lp = jnp.where(ends, NEG_INF, cand_lp)
        alive_lp, top = jax.lax.top_k(live_lp, k)
        alive_seq = jnp.take_along_axis(cand_seq, top[:, :, None], axis=1)
        new_parent = jnp.take_along_axis(parent, top, axis=1)
        new_tok = jnp.take_along_axis(tok, top, axis=1)
        rows = (jnp.arange(b)[:, None] * k + new_parent).reshape(b * k)
        cache = gather_rows(cache, rows)
        logits, cache = step(cache, new_tok.reshape(b * k), i)
        return i + 1, alive_seq, alive_lp, fin_seq, fin_score, cache, logits

    state = (jnp.int32(0), alive_seq, alive_lp, fin_seq, fin_score, cache, logits_NV)
    _, alive_seq, alive_lp, fin_seq, fin_score, *_ = jax.lax.while_loop(cond, body, state)
    return fin_seq, fin_score


def _repeat(x, beams: int):
    return jnp.repeat(x, beams, axis=0)


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_len", "alpha", "eos_id"))
def _beam_encdec(model, params, inputs_BS, seg_BS, *, beams: int, max_len: int, alpha: float,
                 eos_id: int):
    b = inputs_BS.shape[0]
    encoded = model.apply({"params": params}, inputs_BS, seg_BS, method=model.encode)
    encoded, seg = _repeat(encoded, beams), _repeat(seg_BS, beams)
    start = jnp.zeros((b * beams, 1), jnp.int32)  # the decoder start id

    def run(cache, tok_N1, pos):
        positions = jnp.full(tok_N1.shape, pos, jnp.int32)
        logits, mutated = model.apply({"params": params, "cache": cache}, encoded, tok_N1,
                                      None, positions, encoder_segment_ids=seg,
                                      method=model.decode, mutable=["cache"])
        return logits[:, -1], mutated["cache"]

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs_BS[:1].repeat(
        b * beams, 0), start))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    logits, cache = run(cache, start, 0)
    return _search(lambda c, t, i: run(c, t[:, None], i + 1), cache, logits, batch=b,
                   beams=beams, max_len=max_len, alpha=alpha, eos_id=eos_id)


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_len", "alpha", "eos_id"))
def _beam_decoder(model, params, prompt_BP, *, beams: int, max_len: int, alpha: float,
                  eos_id: int):
    b, lp = prompt_BP.shape
    prompt = _repeat(prompt_BP, beams)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), prompt[:, :1]))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
    pos = jnp.broadcast_to(jnp.arange(lp, dtype=jnp.int32), prompt.shape)
    logits, cache = _forward(model, params, cache, prompt, pos)

    def step(cache, tok_N, i):
        return _forward(model, params, cache, tok_N[:, None],
                        jnp.full((b * beams, 1), lp + i, jnp.int32))

    return _search(step, cache, logits, batch=b, beams=beams, max_len=max_len, alpha=alpha,
                   eos_id=eos_id)


def beam_search(cfg: ModelConfig, params: Any, ids: np.ndarray, *, beam_size: int = 4,
                alpha: float = 0.6, max_len: int, eos_id: int, decoder_only: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """Beam search through the KV cache; one compiled call per shape and setting.

    `ids` [B, S]: encoder inputs (id 0 = padding) of an `EncoderDecoder`, or, with
    `decoder_only`, a `Decoder` prompt (every row the same length). Returns the `beam_size`
    best hypotheses per row, best first: tokens [B, K, max_len] (0 after `eos_id`) and
    scores [B, K] (log-probability / ((5 + length) / 6) ** alpha, the length counting `eos_id`).
    A hypothesis that reaches `max_len` tokens ends there. Beam size 1 is greedy decoding.
    """
    from lm.models.transformer import EncoderDecoder  # noqa: PLC0415

    if beam_size < 1:
        raise ValueError(f"beam_size: must be >= 1, got {beam_size}")
    if max_len < 1:
        raise ValueError(f"max_len: must be >= 1, got {max_len}")
    if alpha < 0:
        raise ValueError(f"length_penalty: alpha must be >= 0, got {alpha}")
    ids = jnp.asarray(np.asarray(ids, np.int32))
    kw = dict(beams=int(beam_size), max_len=int(max_len), alpha=float(alpha),
              eos_id=int(eos_id))
    if decoder_only:
        total = ids.shape[1] + max_len
        if cfg.position == "learned" and total > cfg.max_len:
            raise ValueError(f"max_len: prompt + max_len = {total} exceeds the model's "
                             f"learned positions ({cfg.max_len})")
        model = Decoder(cfg, decode=True, cache_len=total + 1)  # + the unused last step
        seqs, scores = _beam_decoder(model, params, ids, **kw)
    else:
        model = EncoderDecoder(cfg, decode_mode=True, cache_len=max_len + 1)
        seqs, scores = _beam_encdec(model, params, ids, (ids != 0).astype(jnp.int32), **kw)
    return np.asarray(seqs), np.asarray(scores)
