"""Attention as a C++ kernel on the CPU (`attention_cpu.cc`), with its backward pass.

XLA:CPU compiles the attention core of a small model (`char_lm:baby`: 48 heads of 64 x 64
per layer) into ~25 operations per layer and step: transposed copies of q, k and v,
batched products at 30-45 GFLOP/s (a 64 x 64 x 32 product is too small for its GEMM
libraries), the mask, the softmax and its gradient. The kernel computes the core on the
model's own [B, L, H, K] layout, one (row, head) at a time, 4 query rows x 16 keys in
AVX-512 registers (8 with AVX2), only over the keys between each query's first and last allowed one
(half of a causal table), on XLA's intra-op thread pool, and saves the probabilities
only when a gradient is taken. `python benchmarks/attention.py --impls einsum_xla,einsum
--lengths 64 --batch 12 --heads 4 --head_dim 32 --repeats 50` (forward + backward, one
`char_lm:baby` layer): 1.68 -> 0.98 ms; the GPT 4x256 shape 9.6 -> 5.7 ms (README,
Performance).

It is compiled on first use with the machine's C++ compiler (`c++ -O3 -march=native`,
about 5 s) into `LM_KERNEL_CACHE` (default `~/.cache/lm/kernels`), keyed by its source,
the compiler and its flags, jax's version and the CPU, and registered as XLA FFI targets
(`LM_KERNEL_MARCH=haswell` builds the AVX2 form instead of `-march=native`). Where no
compiler is found or the build fails, `available()` is False (with one warning) and
callers keep the XLA path; `LM_CPU_KERNELS=0` turns the kernel off (`lm.compile` sets it:
it lowers TPU programs from a process whose default backend is the CPU).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "attention_cpu.cc")
_FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]


def _flags() -> list[str]:
    """The compiler flags; `LM_KERNEL_MARCH` replaces -march=native (e.g. `haswell`: the
    AVX2 build on an AVX-512 machine, or one build for a cluster's oldest CPU)."""
    march = os.environ.get("LM_KERNEL_MARCH")
    return [f"-march={march}" if f == "-march=native" and march else f for f in _FLAGS]
_TARGETS = {"lm_attention_fwd": "LmAttentionForward", "lm_attention_bwd": "LmAttentionBackward",
            "lm_attention_inference": "LmAttentionInference"}
_lock = threading.Lock()
_state: dict[str, object] = {}


def enabled() -> bool:
    """Whether the CPU kernels may be used (`LM_CPU_KERNELS=0` turns them off)."""
    return os.environ.get("LM_CPU_KERNELS", "1") != "0"


@contextlib.contextmanager
def switched_off():
    """Traces inside take XLA's path (the kernel is chosen when tracing): for comparisons."""
    old = os.environ.get("LM_CPU_KERNELS")
    os.environ["LM_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["LM_CPU_KERNELS"]
        else:
            os.environ["LM_CPU_KERNELS"] = old


def _cpu_id() -> str:
    """The CPU model and flags (the kernel is built with -march=native)."""
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
    with open(_SOURCE, "rb") as f:
        source = f.read()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([
        source, version.encode(), " ".join(_flags()).encode(), jax.__version__.encode(),
        _cpu_id().encode()])).hexdigest()[:16]
    cache_dir = cache_dir or os.environ.get("LM_KERNEL_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "lm", "kernels")
    path = os.path.join(cache_dir, f"attention_cpu-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache_dir)
    os.close(fd)
    try:
        out = subprocess.run([cxx, *_flags(), f"-I{jax.ffi.include_dir()}", _SOURCE, "-o", tmp],
                             capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"{cxx} failed on {_SOURCE}: {out.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: concurrent builders each write their own temp file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def available() -> bool:
    """Whether the kernel is built and registered (builds it on the first call)."""
    if not enabled():
        return False
    with _lock:
        if "ok" not in _state:
            try:
                lib = ctypes.cdll.LoadLibrary(library_path())
                for target, symbol in _TARGETS.items():
                    jax.ffi.register_ffi_target(
                        target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
                _state.update(ok=True, lib=lib)
            except (RuntimeError, OSError) as e:
                logging.warning("CPU attention kernel unavailable (XLA path used): %s", e)
                _state["ok"] = False
    return bool(_state["ok"])


@functools.cache
def has_simd() -> bool:
    """Whether the CPU has AVX-512 or AVX2, the vector widths the kernel is written for
    (16 and 8 floats; its generic vectors on other CPUs are untested for speed)."""
    flags = _cpu_id().split()
    return "avx512f" in flags or "avx2" in flags


def usable(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> bool:
    """Whether `attention` applies: fp32 operands on a CPU with AVX-512 or AVX2, kernel
    built. Operands sharded over several devices are gathered for the call (the
    partitioner knows nothing of it; multi-device CPU runs are tests and debugging)."""
    return (jax.default_backend() == "cpu"
            and q.dtype == k.dtype == v.dtype == jnp.float32 and has_simd()
            and available())


def _require() -> None:
    if not available():
        raise RuntimeError("the CPU attention kernel is unavailable (see the warning above, "
                           "or LM_CPU_KERNELS=0)")


def _forward(q, k, v, allowed, scale):
    _require()
    b, length, h, _ = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                 jax.ShapeDtypeStruct((b, h, length, k.shape[1]), jnp.float32))
    return jax.ffi.ffi_call("lm_attention_fwd", out_types, vmap_method="sequential")(
        q, k, v, allowed, scale=np.float32(scale))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q_BLHK: jnp.ndarray, k_BSGK: jnp.ndarray, v_BSGK: jnp.ndarray,
              allowed_BLS: jnp.ndarray, scale: float) -> jnp.ndarray:
    """softmax(scale q kᵀ, keys where `allowed_BLS`) v as [B, L, H, K] (H a multiple of
    G); a query with no allowed key gets zeros. fp32, CPU only (see `usable`). Without a
    gradient the probabilities are not written out."""
    _require()
    out_type = jax.ShapeDtypeStruct(q_BLHK.shape, jnp.float32)
    return jax.ffi.ffi_call("lm_attention_inference", out_type, vmap_method="sequential")(
        q_BLHK, k_BSGK, v_BSGK, allowed_BLS, scale=np.float32(scale))


def _attention_fwd(q, k, v, allowed, scale):
    out, probs = _forward(q, k, v, allowed, scale)
    return out, (q, k, v, allowed, probs)


def _attention_bwd(scale, res, g):
    q, k, v, allowed, probs = res
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call("lm_attention_bwd", out_types, vmap_method="sequential")(
        q, k, v, allowed, probs, g.astype(jnp.float32), scale=np.float32(scale))
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
