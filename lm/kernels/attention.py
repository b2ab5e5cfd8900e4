"""Attention as a C++ kernel on the CPU (`attention_cpu.cc`; the backward pass in
`attention_bwd_cpu.cc`), differentiable; and a decoding step's attention over the KV
cache (`decode_attention_cpu.cc`, `cached`).

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

Built on first use with the other CPU kernels (`lm.kernels.build`); where it cannot be
built or `LM_CPU_KERNELS=0`, callers keep the XLA path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.kernels import build

# kept here for callers of the attention kernel (tests, benchmarks)
from lm.kernels.build import available, enabled, has_simd, library_path, switched_off  # noqa: F401


def usable(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> bool:
    """Whether `attention` applies: fp32 operands on a CPU with AVX-512 or AVX2, kernel
    built. Operands sharded over several devices are gathered for the call (the
    partitioner knows nothing of it; multi-device CPU runs are tests and debugging)."""
    return q.dtype == k.dtype == v.dtype and packed_usable(q.dtype)


def packed_usable(dtype) -> bool:
    """Whether `attention_packed` (and `attention`) apply to operands of `dtype`."""
    return jnp.dtype(dtype) == jnp.float32 and build.on_cpu()


def _forward(q, k, v, allowed, scale):
    build.require()
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
    build.require()
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def attention_packed(qkv_BLCK: jnp.ndarray, allowed_BLL: jnp.ndarray, scale: float,
                     heads: int) -> jnp.ndarray:
    """Self-attention on the packed projection [B, L, H + 2G, K] (the first `heads` heads
    queries, then G keys, then G values) as `attention` computes it on the three parts;
    its gradient is one array in the same layout. Reading the parts in place saves the
    three slice copies that separate operands of a custom call need, and the projection's
    backward pass takes one cotangent (two products instead of six)."""
    return _packed_call("lm_attention_packed_inference", _packed_out(qkv_BLCK, heads), scale,
                        heads, qkv_BLCK, allowed_BLL)


def _packed_out(qkv, heads):
    b, length, _, k = qkv.shape
    return jax.ShapeDtypeStruct((b, length, heads, k), jnp.float32)


def _packed_call(target, out_types, scale, heads, *operands):
    build.require()
    return jax.ffi.ffi_call(target, out_types, vmap_method="sequential")(
        *operands, scale=np.float32(scale), heads=np.int64(heads))


def _packed_fwd(qkv, allowed, scale, heads):
    b, length = qkv.shape[:2]
    probs_type = jax.ShapeDtypeStruct((b, heads, length, length), jnp.float32)
    out, probs = _packed_call("lm_attention_packed_fwd", (_packed_out(qkv, heads), probs_type),
                              scale, heads, qkv, allowed)
    return out, (qkv, allowed, probs)


def _packed_bwd(scale, heads, res, g):
    qkv, allowed, probs = res
    dqkv = _packed_call("lm_attention_packed_bwd", jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                        scale, heads, qkv, allowed, probs, g.astype(jnp.float32))
    return dqkv, None


attention_packed.defvjp(_packed_fwd, _packed_bwd)


def cached(q_NRK: jnp.ndarray, keys_NKS: jnp.ndarray, values_NSK: jnp.ndarray,
           allowed_BS: jnp.ndarray, scale: float, bias_NRS: jnp.ndarray | None = None
           ) -> jnp.ndarray:
    """One decoding step over the KV cache in its stored layouts (lm.models.attention):
    softmax(scale q kᵀ [+ bias] over the keys where `allowed_BS`) v for every row and
    key/value head n = b * G + g and its R query heads, reading only the keys between each
    row's first and last allowed one; a query with no allowed key gets zeros. fp32, CPU
    only (`packed_usable`); no gradient (decoding)."""
    build.require()
    bias = jnp.zeros((0,), jnp.float32) if bias_NRS is None else bias_NRS.astype(jnp.float32)
    out_type = jax.ShapeDtypeStruct(q_NRK.shape, jnp.float32)
    return jax.ffi.ffi_call("lm_decode_attention", out_type, vmap_method="sequential")(
        q_NRK, keys_NKS, values_NSK, allowed_BS, bias, scale=np.float32(scale))
