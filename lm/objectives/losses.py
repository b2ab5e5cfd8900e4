"""Token-level cross-entropy, materialised or fused with the output projection.

With a large vocabulary the output projection and its softmax dominate a small model's
step: the fp32 logits of a GPT-2 batch (2048 tokens x 50257) are 412 MB, and autodiff
walks them four or five times (logits, log-sum-exp, softmax for the gradient, the
one-hot scatter, a transposed copy for the weight gradient), each pass bound by memory
bandwidth. `fused_cross_entropy` computes the loss and both gradients chunk by chunk in
the forward pass (the derivative of a summed loss does not depend on anything that
follows it, only on its scalar cotangent), so the logits are never stored whole, the
exponentials are taken once, and the backward pass is two multiplications.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lm.kernels import amx_projection as amx_kernel
from lm.kernels import cross_entropy as ce_kernel
from lm.kernels import gemm as gemm_kernel
from lm.objectives.base import Metrics


def token_cross_entropy(logits_BLV: jnp.ndarray, targets_BL: jnp.ndarray,
                        weights_BL: jnp.ndarray, accuracy: bool = True,
                        label_smoothing: float = 0.0) -> Metrics:
    """Weighted next-token loss (and accuracy) as (sum, count) from materialised logits;
    with `label_smoothing` the target distribution is smoothed toward uniform.

    Accuracy costs one more pass over the [B, L, V] logits, so training steps leave it
    to evaluation."""
    logits = logits_BLV.astype(jnp.float32)
    if label_smoothing:
        soft = optax.smooth_labels(jax.nn.one_hot(targets_BL, logits.shape[-1]),
                                   label_smoothing)
        ce_BL = optax.softmax_cross_entropy(logits, soft)
    else:
        ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BL)
    count = weights_BL.sum()
    out = {"loss": ((ce_BL * weights_BL).sum(), count)}
    if accuracy:
        correct_BL = (jnp.argmax(logits_BLV, -1) == targets_BL).astype(jnp.float32)
        out["accuracy"] = ((correct_BL * weights_BL).sum(), count)
    return out


def fused_cross_entropy(x_BLD: jnp.ndarray, table_VD: jnp.ndarray, targets_BL: jnp.ndarray,
                        weights_BL: jnp.ndarray, chunk: int, accuracy: bool = True) -> Metrics:
    """`token_cross_entropy(x @ tableᵀ, ...)` without materialising the logits.

    `x` and `table` are in the compute dtype (products accumulate in fp32; logits, loss
    and softmax are fp32). At most about `chunk` tokens are projected at a time: all rows
    times up to `chunk // B` positions, so each chunk keeps the batch sharding (0 = all
    at once). The chunks are as even as their number allows; the last one is padded with
    zero-weight positions. Differentiable in `x` and `table`."""
    b, length, d = x_BLD.shape
    k = length if chunk <= 0 else min(max(chunk // b, 1), length)  # positions per chunk
    k = -(-length // -(-length // k))  # same number of chunks, least padding
    pad = -length % k
    weights_BL = weights_BL.astype(jnp.float32)
    if pad:  # padded positions carry weight 0
        x_BLD = jnp.pad(x_BLD, ((0, 0), (0, pad), (0, 0)))
        targets_BL = jnp.pad(targets_BL, ((0, 0), (0, pad)))
        weights_BL = jnp.pad(weights_BL, ((0, 0), (0, pad)))
    c = (length + pad) // k
    x_CBKD = x_BLD.reshape(b, c, k, d).swapaxes(0, 1)
    targets_CBK = targets_BL.reshape(b, c, k).swapaxes(0, 1)
    weights_CBK = weights_BL.reshape(b, c, k).swapaxes(0, 1)
    loss_sum, correct = _fused_loss(x_CBKD, table_VD, targets_CBK, weights_CBK)
    count = weights_BL.sum()
    out = {"loss": (loss_sum, count)}
    if accuracy:
        out["accuracy"] = (jax.lax.stop_gradient(correct), count)
    return out


def _chunk_logits(x_BKD, table_VD):
    return jnp.einsum("bkd,vd->bkv", x_BKD, table_VD, preferred_element_type=jnp.float32)


def _chunk_stats(logits_BKV, targets_BK, weights_BK):
    """(weighted loss sum, weighted correct count, exp(logits - max), sum of those).

    The exponentials are stored once for both the sum and the gradient: summing
    exp(logits - max) inside the reduction and taking exp(logits - lse) afresh for the
    gradient (one pass fewer over the [chunk, V] array) made the GPT step 1.2x slower,
    as YNNPACK's fused exp-and-sum ran 3x slower than XLA's exp plus YNNPACK's sum."""
    max_BK1 = logits_BKV.max(-1, keepdims=True)
    exp_BKV = jnp.exp(logits_BKV - max_BK1)
    sum_BK1 = exp_BKV.sum(-1, keepdims=True)
    target_BK = jnp.take_along_axis(logits_BKV, targets_BK[..., None], -1)[..., 0]
    loss_BK = (max_BK1[..., 0] + jnp.log(sum_BK1[..., 0]) - target_BK) * weights_BK
    # ties count as correct, unlike argmax's first-index rule: equal only on exact ties
    correct_BK = (target_BK >= max_BK1[..., 0]).astype(jnp.float32) * weights_BK
    return loss_BK.sum(), correct_BK.sum(), exp_BKV, sum_BK1


