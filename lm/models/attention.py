"""Scaled dot-product attention and the multi-head (grouped key/value) attention layer.

Two interchangeable implementations of softmax(Q Kᵀ / √K) V behind `impl`:
  'einsum'  the reference: explicit logits in fp32, supports dropout and returns the
            probabilities for inspection;
  'xla'     `jax.nn.dot_product_attention(implementation='xla')`;
  'cudnn'   the same call with the fused cuDNN kernel (GPU only; causal + right padding
            become kernel flags, any other mask is passed as a table).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from lm.kernels import attention as cpu_kernels
from lm.models import custom_grads
from lm.models import positions as pos_lib
from lm.models.config import ModelConfig
from lm.models.custom_grads import add_bias, dense_product, mixed_einsum, on_cpu, softmax
from lm.models.masks import Mask
from lm.sharding import constrain

_NEG = -1e30  # large finite negative: fully masked rows stay NaN-free


def dot_product_attention(
    q_BLHK: jnp.ndarray,
    k_BSGK: jnp.ndarray,
    v_BSGK: jnp.ndarray,
    mask: Mask | None = None,
    *,
    bias_BHLS: jnp.ndarray | None = None,
    impl: str = "einsum",
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    return_probs: bool = False,
    scale: float | None = None,
) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
    """Attention over G key/value heads shared by H // G query heads each; the logits are
    q·k times `scale` (None: 1/sqrt(K); T5 uses 1).

    Rows whose every key is masked (padding queries) produce an unspecified but finite
    output; callers ignore them.
    """
    b, length, h, k = q_BLHK.shape
    g = k_BSGK.shape[2]
    if h % g:
        raise ValueError(f"{h} query heads are not a multiple of {g} key/value heads")
    dropout = dropout_rate > 0 and dropout_rng is not None
    if impl != "einsum" and not return_probs and not dropout:
        return _fused_attention(q_BLHK, k_BSGK, v_BSGK, mask, bias_BHLS, impl, scale)

    if (_kernel_applies(impl, bias_BHLS, dropout, return_probs)
            and cpu_kernels.usable(q_BLHK, k_BSGK, v_BSGK)):
        return cpu_kernels.attention(q_BLHK, k_BSGK, v_BSGK,
                                     *_kernel_mask_and_scale(mask, q_BLHK, k_BSGK, scale))

    r = h // g
    # The logits as [B, G, R, L, S] (R = H // G query heads per key/value head) only for
    # true groups, else as [B, H, L, S]: on XLA:CPU a reduction over a table with an axis
    # of size 1 (the softmax and its backward over [B, G, 1, L, S]) ran 6-20x slower
    # (benchmarks/cpu_ops.py, ops softmax_bwd_*).
    grouped = r > 1 and g > 1
    q, keys, values = q_BLHK, k_BSGK, v_BSGK
    if grouped:
        q = q_BLHK.reshape(b, length, g, r, k)
        spec_logits, spec_out = "blgrk,bsgk->bgrls", "bgrls,bsgk->blgrk"
    elif g == 1:  # one key/value head for all query heads
        keys, values = k_BSGK[:, :, 0], v_BSGK[:, :, 0]
        spec_logits, spec_out = "blhk,bsk->bhls", "bhls,bsk->bhlk"
    else:  # a key/value head per query head
        spec_logits, spec_out = "blhk,bshk->bhls", "bhls,bshk->bhlk"
    if scale != 1.0:
        q = q * jnp.asarray(k**-0.5 if scale is None else scale, q.dtype)
    logits = jnp.einsum(spec_logits, q, keys, preferred_element_type=jnp.float32)
    if bias_BHLS is not None:
        bias = bias_BHLS.astype(jnp.float32)
        logits += bias.reshape(bias.shape[0], g, r, *bias.shape[2:]) if grouped else bias
    if mask is not None:
        allowed = mask.allowed()  # [B, 1, L, S]
        logits = jnp.where(allowed[:, :, None] if grouped else allowed, logits, _NEG)
    probs = softmax(logits) if on_cpu() else jax.nn.softmax(logits, axis=-1)
    if dropout_rate > 0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    out = mixed_einsum(spec_out, probs.astype(values.dtype), values)
    if not grouped:  # head-major, then transposed: asked for [B, L, H, K] directly,
        # XLA:CPU computed the product transposed (values copied to [K, S]), a 1.05-1.14x
        # slower validation forward for char_lm:baby (benchmarks/ab.py)
        out = out.transpose(0, 2, 1, 3)
    out_BLHK = out.reshape(b, length, h, k)
    if return_probs:
        return out_BLHK, probs.reshape(b, h, length, -1)
    return out_BLHK


def packed_self_attention(qkv_BLCK: jnp.ndarray, mask: Mask | None, heads: int,
                          scale: float | None) -> jnp.ndarray:
    """`dot_product_attention` of self-attention through the CPU kernel, on the packed
    projection [B, L, H + 2G, K] (`packed_qkv`) read in place; the caller checks that the
    kernel applies (`_kernel_applies`, `cpu_kernels.packed_usable`)."""
    return cpu_kernels.attention_packed(
        qkv_BLCK, *_kernel_mask_and_scale(mask, qkv_BLCK, qkv_BLCK, scale), heads)


def _kernel_applies(impl: str, bias_BHLS, dropout: bool, return_probs: bool) -> bool:
    """Whether the CPU attention kernel computes what was asked (it has no logit bias,
    dropout or probabilities to return); the operands' dtype is checked separately."""
    return impl == "einsum" and bias_BHLS is None and not dropout and not return_probs


