"""benchmarks/attention.py: the function it times is the attention it names, with and
without a gradient, and its FLOP count follows."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from lm.models import masks
from lm.models.attention import dot_product_attention

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("attention_bench",
                                                  ROOT / "benchmarks" / "attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _inputs(b=2, length=12, h=2, k=8):
    rng = np.random.default_rng(0)
    q, key, v = (jnp.asarray(rng.normal(size=(b, length, h, k)), jnp.float32) for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    mask = masks.self_mask(jnp.ones((b, length), jnp.int32), pos, causal=True)
    return q, key, v, mask.replace(packed=False)


def test_forward_only_is_the_sum_of_squares_of_the_output():
    bench = _module()
    q, key, v, mask = _inputs()
    ref = float(jnp.sum(dot_product_attention(q, key, v, mask, impl="einsum") ** 2))
    for impl in ("einsum", "einsum_xla"):
        fn = bench.make_fn(impl, forward_only=True)
        out = fn.lower(q, key, v, mask).compile()(q, key, v, mask)
        np.testing.assert_allclose(float(out), ref, rtol=1e-5)
        value, grads = bench.make_fn(impl).lower(q, key, v, mask).compile()(q, key, v, mask)
        np.testing.assert_allclose(float(value), ref, rtol=1e-5)
        assert len(grads) == 3 and grads[0].shape == q.shape


def test_lines_name_the_pass_and_count_its_flops():
    bench = _module()
    fwd = bench.bench("einsum", 32, 2, 2, 16, jnp.float32, 2, forward_only=True)
    both = bench.bench("einsum", 32, 2, 2, 16, jnp.float32, 2)
    assert (fwd["what"], both["what"]) == ("attention_fwd", "attention_fwd_bwd")
    for line, passes in ((fwd, 1), (both, 3)):  # 4 B H L^2 K per pass
        flops = passes * 4 * 2 * 2 * 32 * 32 * 16
        # ms is rounded to 3 decimals, GFLOP/s (from the unrounded time) to 2
        np.testing.assert_allclose(flops / (line["ms"] * 1e6), line["gflops_per_s"],
                                   rtol=0.01, atol=0.011)
    assert isinstance(fwd["cpu_flags"], list)
