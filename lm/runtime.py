"""Process-wide XLA settings, applied when `lm` is imported (before JAX starts a backend).

XLA's CPU backend in jaxlib 0.10 hands dots, elementwise ops and reductions to YNNPACK.
On our training steps its elementwise fusions are slower than XLA's own loops, while its
dots are the fastest available and its reductions beat XLA's reduce-window trees on
large rows: restricting YNNPACK to dots made the `char_lm:baby` step 1.3x faster than
the default, and adding reductions back (`DOT,REDUCE`) made the GPT benchmark step 7 %
faster in fp32 and bf16, BERT's 6 % and decoding 5-10 % (the max and sum over a
[512, 50257] logits chunk: 27-29 and 7-8 ms in XLA's loops, 6-10 and 4-6 ms in YNNPACK,
`benchmarks/cpu_ops.py`),
`char_lm:baby` unchanged (benchmarks/train_step.py, A/B on the same machine). YNNPACK's
max ignores NaN where XLA's propagates it; a NaN logit still makes the loss NaN through
the softmax's sum. The flag is experimental, and an unknown flag aborts XLA at start-up,
so it is set only for jaxlib versions it was measured on, never over a value the user
set, and not at all with `LM_XLA_DEFAULTS=0`.
Accelerator backends ignore CPU flags.

The best setting depends on the compute dtype. Restricted to `DOT`, XLA upcasts a bf16
dot to fp32 inside its YNNPACK fusion, so bf16 runs at fp32 speed; with
`INDIVIDUAL_DOT` the dot keeps its bf16 operands and reaches the CPU's bf16 units
(AVX512-BF16 / AMX: a 2048^3 GEMM 1,330 GFLOP/s against 266), while fp32 small-model
steps are slower that way (`char_lm:baby` 58 ms against 35). So `import lm` sets the fp32
value and `set_compute_dtype("bfloat16")` switches it, as long as no backend has started
(`lm.main` calls it once the config is read).
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys
from collections.abc import MutableMapping

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = {YNN_FLAG: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# On CPUs with AVX-512, XLA's own loops (elementwise fusions: the GELU's erf, exp) in
# 512-bit vectors instead of the default 256: a [4096, 512] GELU 0.47 -> 0.34 ms
# (`benchmarks/cpu_ops.py --ops gelu`, README); the
# `char_lm:baby` step 1.018x, its validation batch 1.036x, BERT 1.017x, GPT fp32 1.022x,
# GPT bf16 even (benchmarks/ab.py, every pair faster in the first three).
VECTOR_FLAG = "xla_cpu_prefer_vector_width"
AVX512_FLAGS = {VECTOR_FLAG: "512"}
# per compute dtype: the YNNPACK fusion types measured fastest (see the module docstring)
YNN_BY_DTYPE = {"float32": "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE",
                "bfloat16": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
TESTED_JAXLIB = ("0.10.",)  # version prefixes the flags are known (and measured) on


def jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def configure_xla(env: MutableMapping[str, str] = os.environ,
                  version: str | None = None, cpu: list[str] | None = None) -> list[str]:
    """Adds our CPU flags to `env["XLA_FLAGS"]` (`cpu`: this CPU's `cpu_flags()`, read
    when None; AVX-512 adds AVX512_FLAGS); returns the flags added."""
    if env.get("LM_XLA_DEFAULTS", "1") == "0":
        return []
    version = jaxlib_version() if version is None else version
    if not version.startswith(TESTED_JAXLIB):
        return []
    cpu = cpu_flags() if cpu is None else cpu
    ours = {**CPU_FLAGS, **(AVX512_FLAGS if "avx512f" in cpu else {})}
    flags = env.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in ours.items() if name not in flags]
    if added:
        env["XLA_FLAGS"] = " ".join([flags, *added]).strip()
        env["LM_XLA_ADDED"] = " ".join(added)  # ours, so set_compute_dtype may change them
    return added


def set_compute_dtype(dtype: str, env: MutableMapping[str, str] = os.environ,
                      started: bool | None = None) -> str | None:
    """Switches our YNNPACK flag to the value measured fastest for `dtype`.

    Returns the flag now in effect, or None where nothing changes: a dtype without an
    entry, a flag the user set (or `LM_XLA_DEFAULTS=0`, or an untested jaxlib), or a
    backend already started (`started`; None asks JAX), whose flags are fixed."""
    value = YNN_BY_DTYPE.get(str(dtype))
    ours = env.get("LM_XLA_ADDED", "").split()
    mine = [f for f in ours if f.startswith(f"--{YNN_FLAG}=")]
    if value is None or not mine or mine[0] not in env.get("XLA_FLAGS", "").split():
        return None
    if started is None:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    wanted = f"--{YNN_FLAG}={value}"
    if wanted == mine[0]:
        return wanted
    if started:
        return None
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(mine[0], wanted)
    env["LM_XLA_ADDED"] = " ".join(wanted if f == mine[0] else f for f in ours)
    return wanted


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 1 << 30  # free memory kept for reuse before any is given back


def configure_malloc(env: MutableMapping[str, str] = os.environ) -> bool:
    """Keeps large buffers in the process heap instead of fresh `mmap`s (glibc only).

    XLA:CPU allocates each call's temporaries as one buffer. glibc serves requests above
    its mmap threshold (at most 32 MB) with a new mapping and unmaps it on free, so every
    step of a model whose temporaries exceed 32 MB faults in all of its pages again: the
    `char_lm:baby` gradient (45 MB of temporaries) took 11,400 page faults and 45.9 ms per
    call, against 268 faults and 34.9 ms with mmap off and a high trim threshold, where
    the freed buffer is reused. Every thread shares that (main) arena: a worker thread's
    own arena maps any buffer above its 64 MB heap afresh whatever the settings, and
    YNNPACK packs a product's operand on XLA's pool threads (the fp32 GPT step's
    [512, 50257] loss-chunk gradient, 103 MB: 101,000 page faults per step, none with one
    arena; the step 1.06x, `char_lm:baby` even). Returns whether the setting was applied;
    `LM_MALLOC_DEFAULTS=0` turns it off."""
    if env.get("LM_MALLOC_DEFAULTS", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and
                    libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) and
                    libc.mallopt(_M_ARENA_MAX, 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
        return False


def configure_dispatch(env: MutableMapping[str, str] = os.environ) -> bool:
    """Runs CPU computations on the calling thread (`jax_cpu_enable_async_dispatch=False`).

    With asynchronous dispatch each computation runs on a PJRT worker thread, whose glibc
    arena cannot hold a buffer above its 64 MB heap size and maps every such buffer afresh
    (`mmap` regardless of `configure_malloc`), so its pages fault in again at every call:
    the GPT benchmark step took 140,000 page faults (550 MB) per step, BERT 84,000; run
    inline, the caller's (main) arena keeps and reuses them, with no faults. Steps then
    ran 7 % (GPT fp32 and bf16), 15 % (BERT) and 4 % (`char_lm:baby`) faster. Must run
    before a CPU backend starts (returns False after, and with `LM_DISPATCH_DEFAULTS=0`).
    Sharded (multi-device) computations are dispatched asynchronously either way. The
    server turns asynchronous dispatch back on (`set_async_dispatch`): its engine reads
    one step's tokens while the next step runs."""
    if env.get("LM_DISPATCH_DEFAULTS", "1") == "0":
        return False
    return set_async_dispatch(False)


