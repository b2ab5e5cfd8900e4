"""Decoding's token choice as C++ kernels on the CPU (`argmax_cpu.cc`): greedy, the first
index of each row's largest logit, as jnp.argmax (NaN counts as largest); sampling, the
token at quantile u of each row's softmax as lm.generate.categorical_from_uniform
computes it ([8, 50257] logits: 0.163 ms in XLA's steps, 0.064 ms in the kernel,
`python benchmarks/cpu_ops.py --ops sample_xla sample_kernel --repeats 30`).

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


def sample(u: jnp.ndarray, logits: jnp.ndarray, block: int = 256) -> jnp.ndarray:
    """int32 token at quantile `u` (one uniform per row) of each row's softmax, as
    `lm.generate.categorical_from_uniform(u, logits, block=256)` computes it (equal up to
    fp32 summation order; a -inf logit is never drawn)."""
    if block != 256:
        raise ValueError(f"block: the kernel sums blocks of 256 logits, got {block}")
    build.require()
    out = jax.ShapeDtypeStruct(logits.shape[:-1], jnp.int32)
    return jax.ffi.ffi_call("lm_row_sample", out, vmap_method="sequential")(
        logits, u.astype(jnp.float32))
