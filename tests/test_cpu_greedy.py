"""The CPU greedy kernel (lm/kernels/greedy_cpu.cc): tokens from an int8 copy of the output
table with exact fp32 rescoring equal argmax(small_logits) bit for bit, its error bound
holds, it rescores few rows, and greedy decoding uses it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lm.kernels import argmax as argmax_kernel
from lm.kernels import build
from lm.kernels import greedy as kernel
from lm.kernels import logits as logits_kernel

pytestmark = pytest.mark.skipif(
    not (build.has_simd() and build.available()),
    reason="the CPU kernels need AVX-512 or AVX2 and a C++ compiler here")


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


@jax.jit
def _reference(x, table):
    return argmax_kernel.argmax(logits_kernel.small_logits(x, table))


@jax.jit
def _greedy(x, table):
    return kernel.greedy_with_count(x, table, kernel.quantize(table))


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 32])
@pytest.mark.parametrize("vocab,width", [(1001, 256), (50257, 64), (37, 16)])
def test_tokens_equal_the_logits_kernels_argmax(rows, vocab, width):
    table = _normal(vocab, (vocab, width), 0.02)
    x = _normal(rows, (rows, width))
    tokens, rescored = _greedy(x, table)
    np.testing.assert_array_equal(tokens, _reference(x, table))
    if vocab > 1000:  # the bound, not the whole fp32 product, decided
        assert np.all(rescored >= 1) and np.all(rescored < vocab // 50), rescored


def test_ties_and_near_ties_pick_the_first_largest_exact_logit():
    """Duplicated rows tie exactly (the first wins); rows one rounding apart have equal
    int8 forms and differ only in their exact logits; a row among many near copies."""
    width, vocab = 64, 4099
    base = np.array(_normal(0, (vocab, width), 0.02))
    best = np.array(_normal(1, (width,)))
    x = jnp.asarray(np.stack([best, -best, best * 3]), jnp.float32)
    base[1000] = base[3000] = np.asarray(best) * 0.05  # an exact tie, twice
    base[2000] = base[1000] * (1 + 2e-7)  # one ulp or so apart
    for j in range(100, 140):  # forty near copies of the second row's winner
        base[j] = -np.asarray(best) * 0.05 + np.random.default_rng(j).normal(size=width) * 1e-7
    table = jnp.asarray(base)
    tokens, rescored = _greedy(x, table)
    want = _reference(x, table)
    np.testing.assert_array_equal(tokens, want)
    logits = np.asarray(logits_kernel.small_logits(x, table))
    assert logits[0, 1000] == logits[0, 3000]  # the tie is real, and the first index won
    assert int(want[0]) in (1000, 2000) and int(rescored[1]) >= 40


def test_the_error_bound_holds():
    """|exact fp32 logit - scale * (x . q)| <= ||x|| * radius, with room for the fp32
    rounding of the approximation (checked in fp64 here), and q is w / scale rounded."""
    vocab, width = 3001, 256
    table = np.array(_normal(3, (vocab, width), 0.05))
    table[7] = 0.0  # a zero row: scale 0, radius 0
    table[8, 5] = 40.0  # an outlier: a coarse row, a wide radius
    q, scale, radius = (np.asarray(a) for a in jax.jit(kernel.quantize)(jnp.asarray(table)))
    assert q.dtype == np.int8 and np.abs(q).max() <= 127
    np.testing.assert_allclose(scale, np.abs(table).max(1) / 127, rtol=1e-6)
    err = np.abs(table - scale[:, None] * q.astype(np.float64))
    assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12)
    assert scale[7] == 0 and radius[7] == 0 and radius[8] > 10 * np.median(radius)
    for seed in range(4):
        x = np.array(_normal(10 + seed, (8, width), 1 + 10 * seed))
        exact = np.asarray(logits_kernel.small_logits(jnp.asarray(x), jnp.asarray(table)))
        approx = scale * (x.astype(np.float64) @ q.T.astype(np.float64))
        slack = np.linalg.norm(x.astype(np.float64), axis=1)[:, None] * radius
        assert np.all(np.abs(exact - approx) <= slack)
        # and the bound is not vacuous: within 30x of the largest error seen
        assert np.max(slack) < 30 * np.max(np.abs(exact - approx)) + 1e-6


def test_non_finite_values_pick_as_jnp_argmax():
    width, vocab = 32, 500
    table = np.array(_normal(4, (vocab, width), 0.1))
    x = np.array(_normal(5, (4, width)))
    x[1, 3] = np.nan  # every logit NaN: index 0
    x[2, 4] = np.inf  # +-inf and NaN logits
    table[123, 9] = np.inf  # a row that is +-inf for rows 0 and 3
    x[3, 9] = -1.0
    table_j, x_j = jnp.asarray(table), jnp.asarray(x)
    tokens, rescored = _greedy(x_j, table_j)
    want = jnp.argmax(logits_kernel.small_logits(x_j, table_j), axis=-1)
    np.testing.assert_array_equal(tokens, want)
    assert int(rescored[1]) == vocab  # the fp32 path decided


def test_greedy_decoding_goes_through_it():
    from lm.generate import _decode
    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder

    cfg = ModelConfig(vocab_size=40, d_model=32, num_layers=1, num_heads=2, mlp_dim=64,
                      max_len=16)
    ids = jnp.zeros((2, 3), jnp.int32)
    params = Decoder(cfg).init(jax.random.key(0), ids)["params"]
    model = Decoder(cfg, decode=True, cache_len=8)

    def hlo(temperature):
        return str(jax.make_jaxpr(lambda p: _decode(
            model, p, ids, ids, jax.random.key(0), max_new_tokens=4, temperature=temperature,
            top_k=0, top_p=1.0, eos_id=None, windowed=False))(params))

    assert "lm_greedy_tied" in hlo(0.0) and "lm_small_logits" not in hlo(0.0)
    assert "lm_greedy_tied" not in hlo(1.0)  # sampling needs every logit
    assert not kernel.usable(2, jnp.zeros((40, 24), jnp.float32))  # width not a multiple of 16
    assert not kernel.usable(kernel.MAX_ROWS + 1, jnp.zeros((40, 32), jnp.float32))


def test_windowed_greedy_decoding_matches_the_logits_path(monkeypatch):
    """Past max_len (the cache refilled from the last half of the window) and at several
    batch sizes, greedy decoding through the kernel gives the tokens of the logits path."""
    from lm.generate import generate
    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder

    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                      max_len=16)
    prompt = np.random.default_rng(0).integers(0, 300, (3, 5)).astype(np.int32)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(2), jnp.asarray(prompt))["params"])
    params = jax.tree.map(lambda p: p * 10, params)  # sharper: no single repeated token
    fast = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.0)
    jax.clear_caches()
    monkeypatch.setattr(kernel, "usable", lambda rows, table: False)
    slow = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.0)
    assert fast.shape == (3, 35)
    np.testing.assert_array_equal(fast, slow)
    assert min(len(set(row[5:].tolist())) for row in fast) > 10  # varied output


def test_serving_steps_pick_the_logits_paths_tokens():
    """The serving step with the int8 table: every row greedy -> the kernel; a sampling
    row or a logprobs request -> the logits; greedy tokens equal the logits path's."""
    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder
    from lm.serve import slots as dev

    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                      max_len=16)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(3), jnp.zeros((1, 2), jnp.int32))[
        "params"])
    params = jax.tree.map(lambda p: p * 10, params)
    model = Decoder(cfg, decode=True, cache_len=16)
    table = dev.greedy_table(model, params)
    assert table is not None
    rows = 4
    z = jnp.zeros((rows,), jnp.int32)
    settings = (jnp.ones((rows,), bool), jnp.int32(0), z.astype(jnp.uint32), z,
                jnp.zeros((rows,), jnp.float32), z, jnp.ones((rows,), jnp.float32))

    def run(greedy, want_top=False):
        cache = dev.empty_cache(model, rows)
        ids = jnp.asarray([5, 17, 123, 299], jnp.int32)
        out = []
        for t in range(6):
            active, _, seeds, counts, temp, top_k, top_p = settings
            cache, ids, tok_lp, *_ = dev.step(
                model, params, cache, ids, jnp.full((rows,), t, jnp.int32), active,
                jnp.int32(t), seeds, counts, temp, top_k, top_p, jnp.asarray(want_top),
                greedy, rows=rows)
            out.append(np.asarray(ids))
        return np.stack(out), np.asarray(tok_lp)

    fast, lp_fast = run(table)
    slow, _ = run(None)
    np.testing.assert_array_equal(fast, slow)
    assert len(set(fast[:, 0].tolist())) > 2 and not lp_fast.any()
    with_lp, lp = run(table, want_top=True)  # logprobs asked: the logits branch
    np.testing.assert_array_equal(with_lp, slow)
    assert np.all(lp < 0)
    args = (params, dev.empty_cache(model, rows), z, z, *settings, jnp.asarray(False))
    assert "lm_greedy_tied" in str(jax.make_jaxpr(
        lambda *a: dev.step(model, *a, table, rows=rows))(*args))
    assert "lm_greedy_tied" not in str(jax.make_jaxpr(
        lambda *a: dev.step(model, *a, None, rows=rows))(*args))
