"""Builds lm's C++ CPU kernels (`*_cpu.cc` in this folder) into one library on first use
and registers their XLA FFI targets.

The library is compiled with the machine's C++ compiler (`c++ -O3 -march=native`, a
process per source; about 40 s on 2 cores) into `LM_KERNEL_CACHE` (default
`~/.cache/lm/kernels`), keyed by the sources, the compiler and its flags, jax's version
and the CPU (`LM_KERNEL_MARCH=haswell` builds the AVX2 form instead of `-march=native`).
Where no compiler is found or the build fails, `available()` is False (with one warning)
and callers keep the XLA path; `LM_CPU_KERNELS=0` turns the kernels off (`lm.compile`
sets it: it lowers TPU programs from a process whose default backend is the CPU).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
from absl import logging

_DIR = os.path.dirname(os.path.abspath(__file__))
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-fPIC", "-w"]  # per source; linked -shared
# FFI target name -> exported handler symbol, for every kernel in the library
TARGETS = {
    "lm_attention_fwd": "LmAttentionForward", "lm_attention_bwd": "LmAttentionBackward",
    "lm_attention_inference": "LmAttentionInference",
    "lm_attention_packed_fwd": "LmAttentionPackedForward",
    "lm_attention_packed_bwd": "LmAttentionPackedBackward",
    "lm_attention_packed_inference": "LmAttentionPackedInference",
    "lm_cross_entropy_stats": "LmCrossEntropyStats",
    "lm_cross_entropy_grad_f32": "LmCrossEntropyGradF32",
    "lm_cross_entropy_grad_bf16": "LmCrossEntropyGradBF16",
    "lm_row_argmax": "LmRowArgmax", "lm_row_sample": "LmRowSample",
    "lm_row_filter": "LmRowFilter",
    "lm_decode_attention": "LmDecodeAttention",
    "lm_small_logits": "LmSmallLogits", "lm_transpose": "LmTranspose", "lm_gemm": "LmGemm",
    "lm_gemm_acc": "LmGemmAcc", "lm_quantize_rows": "LmQuantizeRows",
    "lm_greedy_tied": "LmGreedyTied", "lm_sample_tied": "LmSampleTied",
    "lm_gumbel_rows": "LmGumbelRows", "lm_top_k_tied": "LmTopKTied",
    "lm_amx_chunk_stats_bf16": "LmAmxChunkStatsBF16",
    "lm_amx_chunk_grads_bf16": "LmAmxChunkGradsBF16", "lm_amx_pack_bf16": "LmAmxPackBF16",
}
_lock = threading.Lock()
_state: dict[str, object] = {}


def sources() -> list[str]:
    """The kernels' C++ sources (compiled together) and their shared header."""
    return sorted(glob.glob(os.path.join(_DIR, "*_cpu.cc")))


def _flags() -> list[str]:
    """The compiler flags; `LM_KERNEL_MARCH` replaces -march=native (e.g. `haswell`: the
    AVX2 build on an AVX-512 machine, or one build for a cluster's oldest CPU)."""
    march = os.environ.get("LM_KERNEL_MARCH")
    return [f"-march={march}" if f == "-march=native" and march else f for f in _FLAGS]


def enabled() -> bool:
    """Whether the CPU kernels may be used (`LM_CPU_KERNELS=0` turns them off)."""
    return os.environ.get("LM_CPU_KERNELS", "1") != "0"


@contextlib.contextmanager
def switched_off():
    """Traces inside take XLA's path (kernels are chosen when tracing): for comparisons."""
    old = os.environ.get("LM_CPU_KERNELS")
    os.environ["LM_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LM_CPU_KERNELS"]
        else:
            os.environ["LM_CPU_KERNELS"] = old


def cpu_id() -> str:
    """The CPU model and flags (the kernels are built with -march=native)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [x for x in f if x.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def library_path(cache_dir: str | None = None) -> str:
    """Builds the kernel library if needed and returns its path (RuntimeError on failure)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (c++, g++, clang++ or $CXX) on PATH")
    parts = []
    for path in [*sources(), *sorted(glob.glob(os.path.join(_DIR, "*.h")))]:
        with open(path, "rb") as f:
            parts.append(os.path.basename(path).encode() + b"\0" + f.read())
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([
        *parts, version.encode(), " ".join(_flags()).encode(), jax.__version__.encode(),
        cpu_id().encode()])).hexdigest()[:16]
    cache_dir = cache_dir or os.environ.get("LM_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lm", "kernels")
    path = os.path.join(cache_dir, f"lm_cpu_kernels-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    # one builder per library: other processes (pytest workers, the hosts of a one-machine
    # job) wait for it and load its result instead of compiling the same sources again
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(path):
            _compile(cxx, cache_dir, path)
    return path


def _compile(cxx: str, cache_dir: str, path: str) -> None:
    """Compiles each source in its own process, as many at once as there are cores (37-42 s
    on 2 cores against 74-76 s for one compiler process over every source), links them and
    moves the library into place."""
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        def one(src: str) -> str:
            obj = os.path.join(tmp, os.path.basename(src) + ".o")
            out = subprocess.run([cxx, *_flags(), f"-I{jax.ffi.include_dir()}", "-c", src,
                                  "-o", obj], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"{cxx} failed on {os.path.basename(src)}: "
                                   f"{out.stderr.strip()[-400:]}")
            return obj

        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            objects = list(pool.map(one, sources()))
        lib = os.path.join(tmp, "lib.so")
        out = subprocess.run([cxx, "-shared", *objects, "-o", lib],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{cxx} failed linking the kernels: {out.stderr.strip()[-400:]}")
        os.replace(lib, path)  # atomic: a reader never sees a partial library


def available() -> bool:
    """Whether the kernels are built and registered (builds them on the first call)."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(library_path())
                for target, symbol in TARGETS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state.update(ok=True, lib=lib)
            except (RuntimeError, OSError) as e:
                logging.warning("CPU kernels unavailable (XLA path used): %s", e)
                _state["ok"] = False
    return bool(_state["ok"])


def library() -> ctypes.CDLL:
    """The loaded kernel library (after `available()` is True), for its plain C queries
    such as whether a kernel was built for this CPU."""
    require()
    return _state["lib"]


@functools.cache
def has_simd() -> bool:
    """Whether the CPU has AVX-512 or AVX2, the vector widths the kernels are written for
    (16 and 8 floats; their generic vectors on other CPUs are untested for speed)."""
    flags = cpu_id().split()
    return "avx512f" in flags or "avx2" in flags


def on_cpu() -> bool:
    """Whether the kernels apply here: the default backend is the CPU, with AVX-512 or
    AVX2, kernels enabled and built."""
    return jax.default_backend() == "cpu" and has_simd() and available()


def require() -> None:
    if not available():
        raise RuntimeError("lm's CPU kernels are unavailable (see the warning above, "
                           "or LM_CPU_KERNELS=0)")
