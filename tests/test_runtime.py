"""Process-wide XLA defaults (lm.runtime)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lm import runtime

FLAG = ("--xla_cpu_experimental_ynn_fusion_type="
        "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE")


def test_adds_cpu_flags_after_existing_ones():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert runtime.configure_xla(env, version="0.10.2", cpu=["avx2"]) == [FLAG]
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
    assert runtime.configure_xla(env, version="0.10.2", cpu=["avx2"]) == []  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_avx512_cpus_get_512_bit_vectors_unless_the_user_set_a_width():
    wide = "--xla_cpu_prefer_vector_width=512"
    env = {}
    assert runtime.configure_xla(env, version="0.10.2", cpu=["avx2", "avx512f"]) == [FLAG, wide]
    assert env["XLA_FLAGS"] == f"{FLAG} {wide}"
    assert runtime.set_compute_dtype("bfloat16", env, started=False).endswith("INDIVIDUAL_DOT,"
                                                                             "LIBRARY_FUSION_TYPE_REDUCE")
    assert wide in env["XLA_FLAGS"].split() and wide in env["LM_XLA_ADDED"].split()
    here = {}  # without `cpu`, this machine's /proc/cpuinfo decides
    added = runtime.configure_xla(here, version="0.10.2")
    assert (wide in added) == ("avx512f" in runtime.cpu_flags())
    mine = {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}
    assert runtime.configure_xla(mine, version="0.10.2", cpu=["avx512f"]) == [FLAG]
    assert mine["XLA_FLAGS"] == f"--xla_cpu_prefer_vector_width=256 {FLAG}"


def test_never_overrides_the_user_or_untested_versions():
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_ELTWISE"}
    assert runtime.configure_xla(mine, version="0.10.2", cpu=["avx512f"]) == [
        "--xla_cpu_prefer_vector_width=512"]  # only the flag the user did not set
    assert mine["XLA_FLAGS"].split()[0].endswith("ELTWISE")
    assert mine["XLA_FLAGS"].count("ynn_fusion_type") == 1
    off = {"LM_XLA_DEFAULTS": "0"}
    assert runtime.configure_xla(off, version="0.10.2") == [] and "XLA_FLAGS" not in off
    newer = {}
    assert runtime.configure_xla(newer, version="0.11.0") == [] and "XLA_FLAGS" not in newer


_PROBE = """
import lm, jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.tanh(jnp.exp(x) @ x) * 3 + x)
entry = f.lower(jnp.ones((256, 256))).compile().as_text().split("ENTRY")[1]
print(f"fusions-{entry.count(' fusion(')}")
"""


@pytest.mark.parametrize("defaults", ["1", "0"])
def test_flag_reaches_the_cpu_compiler(defaults):
    if not runtime.jaxlib_version().startswith(runtime.TESTED_JAXLIB):
        pytest.skip(f"jaxlib {runtime.jaxlib_version()}: lm sets no XLA flags for it")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {
        "LM_XLA_DEFAULTS": defaults, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, check=True).stdout.split()[-1]
    # Ours (DOT,REDUCE) take the product with its elementwise neighbours into one YNNPACK
    # fusion; XLA's default types leave the exp and the final multiply-add to its loops.
    assert out == ("fusions-1" if defaults == "1" else "fusions-3")


def test_compute_dtype_switches_only_our_flag_before_the_backend_starts():
    env = {}
    runtime.configure_xla(env, version="0.10.2", cpu=[])
    bf16 = FLAG.replace("TYPE_DOT", "TYPE_INDIVIDUAL_DOT")
    assert runtime.set_compute_dtype("bfloat16", env, started=False) == bf16
    assert env["XLA_FLAGS"] == bf16
    assert runtime.set_compute_dtype("float32", env, started=False) == FLAG
    assert env["XLA_FLAGS"] == FLAG
    assert runtime.set_compute_dtype("bfloat16", env, started=True) is None  # too late
    assert env["XLA_FLAGS"] == FLAG
    assert runtime.set_compute_dtype("float16", env, started=False) is None  # not measured
    mine = {"XLA_FLAGS": FLAG}  # the same text, but set by the user: never touched
    assert runtime.set_compute_dtype("bfloat16", mine, started=False) is None
    assert mine["XLA_FLAGS"] == FLAG


_BF16_PROBE = """
from lm import runtime
import sys
runtime.set_compute_dtype(sys.argv[1])
import jax, jax.numpy as jnp
a = jnp.ones((64, 64), jnp.bfloat16)
f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
text = f.lower(a, a).compile().as_text()
print("upcast" if "f32[64,64]{1,0} convert(" in text else "bf16-operands")
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bf16_dots_keep_bf16_operands_after_the_switch(dtype):
    if not runtime.jaxlib_version().startswith(runtime.TESTED_JAXLIB):
        pytest.skip(f"jaxlib {runtime.jaxlib_version()}: lm sets no XLA flags for it")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "LM_XLA_ADDED")} | {
        "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _BF16_PROBE, dtype], env=env,
                         capture_output=True, text=True, check=True).stdout.split()[-1]
    # fp32's setting converts bf16 operands to fp32 inside the library fusion (fp32 speed)
    assert out == ("upcast" if dtype == "float32" else "bf16-operands")


