"""benchmarks/profile_ops.py: the trace's ops, per call, largest first."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("profile_ops",
                                                  ROOT / "benchmarks" / "profile_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_top_ops_ranks_a_large_product_first_and_counts_per_call():
    a = jnp.ones((512, 512), jnp.float32)
    f = jax.jit(lambda x: (x @ x @ x).sum())
    ops = _module().top_ops(lambda: f(a).block_until_ready(), calls=4, top=3)
    assert ops and all(o["what"] == "op" for o in ops)
    times = [o["ms_per_call"] for o in ops]
    assert times == sorted(times, reverse=True) and times[0] > 0
    # two 512^3 products dominate a sum: the largest op is the products' op (XLA may fuse
    # both into one), counted once per call over the 4 traced calls
    assert "dot" in ops[0]["name"] or "ynn" in ops[0]["name"]
    assert ops[0]["per_call"] == 1.0
