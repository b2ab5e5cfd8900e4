"""The CPU pick kernel (lm/kernels/pick_cpu.cc): tokens from an int8 copy of the output
table with exact fp32 rescoring. Greedy tokens equal argmax(small_logits) bit for bit;
sampled tokens equal argmax(its noise + small_logits / t) bit for bit, its noise is jax's
Gumbel noise to an ulp, and the draws are jax.random.categorical's; the error bound holds,
few rows are rescored, and decoding and serving use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lm.kernels import argmax as argmax_kernel
from lm.kernels import build
from lm.kernels import logits as logits_kernel
from lm.kernels import pick as kernel

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


def test_the_radius_covers_the_int16_copy_of_x():
    """With AVX2 the approximate pass multiplies the int8 table by an int16 copy of x; the
    radius reserves room for that rounding. Here the table is exact in int8 (no table
    error), x's small elements all round to 0 against its one large element and are
    aligned with row 0's signs and against row 1's: the int16 estimate ranks row 1 first
    by 32767 units where row 0's exact logit is larger by 32121 units. Without the
    radius's share for x's rounding (HiddenShare) row 0 is no candidate and the kernel
    returns 1 (checked); with it both rows are rescored and 0 wins."""
    width, vocab, j0 = 512, 64, 7
    sign = np.where(np.random.default_rng(0).random(width) < 0.5, -1.0, 1.0)
    unit = 2.0**-7  # scale of both rows: max |w| = 127 units, exact in fp32
    table = np.zeros((vocab, width), np.float32)
    table[0] = 127 * unit * sign
    table[1] = -127 * unit * sign
    table[0, j0], table[1, j0] = 100 * unit, 101 * unit
    delta = 2.0**-10
    x = (0.4999 * delta * sign)[None].astype(np.float32)
    x[0, j0] = 32767 * delta  # the int16 scale is delta; the rest rounds to 0
    x_j, table_j = jnp.asarray(x), jnp.asarray(table)
    exact = np.asarray(logits_kernel.small_logits(x_j, table_j))[0]
    assert exact[0] > exact[1] > 0 and np.all(exact[2:] == 0)
    tokens, rescored = _greedy(x_j, table_j)
    assert int(tokens[0]) == 0
    assert int(rescored[0]) < vocab  # decided by the bound, not the whole fp32 row


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
    assert "lm_sample_tied" in hlo(1.0) and "lm_small_logits" not in hlo(1.0)

    def jaxpr(top_k, top_p):
        return str(jax.make_jaxpr(lambda p: _decode(
            model, p, ids, ids, jax.random.key(0), max_new_tokens=4, temperature=1.0,
            top_k=top_k, top_p=top_p, eos_id=None, windowed=False))(params))

    assert "lm_top_k_tied" in jaxpr(5, 0.9)  # the top k from the int8 copy, then the draw
    assert "lm_top_k_tied" not in jaxpr(0, 0.9)  # a nucleus over every logit
    assert "lm_sample_tied" not in jaxpr(0, 0.9) and "lm_small_logits" in jaxpr(0, 0.9)
    assert not kernel.usable(2, jnp.zeros((40, 24), jnp.float32))  # width not a multiple of 16
    assert not kernel.usable(kernel.MAX_ROWS + 1, jnp.zeros((40, 32), jnp.float32))


def _small_decoder(seed: int, sharpen: float):
    """(config, a [3, 5] prompt, params scaled by `sharpen`) of the small tied GPT the
    decoding and serving tests share: 2 layers of width 32, vocab 300, max_len 16."""
    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder

    cfg = ModelConfig(vocab_size=300, d_model=32, num_layers=2, num_heads=2, mlp_dim=64,
                      max_len=16)
    prompt = np.random.default_rng(0).integers(0, 300, (3, 5)).astype(np.int32)
    params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.asarray(prompt))[
        "params"])
    return cfg, prompt, jax.tree.map(lambda p: p * sharpen, params)


def _counting(monkeypatch, name: str) -> list:
    """Replaces kernel.<name> with a wrapper that records each trace of it (decoding and
    serving trace the kernel only on the path that uses it), returns the record."""
    calls, real = [], getattr(kernel, name)

    def counted(*args):
        calls.append(name)
        return real(*args)

    monkeypatch.setattr(kernel, name, counted)
    return calls


def test_windowed_greedy_decoding_matches_the_logits_path(monkeypatch):
    """Past max_len (the cache refilled from the last half of the window) and at several
    batch sizes, greedy decoding through the kernel gives the tokens of the logits path."""
    from lm.generate import generate

    cfg, prompt, params = _small_decoder(2, 10)  # sharper: no single repeated token
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
    from lm.models.transformer import Decoder
    from lm.serve import slots as dev

    cfg, _, params = _small_decoder(3, 10)
    model = Decoder(cfg, decode=True, cache_len=16)
    table = dev.pick_table(model, params)
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
    assert "lm_sample_tied" in str(jax.make_jaxpr(
        lambda *a: dev.step(model, *a, table, rows=rows))(*args))
    assert "lm_sample_tied" not in str(jax.make_jaxpr(
        lambda *a: dev.step(model, *a, None, rows=rows))(*args))


def test_serving_draws_do_not_depend_on_the_branch(monkeypatch):
    """Sampled serving rows draw the same tokens through the kernel and through the
    logits (whose sampler adds the same noise), so a row's tokens do not change when
    another row's top-k sends the step to the logits branch."""
    from lm.models.transformer import Decoder
    from lm.serve import slots as dev

    cfg, _, params = _small_decoder(3, 3)
    model = Decoder(cfg, decode=True, cache_len=16)
    table = dev.pick_table(model, params)
    rows = 4
    temp = jnp.asarray([0.0, 0.8, 1.3, 1.0], jnp.float32)
    seeds = jnp.asarray([1, 2, 3, 4], jnp.uint32)

    def run(head, top_k_last):
        cache = dev.empty_cache(model, rows)
        ids = jnp.asarray([5, 17, 123, 299], jnp.int32)
        top_k = jnp.asarray([0, 0, 0, top_k_last], jnp.int32)
        out = []
        for t in range(8):
            cache, ids, *_ = dev.step(
                model, params, cache, ids, jnp.full((rows,), t, jnp.int32),
                jnp.ones((rows,), bool), jnp.int32(t), seeds, jnp.full((rows,), t, jnp.int32),
                temp, top_k, jnp.ones((rows,), jnp.float32), jnp.asarray(False), head,
                rows=rows)
            out.append(np.asarray(ids))
        return np.stack(out)

    ran, real = [], kernel.sample

    def recorded(*args):  # counts the steps that run the kernel branch
        jax.debug.callback(lambda: ran.append(1))
        return real(*args)

    monkeypatch.setattr(kernel, "sample", recorded)
    jax.clear_caches()  # trace `step` again with the recording kernel
    fast = run(table, 0)
    assert len(ran) == 8  # every step took the kernel
    np.testing.assert_array_equal(fast, run(None, 0))  # kernel == logits path
    mixed = run(table, 5)  # the last row's top-k: every row through the logits
    assert len(ran) == 8
    jax.clear_caches()
    np.testing.assert_array_equal(mixed[:, :3], fast[:, :3])
    assert len(set(fast[:, 1].tolist())) > 4  # sampled, varied


