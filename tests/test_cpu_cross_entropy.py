"""The CPU cross-entropy kernel (lm/kernels/cross_entropy_cpu.cc): the same losses,
correct counts and gradients as XLA's path, bf16 gradients rounded as XLA rounds them,
padding rows, NaN logits, batching, and the fused loss with the kernel on and off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import build
from lm.kernels import cross_entropy as ce
from lm.objectives.losses import fused_cross_entropy

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU kernels need AVX-512 or AVX2 and a C++ compiler here")


def _reference(logits, targets, weights, dtype):
    """XLA's path, written out: loss, correct flag and (softmax - onehot) * w per row."""
    m = logits.max(-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = e.sum(-1, keepdims=True)
    xt = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    loss = (m[..., 0] + jnp.log(s[..., 0]) - xt) * weights
    correct = (xt >= m[..., 0]).astype(jnp.float32) * weights
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    return loss, correct, ((e / s - onehot) * weights[..., None]).astype(dtype)


def _case(seed, lead, vocab):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(*lead, vocab)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, lead), jnp.int32)
    weights = jnp.asarray(rng.random(lead) > 0.25, jnp.float32) * 1.5  # zeros: padding
    return logits, targets, weights


@pytest.mark.parametrize("vocab", [1, 7, 16, 65, 1000, 50257])  # below, at, off the lanes
def test_stats_and_gradient_match_xla(vocab):
    logits, targets, weights = _case(vocab, (3, 5), vocab)
    want = _reference(logits, targets, weights, jnp.float32)
    got = jax.jit(ce.stats_and_grad)(logits, targets, weights)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=2e-6, atol=2e-6)
    loss, correct = jax.jit(ce.stats)(logits, targets, weights)
    np.testing.assert_allclose(loss, want[0], rtol=2e-6, atol=2e-6)
    np.testing.assert_array_equal(correct, want[1])
    assert float(jnp.abs(got[2]).sum(-1)[weights == 0].max(initial=0.0)) == 0.0  # padding


def test_bf16_gradient_is_xlas_rounding():
    logits, targets, weights = _case(1, (4, 6), 3000)
    want = _reference(logits, targets, weights, jnp.float32)[2]
    got = jax.jit(lambda *a: ce.stats_and_grad(*a, grad_dtype=jnp.bfloat16))(
        logits, targets, weights)[2]
    assert got.dtype == jnp.bfloat16
    # fp32 values that agree to ~1e-7 relative round to the same bf16 but for values
    # within that of a rounding boundary: all but a handful of the 72,000 are identical
    mismatched = int((got != want.astype(jnp.bfloat16)).sum())
    assert mismatched <= 8, mismatched
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=8e-3, atol=1e-7)


def test_ties_count_as_correct_and_targets_are_clamped():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.0], [5.0, 1.0, 0.0, 0.0]], jnp.float32)
    targets = jnp.array([2, 9], jnp.int32)  # row 1: out of range, clamped to the last
    loss, correct, grad = ce.stats_and_grad(logits, targets, jnp.ones(2, jnp.float32))
    np.testing.assert_array_equal(correct, [1.0, 0.0])
    lse = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(loss, [lse[0] - 3.0, lse[1] - 0.0], rtol=1e-6)
    np.testing.assert_allclose(grad.sum(-1), [0.0, 0.0], atol=1e-6)
    assert float(grad[1, 3]) < 0 and float(grad[0, 2]) < 0


def test_a_nan_or_infinite_logit_makes_the_row_nan():
    logits = jnp.zeros((3, 40), jnp.float32).at[0, 5].set(jnp.nan).at[1, 33].set(jnp.inf)
    loss, _, grad = ce.stats_and_grad(logits, jnp.zeros(3, jnp.int32), jnp.ones(3))
    assert np.isnan(loss[0]) and np.isnan(loss[1]) and np.isfinite(loss[2])
    assert np.isnan(grad[0]).any() and np.isfinite(grad[2]).all()


