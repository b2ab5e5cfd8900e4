"""Greedy decoding's token choice as a C++ kernel on the CPU (`argmax_cpu.cc`): the first
index of each row's largest logit, as jnp.argmax (NaN counts as largest).

XLA:CPU runs jnp.argmax's variadic reduction as a scalar loop (~3x slower than
lax.top_k(x, 1) over a 50257 vocabulary), and top_k sorts; the kernel makes two
vectorised passes over the row (the first index found a vector at a time), rows split
over XLA's threads: [8, 50257] logits 0.43 ms in top_k, 0.155 ms in the kernel's first
form (scalar second pass, one thread), 0.055 ms now (`python benchmarks/cpu_ops.py --ops
argmax_top_k1 argmax_kernel --repeats 30`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels import build


def usable(logits: jnp.ndarray) -> bool:
    """fp32 logits with a last axis, on a CPU with AVX-512 or AVX2, kernels built."""
    return logits.dtype == jnp.float32 and logits.ndim >= 1 and build.on_cpu()


def argmax(logits: jnp.ndarray) -> jnp.ndarray:
    """int32 index of the largest value along the last axis (first on ties)."""
    build.require()
    out = jax.ShapeDtypeStruct(logits.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call("lm_row_argmax", out, vmap_method="broadcast_all")(logits)
