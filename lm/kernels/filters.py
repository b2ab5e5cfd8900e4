"""Sampling's top-k and nucleus filters as a C++ kernel on the CPU (`filter_cpu.cc`): per
row, the `top_k` largest logits (0: all), then the smallest set of largest logits whose
softmax probability reaches `top_p` (1: all), ties at either boundary kept, every other
logit -FLT_MAX (jnp.finfo(float32).min), as `lm.generate.filter_logits` (one k and p for
all rows) and serving's `sample_rows` (a k and p per row) filter.

XLA sorted the row for them (15 ms per 50257-wide row on a 2-core CPU, 412 ms for 32
rows); `lm.generate.threshold` replaced the sort by 32 bisection passes over the row (3.4
ms for one row); the kernel selects both thresholds by radix, three passes of 11, 11 and
10 bits with the probabilities summed in double (`python benchmarks/cpu_ops.py --ops
nucleus_sort_1 nucleus_bisect_1 nucleus_kernel_1 nucleus_sort_8 nucleus_bisect_8
nucleus_kernel_8`). Where a probability sum lies within rounding of top_p the kernel's
double sums and XLA's fp32 sums may keep one value more or less.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels import build


def usable(logits: jnp.ndarray) -> bool:
    """fp32 logits [B, V], on a CPU with AVX-512 or AVX2, kernels built."""
    return logits.dtype == jnp.float32 and logits.ndim == 2 and build.on_cpu()


def filter_rows(logits_BV: jnp.ndarray, top_k_B: jnp.ndarray, top_p_B: jnp.ndarray
                ) -> jnp.ndarray:
    """The filtered logits [B, V]: a row's top_k (0: all) largest, then its nucleus top_p
    (1: all); the rest -FLT_MAX."""
    build.require()
    b = logits_BV.shape[0]
    return jax.ffi.ffi_call("lm_row_filter", jax.ShapeDtypeStruct(logits_BV.shape, jnp.float32),
                            vmap_method="sequential")(
        logits_BV, jnp.broadcast_to(top_k_B, (b,)).astype(jnp.int32),
        jnp.broadcast_to(top_p_B, (b,)).astype(jnp.float32))