def test_vmapped_calls_match_the_unbatched_ones():
    logits, targets, weights = _case(3, (2, 3, 4), 70)
    got = jax.vmap(ce.stats_and_grad)(logits, targets, weights)
    for i in range(2):
        one = ce.stats_and_grad(logits[i], targets[i], weights[i])
        for g, o in zip(got, one, strict=True):
            np.testing.assert_array_equal(g[i], o)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_loss_with_and_without_the_kernel(dtype):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 16)), dtype)
    table = jnp.asarray(rng.normal(size=(300, 16)) * 0.3, dtype)
    targets = jnp.asarray(rng.integers(0, 300, (2, 9)), jnp.int32)
    weights = jnp.ones((2, 9), jnp.float32).at[1, 6:].set(0.0)

    def loss(x, table):
        out = fused_cross_entropy(x, table, targets, weights, chunk=8)
        return out["loss"][0] / out["loss"][1], out["accuracy"][0]

    def run():  # traced afresh each time: the kernel is chosen when tracing
        grad = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1))
        jaxpr = str(jax.make_jaxpr(lambda *a: (loss(*a), grad(*a)))(x, table))
        return jax.jit(lambda *a: loss(*a))(x, table), jax.jit(lambda *a: grad(*a))(x, table), jaxpr

    with build.switched_off():
        ref_value, ref_grads, ref_jaxpr = run()
    value, grads, jaxpr = run()
    assert "lm_cross_entropy_stats" in jaxpr and "lm_cross_entropy_grad" in jaxpr
    assert "lm_cross_entropy" not in ref_jaxpr
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(value[0], ref_value[0], rtol=1e-5)
    assert float(value[1]) == float(ref_value[1])
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), **tol)


def test_logits_used_again_are_not_overwritten_by_the_fp32_gradient():
    logits, targets, weights = _case(4, (8,), 100)
    both = jax.jit(lambda x: (ce.stats_and_grad(x * 2, targets, weights)[2], (x * 2).sum(-1)))
    grad, sums = both(logits)
    np.testing.assert_allclose(sums, (logits * 2).sum(-1), rtol=1e-6)
    np.testing.assert_allclose(grad, _reference(logits * 2, targets, weights, jnp.float32)[2],
                               rtol=2e-6, atol=2e-6)


def test_cross_entropy_sums_on_materialised_logits_with_and_without_the_kernel():
    """`losses.cross_entropy_sums` (BERT's masked-LM loss): the kernel's sums and the
    gradient it takes in the forward pass equal XLA's softmax and autodiff, and a
    non-finite logit in a row of weight 0 reaches neither the sums nor the gradient."""
    from lm.objectives.losses import cross_entropy_sums

    logits, targets, weights = _case(7, (3, 5), 97)
    logits = logits.at[0, 0].set(jnp.inf).at[1, 2, 4].set(jnp.nan)
    weights = weights.at[0, 0].set(0.0).at[1, 2].set(0.0)

    def run():
        def loss(x):
            total, correct = cross_entropy_sums(x, targets, weights)
            return 2.0 * total + correct, (total, correct)
        (_, sums), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)
        return sums, grad, jax.jit(lambda x: cross_entropy_sums(x, targets, weights))(logits)

    (k_sums, k_grad, k_fwd), hlo = run(), jax.jit(
        lambda x: cross_entropy_sums(x, targets, weights)).lower(logits).as_text()
    assert "lm_cross_entropy" in hlo
    with build.switched_off():
        x_sums, x_grad, x_fwd = run()
    loss, correct, grad = _reference(jnp.where(weights[..., None] > 0, logits, 0.0), targets,
                                     weights, jnp.float32)
    for got in (k_sums, x_sums, k_fwd, x_fwd):
        np.testing.assert_allclose(got[0], loss.sum(), rtol=1e-5)
        np.testing.assert_allclose(got[1], correct.sum(), rtol=1e-6)
    for got in (k_grad, x_grad):  # the correct count carries no gradient
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, 2.0 * grad, rtol=1e-5, atol=1e-6)
