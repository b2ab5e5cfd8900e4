"""The tied output projection for a few rows (decoding) as a C++ kernel on the CPU
(`logits_cpu.cc`).

A greedy decoding step of the GPT 4x256 at batch 8 spent 3.8 ms of its ~7.4 in the
[8, 256] x [256, 50257] logits product (`python benchmarks/profile_ops.py decode --model
gpt --batch 8`), where one read of the 51 MB table takes ~1.5 ms on this machine; the
kernel reads each table row once against every row of h: decoding at batch 8 1.21x,
batch 1 even (README, Performance).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels import build

# decoding and serving batches: [N, 256] x the 50257-row table, kernel against XLA's
# product (ms): 8 rows 1.27 / 1.85, 16 1.76 / 2.26, 32 2.85 / 3.28, 64 4.89 / 5.04; a
# larger product is a GEMM worth packing for
MAX_ROWS = 32


def usable(x: jnp.ndarray, table: jnp.ndarray) -> bool:
    """fp32, at most MAX_ROWS rows of x, on a CPU with AVX-512 or AVX2, kernels built."""
    rows = x.size // max(x.shape[-1], 1)
    return (x.dtype == table.dtype == jnp.float32 and table.ndim == 2 and 0 < rows <= MAX_ROWS
            and build.on_cpu())


@jax.custom_vjp
def small_logits(x: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """x [..., D] @ table [V, D]ᵀ -> [..., V] in fp32 (see `usable`); differentiable (its
    backward pass is two plain products)."""
    build.require()
    out = jax.ShapeDtypeStruct((*x.shape[:-1], table.shape[0]), jnp.float32)
    return jax.ffi.ffi_call("lm_small_logits", out, vmap_method="sequential")(x, table)


def _fwd(x, table):
    return small_logits(x, table), (x, table)


def _bwd(res, g):
    x, table = res
    return jnp.einsum("...v,vd->...d", g, table), jnp.einsum("...v,...d->vd", g, x)


small_logits.defvjp(_fwd, _bwd)