def _chunk_loss(logits_BKV, targets_BK, weights_BK):
    """(weighted loss sum, weighted correct count) of one chunk, without a gradient."""
    if ce_kernel.usable(logits_BKV):
        loss_BK, correct_BK = ce_kernel.stats(logits_BKV, targets_BK, weights_BK)
        return loss_BK.sum(), correct_BK.sum()
    loss, correct, _, _ = _chunk_stats(logits_BKV, targets_BK, weights_BK)
    return loss, correct


def _chunk_loss_and_grad(logits_BKV, targets_BK, weights_BK, dtype):
    """`_chunk_loss` and the summed loss's gradient in the logits, (softmax - onehot) * w
    in `dtype`. On the CPU one kernel computes all three with the logits read once
    (lm/kernels/cross_entropy.py); XLA's path walks them four or five times."""
    if ce_kernel.usable(logits_BKV, dtype):
        loss_BK, correct_BK, dlogits_BKV = ce_kernel.stats_and_grad(
            logits_BKV, targets_BK, weights_BK, dtype)
        return loss_BK.sum(), correct_BK.sum(), dlogits_BKV
    loss, correct, exp_BKV, sum_BK1 = _chunk_stats(logits_BKV, targets_BK, weights_BK)
    onehot_BKV = jnp.arange(logits_BKV.shape[-1], dtype=targets_BK.dtype) == targets_BK[..., None]
    dlogits_BKV = ((exp_BKV / sum_BK1 - onehot_BKV) * weights_BK[..., None]).astype(dtype)
    return loss, correct, dlogits_BKV


def _amx(x_CBKD, table_VD) -> bool:
    """Whether a chunk's projection, loss and gradients run as one AMX kernel call
    (bf16 on a CPU with AMX: lm/kernels/amx_projection.py)."""
    _, b, k, d = x_CBKD.shape
    return amx_kernel.usable(jax.ShapeDtypeStruct((b * k, d), x_CBKD.dtype), table_VD)


def _tokens(x_BKD, targets_BK, weights_BK):
    return (x_BKD.reshape(-1, x_BKD.shape[-1]), targets_BK.reshape(-1),
            weights_BK.reshape(-1))


