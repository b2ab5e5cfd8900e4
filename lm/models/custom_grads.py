"""Operations with hand-written backward passes, where autodiff's gradient compiles to
slow code on XLA:CPU (each docstring says what was measured) or keeps more residuals."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lm.kernels import gemm as gemm_kernel
from lm.kernels import transpose as transpose_kernel


def on_cpu() -> bool:
    """Whether the computation being traced runs on XLA:CPU, where the workarounds below
    apply (other backends keep autodiff's gradients and their own fusions)."""
    return jax.default_backend() == "cpu"


@jax.custom_vjp
def materialize_grad(x: jnp.ndarray) -> jnp.ndarray:
    """Identity whose backward pass writes the cotangent to memory (CPU workaround).

    XLA's CPU fusion recomputes the residual stream's gradient (the LayerNorm-backward
    chain of every later sublayer) inside each transpose that feeds a weight-gradient
    GEMM: O(layers^2) work, ~40 % of a small model's step. A product with an identity
    is exact and cannot be fused through, so the gradient is computed once per sublayer.
    The cotangent is viewed as [8, N / 8] and multiplied by an 8 x 8 identity: 16 FLOPs
    per element, whatever the width (a [D, D] identity would cost 2 * D per element).

    The cotangent is clamped to the finite range first (`keep_out_of_dot_fusion`, never
    binds): YNNPACK otherwise fused the identity product with the product and residual
    add that produce the cotangent (BERT: 6-8 ms per such fusion in `benchmarks/
    profile_ops.py train_step --model bert`), and the
    `char_lm:baby` step ran 1.036x faster without that fusion (BERT 1.002x, GPT 1.008x;
    `benchmarks/ab.py`, 4 / 3 / 3 rounds)."""
    return x


def _materialize_fwd(x):
    return x, None


def _materialize_bwd(_, g):
    dtype = g.dtype
    # in fp32: in bf16 XLA:CPU rounded after each op of the LayerNorm backward fusion
    # that produces g (GPT 4x256 bf16: its convert fusions 23 -> 9 ms of the traced step,
    # the step 1.013x, CPU 1.016x, 4 rounds)
    g = keep_out_of_dot_fusion(g.astype(jnp.float32))
    rows = 8 if g.size % 8 == 0 else 1
    eye = jnp.eye(rows, dtype=g.dtype)
    out = jnp.dot(eye, g.reshape(rows, -1), preferred_element_type=g.dtype)
    return (out.reshape(g.shape).astype(dtype),)


materialize_grad.defvjp(_materialize_fwd, _materialize_bwd)


@jax.custom_vjp
def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """Exact (erf) GELU, x * Phi(x), whose backward pass keeps one residual: the derivative
    Phi(x) + x * phi(x), computed in the forward fusion. Autodiff of `jax.nn.gelu` keeps
    x and two erf/exp intermediates and rebuilds the derivative inside the backward
    fusions (on CPU, inside the transposes that feed the weight-gradient GEMMs).

    The derivative lies in [-0.129, 1.129]; clamping it to [-0.2, 1.2] changes no value
    but is an op YNNPACK cannot fuse, so XLA computes the derivative in its own loop
    instead of recomputing exp inside the backward pass's dot fusion (the [768, 512]
    MLP-backward product of `char_lm:baby`: 1.3 ms there, 0.8 ms after).

    Without a gradient (validation, decoding: this primal, not `_gelu_fwd`) XLA handed
    the erf and the product x * Phi to YNNPACK inside the MLP's dot fusions, where they
    ran slower than the products (`char_lm:baby`'s validation forward: 64-75 -> 51 ms a
    batch). Phi is clamped to [0, 1] and the output to [-1, max]: neither binds (GELU >=
    -0.17), NaN stays NaN, and XLA's own loops compute them. The training forward
    (`_gelu_fwd`) keeps them unclamped: its residuals keep them out of those fusions."""
    cdf = jnp.clip(_phi(x), 0.0, 1.0)
    return jnp.clip(x * cdf, -1.0, jnp.finfo(x.dtype).max)


def _phi(x):
    return 0.5 + 0.5 * jax.lax.erf(x * 2**-0.5)  # erf: one vectorised polynomial on CPU


def _gelu_fwd(x):
    x32 = x.astype(jnp.float32)  # bf16: one rounding at the end, not one per op
    cdf = _phi(x32)
    pdf = jnp.exp(-0.5 * x32 * x32) * (2 * jnp.pi) ** -0.5
    slope = jnp.clip(cdf + x32 * pdf, -0.2, 1.2)  # never binds (docstring)
    return (x32 * cdf).astype(x.dtype), slope.astype(x.dtype)


def _gelu_bwd(slope, g):
    return (keep_out_of_dot_fusion(g) * slope,)


def keep_out_of_dot_fusion(g: jnp.ndarray) -> jnp.ndarray:
    """g clamped to the finite range (+-inf become +-max; NaN stays NaN): an op YNNPACK
    does not fuse, placed between a product and the elementwise op that consumes it."""
    big = jnp.finfo(g.dtype).max
    return jnp.clip(g, -big, big)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def gelu_tanh(x: jnp.ndarray) -> jnp.ndarray:
    """The tanh-approximated GELU (GPT-2's "gelu_new"), 0.5 x (1 + tanh(u)), u = c (x +
    0.044715 x^3), with one residual, its derivative, as `gelu`. Through autodiff the
    derivative's chain of ~15 elementwise ops was recomputed inside the transpose that
    feeds the MLP's weight-gradient product (GPT 4x256: 23 ms per layer per step).
    Without a gradient tanh and the output are clamped as in `gelu` (kept out of
    YNNPACK's dot fusions; never binds)."""
    t = jnp.clip(jnp.tanh(_tanh_arg(x)), -1.0, 1.0)
    return jnp.clip(0.5 * x * (1 + t), -1.0, jnp.finfo(x.dtype).max)


def _tanh_arg(x):
    return (2 / jnp.pi) ** 0.5 * (x + 0.044715 * x * x * x)


def _gelu_tanh_fwd(x):
    """In fp32 whatever x's dtype: in bf16 XLA:CPU rounded after every one of the ~15 ops
    (a convert pair each) and recomputed the chain inside the backward pass's fusion
    (GPT 4x256 bf16: 4.7 ms per layer and step)."""
    x32 = x.astype(jnp.float32)
    c = (2 / jnp.pi) ** 0.5
    t = jnp.tanh(_tanh_arg(x32))
    slope = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * c * (1 + 3 * 0.044715 * x32 * x32)
    slope = jnp.clip(slope, -0.2, 1.2)  # [-0.13, 1.13]: never binds
    return (0.5 * x32 * (1 + t)).astype(x.dtype), slope.astype(x.dtype)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_bwd)


