"""fp32 matrix products [N, K] x [K, F] as a C++ kernel on AVX-512 CPUs (`gemm_cpu.cc`),
for the dense layers' forward and input-gradient products (`lm.models.custom_grads`).

In place of XLA:CPU's YNNPACK products (`benchmarks/ab.py`, `LM_GEMM_KERNEL=0` against
the default; README, Performance): the `char_lm:baby` step 1.06x, its 64-window
validation batch 1.11x, BERT 4x256 1.04x, GPT 4x256 fp32 1.07x. The kernels' gradients
xᵀ g stay with XLA (with the kernel, whose few long rows split poorly over threads, the
char step ran 0.94x). Used where the default backend is the CPU with AVX-512, the
operands are fp32, F is a multiple of 16 and the library was built for AVX-512;
`LM_GEMM_KERNEL=0` (or `LM_CPU_KERNELS=0`) keeps XLA's product. Operands sharded over
several devices are gathered for the call, as for the attention kernel (the partitioner
knows nothing of it; multi-device CPU runs are tests and debugging).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from lm.kernels import build


@functools.cache
def _built_for_avx512() -> bool:
    """The CPU has AVX-512 and the library was built with it (not for an older -march)."""
    if "avx512f" not in build.cpu_id().split():
        return False
    return bool(build.available() and build.library().LmGemmBuilt())


def usable(a, b) -> bool:
    """Whether `matmul(a, b)` applies (read when tracing; arrays or anything with .shape and
    .dtype): fp32 a [..., K] and b [K, F], F > 0 a multiple of 16, the CPU with AVX-512,
    kernels enabled and built, `LM_GEMM_KERNEL=0` not set."""
    return (a.dtype == b.dtype == jnp.float32 and len(b.shape) == 2 and len(a.shape) >= 1
            and a.shape[-1] == b.shape[0] and b.shape[1] > 0 and b.shape[1] % 16 == 0
            and math.prod(a.shape) > 0 and os.environ.get("LM_GEMM_KERNEL", "1") != "0"
            and build.on_cpu() and _built_for_avx512())


def matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a [..., K] @ b [K, F] in fp32 (see `usable`). Not differentiable: it serves the
    custom gradients' forward and backward products."""
    build.require()
    a2 = a.reshape(-1, a.shape[-1])
    out = jax.ShapeDtypeStruct((a2.shape[0], b.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call("lm_gemm", out, vmap_method="sequential")(a2, b)
    return y.reshape(*a.shape[:-1], b.shape[1])


def usable_acc(c, a, b) -> bool:
    """Whether `matmul_acc(c, a, b)` applies: as `usable`, 2-D operands, any width F."""
    return (c.dtype == a.dtype == b.dtype == jnp.float32 and len(a.shape) == len(b.shape)
            == len(c.shape) == 2 and a.shape[1] == b.shape[0]
            and tuple(c.shape) == (a.shape[0], b.shape[1]) and math.prod(c.shape) > 0
            and os.environ.get("LM_GEMM_KERNEL", "1") != "0" and build.on_cpu()
            and _built_for_avx512())


def matmul_acc(c: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """c + a [N, K] @ b [K, F] in fp32, written over c's buffer where XLA can give it (a
    loop's accumulator). Not differentiable (see `usable_acc`)."""
    build.require()
    return jax.ffi.ffi_call("lm_gemm_acc", jax.ShapeDtypeStruct(c.shape, jnp.float32),
                            vmap_method="sequential", input_output_aliases={2: 0})(a, b, c)
