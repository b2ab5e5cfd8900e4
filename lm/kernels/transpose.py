"""A 2-D fp32 transpose as a C++ kernel on the CPU (`transpose_cpu.cc`), whose result XLA
cannot fold back into the product that reads it.

A kernel's gradient xᵀ g over the token axis, however it is written, reaches XLA:CPU as a
product contracting both operands' leading axis (layout assignment undoes an explicit
transpose), which runs in Eigen: [768, 128]ᵀ x [768, 512] 0.479 ms, against 0.358 ms in
YNNPACK with x already laid out [128, 768] (`python benchmarks/cpu_ops.py --ops
weight_grad_2d weight_grad_pretransposed --repeats 200`). Transposing the smaller operand here first
gives YNNPACK a row-major operand (`lm.models.custom_grads.weight_grad`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels import build


def usable(x: jnp.ndarray) -> bool:
    """fp32 2-D on a CPU with AVX-512 or AVX2, kernels built."""
    return x.dtype == jnp.float32 and x.ndim == 2 and build.on_cpu()


def transpose(x_RC: jnp.ndarray) -> jnp.ndarray:
    """x [R, C] -> [C, R] as a new row-major array (see `usable`). Not differentiable:
    it serves backward passes."""
    build.require()
    out = jax.ShapeDtypeStruct(x_RC.shape[::-1], jnp.float32)
    return jax.ffi.ffi_call("lm_transpose", out, vmap_method="sequential")(x_RC)
