"""fp32 matrix products [N, K] x [K, F] as a C++ kernel (`gemm_cpu.cc`), for the dense
layers' forward and input-gradient products (`lm.models.custom_grads`).

In place of XLA:CPU's YNNPACK products (`benchmarks/ab.py`, `LM_GEMM_KERNEL=0` against
the default; README, Performance), on an AVX-512 Intel Xeon: the `char_lm:baby` step
1.06x, its 64-window validation batch 1.11x, BERT 4x256 1.04x, GPT 4x256 fp32 1.07x. The
kernels' gradients xᵀ g stay with XLA (with the kernel, whose few long rows split poorly
over threads, the char step ran 0.94x). On an AVX2 AMD EPYC its 8-float form was slower
than YNNPACK for training's products and the table gradient's sum (GPT step 0.93x), and
faster for decoding's few rows (greedy batch 8 1.10x): there it takes at most
AVX2_MAX_ROWS rows. Used where the default backend is the CPU, the operands are fp32, F
is a multiple of 16 and the library was built for the CPU's vectors; `LM_GEMM_KERNEL=0`
(or `LM_CPU_KERNELS=0`) keeps XLA's product. Operands sharded over several devices are
gathered for the call, as for the attention kernel (the partitioner knows nothing of it;
multi-device CPU runs are tests and debugging).
"""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp

from lm.kernels import build


@functools.cache
def built_width() -> int:
    """Floats per register of the library's product: 16 (AVX-512), 8 (AVX2), 0 (none;
    `build.on_cpu` checks the CPU has the build's instructions)."""
    return int(build.available() and build.library().LmGemmBuilt())


# With AVX2 only for decoding's few rows, where B is streamed from memory once
AVX2_MAX_ROWS = 12


def usable(a, b) -> bool:
    """Whether `matmul(a, b)` applies (read when tracing; arrays or anything with .shape and
    .dtype): fp32 a [..., K] and b [K, F], F > 0 a multiple of 16, the CPU with AVX-512
    (with AVX2: at most AVX2_MAX_ROWS rows of a), kernels enabled and built,
    `LM_GEMM_KERNEL=0` not set."""
    rows = math.prod(a.shape[:-1])
    return (a.dtype == b.dtype == jnp.float32 and len(b.shape) == 2 and len(a.shape) >= 1
            and a.shape[-1] == b.shape[0] and b.shape[1] > 0 and b.shape[1] % 16 == 0
            and math.prod(a.shape) > 0 and os.environ.get("LM_GEMM_KERNEL", "1") != "0"
            and build.on_cpu()
            and (built_width() == 16 or built_width() == 8 and rows <= AVX2_MAX_ROWS))


def matmul(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """a [..., K] @ b [K, F] in fp32 (see `usable`). Not differentiable: it serves the
    custom gradients' forward and backward products."""
    build.require()
    a2 = a.reshape(-1, a.shape[-1])
    out = jax.ShapeDtypeStruct((a2.shape[0], b.shape[1]), jnp.float32)
    y = jax.ffi.ffi_call("lm_gemm", out, vmap_method="sequential")(a2, b)
    return y.reshape(*a.shape[:-1], b.shape[1])


def usable_acc(c, a, b) -> bool:
    """Whether `matmul_acc(c, a, b)` applies: as `usable` on AVX-512, 2-D operands, any
    width F (not with AVX2: the GPT step ran 0.93x with it)."""
    return (c.dtype == a.dtype == b.dtype == jnp.float32 and len(a.shape) == len(b.shape)
            == len(c.shape) == 2 and a.shape[1] == b.shape[0]
            and tuple(c.shape) == (a.shape[0], b.shape[1]) and math.prod(c.shape) > 0
            and os.environ.get("LM_GEMM_KERNEL", "1") != "0" and build.on_cpu()
            and built_width() == 16)


def matmul_acc(c: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """c + a [N, K] @ b [K, F] in fp32, written over c's buffer where XLA can give it (a
    loop's accumulator). Not differentiable (see `usable_acc`)."""
    build.require()
    return jax.ffi.ffi_call("lm_gemm_acc", jax.ShapeDtypeStruct(c.shape, jnp.float32),
                            vmap_method="sequential", input_output_aliases={2: 0})(a, b, c)
