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

Metrics = dict[str, tuple[jnp.ndarray, jnp.ndarray]]


def token_cross_entropy(logits_BLV: jnp.ndarray, targets_BL: jnp.ndarray,
                        weights_BL: jnp.ndarray, accuracy: bool = True) -> Metrics:
    """Weighted next-token loss (and accuracy) as (sum, count) from materialised logits.

    Accuracy costs one more pass over the [B, L, V] logits, so training steps leave it
    to evaluation."""
    ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32),
                                                            targets_BL)
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
    and softmax are fp32); `chunk` tokens are projected at a time (0 = all at once; a
    last partial chunk is padded with zero-weight tokens). Differentiable in `x` and
    `table`."""
    d = x_BLD.shape[-1]
    x_ND = x_BLD.reshape(-1, d)
    targets_N = targets_BL.reshape(-1)
    weights_N = weights_BL.astype(jnp.float32).reshape(-1)
    n = x_ND.shape[0]
    chunk = min(chunk, n) if chunk > 0 else n
    pad = -n % chunk  # padded tokens carry weight 0
    if pad:
        x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
        targets_N = jnp.pad(targets_N, (0, pad))
        weights_N = jnp.pad(weights_N, (0, pad))
    x_CKD = x_ND.reshape(-1, chunk, d)
    targets_CK = targets_N.reshape(-1, chunk)
    weights_CK = weights_N.reshape(-1, chunk)
    loss_sum, correct = _fused_loss(x_CKD, table_VD, targets_CK, weights_CK)
    count = weights_BL.astype(jnp.float32).sum()
    out = {"loss": (loss_sum, count)}
    if accuracy:
        out["accuracy"] = (jax.lax.stop_gradient(correct), count)
    return out


def _chunk_logits(x_KD, table_VD):
    return jnp.einsum("kd,vd->kv", x_KD, table_VD, preferred_element_type=jnp.float32)


def _chunk_stats(logits_KV, targets_K, weights_K):
    """(weighted loss sum, weighted correct count, exp(logits - max), sum of those)."""
    max_K1 = logits_KV.max(-1, keepdims=True)
    exp_KV = jnp.exp(logits_KV - max_K1)
    sum_K1 = exp_KV.sum(-1, keepdims=True)
    target_K = jnp.take_along_axis(logits_KV, targets_K[:, None], -1)[:, 0]
    loss_K = (max_K1[:, 0] + jnp.log(sum_K1[:, 0]) - target_K) * weights_K
    # ties count as correct, unlike argmax's first-index rule: equal only on exact ties
    correct_K = (target_K >= max_K1[:, 0]).astype(jnp.float32) * weights_K
    return loss_K.sum(), correct_K.sum(), exp_KV, sum_K1


@jax.custom_vjp
def _fused_loss(x_CKD, table_VD, targets_CK, weights_CK):
    def body(totals, xs):
        x_KD, targets_K, weights_K = xs
        loss, correct, _, _ = _chunk_stats(_chunk_logits(x_KD, table_VD), targets_K, weights_K)
        return (totals[0] + loss, totals[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    totals, _ = jax.lax.scan(body, (zero, zero), (x_CKD, targets_CK, weights_CK))
    return totals


def _fused_loss_fwd(x_CKD, table_VD, targets_CK, weights_CK):
    vocab = table_VD.shape[0]

    def body(carry, xs):
        loss_sum, correct_sum, dtable_VD = carry
        x_KD, targets_K, weights_K = xs
        logits_KV = _chunk_logits(x_KD, table_VD)
        loss, correct, exp_KV, sum_K1 = _chunk_stats(logits_KV, targets_K, weights_K)
        onehot_KV = jnp.arange(vocab, dtype=targets_K.dtype)[None, :] == targets_K[:, None]
        dlogits_KV = ((exp_KV / sum_K1 - onehot_KV) * weights_K[:, None]).astype(x_KD.dtype)
        dx_KD = jnp.einsum("kv,vd->kd", dlogits_KV, table_VD,
                           preferred_element_type=jnp.float32).astype(x_KD.dtype)
        dtable_VD = dtable_VD + jnp.einsum("kv,kd->vd", dlogits_KV, x_KD,
                                           preferred_element_type=jnp.float32)
        return (loss_sum + loss, correct_sum + correct, dtable_VD), dx_KD

    zero = jnp.zeros((), jnp.float32)
    init = (zero, zero, jnp.zeros(table_VD.shape, jnp.float32))
    (loss_sum, correct_sum, dtable_VD), dx_CKD = jax.lax.scan(
        body, init, (x_CKD, targets_CK, weights_CK))
    return (loss_sum, correct_sum), (dx_CKD, dtable_VD.astype(table_VD.dtype))


def _fused_loss_bwd(residuals, cotangents):
    dx_CKD, dtable_VD = residuals
    g = cotangents[0]  # the correct count is not differentiable
    return ((g * dx_CKD).astype(dx_CKD.dtype), (g * dtable_VD).astype(dtable_VD.dtype),
            None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