def set_async_dispatch(enabled: bool) -> bool:
    """Sets JAX's CPU dispatch mode; False (nothing changed) once a backend has started."""
    import jax  # noqa: PLC0415  (imported only here: the other settings precede JAX)
    from jax._src import xla_bridge  # noqa: PLC0415

    if xla_bridge.backends_are_initialized():
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", enabled)
    return True


DEFAULT_COMPILATION_CACHE = "~/.cache/lm/jax"


def configure_compilation_cache(env: MutableMapping[str, str] = os.environ) -> str | None:
    """Keeps compiled programs in `LM_COMPILATION_CACHE` (default ~/.cache/lm/jax; empty
    or 0 = off), JAX's persistent compilation cache, so that a later run of the same
    shapes (a sweep's next point, a resumed run) skips XLA's compilation: the
    `char_lm:baby` training call took 5.2 s to compile, 1.8 s read back (tracing and
    lowering remain). Programs that compile in under 0.1 s are not kept (the
    `char_lm:baby` evaluation step, 0.27 s to compile, is read back in 0.01 s). Results
    are unchanged (the cache key covers the program, the XLA flags and the jaxlib
    version). Returns the directory in use, or None (off, or the directory cannot be
    created: the run compiles afresh). `lm.main` calls it; library users may too."""
    path = env.get("LM_COMPILATION_CACHE", DEFAULT_COMPILATION_CACHE)
    if path in ("", "0"):
        return None
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None
    import jax  # noqa: PLC0415

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path


def peer_env(env: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for a benchmark's peer process (PyTorch, transformers): ours with
    lm's process settings off, so the peer runs as its own users run it even where it
    imports lm (weight conversion). PyTorch steps change under `configure_malloc` too
    (its GPT step ran faster, its peak memory 1 GB higher)."""
    return {**env, "LM_MALLOC_DEFAULTS": "0", "LM_DISPATCH_DEFAULTS": "0"}


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> list[str]:
    """This CPU's vector, bf16 and AMX feature flags (of CPU_FEATURES) from /proc/cpuinfo;
    empty where the file is absent. bf16 matmuls beat fp32 on the CPU only with
    avx512_bf16 / amx_bf16, so benchmarks print these beside every number."""
    try:
        with open(path) as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in CPU_FEATURES if f in flags]


def cpu_has_bf16_units(flags: list[str] | None = None) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX-BF16). Without
    them XLA:CPU converts bf16 operands for fp32 arithmetic, and a bf16 step runs slower
    than fp32: on an AVX2 AMD EPYC the GPT 4x256 step 2.25 s against 1.41-1.62 s, its
    bf16 GEMM 99 GFLOP/s against 153 (`benchmarks/train_step.py --model gpt --dtype
    bfloat16`)."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def slow_dtype_warning(dtype: str, backend: str, flags: list[str] | None = None) -> str | None:
    """The warning for a compute dtype slower than the default here (bf16 on a CPU without
    bf16 units), or None."""
    if str(dtype) == "bfloat16" and backend == "cpu" and not cpu_has_bf16_units(flags):
        return ("model.dtype=bfloat16 on a CPU without AVX512-BF16 or AMX: its products run "
                "in fp32 on converted copies, slower than model.dtype=float32 (the default)")
    return None