@jax.custom_vjp
def _fused_loss(x_CBKD, table_VD, targets_CBK, weights_CBK):
    amx = _amx(x_CBKD, table_VD)
    columns = amx_kernel.pack(table_VD)[0] if amx else None

    def body(totals, xs):
        x_BKD, targets_BK, weights_BK = xs
        if amx:
            loss_T, correct_T = amx_kernel.chunk_stats(
                *_tokens(x_BKD, targets_BK, weights_BK), columns, table_VD.shape[0])
            loss, correct = loss_T.sum(), correct_T.sum()
        else:
            loss, correct = _chunk_loss(_chunk_logits(x_BKD, table_VD), targets_BK,
                                        weights_BK)
        return (totals[0] + loss, totals[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(body, (zero, zero), (x_CBKD, targets_CBK, weights_CBK))
    return totals


def _fused_loss_fwd(x_CBKD, table_VD, targets_CBK, weights_CBK):
    amx = _amx(x_CBKD, table_VD)
    chunks = x_CBKD.shape[0]
    if amx:  # the table packed once per step for the kernel's two products
        columns, rows = amx_kernel.pack(table_VD)

    def body(carry, xs):
        loss_sum, correct_sum, dtable_DV = carry
        x_BKD, targets_BK, weights_BK = xs
        if amx:
            loss_T, correct_T, dx_TD, dtable_DV = amx_kernel.chunk_grads(
                *_tokens(x_BKD, targets_BK, weights_BK), columns, rows, dtable_DV)
            dx_BKD = dx_TD.reshape(x_BKD.shape).astype(x_BKD.dtype)
            return (loss_sum + loss_T.sum(), correct_sum + correct_T.sum(), dtable_DV), dx_BKD
        loss, correct, dlogits_BKV = _chunk_loss_and_grad(
            _chunk_logits(x_BKD, table_VD), targets_BK, weights_BK, x_BKD.dtype)
        dx_BKD = jnp.einsum("bkv,vd->bkd", dlogits_BKV, table_VD,
                            preferred_element_type=jnp.float32).astype(x_BKD.dtype)
        # accumulated as [D, V]: the product then contracts both operands over their
        # leading (token) axis with the [tokens, V] gradient as the canonical right-hand
        # side; as [V, D] XLA copied that gradient transposed in every chunk
        dtable_DV = _add_table_grad(dtable_DV, x_BKD, dlogits_BKV, chunks > 1)
        return (loss_sum + loss, correct_sum + correct, dtable_DV), dx_BKD

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(table_VD.shape[::-1], jnp.float32))
    (loss_sum, correct_sum, dtable_DV), dx_CBKD = jax.lax.scan(
        body, init, (x_CBKD, targets_CBK, weights_CBK))
    return (loss_sum, correct_sum), (dx_CBKD, dtable_DV.T.astype(table_VD.dtype))


# From this vocabulary on the kernel's 256-column tasks keep both threads busy (a
# 65-character table ran as one task: the `char_lm:baby` step 0.988x)
_ACC_KERNEL_VOCAB = 2048


def _add_table_grad(dtable_DV, x_BKD, dlogits_BKV, several: bool):
    """dtable_DV + x_BKDᵀ dlogits_BKV over the chunk's tokens. On AVX-512 CPUs (fp32, a
    large vocabulary) lm's product kernel adds into the accumulator in place: XLA's
    product with the sum fused took 52 ms per GPT 4x256 chunk, 32 ms without the sum;
    the kernel ~41 with it (lm.kernels.gemm; the GPT step 1.10x). With one chunk
    (`several` False) XLA drops the sum with zeros and its product alone is faster (the
    BERT step, one 320-row chunk, ran 0.987x through the kernel)."""
    x_TD = x_BKD.reshape(-1, x_BKD.shape[-1])
    g_TV = dlogits_BKV.reshape(-1, dlogits_BKV.shape[-1])
    if several and g_TV.shape[1] >= _ACC_KERNEL_VOCAB and gemm_kernel.usable_acc(
            dtable_DV, jax.ShapeDtypeStruct(x_TD.shape[::-1], x_TD.dtype), g_TV):
        return gemm_kernel.matmul_acc(dtable_DV, x_TD.T, g_TV)
    return dtable_DV + jnp.einsum("td,tv->dv", x_TD, g_TV, preferred_element_type=jnp.float32)


def _fused_loss_bwd(residuals, cotangents):
    dx_CBKD, dtable_VD = residuals
    g = cotangents[0]  # the correct count is not differentiable
    return ((g * dx_CBKD).astype(dx_CBKD.dtype), (g * dtable_VD).astype(dtable_VD.dtype),
            None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


def cross_entropy_sums(logits_BKV: jnp.ndarray, targets_BK: jnp.ndarray,
                       weights_BK: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(sum of w * cross-entropy, sum of w * correct) over materialised logits, where
    correct = the target's logit is the largest (exact ties count). Rows of weight 0
    contribute nothing, whatever their logits (a non-finite logit there cannot leak).

    Differentiable in the logits, as one chunk of the fused loss: both sums and the
    gradient are computed in the forward pass (the derivative of a summed loss needs only
    its scalar cotangent), on the CPU by one kernel in one read of the logits."""
    logits = logits_BKV.astype(jnp.float32)
    weights = weights_BK.astype(jnp.float32)
    if not ce_kernel.usable(logits):  # the kernel skips rows of weight 0 itself
        # replaced, not only weighted: 0 * inf is NaN, in the sums and in the gradient
        logits = jnp.where(weights[..., None] > 0, logits, 0.0)
    return _summed_loss(logits, targets_BK, weights)


@jax.custom_vjp
def _summed_loss(logits_BKV, targets_BK, weights_BK):
    return _chunk_loss(logits_BKV, targets_BK, weights_BK)


def _summed_loss_fwd(logits_BKV, targets_BK, weights_BK):
    loss, correct, dlogits_BKV = _chunk_loss_and_grad(logits_BKV, targets_BK, weights_BK,
                                                      jnp.float32)
    return (loss, correct), dlogits_BKV


def _summed_loss_bwd(dlogits_BKV, cotangents):
    # the correct count is not differentiable; the weights are data
    return cotangents[0] * dlogits_BKV, None, None


_summed_loss.defvjp(_summed_loss_fwd, _summed_loss_bwd)
