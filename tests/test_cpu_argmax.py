"""The CPU argmax kernel (lm/kernels/argmax_cpu.cc): jnp.argmax's index on every row —
ties, NaN, -inf, lengths off the vector width, batching — and greedy decoding uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import generate
from lm.kernels import argmax as kernel
from lm.kernels import build

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU kernels need AVX-512 or AVX2 and a C++ compiler here")


@pytest.mark.parametrize("vocab", [1, 5, 16, 33, 50257])
def test_matches_jnp_argmax(vocab):
    x = jnp.asarray(np.random.default_rng(vocab).normal(size=(6, vocab)), jnp.float32)
    np.testing.assert_array_equal(kernel.argmax(x), jnp.argmax(x, -1))


def test_ties_nan_and_infinities():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0],            # tie: the first
                   [-jnp.inf] * 4,                   # all -inf: index 0
                   [1.0, jnp.nan, 5.0, jnp.nan],     # NaN counts as largest: the first
                   [0.0, 0.0, 0.0, jnp.inf],
                   [2.0] + [1.0] * 3], jnp.float32)
    got = kernel.argmax(x)
    np.testing.assert_array_equal(got, jnp.argmax(x, -1))
    np.testing.assert_array_equal(got, [1, 0, 1, 3, 0])
    tail = jnp.zeros((2, 37), jnp.float32).at[0, 36].set(1.0).at[1, 20].set(jnp.nan)
    np.testing.assert_array_equal(kernel.argmax(tail), [36, 20])  # beyond the last vector


def test_ties_and_nan_in_long_rows():
    """Rows long enough for the vector passes and the rows' parallel split (V >= 4096)."""
    v = 5001
    x = np.random.default_rng(1).normal(size=(6, v)).astype(np.float32)
    x[0, [100, 4000]] = 9.0                        # tie inside the vectors: the first
    x[1, [2000, 3000]] = np.nan                    # NaNs: the first
    x[1, 10] = 9.0
    x[2] = -np.inf                                 # all -inf: index 0
    x[3, v - 1] = np.inf                           # in the scalar tail
    x[4, [17, 18]] = 9.0                           # tie within one vector
    x[5, [4992, 5000]] = np.nan                    # first NaN in the last whole vector
    got = kernel.argmax(jnp.asarray(x))
    np.testing.assert_array_equal(got, [100, 2000, 0, v - 1, 17, 4992])
    np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), -1))


def test_leading_axes_and_vmap():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 70)), jnp.float32)
    assert kernel.argmax(x).shape == (3, 4) and kernel.argmax(x).dtype == jnp.int32
    np.testing.assert_array_equal(kernel.argmax(x), jnp.argmax(x, -1))
    np.testing.assert_array_equal(jax.vmap(kernel.argmax)(x), jnp.argmax(x, -1))


def test_greedy_token_choice_uses_the_kernel_on_cpu():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(8, 300)), jnp.float32)

    def pick():  # a fresh function per trace: the kernel is chosen when tracing
        return lambda x: generate.sample_token(jax.random.key(0), x, temperature=0.0,
                                               top_k=0, top_p=1.0)

    assert "lm_row_argmax" in str(jax.make_jaxpr(pick())(logits))
    with build.switched_off():
        assert "lm_row_argmax" not in str(jax.make_jaxpr(pick())(logits))
        ref = jax.jit(pick())(logits)
    np.testing.assert_array_equal(jax.jit(pick())(logits), ref)
    np.testing.assert_array_equal(ref, jnp.argmax(logits, -1))


@pytest.mark.parametrize("vocab", [1, 7, 256, 1000, 50257])
def test_sampling_kernel_draws_the_xla_paths_token(vocab):
    """The kernel's token at quantile u equals lm.generate's XLA steps (blocks of 256) for
    every u; they differ only where fp32 summation order moves a CDF step past u."""
    from lm.generate import categorical_from_uniform

    rng = np.random.default_rng(vocab)
    logits = rng.normal(size=(64, vocab)).astype(np.float32) * 3
    logits[:8, : vocab // 2] = -np.inf  # probability 0 for half the tokens of 8 rows
    u = jnp.asarray(rng.uniform(size=64), jnp.float32)
    got = kernel.sample(u, jnp.asarray(logits))
    with build.switched_off():
        want = categorical_from_uniform(u, jnp.asarray(logits))
    np.testing.assert_array_equal(got, want)
    assert np.isfinite(logits[np.arange(64), np.asarray(got)]).all()  # -inf never drawn
    with build.switched_off():  # u = 0: the first token of positive probability
        first = categorical_from_uniform(jnp.zeros(64), jnp.asarray(logits))
    np.testing.assert_array_equal(kernel.sample(jnp.zeros(64), jnp.asarray(logits)), first)
    # u just below 1 (where rounding decides between the last tokens): a possible token
    top = np.asarray(kernel.sample(jnp.full(64, 1.0 - 2**-24), jnp.asarray(logits)))
    assert ((top >= 0) & (top < vocab)).all()
    assert np.isfinite(logits[np.arange(64), top]).all()


def test_sampling_uses_the_kernel_on_cpu():
    logits = jnp.zeros((2, 300), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda k, x: generate.sample_token(
        k, x, temperature=1.0, top_k=0, top_p=1.0))(jax.random.key(0), logits))
    assert "lm_row_sample" in jaxpr