def _kernel_mask_and_scale(mask: Mask | None, queries, keys, scale: float | None):
    """The kernel's boolean table [B, L, S] of allowed keys and its logit scale, for
    queries [B, L, .., K] and keys [B, S, ..]."""
    b, length, *_, k = queries.shape
    allowed = (jnp.ones((b, length, keys.shape[1]), bool) if mask is None
               else mask.allowed()[:, 0])
    return allowed, k**-0.5 if scale is None else scale


def _fused_attention(q, k, v, mask: Mask | None, bias, impl: str, scale: float | None
                     ) -> jnp.ndarray:
    kwargs: dict = {}
    if mask is not None:
        simple = impl == "cudnn" and not mask.packed and mask.kv_prefix is None
        if simple:  # causal and right padding map onto kernel flags
            kwargs["is_causal"] = mask.causal
            kwargs["query_seq_lengths"] = (mask.q_segment_ids != 0).sum(-1).astype(jnp.int32)
            kwargs["key_value_seq_lengths"] = (mask.kv_segment_ids != 0).sum(-1).astype(
                jnp.int32)
        else:
            kwargs["mask"] = mask.allowed()
    if bias is not None:
        kwargs["bias"] = bias.astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=impl, **kwargs)


def _dense(cfg: ModelConfig, features: int | tuple[int, ...], axes: tuple[str, ...], name: str,
           in_axis: int | tuple[int, ...] = -1, init_scale: float = 1.0) -> nn.Module:
    """DenseGeneral with logical axis names; the bias takes the names of the output axes."""
    n_out = len(features) if isinstance(features, tuple) else 1
    return nn.DenseGeneral(
        features=features,
        axis=in_axis,
        use_bias=cfg.use_bias,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.params_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std * init_scale), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[-n_out:]),
        name=name,
    )


class Projection(nn.Module):
    """The parameters of `_dense(cfg, features, axes, ...)` (kernel [*in_shape, *features],
    bias [*features]; same names, shapes, partitioning and initial values) without
    applying them, so the layer can run its own products (the query, key and value
    projections as one; the output projection as one 2-D product)."""

    cfg: ModelConfig
    features: tuple[int, ...]
    axes: tuple[str, ...]
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, in_shape: int | tuple[int, ...]):
        cfg, n = self.cfg, len(self.features)
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)

        def flat_init(init, flat_shape):
            def wrapped(rng, shape, dtype=jnp.float32):  # as DenseGeneral: init flat, reshape
                boxed = init(rng, flat_shape, dtype)
                return meta.replace_boxed(boxed, jnp.reshape(boxed.unbox(), shape))
            return wrapped

        size = int(np.prod(self.features))
        kernel = self.param("kernel", flat_init(nn.with_logical_partitioning(
            nn.initializers.normal(cfg.init_std * self.init_scale), self.axes),
            (int(np.prod(in_shape)), size)), (*in_shape, *self.features), cfg.params_dtype)
        bias = None
        if cfg.use_bias:
            bias = self.param("bias", flat_init(nn.with_logical_partitioning(
                nn.initializers.zeros_init(), self.axes[-n:]), (size,)),
                self.features, cfg.params_dtype)
        return kernel, bias