# ------------------------------------------------------------------------------ sampling
@jax.jit
def _sample(x, table, temperature, keys):
    return kernel.sample_with_count(x, table, kernel.quantize(table), temperature, keys)


def _sample_reference(x, table, temperature, keys):
    """argmax(noise + logits / t) per row in numpy fp32 (argmax(logits) where t == 0)."""
    logits = np.asarray(logits_kernel.small_logits(x, table))
    noise = np.asarray(kernel.gumbel(keys, table.shape[0]))
    t = np.asarray(temperature, np.float32)[:, None]
    scores = np.where(t > 0, noise + logits / np.where(t > 0, t, np.float32(1)), logits)
    return np.argmax(scores, axis=-1)


def test_noise_is_jaxs_gumbel_noise():
    """Same Threefry bits and uniform map as jax.random.gumbel; the logarithms within an
    ulp or two (of max(|g|, 1))."""
    keys = jax.random.split(jax.random.key(7), 3)
    for vocab in (5, 37, 50257):
        got = np.asarray(kernel.gumbel(keys, vocab))
        want = np.asarray(jax.vmap(lambda k, v=vocab: jax.random.gumbel(k, (v,)))(keys))
        err = np.abs(got - want) / np.maximum(np.abs(want), 1)
        assert err.max() <= 2 * 2.0**-23, err.max()
        assert np.mean(got == want) > 0.5
    assert got.min() < -2 and got.max() > 9  # the tails are there (50257 draws per row)


