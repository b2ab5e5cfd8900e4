"""Softmax cross-entropy over rows of fp32 logits as a C++ kernel on the CPU
(`cross_entropy_cpu.cc`), for the chunks of the fused output projection + loss
(`lm.objectives.losses.fused_cross_entropy`).

XLA walks a [chunk, V] logits array four or five times (max, exp, sum, the gradient and
its conversion to the compute dtype), each pass from memory: a GPT-2 chunk of 512 tokens
is 103 MB of fp32 logits, and those passes took ~42 ms of the chunk's ~150 ms in the
bf16 GPT step (`benchmarks/profile_ops.py train_step --model gpt --dtype bfloat16`). The
kernel keeps one row (200 KB) in the core's cache across its passes: the logits are read
once and the gradient written once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lm.kernels import build


def usable(logits: jnp.ndarray, grad_dtype=None) -> bool:
    """Whether the kernel applies: fp32 logits (and an fp32 or bf16 gradient) on a CPU
    with AVX-512 or AVX2, kernels built."""
    return (logits.dtype == jnp.float32 and logits.ndim >= 1
            and jnp.dtype(grad_dtype or jnp.float32) in (jnp.float32, jnp.bfloat16)
            and build.on_cpu())


def _rows(logits, targets, weights):
    lead = logits.shape[:-1]
    if targets.shape != lead or weights.shape != lead:
        raise ValueError(f"targets {targets.shape} and weights {weights.shape} must match "
                         f"the logits' leading axes {lead}")
    return lead, targets.astype(jnp.int32), weights.astype(jnp.float32)


def stats(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray
          ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per row: the weighted loss (logsumexp - target logit) * w and the weighted
    correct flag (target logit >= max: ties count) * w. Not differentiable (the
    gradient comes from `stats_and_grad`)."""
    build.require()
    lead, targets, weights = _rows(logits, targets, weights)
    out = jax.ShapeDtypeStruct(lead, jnp.float32)
    return jax.ffi.ffi_call("lm_cross_entropy_stats", (out, out),
                            vmap_method="broadcast_all")(logits, targets, weights)


def stats_and_grad(logits: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                   grad_dtype=jnp.float32) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`stats` and the gradient of the summed weighted loss with respect to the logits,
    (softmax - onehot(target)) * w, in `grad_dtype` (fp32 or bf16, rounded to nearest
    even). Rows of weight 0 get a zero loss and gradient."""
    build.require()
    lead, targets, weights = _rows(logits, targets, weights)
    grad_dtype = jnp.dtype(grad_dtype)
    target = {jnp.dtype(jnp.float32): "lm_cross_entropy_grad_f32",
              jnp.dtype(jnp.bfloat16): "lm_cross_entropy_grad_bf16"}[grad_dtype]
    row = jax.ShapeDtypeStruct(lead, jnp.float32)
    grad = jax.ShapeDtypeStruct(logits.shape, grad_dtype)
    # an fp32 gradient overwrites the logits in place (XLA copies them first if they are
    # used again): one [chunk, V] buffer fewer
    aliases = {0: 2} if grad_dtype == jnp.float32 else {}
    return jax.ffi.ffi_call(target, (row, row, grad), vmap_method="broadcast_all",
                            input_output_aliases=aliases)(logits, targets, weights)
