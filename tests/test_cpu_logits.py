"""The CPU small-batch logits kernel (lm/kernels/logits_cpu.cc): x @ tableᵀ for 1-32 rows
as the XLA product, its gradient, and the tied projection choosing it only for few rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import build
from lm.kernels import logits as kernel
from lm.models.layers import tied_logits

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU kernels need AVX-512 or AVX2 and a C++ compiler here")


def _normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 13, 32])
@pytest.mark.parametrize("vocab,width", [(1001, 256), (37, 20), (3, 16)])  # odd V, D % 16
def test_matches_the_xla_product(rows, vocab, width):
    x, table = _normal(rows, (rows, 1, width)), _normal(vocab, (vocab, width))
    got = kernel.small_logits(x, table)
    assert got.shape == (rows, 1, vocab) and got.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(table, np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gradient_matches_autodiff():
    x, table = _normal(0, (2, 3, 24)), _normal(1, (50, 24))
    weights = _normal(2, (2, 3, 50))

    def loss(f):
        return lambda x, t: jnp.sum(jnp.sin(f(x, t)) * weights)

    got = jax.grad(loss(kernel.small_logits), argnums=(0, 1))(x, table)
    want = jax.grad(loss(lambda x, t: x @ t.T), argnums=(0, 1))(x, table)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_tied_logits_use_it_for_few_rows_only():
    table = _normal(0, (300, 32))

    def uses_kernel(rows):
        x = _normal(1, (rows, 1, 32))
        jaxpr = str(jax.make_jaxpr(lambda x, t: tied_logits(x, t, jnp.float32))(x, table))
        return "lm_small_logits" in jaxpr

    assert uses_kernel(1) and uses_kernel(8) and uses_kernel(kernel.MAX_ROWS)
    assert not uses_kernel(kernel.MAX_ROWS + 1)  # a real GEMM: XLA's
    x = _normal(2, (8, 1, 32))
    np.testing.assert_allclose(tied_logits(x, table, jnp.float32), x @ table.T, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("vocab,width", [(1001, 256), (37, 20)])
def test_a_row_does_not_depend_on_its_batch(vocab, width):
    """Every row is summed in the same order whatever tile it falls in (4, 2 or 1 rows;
    the table's last rows): decoding a prompt alone or in a batch gives identical logits."""
    x, table = _normal(0, (8, width)), _normal(1, (vocab, width))
    full = np.asarray(kernel.small_logits(x, table))
    for rows in (1, 2, 3, 5, 7):
        np.testing.assert_array_equal(np.asarray(kernel.small_logits(x[:rows], table)),
                                      full[:rows])
        np.testing.assert_array_equal(np.asarray(kernel.small_logits(x[-rows:], table)),
                                      full[-rows:])