@pytest.mark.parametrize("rows", [1, 3, 8, 32])
@pytest.mark.parametrize("vocab,width", [(1001, 256), (50257, 64), (37, 16)])
def test_draws_are_the_argmax_of_its_noise_plus_the_tempered_logits(rows, vocab, width):
    table = _normal(vocab, (vocab, width), 0.05)
    x = _normal(rows, (rows, width))
    temperature = jnp.asarray([(1.0, 0.0, 0.5, 2.0, 1e-3)[i % 5] for i in range(rows)],
                              jnp.float32)
    keys = jax.random.split(jax.random.key(rows), rows)
    tokens, rescored = _sample(x, table, temperature, keys)
    np.testing.assert_array_equal(tokens, _sample_reference(x, table, temperature, keys))
    if vocab > 1000:  # the bounds decided
        assert np.all(rescored >= 1) and np.all(rescored < vocab // 50), rescored


def test_near_ties_at_low_temperatures_draw_the_exact_scores_winner():
    """Forty near copies of the winning row, their exact logits closer together than the
    int8 error: at low temperatures those differences, not the noise, decide, and the
    draw is still argmax(noise + exact logits / t)."""
    width, vocab, rows = 64, 4099, 16
    base = np.array(_normal(0, (vocab, width), 0.02))
    best = np.array(_normal(1, (width,)))
    for j in range(100, 140):
        base[j] = best * 0.05 + np.random.default_rng(j).normal(size=width) * 3e-4
    table = jnp.asarray(base, jnp.float32)
    x = jnp.asarray(np.tile(best, (rows, 1)), jnp.float32)
    temperature = jnp.asarray([1e-5, 1e-4, 1e-3, 1e-2] * (rows // 4), jnp.float32)
    keys = jax.random.split(jax.random.key(9), rows)
    tokens, rescored = _sample(x, table, temperature, keys)
    np.testing.assert_array_equal(tokens, _sample_reference(x, table, temperature, keys))
    assert np.all((np.asarray(tokens) >= 100) & (np.asarray(tokens) < 140))
    assert np.all(np.asarray(rescored) >= 10)  # the near copies were computed exactly
    assert len(set(np.asarray(tokens).tolist())) >= 3  # the noise still matters at 1e-2


def test_draws_are_jax_categorical_draws_and_follow_the_softmax():
    from scipy import stats

    vocab, width, n = 37, 16, 4096
    table = _normal(0, (vocab, width), 0.3)
    x = jnp.tile(_normal(1, (1, width)), (32, 1))
    t = jnp.full((32,), 0.8, jnp.float32)
    keys = jax.random.split(jax.random.key(2), n)
    draws = np.concatenate([np.asarray(_sample(x, table, t, keys[i:i + 32])[0])
                            for i in range(0, n, 32)])
    logits = logits_kernel.small_logits(x[:1], table)[0] / 0.8
    jax_draws = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, logits))(keys))
    assert np.mean(draws == jax_draws) > 0.998  # differ only where scores tie to an ulp
    p = np.asarray(jax.nn.softmax(logits), np.float64)
    counts = np.bincount(draws, minlength=vocab)
    assert stats.chisquare(counts, p * n / p.sum()).pvalue > 1e-3
    assert len(set(draws.tolist())) > 20  # a spread-out softmax, not a near-greedy one


def test_non_finite_values_sample_as_jax_does():
    """NaN or inf in x or the table: the whole fp32 row, argmax(noise + logits / t) as
    jnp.argmax picks it (the first NaN, else the first largest)."""
    width, vocab = 32, 500
    table = np.array(_normal(4, (vocab, width), 0.1))
    x = np.array(_normal(5, (4, width)))
    x[1, 3] = np.nan
    x[2, 4] = np.inf
    table[123, 9] = np.inf
    x[3, 9] = -1.0
    table_j, x_j = jnp.asarray(table), jnp.asarray(x)
    t = jnp.ones((4,), jnp.float32)
    keys = jax.random.split(jax.random.key(5), 4)
    tokens, rescored = _sample(x_j, table_j, t, keys)
    logits = logits_kernel.small_logits(x_j, table_j) / t[:, None]
    want = jnp.argmax(kernel.gumbel(keys, vocab) + logits, axis=-1)
    np.testing.assert_array_equal(tokens, want)
    assert int(rescored[1]) == vocab and int(rescored[2]) == vocab


