"""The AMX kernels for the bf16 fused loss (lm/kernels/amx_projection_cpu.cc): the table's
two packed layouts, per-chunk losses, correct counts and both backward products against
fp32 references of the same bf16 values (vocabularies on and off the 256-column blocks and
32-column tiles, padding rows, clamped targets), the accumulator used again, and the fused
loss with the kernels on and off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.kernels import amx_projection as amx
from lm.kernels import build
from lm.objectives.losses import fused_cross_entropy

needs_amx = pytest.mark.skipif(
    not (build.has_simd() and build.available() and amx.has_amx()),
    reason="the kernel needs a CPU with AMX (amx_tile, amx_bf16) and a C++ compiler here")


def _f32(a):
    return np.asarray(a, np.float64)


def test_pair_rows_puts_rows_2i_and_2i_plus_1_side_by_side():
    table = jnp.arange(5 * 3, dtype=jnp.float32).reshape(5, 3).astype(jnp.bfloat16)
    paired = np.asarray(amx.pair_rows(table))
    assert paired.shape == (3, 3) and paired.dtype == np.uint32
    bits = np.asarray(jax.lax.bitcast_convert_type(table, jnp.uint16)).astype(np.uint32)
    np.testing.assert_array_equal(paired[:2], bits[0:4:2] | (bits[1:4:2] << 16))
    np.testing.assert_array_equal(paired[2], bits[4])  # an odd V: a zero row beside the last


def test_pair_columns_puts_columns_2i_and_2i_plus_1_side_by_side():
    table = jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4).astype(jnp.bfloat16)
    cols = np.asarray(amx.pair_columns(table))
    assert cols.shape == (2, 32) and cols.dtype == np.uint32
    bits = np.asarray(jax.lax.bitcast_convert_type(table, jnp.uint16)).astype(np.uint32)
    np.testing.assert_array_equal(cols[:, :3], (bits[:, 0::2] | (bits[:, 1::2] << 16)).T)
    assert not cols[:, 3:].any()  # zero words past V


@needs_amx
@pytest.mark.parametrize("v,d", [(1, 32), (5, 32), (33, 64), (1000, 96)])
def test_pack_equals_both_layouts(v, d):
    table = jnp.asarray(np.random.default_rng(v).normal(size=(v, d)), jnp.bfloat16)
    cols, rows = jax.jit(amx.pack)(table)
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(amx.pair_columns(table)))
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(amx.pair_rows(table)))


def _reference(x, table, targets, weights, acc):
    """fp64 logits of the bf16 values; loss, correct, the bf16-rounded gradient g, g E
    and acc + xᵀ g."""
    logits = _f32(x) @ _f32(table).T
    v = logits.shape[1]
    t = np.clip(np.asarray(targets), 0, v - 1)
    top = logits.max(1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(1))
    xt = logits[np.arange(len(t)), t]
    w = np.asarray(weights, np.float64)
    g = (np.exp(logits - lse[:, None]) - (np.arange(v) == t[:, None])) * w[:, None]
    g = _f32(jnp.asarray(g, jnp.float32).astype(jnp.bfloat16))
    return ((lse - xt) * w, (xt >= top) * w, g @ _f32(table), _f32(acc) + _f32(x).T @ g)


@needs_amx
@pytest.mark.parametrize("t,v,d", [(32, 1, 32), (32, 33, 64), (64, 256, 32),
                                   (96, 600, 32), (64, 1100, 96)])
def test_chunk_kernels_match_fp64_references_of_the_same_values(t, v, d):
    rng = np.random.default_rng(t + v + d)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(v, d)) * 0.3, jnp.bfloat16)
    targets = jnp.asarray(rng.integers(-2, v + 2, t), jnp.int32)  # some clamped
    weights = jnp.asarray(rng.random(t) > 0.2, jnp.float32) * 1.5  # zeros: padding
    acc = jnp.asarray(rng.normal(size=(d, v)) * 1e-2, jnp.float32)
    assert amx.usable(x, table)

    def run(x, table, targets, weights, acc):
        cols, rows = amx.pack(table)
        return (amx.chunk_stats(x, targets, weights, cols, v),
                amx.chunk_grads(x, targets, weights, cols, rows, acc))

    (loss1, correct1), (loss, correct, dx, acc2) = jax.jit(run)(x, table, targets, weights, acc)
    want_loss, want_correct, want_dx, want_acc = _reference(x, table, targets, weights, acc)
    for got in (loss, loss1):
        np.testing.assert_allclose(_f32(got), want_loss, rtol=1e-5, atol=1e-5)
    for got in (correct, correct1):
        np.testing.assert_array_equal(_f32(got), want_correct)
    assert dx.shape == (t, d) and acc2.shape == (d, v) and dx.dtype == acc2.dtype == jnp.float32
    # g rounds to bf16 in both; a few entries may round the other way (a 2^-8 step)
    scale = max(np.abs(want_dx).max(), 1e-6)
    np.testing.assert_allclose(_f32(dx), want_dx, rtol=1e-2, atol=1e-2 * scale)
    np.testing.assert_allclose(_f32(acc2), want_acc, rtol=1e-2,
                               atol=1e-2 * np.abs(want_acc - _f32(acc)).max() + 1e-7)
    assert np.abs(_f32(dx) - want_dx).mean() < 1e-3 * scale


@needs_amx
def test_an_accumulator_used_again_is_not_overwritten():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 32)), jnp.bfloat16)
    table = jnp.asarray(rng.normal(size=(70, 32)), jnp.bfloat16)
    targets, weights = jnp.zeros((32,), jnp.int32), jnp.ones((32,), jnp.float32)
    acc = jnp.asarray(rng.normal(size=(32, 70)), jnp.float32)

    def both(x, table, a):
        a = a * 2
        cols, rows = amx.pack(table)
        return amx.chunk_grads(x, targets, weights, cols, rows, a)[3], a.sum()

    summed, before = jax.jit(both)(x, table, acc)
    np.testing.assert_allclose(float(before), float(_f32(acc).sum() * 2), rtol=1e-5)
    want = _reference(x, table, targets, weights, acc * 2)[3]
    np.testing.assert_allclose(_f32(summed), want, rtol=1e-2, atol=1e-3)


def test_usable_only_for_bf16_tiles_on_amx(monkeypatch):
    x, table = jnp.zeros((64, 32), jnp.bfloat16), jnp.zeros((100, 32), jnp.bfloat16)
    assert not amx.usable(x.astype(jnp.float32), table.astype(jnp.float32))
    assert not amx.usable(jnp.zeros((48, 32), jnp.bfloat16), table)  # T off the tiles
    assert not amx.usable(jnp.zeros((64, 48), jnp.bfloat16), jnp.zeros((100, 48), jnp.bfloat16))
    assert amx.usable(x, table) == (build.on_cpu() and amx.has_amx())
    monkeypatch.setenv("LM_AMX_KERNELS", "0")
    assert not amx.usable(x, table)


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

    def run():  # traced afresh (a new function each time): kernels are chosen when tracing
        fresh = lambda *a: loss(*a)  # noqa: E731
        grad = jax.grad(fresh, argnums=(0, 1))
        lowered = tuple(jax.jit(f).lower(x, table).as_text() for f in (fresh, grad))
        return jax.jit(fresh)(x, table), jax.jit(grad)(x, table), lowered

    with pytest.MonkeyPatch.context() as m:
        m.setenv("LM_AMX_KERNELS", "0")
        ref_value, ref, ref_lowered = run()
    value, grads, lowered = run()
    assert "lm_amx_chunk_stats_bf16" in lowered[0] and "lm_amx_chunk_grads_bf16" in lowered[1]
    assert "lm_amx" not in ref_lowered[0] + ref_lowered[1]
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    for g, r in zip(grads, ref, strict=True):
        g, r = _f32(g), _f32(r)
        # both accumulate in fp32 and round once to bf16: at most one bf16 step apart
        np.testing.assert_allclose(g, r, rtol=2 ** -7, atol=1e-3 * np.abs(r).max())
        assert np.abs(g - r).mean() < 1e-3 * np.abs(r).mean()


@needs_amx
def test_bf16_training_with_the_kernels_follows_xla_paths_loss_curve(tmp_path, monkeypatch):
    from lm import train
    from tests.test_train import losses, make_config

    traced = []
    chunk_grads = amx.chunk_grads
    monkeypatch.setattr(amx, "chunk_grads", lambda *a: traced.append(1) or chunk_grads(*a))
    run = {"train.steps": 6, "train.log_every": 1, "train.eval_every": 6,
           "model.dtype": "bfloat16"}
    train.train_and_evaluate(make_config(tmp_path, **run), str(tmp_path / "amx"))
    assert traced, "the bf16 test config no longer takes the AMX kernels"
    monkeypatch.setenv("LM_AMX_KERNELS", "0")
    train.train_and_evaluate(make_config(tmp_path, **run), str(tmp_path / "xla"))
    ours, xla = losses(tmp_path / "amx"), losses(tmp_path / "xla")
    assert sorted(ours) == sorted(xla) == list(range(1, 7))
    for step in xla:  # the same bf16 rounding of the same values: far inside bf16's 0.02
        assert abs(ours[step] - xla[step]) < 2e-3, (step, ours[step], xla[step])
