"""Process-wide XLA defaults (lm.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lm import runtime

FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT"


def test_adds_cpu_flags_after_existing_ones():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.configure_xla(env, version="0.10.2") == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert runtime.configure_xla(env, version="0.10.2") == []  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_never_overrides_the_user_or_untested_versions():
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE"}
    assert runtime.configure_xla(mine, version="0.10.2") == []
    assert mine["XLA_FLAGS"].endswith("ELTWISE")
    off = {"LM_XLA_DEFAULTS": "0"}
    assert runtime.configure_xla(off, version="0.10.2") == [] and "XLA_FLAGS" not in off
    newer = {}
    assert runtime.configure_xla(newer, version="0.11.0") == [] and "XLA_FLAGS" not in newer


_PROBE = """
import lm, jax, jax.numpy as jnp
f = jax.jit(lambda x, w: (jnp.tanh(x @ w) * 2.0).sum(-1))
text = f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text()
print("reduce-outside-ynn" if "wrapped_reduce" in text else "reduce-inside-ynn")
"""


@pytest.mark.parametrize("defaults", ["1", "0"])
def test_flag_reaches_the_cpu_compiler(defaults):
    if not runtime.jaxlib_version().startswith(runtime.TESTED_JAXLIB):
        pytest.skip(f"jaxlib {runtime.jaxlib_version()}: lm sets no XLA flags for it")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "LM_XLA_DEFAULTS": defaults, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    # With the default YNNPACK fusion types the dot, tanh and reduction form one library
    # fusion; restricted to dots, the reduction is XLA's own loop.
    assert out == ("reduce-outside-ynn" if defaults == "1" else "reduce-inside-ynn")