@jax.custom_vjp
def dense_product(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
    """x @ kernel over x's last axis ([..., in] x [in, out]); the kernel's gradient
    transposes the smaller of the input and the output gradient (XLA:CPU transposed the
    larger: a [N, 4D] copy for every MLP input projection). In fp32 on an AVX-512 CPU (with
    AVX2: for decoding's few rows) the product and the input gradient g kernelᵀ run in
    `lm.kernels.gemm` (the latter on the kernel transposed by `lm.kernels.transpose`)."""
    return mixed_dot(x, kernel)


def mixed_dot(a: jnp.ndarray, b: jnp.ndarray,
              dims: tuple | None = None) -> jnp.ndarray:
    """`lax.dot_general(a, b, dims)` (default: a's last axis with b's first) accumulated in
    fp32 and returned in a's dtype. For bf16 operands XLA:CPU runs a bf16 -> bf16 product
    as an fp32 GEMM on upcast copies, 4-6x slower than the same operands with an fp32
    result (a [2048, 256] x [256, 1024] product alone: 4.3-5.3 against 1.0-1.1 ms; the
    bf16 GPT step 1.22x); for fp32 operands the compiled product is the same. Without
    `dims`, fp32 operands go to `lm.kernels.gemm` where `gemm.usable` says so (AVX-512;
    AVX2 for few rows; not differentiable: for custom gradients)."""
    if dims is None and gemm_kernel.usable(a, b):
        return gemm_kernel.matmul(a, b)
    dims = dims or (((a.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(a.dtype)


def mixed_einsum(spec: str, a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """`jnp.einsum(spec, a, b)` accumulated in fp32 and returned in a's dtype (see
    `mixed_dot`)."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _dense_fwd(x, kernel):
    return mixed_dot(x, kernel), (x, kernel)


def _dense_bwd(res, g):
    x, kernel = res
    dk = weight_grad(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))
    if transpose_kernel.usable(kernel) and gemm_kernel.usable(
            g, jax.ShapeDtypeStruct(kernel.shape[::-1], kernel.dtype)):
        dx = gemm_kernel.matmul(g, transpose_kernel.transpose(kernel))
    else:
        dx = mixed_dot(g, kernel, (((g.ndim - 1,), (1,)), ((), ())))
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


def weight_grad(x_NI: jnp.ndarray, g_NO: jnp.ndarray) -> jnp.ndarray:
    """A kernel's gradient xᵀ g over the token axis ([N, in], [N, out] -> [in, out]),
    accumulated in fp32, in x's dtype. The smaller operand is transposed (XLA:CPU
    transposed the larger: a [N, 4D] copy for every MLP input projection).

    For fp32 on the CPU the transpose is a kernel's (`lm.kernels.transpose`): XLA folds
    its own back into the product, which then contracts both operands' leading axis and
    runs in Eigen; on a row-major transposed operand YNNPACK runs it (`char_lm:baby`'s
    [768, 128]ᵀ x [768, 512] 0.479 -> 0.429 ms, [768, 512]ᵀ x [768, 128] 0.654 -> 0.503
    ms with the transposes: `python benchmarks/cpu_ops.py --weight_grad_shape N IN OUT
    --ops weight_grad_2d weight_grad_kernel_transposed --repeats 200`; the char step
    1.031x, GPT fp32 1.025x, BERT even)."""
    small_x = x_NI.shape[1] <= g_NO.shape[1]
    if x_NI.dtype == g_NO.dtype == jnp.float32 and transpose_kernel.usable(x_NI):
        t = transpose_kernel.transpose
        # XLA's product (explicit dims), not lm.kernels.gemm: its few long rows ([in, N],
        # N the token count) split poorly over threads (the char step 0.94x)
        nn = (((1,), (0,)), ((), ()))
        return (mixed_dot(t(x_NI), g_NO, nn) if small_x
                else t(mixed_dot(t(g_NO), x_NI, nn)))
    if small_x:
        return mixed_dot(jnp.transpose(x_NI), g_NO)
    return jnp.transpose(mixed_dot(jnp.transpose(g_NO), x_NI))


dense_product.defvjp(_dense_fwd, _dense_bwd)


# Above this many columns XLA:CPU's sum over rows falls off a cliff: [320, 16384] 1.2 ms,
# [320, 16385] 11.1 ms, [320, 30522] (BERT's MLM bias gradient) 23.1 ms, [512, 50257]
# 120 ms, against 1.0, 1.0, 1.4 and 4.3 ms as a product with ones (`python
# benchmarks/cpu_ops.py --bias_shape 1 R C --ops bias_grad_reduce bias_grad_ones8_product`;
# in a one-off script up to 8,192 columns the sum was as fast or faster).
_WIDE_BIAS = 16384


def add_bias(y: jnp.ndarray, bias: jnp.ndarray) -> jnp.ndarray:
    """y + bias over y's trailing axes. On the CPU the bias gradient (a sum over every
    token) is a matrix product with ones in bf16, which YNNPACK runs on the bf16 units
    (XLA summed the fp32-converted gradient in scalar reduce-window loops: GPT 4x256
    bf16: 11 ms per MLP bias and step, 77 ms of all biases), and for biases wider than
    `_WIDE_BIAS` in any dtype (an output bias over a vocabulary)."""
    if on_cpu() and y.dtype == bias.dtype and (y.dtype == jnp.bfloat16
                                               or bias.size > _WIDE_BIAS):
        return _add_bias(y, bias, bias.ndim)
    return y + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_bias(y, bias, ndim):
    return y + bias


def _add_bias_fwd(y, bias, ndim):
    return y + bias, None


def _add_bias_bwd(ndim, _, g):
    g2 = g.reshape(-1, math.prod(g.shape[g.ndim - ndim:]))
    # [8, N] ones, not a vector: XLA rewrites a vector-matrix product into a reduction
    ones = jnp.ones((8, g2.shape[0]), g.dtype)
    db = jnp.dot(ones, g2, preferred_element_type=jnp.float32)[0]
    return g, db.reshape(g.shape[g.ndim - ndim:]).astype(g.dtype)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def softmax(logits: jnp.ndarray) -> jnp.ndarray:
    """softmax over the last axis whose backward pass reads the saved probabilities once:
    p * (g - sum(p * g)). jax.nn.softmax saves exp(logits - max) and 1 / sum and
    recomputes p inside the reduction of its backward pass, a three-input YNNPACK fusion
    that ran 2x slower than the two-input one.

    Without a gradient (this primal) the probabilities are clamped to [0, 1] (never
    binds; NaN stays NaN): XLA otherwise fused the whole softmax into YNNPACK's fusion of
    the probabilities-times-values product, 3.4 ms against 0.9 for the logits product
    of the same size (`char_lm:baby` validation). In training they are saved for the
    backward pass, which keeps them out of that fusion already."""
    return jnp.clip(jax.nn.softmax(logits, axis=-1), 0.0, 1.0)


def _softmax_fwd(logits):
    probs = jax.nn.softmax(logits, axis=-1)
    return probs, probs


def _softmax_bwd(probs, g):
    return (probs * (g - jnp.sum(probs * g, axis=-1, keepdims=True)),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


@jax.custom_vjp
def tied_product(x: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """x @ tableᵀ ([..., D] x [V, D] -> [..., V], fp32 operands), whose table gradient
    is computed as [D, V] = xᵀ g and transposed once, instead of copying the [N, V]
    output gradient transposed for a [V, D] product."""
    return jnp.einsum("...d,vd->...v", x, table)


def _tied_fwd(x, table):
    return tied_product(x, table), (x, table)


def _tied_bwd(res, g):
    x, table = res
    dx = jnp.einsum("...v,vd->...d", g, table)
    x_ND, g_NV = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return dx, jnp.einsum("nd,nv->dv", x_ND, g_NV).T


tied_product.defvjp(_tied_fwd, _tied_bwd)


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray | None,
               eps: float) -> jnp.ndarray:
    """LayerNorm over the last axis in fp32, (x - mean) / sqrt(var + eps) * scale [+ bias].
    On the CPU its backward pass is the closed form rstd (gy - mean(gy) - y mean(gy y)),
    gy = g scale, from two residuals (y and rstd); other backends keep autodiff's."""
    if on_cpu():
        return _layer_norm(x, scale, bias, eps, jnp.dtype(x.dtype))
    return _affine(_normalize(x, eps)[0], scale, bias)


def _normalize(x, eps):
    x32 = x.astype(jnp.float32)
    xc = x32 - jnp.mean(x32, -1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.mean(xc * xc, -1, keepdims=True) + eps)
    return xc * rstd, rstd


def _affine(y, scale, bias):
    return y * scale if bias is None else y * scale + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps, x_dtype):
    return _affine(_normalize(x, eps)[0], scale, bias)


def _layer_norm_fwd(x, scale, bias, eps, x_dtype):
    y, rstd = _normalize(x, eps)
    return _affine(y, scale, bias), (y, rstd, scale, bias)


def _layer_norm_bwd(eps, x_dtype, res, g):
    y, rstd, scale, bias = res
    g = g.astype(jnp.float32)
    gy = g * scale
    dx = rstd * (gy - jnp.mean(gy, -1, keepdims=True) - y * jnp.mean(gy * y, -1, keepdims=True))
    rows = tuple(range(g.ndim - 1))
    dscale = jnp.sum(g * y, rows).astype(scale.dtype)
    dbias = None if bias is None else jnp.sum(g, rows).astype(bias.dtype)
    return dx.astype(x_dtype), dscale, dbias


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)
