"""Weight matmuls in a low-precision compute dtype with fp32 accumulation, forward and
backward.

`x @ w` with bf16 operands and a bf16 result, as plain autodiff writes it, runs on
XLA:CPU ~6x slower than the same GEMM with an fp32 result (2048^3 on an AMX Xeon: 50 vs
310 GFLOP/s, both measured on one loaded machine), and the backward pass's two GEMMs take
that slow path too. `dot_general` here asks for an fp32 result of bf16 x bf16 in all
three GEMMs (`preferred_element_type`), then rounds the activation to the compute dtype;
the weight gradient stays fp32 all the way to the fp32 master weight. With an fp32 compute
dtype it is plain `lax.dot_general` (the default path is unchanged, bit for bit).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def dot_general(lhs: jnp.ndarray, rhs: jnp.ndarray, dimension_numbers, dtype,
                ) -> jnp.ndarray:
    """lax.dot_general of `lhs` [..., in...] and the weight `rhs` [in..., out...] (the
    trailing axes of lhs contracted with the leading axes of rhs, no batch axes) computed
    in `dtype`: the result has `dtype`, the gradients the operands' own dtypes."""
    if jnp.dtype(dtype) == F32:
        return lax.dot_general(lhs.astype(F32), rhs.astype(F32), dimension_numbers)
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    n = len(lhs_c)
    trailing = tuple(a % lhs.ndim for a in lhs_c) == tuple(range(lhs.ndim - n, lhs.ndim))
    if lhs_b or rhs_b or not trailing or tuple(rhs_c) != tuple(range(n)):
        raise ValueError(f"matmul.dot_general: unsupported dimension numbers "
                         f"{dimension_numbers} for shapes {lhs.shape} x {rhs.shape}")
    return _mixed(lhs, rhs, n, jnp.dtype(dtype))


def for_dtype(dtype):
    """A `dot_general` for flax's DenseGeneral(dot_general=...) in `dtype`."""

    def fn(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        del precision, preferred_element_type  # fixed: fp32 accumulation
        return dot_general(lhs, rhs, dimension_numbers, dtype)

    return fn


def keep_kernel_dtype(inputs, kernel, bias, *, dtype=None):
    """flax `promote_dtype` hook: inputs and bias in `dtype`, the kernel left in its own
    (fp32) dtype so that `dot_general` returns its gradient in fp32."""
    cast = (lambda x: x) if dtype is None else (lambda x: None if x is None else
                                               jnp.asarray(x, dtype))
    return cast(inputs), kernel, cast(bias)


def _flat(lhs: jnp.ndarray, rhs: jnp.ndarray, n: int) -> tuple[jnp.ndarray, jnp.ndarray,
                                                               Sequence[int]]:
    """([M, K], [K, N], the output shape) of lhs [..., in...] and rhs [in..., out...]."""
    k = 1
    for size in rhs.shape[:n]:
        k *= size
    out_shape = (*lhs.shape[: lhs.ndim - n], *rhs.shape[n:])
    return lhs.reshape(-1, k), rhs.reshape(k, -1), out_shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _mixed(lhs, rhs, n, dtype):
    x_MK, w_KN, out_shape = _flat(lhs, rhs, n)
    y_MN = jnp.dot(x_MK.astype(dtype), w_KN.astype(dtype), preferred_element_type=F32)
    return y_MN.astype(dtype).reshape(out_shape)


def _mixed_fwd(lhs, rhs, n, dtype):
    return _mixed(lhs, rhs, n, dtype), (lhs, rhs)


def _mixed_bwd(n, dtype, residuals, g):
    lhs, rhs = residuals
    x_MK, w_KN, _ = _flat(lhs, rhs, n)
    x_MK, w_KN = x_MK.astype(dtype), w_KN.astype(dtype)
    g_MN = g.reshape(x_MK.shape[0], w_KN.shape[1]).astype(dtype)
    dx_MK = lax.dot_general(g_MN, w_KN, (((1,), (1,)), ((), ())), preferred_element_type=F32)
    dw_KN = lax.dot_general(x_MK, g_MN, (((0,), (0,)), ((), ())), preferred_element_type=F32)
    return dx_MK.astype(lhs.dtype).reshape(lhs.shape), dw_KN.astype(rhs.dtype).reshape(
        rhs.shape)


_mixed.defvjp(_mixed_fwd, _mixed_bwd)
