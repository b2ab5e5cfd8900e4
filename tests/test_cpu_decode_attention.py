"""The CPU decoding-attention kernel (lm/kernels/decode_attention_cpu.cc): one query per
(row, head) over the KV cache as a float64 softmax computes it, whatever the mask leaves
(causal prefixes, padding holes, nothing); it reads no key or value past a row's last
allowed one; and a decoding step takes it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import attention as kernel
from lm.kernels import build
from lm.models import attention as attention_lib
from lm.models import masks
from lm.models.config import ModelConfig
from lm.models.transformer import Decoder

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU kernels need AVX-512 or AVX2 and a C++ compiler here")


def _reference(q, keys, values, allowed, scale, bias=None):
    """float64 softmax attention per n = b * G + g; zeros for a row with no allowed key."""
    q, keys, values = (np.asarray(a, np.float64) for a in (q, keys, values))
    bias = 0.0 if bias is None else np.asarray(bias, np.float64)
    allowed = np.asarray(allowed)
    n, r, k = q.shape
    groups = n // allowed.shape[0]
    out = np.zeros((n, r, k))
    for i in range(n):
        ok = allowed[i // groups]
        if not ok.any():
            continue
        logits = scale * q[i] @ keys[i] + (bias if np.isscalar(bias) else bias[i])  # [R, S]
        logits = np.where(ok, logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        out[i] = (p / p.sum(-1, keepdims=True)) @ values[i]
    return out


def _inputs(seed, b, groups, r, k, s):
    rng = np.random.default_rng(seed)
    n = b * groups
    q, keys, values = (jnp.asarray(rng.normal(size=shape), jnp.float32)
                       for shape in ((n, r, k), (n, k, s), (n, s, k)))
    last = rng.integers(1, s + 1, b)  # causal: keys [0, last) filled
    allowed = np.arange(s)[None] < last[:, None]
    allowed[0, : min(3, s - 1)] = False  # row 0: left padding (a hole before its keys)
    if b > 2:
        allowed[2, s // 2] = False  # a hole inside the span
        allowed[-1] = False  # nothing allowed: zeros
    return q, keys, values, jnp.asarray(allowed)


@pytest.mark.parametrize("b,groups,r,k,s", [
    (4, 2, 2, 64, 37),   # grouped heads; S off the vector
    (3, 4, 1, 20, 5),    # K off the vector; S below it
    (3, 1, 3, 16, 200),  # four-vector blocks of keys, then single vectors, then a tail
    (1, 4, 1, 64, 272),  # the GPT benchmark's batch-1 cache
])
def test_matches_a_softmax_reference(b, groups, r, k, s):
    q, keys, values, allowed = _inputs(b * s + k, b, groups, r, k, s)
    got = kernel.cached(q, keys, values, allowed, k**-0.5)
    assert got.shape == q.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _reference(q, keys, values, allowed, k**-0.5),
                               rtol=2e-5, atol=2e-6)


def test_a_logit_bias_is_added_after_the_scale():
    """T5's relative-position bias [N, R, S] (the optional operand)."""
    b, groups, r, k, s = 3, 2, 2, 32, 45
    q, keys, values, allowed = _inputs(7, b, groups, r, k, s)
    bias = jnp.asarray(np.random.default_rng(8).normal(size=(b * groups, r, s)) * 2,
                       jnp.float32)
    got = kernel.cached(q, keys, values, allowed, 1.0, bias)
    np.testing.assert_allclose(got, _reference(q, keys, values, allowed, 1.0, bias),
                               rtol=2e-5, atol=2e-6)


def test_keys_and_values_past_the_last_allowed_are_never_read():
    """The cache's unfilled slots may hold anything (here NaN): they are not read."""
    b, groups, k, s = 2, 2, 32, 100
    q, keys, values, _ = _inputs(0, b, groups, 1, k, s)
    allowed = jnp.asarray(np.arange(s)[None] < np.array([[40], [67]]))
    filled = np.repeat(np.asarray(allowed), groups, axis=0)  # [N, S]
    keys_nan = jnp.where(jnp.asarray(filled)[:, None, :], keys, jnp.nan)
    values_nan = jnp.where(jnp.asarray(filled)[:, :, None], values, jnp.nan)
    got = kernel.cached(q, keys_nan, values_nan, allowed, 0.3)
    np.testing.assert_allclose(got, _reference(q, keys, values, allowed, 0.3),
                               rtol=2e-5, atol=2e-6)


def test_cached_attention_kernel_equals_its_xla_path():
    b, groups, r, k, s = 2, 2, 2, 16, 24
    q, keys, values, _ = _inputs(1, b, groups, r, k, s)
    seg = jnp.ones((b, s), jnp.int32).at[1, :4].set(0)  # row 1 left-padded
    kv_pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = masks.Mask(q_segment_ids=jnp.ones((b, 1), jnp.int32), kv_segment_ids=seg,
                      q_positions=jnp.full((b, 1), 13), kv_positions=kv_pos, causal=True)
    q_b1hk = q.reshape(b, 1, groups * r, k)
    bias = jnp.asarray(np.random.default_rng(2).normal(size=(1, groups * r, 1, s)),
                       jnp.float32)  # broadcast over rows, as T5's relative bias
    for bias_bhls in (None, bias):
        got = attention_lib.cached_attention(q_b1hk, keys, values, mask, bias_bhls, None,
                                             kernel=True)
        want = attention_lib.cached_attention(q_b1hk, keys, values, mask, bias_bhls, None)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def _decode_step_jaxpr(cfg):
    model = Decoder(cfg, decode=True, cache_len=8)
    ids = jnp.zeros((2, 1), jnp.int32)
    variables = model.init(jax.random.key(0), ids)
    pos = jnp.zeros((2, 1), jnp.int32)
    return str(jax.make_jaxpr(lambda v: model.apply(v, ids, None, pos, mutable=["cache"]))(
        variables))


def test_a_decoding_step_takes_the_kernel():
    cfg = ModelConfig(vocab_size=37, d_model=32, num_layers=1, num_heads=4, mlp_dim=64,
                      max_len=16)
    assert "lm_decode_attention" in _decode_step_jaxpr(cfg)
    assert "lm_decode_attention" not in _decode_step_jaxpr(cfg.replace(attention_impl="xla"))
    with build.switched_off():
        assert "lm_decode_attention" not in _decode_step_jaxpr(cfg)
