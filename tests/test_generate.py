"""Sampling: greedy decoding through the cache equals argmax of full forward passes; the
logit filters keep exactly the right tokens; the sliding window goes past max_len."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.generate import filter_logits, generate, sample_token
from lm.models.config import ModelConfig
from lm.models.transformer import Decoder

CFG = ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=16)


def greedy_without_cache(cfg, params, prompt, n):
    ids = np.asarray(prompt)
    forward = jax.jit(lambda ctx: Decoder(cfg).apply({"params": params}, ctx))
    for _ in range(n):
        ctx = ids[:, -cfg.max_len:]
        logits = forward(jnp.asarray(ctx))
        ids = np.concatenate([ids, np.asarray(jnp.argmax(logits[:, -1], -1))[:, None]], 1)
    return ids


@pytest.mark.parametrize("position,kv", [("learned", 4), ("rope", 2)])
def test_greedy_generation_matches_full_forward(position, kv):
    cfg = CFG.replace(position=position, num_kv_heads=kv)
    prompt = np.random.default_rng(0).integers(0, 37, (2, 5)).astype(np.int32)
    params = Decoder(cfg).init(jax.random.key(0), jnp.asarray(prompt))["params"]
    got = generate(cfg, params, prompt, max_new_tokens=8, temperature=0.0)
    np.testing.assert_array_equal(got, greedy_without_cache(cfg, params, prompt, 8))


def test_generation_slides_past_max_len():
    prompt = np.arange(3, dtype=np.int32)[None]
    params = Decoder(CFG).init(jax.random.key(1), jnp.asarray(prompt))["params"]
    out = generate(CFG, params, prompt, max_new_tokens=40, temperature=1.0, seed=3)
    assert out.shape == (1, 43) and out.min() >= 0 and out.max() < 37
    again = generate(CFG, params, prompt, max_new_tokens=40, temperature=1.0, seed=3)
    np.testing.assert_array_equal(out, again)  # seeded: reproducible


def test_top_k_and_top_p_filters():
    logits = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = np.isfinite(np.asarray(filter_logits(logits, top_k=2))) & (
        np.asarray(filter_logits(logits, top_k=2)) > -1e30)
    np.testing.assert_array_equal(kept, [[True, True, False, False, False]])
    nucleus = np.asarray(filter_logits(logits, top_p=0.8)) > -1e30
    np.testing.assert_array_equal(nucleus, [[True, True, True, False, False]])  # 0.85 >= 0.8
    draws = [int(sample_token(jax.random.key(i), logits, temperature=1.0, top_k=0,
                              top_p=0.6)[0]) for i in range(200)]
    assert set(draws) == {0, 1}  # 0.5 + 0.2 reaches 0.6


def _sorted_nucleus(logits, top_k, top_p):
    """The filters by sorting (fp64): keep the top_k largest, then the smallest prefix of
    the sorted rest whose probability reaches top_p, ties at both boundaries kept."""
    keep = np.zeros(logits.shape, bool)
    for b, row in enumerate(np.asarray(logits, np.float64)):
        k = top_k[b] if top_k[b] > 0 else row.size
        kth = np.sort(row)[::-1][min(k, row.size) - 1]
        masked = np.where(row >= kth, row, -np.inf)
        order = np.sort(masked)[::-1]
        p = np.exp(order - order[0])
        cum = np.cumsum(p / p.sum())
        cut = order[min(int(np.sum(cum < top_p[b])), row.size - 1)] if top_p[b] < 1 else -np.inf
        keep[b] = (row >= kth) & (masked >= cut)
    return keep


@pytest.mark.parametrize("kernel", [True, False])
def test_filters_by_bisection_equal_sorting(kernel):
    """filter_logits' nucleus and serving's per-row top-k / top-p thresholds (bisection over
    the values' order, no sort) keep what sorting keeps: random rows, exact ties at the
    boundaries, -0.0 and 0.0, -inf, large and tiny spreads, top_p near 0 and near 1 (not
    within fp32 rounding of 1, where either answer is right)."""
    from lm.kernels import build, filters
    from lm.serve.slots import sample_rows

    if kernel and not filters.usable(jnp.zeros((1, 2))):
        pytest.skip("the filter kernel needs AVX-512 or AVX2 and a C++ compiler here")
    off = contextlib.nullcontext() if kernel else build.switched_off()
    rng = np.random.default_rng(0)
    rows = [rng.normal(size=300) * s for s in (0.01, 1.0, 8.0, 40.0)]
    tie = rng.normal(size=300)
    tie[:40] = tie.max() + 1.0  # 40 equal maxima
    rows.append(tie)
    zeros = rng.normal(size=300)
    zeros[:100], zeros[100:200] = 0.0, -0.0
    zeros[200:] = np.abs(zeros[200:]) * -1e-3
    rows.append(zeros)
    neg = rng.normal(size=300)
    neg[::3] = -np.inf
    rows.append(neg)
    logits = jnp.asarray(np.stack(rows), jnp.float32)
    with off:  # traced (and so run) with the kernel, the CPU's path, or XLA's bisection
        jaxpr = str(jax.make_jaxpr(lambda x: filter_logits(x, top_p=0.5))(logits))
        assert ("lm_row_filter" in jaxpr) == kernel
        for top_p in (1e-6, 0.3, 0.9, 0.999, 0.9999):  # (nearer 1: fp32 rounding decides)
            got = np.asarray(filter_logits(logits, top_p=top_p)) > -1e30
            want = _sorted_nucleus(logits, np.zeros(len(rows), int), np.full(len(rows), top_p))
            np.testing.assert_array_equal(got, want, err_msg=f"top_p={top_p}")
        # serving: a k and a p per row; the filtered logits decide which tokens can be drawn
        b = len(rows)
        top_k = np.array([0, 5, 40, 1, 10, 150, 299])
        top_p = np.array([0.9, 1.0, 0.5, 0.9, 1.0, 0.99, 0.2], np.float32)
        want = _sorted_nucleus(logits, top_k, top_p)
        keys = jax.random.split(jax.random.key(0), b)
        seen = np.zeros_like(want)
        draw = jax.jit(sample_rows)
        for i in range(300):
            tok = np.asarray(draw(logits, jax.random.split(keys[i % b], b), jnp.ones((b,)),
                                  jnp.asarray(top_k), jnp.asarray(top_p)))
            seen[np.arange(b), tok] = True
        wide = jnp.asarray(rng.normal(size=(1, 50257)) * 3, jnp.float32)  # GPT-2's vocabulary
        for k, p in ((1000, 0.9), (0, 0.5), (40, 1.0)):
            got = np.asarray(filter_logits(wide, top_k=k, top_p=p)) > -1e30
            np.testing.assert_array_equal(got, _sorted_nucleus(wide, [k], [p]), err_msg=f"{k} {p}")
    if kernel:  # serving's per-row filter itself keeps exactly what sorting keeps
        got = np.asarray(filters.filter_rows(logits, jnp.asarray(top_k), jnp.asarray(top_p)))
        np.testing.assert_array_equal(got > -1e30, want)
    assert not np.any(seen & ~want)  # nothing outside the filters is ever drawn
    assert seen[3].sum() == 1 and want[3].sum() == 1  # top_k=1: the argmax alone


def test_sample_cli_on_a_trained_run(tmp_path):
    import subprocess
    import sys

    from tests.test_train import ROOT, corpus, run_main

    run_main(tmp_path / "run", f"--config.data.path={corpus(tmp_path)}", "--config.train.steps=2")
    cmd = [sys.executable, "-m", "lm.sample", f"--workdir={tmp_path / 'run'}", "--prompt=the k",
           "--max_new_tokens=20", "--temperature=0"]
    outs = [subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    for proc in outs:
        assert proc.returncode == 0, proc.stderr[-2000:]
    text = outs[0].stdout.rstrip("\n")
    assert text.startswith("the k") and len(text) == len("the k") + 20  # one char per token
    assert outs[0].stdout == outs[1].stdout  # greedy is deterministic
    bad = subprocess.run([sys.executable, "-m", "lm.sample", f"--workdir={tmp_path / 'nope'}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and bad.stderr.strip().splitlines()[-1].startswith("error:")


def test_eos_stops_early_and_finished_rows_repeat_it():
    prompt = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    params = Decoder(CFG).init(jax.random.key(2), jnp.asarray(prompt))["params"]
    free = generate(CFG, params, prompt, max_new_tokens=12, temperature=0.0)
    eos = int(free[0, 3])  # row 0's first greedy token
    out = generate(CFG, params, prompt, max_new_tokens=12, temperature=0.0, eos_id=eos)
    stops = [int(np.argmax(row[3:] == eos)) if eos in row[3:] else None for row in free]
    if stops[1] is None:  # row 1 never emits it: the run goes the whole way
        assert out.shape == (2, 15)
    else:
        assert out.shape == (2, 3 + max(stops) + 1)
    np.testing.assert_array_equal(out[0, 3:], eos)  # row 0 finished at once and repeats eos
    n = stops[1] + 1 if stops[1] is not None else 12
    np.testing.assert_array_equal(out[1, 3:3 + n], free[1, 3:3 + n])  # row 1 unchanged


def test_categorical_draws_follow_the_softmax():
    from lm.generate import categorical

    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    logits = jnp.log(jnp.asarray(probs))[None]
    keys = jax.random.split(jax.random.key(0), 40_000)
    draws = np.asarray(jax.vmap(lambda k: categorical(k, logits)[0])(keys))
    freq = np.bincount(draws, minlength=6) / len(draws)
    np.testing.assert_allclose(freq, probs, atol=0.01)  # ~4 standard errors
    assert freq[5] == 0  # probability 0 (-inf) is never drawn
    # a vocabulary spanning several blocks of the two-level inverse CDF
    wide = jax.random.normal(jax.random.key(1), (1, 1000)) * 2
    draws = np.asarray(jax.vmap(lambda k: categorical(k, wide)[0])(
        jax.random.split(jax.random.key(2), 100_000)))
    expected = np.asarray(jax.nn.softmax(wide[0]))
    assert np.abs(np.bincount(draws, minlength=1000) / len(draws) - expected).max() < 0.006


def test_categorical_inverts_the_cdf():
    from lm.generate import categorical_from_uniform

    # blocks of 4: [0, .1, .2, 0 | .3, 0, 0, .4]; the CDF steps at tokens 1, 2, 4, 7
    p = np.array([0.0, 0.1, 0.2, 0.0, 0.3, 0.0, 0.0, 0.4])
    logits = jnp.log(jnp.asarray(p))[None].repeat(7, 0)
    u = jnp.array([0.0, 0.05, 0.1, 0.29, 0.31, 0.6, 0.9999999])
    picks = categorical_from_uniform(u, logits, block=4)
    np.testing.assert_array_equal(picks, [1, 1, 2, 2, 4, 7, 7])


def test_top_k_sampling_draws_among_the_k_largest():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.1, 0.2, 0.15]]))
    draws = np.array([int(sample_token(jax.random.key(i), logits, temperature=1.0, top_k=3,
                                       top_p=1.0)[0]) for i in range(600)])
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, np.array([0, 0.5, 0, 0.2, 0.15]) / 0.85, atol=0.06)
    nucleus = {int(sample_token(jax.random.key(i), logits, temperature=1.0, top_k=3,
                                top_p=0.6)[0]) for i in range(200)}
    assert nucleus == {1, 3}  # 0.5 + 0.2 reaches 0.6 within the top 3