_FAULT_PROBE = """
import resource, numpy as np
import lm
a = np.ones(16 << 20, np.float32)  # 64 MB: above glibc's largest mmap threshold
del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    a = np.ones(16 << 20, np.float32)
    del a
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.parametrize("defaults", ["1", "0"])
def test_large_buffers_are_reused_not_faulted_in_again(defaults):
    env = dict(os.environ, LM_MALLOC_DEFAULTS=defaults, JAX_PLATFORMS="cpu")
    faults = int(subprocess.run([sys.executable, "-c", _FAULT_PROBE], env=env,
                                capture_output=True, text=True, check=True).stdout.split()[-1])
    # mmap'd: every new buffer faults its pages in again (at least 32 faults even with
    # 2 MB transparent huge pages); reused heap memory: none do
    assert faults < 16 if defaults == "1" else faults >= 32


_DISPATCH_PROBE = """
import resource, statistics
import lm  # noqa: F401
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x * 2.0)
x = jnp.ones(32 << 20, jnp.float32)  # 128 MB: above a worker thread's 64 MB glibc heap
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(statistics.median(faults[2:]))  # a call under load may still map afresh: median
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc arenas")
@pytest.mark.parametrize("defaults", ["1", "0"])
def test_cpu_computations_run_inline_and_reuse_their_buffers(defaults):
    """A call's 128 MB output: with lm's defaults its memory is reused (few faults);
    without them (dispatched to a worker thread, glibc's own malloc settings) it is
    mapped afresh and all 32,768 pages fault in. Both defaults are switched off for the
    second case: since lm puts every thread on the main arena (configure_malloc), a worker
    thread may reuse the buffer too, whichever thread runs the call."""
    env = dict(os.environ, LM_DISPATCH_DEFAULTS=defaults, LM_MALLOC_DEFAULTS=defaults,
               JAX_PLATFORMS="cpu", XLA_FLAGS="")  # one CPU device, as a user's process has
    faults = float(subprocess.run([sys.executable, "-c", _DISPATCH_PROBE], env=env,
                                  capture_output=True, text=True, check=True).stdout.split()[-1])
    pages = (128 << 20) // 4096
    assert faults < pages // 4 if defaults == "1" else faults > pages // 2  # 0 / 32,768


def test_dispatch_setting_refuses_a_started_backend_and_the_opt_out():
    import jax.numpy as jnp

    jnp.ones(1).block_until_ready()  # a backend is running in this process
    assert runtime.configure_dispatch() is False
    assert runtime.configure_dispatch({"LM_DISPATCH_DEFAULTS": "0"}) is False


def test_async_dispatch_can_be_turned_back_on_before_the_backend_starts():
    """`import lm` runs computations inline; the server (`python -m lm.serve`, whose
    engine overlaps host work with the running step) switches back before loading."""
    probe = ("import sys, lm\nfrom jax._src import xla_bridge as xb\n"
             "before = xb._CPU_ENABLE_ASYNC_DISPATCH.value\n"
             "from lm import runtime\nassert runtime.set_async_dispatch(True)\n"
             "print(before, xb._CPU_ENABLE_ASYNC_DISPATCH.value)")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == ["False", "True"]


_CACHE_PROBE = """
import jax, jax.numpy as jnp
from jax import monitoring
from lm import runtime
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
print("dir", runtime.configure_compilation_cache())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # this tiny program too
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print("value", float(f(jnp.arange(64.0).reshape(8, 8) / 64)))
print("hits", events.count("/jax/compilation_cache/cache_hits"))
"""


def test_compilation_cache_is_read_by_a_later_process(tmp_path):
    cache = tmp_path / "jax"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "LM_COMPILATION_CACHE": str(cache)}

    def run(extra=None):
        out = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env={**env, **(extra or {})},
                             capture_output=True, text=True, check=True).stdout.split("\n")
        return dict(line.split(" ", 1) for line in out if line)

    first, second = run(), run()
    assert first["dir"] == second["dir"] == str(cache)
    # written by the first process (every program of the probe), read back by the second
    assert first["hits"] == "0" and int(second["hits"]) >= 1
    assert first["value"] == second["value"]
    assert any(cache.iterdir())
    off = run({"LM_COMPILATION_CACHE": ""})
    assert (off["dir"], off["hits"]) == ("None", "0")
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the directory should be: no cache, no error
    assert run({"LM_COMPILATION_CACHE": str(blocked / "jax")})["dir"] == "None"


def test_bf16_units_are_avx512_bf16_or_amx():
    assert not runtime.cpu_has_bf16_units(["avx2"])
    assert not runtime.cpu_has_bf16_units(["avx2", "avx512f"])  # AVX-512 alone converts
    assert runtime.cpu_has_bf16_units(["avx2", "avx512f", "avx512_bf16"])
    assert runtime.cpu_has_bf16_units(["amx_tile", "amx_bf16"])
    assert runtime.cpu_has_bf16_units() == any(
        f in runtime.cpu_flags() for f in ("avx512_bf16", "amx_bf16"))
    # what lm.main warns: bf16 on a CPU backend without the units, nothing otherwise
    assert "slower" in runtime.slow_dtype_warning("bfloat16", "cpu", ["avx2"])
    assert runtime.slow_dtype_warning("bfloat16", "cpu", ["avx512_bf16"]) is None
    assert runtime.slow_dtype_warning("bfloat16", "gpu", ["avx2"]) is None
    assert runtime.slow_dtype_warning("float32", "cpu", ["avx2"]) is None
