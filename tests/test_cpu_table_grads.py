"""The AMX kernel for the bf16 fused loss's backward products
(lm/kernels/table_grads_cpu.cc): g @ table and acc + xᵀ g against fp32 products of the
same bf16 values, vocabularies on and off its 512-column blocks and 32-column tiles, the
paired table layout, the accumulator used again, and the fused loss with it on and off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import build
from lm.kernels import table_grads as tg
from lm.objectives.losses import fused_cross_entropy

needs_amx = pytest.mark.skipif(
    not (build.has_simd() and build.available() and tg.has_amx()),
    reason="the kernel needs a CPU with AMX (amx_tile, amx_bf16) and a C++ compiler here")


def _case(seed, t, v, d):
    rng = np.random.default_rng(seed)
    g = jnp.asarray(rng.normal(size=(t, v)) * 1e-3, jnp.bfloat16)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(v, d)) * 0.05, jnp.bfloat16)
    acc = jnp.asarray(rng.normal(size=(d, v)) * 1e-2, jnp.float32)
    return g, x, table, acc


def _f32(a):
    return np.asarray(a, np.float64)


def test_pair_rows_puts_rows_2i_and_2i_plus_1_side_by_side():
    table = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3).astype(jnp.bfloat16)
    paired = np.asarray(tg.pair_rows(table))
    assert paired.shape == (3, 3) and paired.dtype == np.uint32
    bits = np.asarray(jax.lax.bitcast_convert_type(table, jnp.uint16)).astype(np.uint32)
    np.testing.assert_array_equal(paired[:2], bits[0:4:2] | (bits[1:4:2] << 16))
    np.testing.assert_array_equal(paired[2], bits[4])  # an odd V: a zero row beside the last


@needs_amx
@pytest.mark.parametrize("t,v,d", [(32, 32, 32), (32, 1, 32), (64, 129, 64),
                                   (96, 600, 32), (32, 1024, 64), (64, 1100, 96)])
def test_products_match_fp32_products_of_the_same_values(t, v, d):
    g, x, table, acc = _case(t + v + d, t, v, d)
    assert tg.usable(x, table)
    dx, acc2 = jax.jit(lambda g, x, e, a: tg.table_grads(g, x, tg.pair_rows(e), a))(
        g, x, table, acc)
    assert dx.shape == (t, d) and acc2.shape == (d, v) and dx.dtype == acc2.dtype == jnp.float32
    want_dx = _f32(g) @ _f32(table)
    want_acc = _f32(acc) + _f32(x).T @ _f32(g)
    # fp32 accumulation of exact bf16 products: only the summation order differs
    np.testing.assert_allclose(_f32(dx), want_dx, rtol=1e-4, atol=1e-6 * np.abs(want_dx).max())
    np.testing.assert_allclose(_f32(acc2), want_acc, rtol=1e-4,
                               atol=1e-6 * np.abs(want_acc).max())


@needs_amx
def test_an_accumulator_used_again_is_not_overwritten():
    g, x, table, acc = _case(1, 32, 70, 32)

    def both(g, x, e, a):
        a = a * 2
        return tg.table_grads(g, x, tg.pair_rows(e), a)[1], a.sum()

    summed, before = jax.jit(both)(g, x, table, acc)
    np.testing.assert_allclose(float(before), float(_f32(acc).sum() * 2), rtol=1e-5)
    np.testing.assert_allclose(_f32(summed), 2 * _f32(acc) + _f32(x).T @ _f32(g), rtol=1e-4,
                               atol=1e-6)


def test_usable_only_for_bf16_tiles_on_amx(monkeypatch):
    x, table = jnp.zeros((64, 32), jnp.bfloat16), jnp.zeros((100, 32), jnp.bfloat16)
    assert not tg.usable(x.astype(jnp.float32), table.astype(jnp.float32))
    assert not tg.usable(jnp.zeros((48, 32), jnp.bfloat16), table)  # T off the tiles
    assert not tg.usable(jnp.zeros((64, 48), jnp.bfloat16), jnp.zeros((100, 48), jnp.bfloat16))
    assert tg.usable(x, table) == (build.on_cpu() and tg.has_amx())
    monkeypatch.setenv("LM_AMX_KERNELS", "0")
    assert not tg.usable(x, table)


@needs_amx
def test_fused_loss_with_and_without_the_kernel():
    rng = np.random.default_rng(0)
    b, length, d, v = 4, 24, 64, 1000
    x = jnp.asarray(rng.normal(size=(b, length, d)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(v, d)) * 0.1, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(0, v, (b, length)), jnp.int32)
    weights = jnp.ones((b, length), jnp.float32).at[1, 20:].set(0.0)

    def loss(x, table):  # chunks of 4 rows x 8 positions: 32 tokens, the kernel's tile
        out = fused_cross_entropy(x, table, targets, weights, chunk=32)
        return out["loss"][0] / out["loss"][1]

    def run():  # traced afresh: the kernel is chosen when tracing
        grad = jax.grad(loss, argnums=(0, 1))
        return jax.jit(grad)(x, table), str(jax.make_jaxpr(grad)(x, table))

    with pytest.MonkeyPatch.context() as m:
        m.setenv("LM_AMX_KERNELS", "0")
        ref, ref_jaxpr = run()
    grads, jaxpr = run()
    assert "lm_table_grads_bf16" in jaxpr and "lm_table_grads_bf16" not in ref_jaxpr
    for g, r in zip(grads, ref, strict=True):
        g, r = _f32(g), _f32(r)
        # both accumulate in fp32 and round once to bf16: at most one bf16 step apart
        np.testing.assert_allclose(g, r, rtol=2 ** -7, atol=1e-3 * np.abs(r).max())
        assert np.abs(g - r).mean() < 1e-3 * np.abs(r).mean()