def test_sampled_decoding_matches_the_reference_draws(monkeypatch):
    """Past max_len and at batch 3, sampling through the kernel gives the tokens of the
    same draws made from the logits: argmax(noise + logits / t)."""
    from lm.generate import generate
    from lm.models.layers import tied_logits

    cfg, prompt, params = _small_decoder(2, 3)
    jax.clear_caches()  # trace again, so the record below sees the path
    traced = _counting(monkeypatch, "sample")
    fast = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.7, seed=4)
    jax.clear_caches()
    assert traced  # the kernel path ran, not the inverse-CDF one on both sides

    def reference(x, table, quantized, temperature, keys):
        logits = tied_logits(x, table, jnp.float32) / temperature[:, None]
        return jnp.argmax(kernel.gumbel(keys, table.shape[0]) + logits, axis=-1).astype(
            jnp.int32)

    monkeypatch.setattr(kernel, "sample", reference)
    slow = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.7, seed=4)
    jax.clear_caches()
    np.testing.assert_array_equal(fast, slow)
    assert min(len(set(row[5:].tolist())) for row in fast) > 10  # varied output


# --------------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("vocab,width,k", [(1001, 256, 40), (50257, 64, 7), (37, 16, 37),
                                           (4099, 64, 1)])
def test_top_k_is_lax_top_k_of_the_scaled_logits(rows, vocab, width, k):
    base = np.array(_normal(vocab, (vocab, width), 0.05))
    base[vocab // 2] = base[3]  # an exact tie: the lower index first
    table = jnp.asarray(base)
    x = _normal(rows, (rows, width))
    factor = jnp.asarray([(1.0, 1 / 0.7, 2.0, 1 / 1.3)[i % 4] for i in range(rows)], jnp.float32)
    values, indices, ok = jax.jit(lambda x, t, f: kernel.top_k(x, t, kernel.quantize(t), f, k))(
        x, table, factor)
    want_v, want_i = jax.lax.top_k(logits_kernel.small_logits(x, table) * factor[:, None], k)
    assert np.all(ok)
    np.testing.assert_array_equal(values, want_v)
    np.testing.assert_array_equal(indices, want_i)


def test_top_k_of_non_finite_rows_is_not_ok():
    width, vocab = 32, 500
    x = np.array(_normal(5, (3, width)))
    x[1, 3] = np.nan
    x[2, 4] = np.inf
    table = _normal(4, (vocab, width), 0.1)
    _, indices, ok = kernel.top_k(jnp.asarray(x), table, kernel.quantize(table),
                                  jnp.ones((3,), jnp.float32), 5)
    np.testing.assert_array_equal(ok, [True, False, False])
    np.testing.assert_array_equal(
        indices[0], jax.lax.top_k(logits_kernel.small_logits(jnp.asarray(x[:1]), table), 5)[1][0])


@pytest.mark.parametrize("top_k,top_p,fallback", [(5, 1.0, False), (40, 0.9, False),
                                                  (5, 0.9, True)])
def test_top_k_decoding_matches_the_logits_path(monkeypatch, top_k, top_p, fallback):
    """Top-k (and nucleus) sampling through the kernel gives the logits path's tokens
    (windowed, batch 3); so does the kernel's fallback for rows that are not ok."""
    from lm.generate import generate

    cfg, prompt, params = _small_decoder(2, 3)
    if fallback:
        top_k_kernel = kernel.top_k
        monkeypatch.setattr(kernel, "top_k", lambda *a: (*top_k_kernel(*a)[:2],
                                                         jnp.zeros((3,), bool)))
    jax.clear_caches()
    traced = _counting(monkeypatch, "top_k")
    fast = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.7, top_k=top_k,
                    top_p=top_p, seed=5)
    jax.clear_caches()
    assert traced  # the kernel path ran
    monkeypatch.setattr(kernel, "usable", lambda rows, table: False)
    slow = generate(cfg, params, prompt, max_new_tokens=30, temperature=0.7, top_k=top_k,
                    top_p=top_p, seed=5)
    jax.clear_caches()
    np.testing.assert_array_equal(fast, slow)
    assert min(len(set(row[5:].tolist())) for row in fast) > 5  # varied output