def out_projection(cfg: ModelConfig, x_BLHK: jnp.ndarray, kernel_HKD, bias_D) -> jnp.ndarray:
    """The attention's output projection [B, L, H, K] x [H, K, D] as one [N, H K] x
    [H K, D] product (`dense_product`, CPU). Through DenseGeneral's two contracted axes
    XLA:CPU copied the kernel and the gradients transposed around every product
    (`char_lm:baby`: 8 of its 39 transposed copies)."""
    dtype = cfg.compute_dtype
    b, length, h, k = x_BLHK.shape
    kernel = jnp.asarray(kernel_HKD, dtype).reshape(h * k, -1)
    y = dense_product(x_BLHK.astype(dtype).reshape(b, length, h * k), kernel)
    return y if bias_D is None else add_bias(y, jnp.asarray(bias_D, dtype))


def packed_qkv(cfg: ModelConfig, x_BLD: jnp.ndarray, params) -> jnp.ndarray:
    """The query, key and value projections as one product into the packed layout [B, L,
    H + 2G, K] that `cpu_kernels.attention_packed` reads in place; its backward pass is
    the two products of `dense_product` on the one packed cotangent (the kernels'
    gradients are slices of one [D, (H + 2G) K] product)."""
    dtype = cfg.compute_dtype
    kernels = [jnp.asarray(kernel, dtype) for kernel, _ in params]
    y = dense_product(x_BLD.astype(dtype), jnp.concatenate(_flat(kernels), axis=1))
    if params[0][1] is not None:
        y = add_bias(y, jnp.concatenate([jnp.asarray(b, dtype).reshape(-1) for _, b in params]))
    return y.reshape(*x_BLD.shape[:-1], -1, kernels[0].shape[-1])


def _flat(kernels_DNK) -> list[jnp.ndarray]:
    """Each [D, N, K] kernel as [D, N K] (a bitcast)."""
    return [w.reshape(w.shape[0], -1) for w in kernels_DNK]


def fused_qkv(cfg: ModelConfig, x_BLD: jnp.ndarray, params) -> list[jnp.ndarray]:
    """The query, key and value projections of self-attention in the compute dtype:
    forward as one product with the kernels concatenated over heads ([D, H + 2G, K]),
    backward as the three separate products (no concatenated cotangent to copy).

    On CPU one [N, D] x [D, (H + 2G) K] product runs faster than three (`char_lm:baby`:
    the forward projections 2.8 -> 1.6 ms of its step; through autodiff the backward
    pass concatenated the three cotangents, 1.4 ms, which the hand-written one avoids)."""
    dtype = cfg.compute_dtype
    kernels = [jnp.asarray(kernel, dtype) for kernel, _ in params]
    outs = _qkv_product(x_BLD.astype(dtype), *kernels)
    return [o if b is None else add_bias(o, jnp.asarray(b, dtype))
            for o, (_, b) in zip(outs, params, strict=True)]


@jax.custom_vjp
def _qkv_product(x_BLD, *kernels_DNK):
    """The products as 2-D ones ([N, D] x [D, C], C = N K of a kernel): written over the
    [B, L, N, K] axes, XLA:CPU's layout assignment copied every kernel and every
    cotangent transposed to [.., K, N] for the backward products (`char_lm:baby`: 24 of
    its 39 transposed copies)."""
    x_ND = x_BLD.reshape(-1, x_BLD.shape[-1])
    flat = _flat(kernels_DNK)
    qkv_NC = custom_grads.mixed_dot(x_ND, jnp.concatenate(flat, axis=1))
    parts = jnp.split(qkv_NC, np.cumsum([w.shape[1] for w in flat])[:-1], axis=1)
    return tuple(p.reshape(*x_BLD.shape[:-1], *w.shape[1:])
                 for p, w in zip(parts, kernels_DNK, strict=True))


def _qkv_fwd(x_BLD, *kernels_DNK):
    return _qkv_product(x_BLD, *kernels_DNK), (x_BLD, kernels_DNK)


def _qkv_bwd(res, grads):
    x_BLD, kernels_DNK = res
    x_ND = x_BLD.reshape(-1, x_BLD.shape[-1])
    gs = [g.reshape(x_ND.shape[0], -1) for g in grads]
    ws = _flat(kernels_DNK)
    nt = (((1,), (1,)), ((), ()))
    dx_ND = sum(jax.lax.dot_general(g, w, nt, preferred_element_type=jnp.float32)
                for g, w in zip(gs, ws, strict=True))
    dws = [custom_grads.weight_grad(x_ND, g).reshape(w.shape)
           for g, w in zip(gs, kernels_DNK, strict=True)]
    return (dx_ND.reshape(x_BLD.shape).astype(x_BLD.dtype), *dws)


_qkv_product.defvjp(_qkv_fwd, _qkv_bwd)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads, RoPE and an optional KV cache.

    Parameters: query [D,H,K], key/value [D,G,K], out [H,K,D] (+ biases when
    `use_bias`). With `decode=True` the keys and values of every call are written into a
    static cache of `cache_len` slots at the index kept in the 'cache' collection; the
    mask passed in must then describe the whole cache (see `Decoder`).
    """

    cfg: ModelConfig
    cross: bool = False
    decode: bool = False
    cache_len: int = 0
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, mask: Mask | None, *, kv_BSD: jnp.ndarray | None = None,
                 bias_BHLS: jnp.ndarray | None = None, deterministic: bool = True):
        cfg = self.cfg
        h, g, k = cfg.num_heads, cfg.kv_heads, cfg.head_size
        # Without run-time scaling (T5) the query init carries the 1/sqrt(K).
        q_scale = 1.0 if cfg.scale_attention else k**-0.5
        axes = ("embed", "heads", "kv")
        # Inspection: apply(..., mutable=['intermediates']) records the probabilities
        # (through the reference path) under intermediates/.../attention_probs.
        return_probs = self.is_mutable_collection("intermediates")
        scale = None if cfg.scale_attention else 1.0
        dropout = not deterministic and cfg.attention_dropout_rate > 0
        if on_cpu():
            out_params = Projection(cfg, (cfg.d_model,), ("heads", "kv", "embed"),
                                    self.out_init_scale, name="out")((h, k))
            out = lambda x_BLHK: out_projection(cfg, x_BLHK, *out_params)  # noqa: E731
        else:
            out = _dense(cfg, cfg.d_model, ("heads", "kv", "embed"), "out", in_axis=(-2, -1),
                         init_scale=self.out_init_scale)
        if kv_BSD is None and on_cpu():
            params = [Projection(cfg, (n, k), axes, s, name=name)(x_BLD.shape[-1])
                      for n, s, name in ((h, q_scale, "query"), (g, 1.0, "key"),
                                         (g, 1.0, "value"))]
            if (not self.decode and cfg.position != "rope"
                    and _kernel_applies(cfg.attention_impl, bias_BHLS, dropout, return_probs)
                    and cpu_kernels.packed_usable(cfg.compute_dtype)):
                qkv_BLCK = constrain(packed_qkv(cfg, x_BLD, params),
                                     ("batch", "length", None, "act_kv"))
                return out(packed_self_attention(qkv_BLCK, mask, h, scale))
            q_BLHK, k_BSGK, v_BSGK = fused_qkv(cfg, x_BLD, params)
        else:
            q_BLHK = _dense(cfg, (h, k), axes, "query", init_scale=q_scale)(x_BLD)
            source = x_BLD if kv_BSD is None else kv_BSD
            k_BSGK = _dense(cfg, (g, k), axes, "key")(source)
            v_BSGK = _dense(cfg, (g, k), axes, "value")(source)
        if cfg.position == "rope" and not self.cross and mask is not None:
            q_BLHK = pos_lib.apply_rope(q_BLHK, mask.q_positions, cfg.rope_theta)
            k_BSGK = pos_lib.apply_rope(k_BSGK, mask.q_positions, cfg.rope_theta)
        q_BLHK = constrain(q_BLHK, ("batch", "length", "act_heads", "act_kv"))
        if self.decode and not self.cross:
            cache = self._update_cache(k_BSGK, v_BSGK)  # None at init (shapes only)
            if cache is not None and q_BLHK.shape[1] == 1 and not return_probs:
                return out(cached_attention(q_BLHK, *cache, mask, bias_BHLS, scale,
                                            kernel=cfg.attention_impl == "einsum"))
            if cache is not None:
                k_BSGK, v_BSGK = _cache_views(*cache, q_BLHK.shape[0])

        rng = self.make_rng("dropout") if dropout else None
        result = dot_product_attention(
            q_BLHK, k_BSGK, v_BSGK, mask, bias_BHLS=bias_BHLS, impl=cfg.attention_impl,
            dropout_rate=cfg.attention_dropout_rate, dropout_rng=rng, return_probs=return_probs,
            scale=scale)
        out_BLHK, probs = result if return_probs else (result, None)
        if return_probs:
            self.sow("intermediates", "attention_probs", probs)
        return out(out_BLHK)

    def _update_cache(self, k_BLGK: jnp.ndarray, v_BLGK: jnp.ndarray):
        """Writes this call's keys/values at the cache index and returns the whole cache:
        (keys [B*G, K, S], values [B*G, S, K]); None at init.

        Those are the operand layouts of q·kᵀ and p·v batched over (B, G), which XLA:CPU
        reads in place; stored [B, S, G, K], every layer's cache was copied into them at
        every decoded token. Rows and key/value heads share one axis because with a
        separate batch axis of size 1 XLA fused the cache update a second time into the
        dot's operand and copied the cache three times per token. `lm.models.cache`
        gives code that picks rows the [B, G, ...] view."""
        b, length, g, k = k_BLGK.shape
        s = self.cache_len
        initialized = self.has_variable("cache", "cached_key")
        ck = self.variable("cache", "cached_key", jnp.zeros, (b * g, k, s), k_BLGK.dtype)
        cv = self.variable("cache", "cached_value", jnp.zeros, (b * g, s, k), v_BLGK.dtype)
        ci = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
        if not initialized:
            return None
        ck.value = jax.lax.dynamic_update_slice(
            ck.value, k_BLGK.transpose(0, 2, 3, 1).reshape(b * g, k, length), (0, 0, ci.value))
        cv.value = jax.lax.dynamic_update_slice(
            cv.value, v_BLGK.swapaxes(1, 2).reshape(b * g, length, k), (0, ci.value, 0))
        ci.value = ci.value + length
        return ck.value, cv.value


def _cache_views(ck_NKS: jnp.ndarray, cv_NSK: jnp.ndarray, batch: int):
    """The stored cache as [B, S, G, K] keys and values (views, for several queries)."""
    n, k, s = ck_NKS.shape
    g = n // batch
    return (ck_NKS.reshape(batch, g, k, s).transpose(0, 3, 1, 2),
            cv_NSK.reshape(batch, g, s, k).swapaxes(1, 2))


def cached_attention(q_B1HK: jnp.ndarray, ck_NKS: jnp.ndarray, cv_NSK: jnp.ndarray,
                     mask: Mask | None, bias_BHLS: jnp.ndarray | None, scale: float | None,
                     *, kernel: bool = False) -> jnp.ndarray:
    """One query per row over the stored cache (a decode step): `dot_product_attention`'s
    einsum path written on the cache's own [B*G, ...] layout, so both products read it in
    place. Logits and softmax in fp32; returns [B, 1, H, K]. With `kernel`, fp32 operands
    on the CPU go to lm's decoding kernel (with the logit bias if any), which reads only
    the filled part of the cache (`lm.kernels.attention.cached`)."""
    b, _, h, k = q_B1HK.shape
    n, _, s = ck_NKS.shape
    g = n // b
    r = h // g
    q_NRK = q_B1HK.reshape(n, r, k)
    if (kernel and q_NRK.dtype == ck_NKS.dtype == cv_NSK.dtype
            and cpu_kernels.packed_usable(q_NRK.dtype)):
        allowed_BS = jnp.ones((b, s), bool) if mask is None else mask.allowed()[:, 0, 0]
        bias_NRS = None if bias_BHLS is None else jnp.broadcast_to(
            bias_BHLS.astype(jnp.float32), (b, h, 1, s)).reshape(n, r, s)
        scale = k**-0.5 if scale is None else scale
        return cpu_kernels.cached(q_NRK, ck_NKS, cv_NSK, allowed_BS, scale,
                                  bias_NRS).reshape(b, 1, h, k)
    if scale != 1.0:
        q_NRK = q_NRK * jnp.asarray(k**-0.5 if scale is None else scale, q_NRK.dtype)
    logits_NRS = jnp.einsum("nrk,nks->nrs", q_NRK, ck_NKS, preferred_element_type=jnp.float32)
    if bias_BHLS is not None:
        bias = jnp.broadcast_to(bias_BHLS.astype(jnp.float32), (b, h, 1, s))
        logits_NRS += bias.reshape(n, r, s)
    if mask is not None:
        allowed_BGS = jnp.broadcast_to(mask.allowed()[:, 0, :1], (b, g, s))
        logits_NRS = jnp.where(allowed_BGS.reshape(n, 1, s), logits_NRS, _NEG)
    probs_NRS = jax.nn.softmax(logits_NRS, axis=-1)
    out_NRK = jnp.einsum("nrs,nsk->nrk", probs_NRS.astype(cv_NSK.dtype), cv_NSK)
    return out_NRK.reshape(b, 1, h, k)
