"""Building blocks: token embeddings, norms, MLPs and the Transformer block."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.kernels import logits as logits_kernel
from lm.models.attention import Attention
from lm.models.config import ModelConfig
from lm.models.custom_grads import (
    add_bias,
    dense_product,
    gelu,
    gelu_tanh,
    layer_norm,
    materialize_grad,
    on_cpu,
    tied_product,
)
from lm.models.masks import Mask
from lm.sharding import constrain


def param_init(cfg: ModelConfig, axes: tuple[str, ...], init=None):
    """Initializer tagged with logical axis names (the sharding rules read them)."""
    return nn.with_logical_partitioning(init or nn.initializers.normal(cfg.init_std), axes)


class Embed(nn.Module):
    """Token embedding table [V, D]; `attend` is the tied output projection."""

    cfg: ModelConfig
    num_embeddings: int
    axes: tuple[str, str] = ("vocab", "embed")

    def setup(self) -> None:
        self.embedding = self.param("embedding", param_init(self.cfg, self.axes),
                                    (self.num_embeddings, self.cfg.d_model), self.cfg.params_dtype)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(jnp.asarray(self.embedding, self.cfg.compute_dtype), ids, axis=0)

    def attend(self, x_BLD: jnp.ndarray) -> jnp.ndarray:
        return tied_logits(x_BLD, self.embedding, self.cfg.compute_dtype)


def tied_logits(x_BLD: jnp.ndarray, table_VD: jnp.ndarray, dtype) -> jnp.ndarray:
    """x @ Eᵀ in the compute dtype with fp32 accumulation and output (logits are fp32)."""
    x_BLD, table_VD = x_BLD.astype(dtype), jnp.asarray(table_VD, dtype)
    if on_cpu() and x_BLD.dtype == table_VD.dtype == jnp.float32:
        if logits_kernel.usable(x_BLD, table_VD):  # decoding: a few rows
            return logits_kernel.small_logits(x_BLD, table_VD)
        return tied_product(x_BLD, table_VD)
    return jnp.einsum("bld,vd->blv", x_BLD, table_VD, preferred_element_type=jnp.float32)


class Norm(nn.Module):
    """LayerNorm (scale + bias unless `norm_bias=False`) or RMSNorm (scale only), in fp32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        scale = self.param("scale", param_init(cfg, ("embed",), nn.initializers.ones_init()),
                           (x.shape[-1],), cfg.params_dtype)
        if cfg.norm == "rmsnorm":
            x32 = x.astype(jnp.float32)
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + cfg.norm_eps)
            return (y * scale).astype(cfg.compute_dtype)
        bias = None
        if cfg.norm_bias:
            bias = self.param("bias", param_init(cfg, ("embed",), nn.initializers.zeros_init()),
                              (x.shape[-1],), cfg.params_dtype)
        return layer_norm(x, scale, bias, cfg.norm_eps).astype(cfg.compute_dtype)


def activation(name: str, x: jnp.ndarray) -> jnp.ndarray:
    if name in ("gelu", "geglu"):
        return gelu(x)
    if name in ("gelu_tanh", "geglu_tanh"):
        return gelu_tanh(x)
    if name == "swiglu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


class Dense(nn.Module):
    """x @ kernel [+ bias], kernel/bias named by logical axes, computed in the compute dtype
    (parameters `kernel` [in, out] and `bias` [out] directly under this module)."""

    cfg: ModelConfig
    features: int
    axes: tuple[str, str]
    init_scale: float = 1.0
    use_bias: bool | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.cfg
        kernel = self.param(
            "kernel", param_init(cfg, self.axes, nn.initializers.normal(
                cfg.init_std * self.init_scale)),
            (x.shape[-1], self.features), cfg.params_dtype)
        x, kernel = x.astype(cfg.compute_dtype), jnp.asarray(kernel, cfg.compute_dtype)
        y = dense_product(x, kernel) if on_cpu() else jnp.dot(x, kernel)
        if cfg.use_bias if self.use_bias is None else self.use_bias:
            bias = self.param("bias", param_init(cfg, self.axes[-1:],
                                                 nn.initializers.zeros_init()),
                              (self.features,), cfg.params_dtype)
            y = add_bias(y, jnp.asarray(bias, cfg.compute_dtype))
        return y


class Mlp(nn.Module):
    """Position-wise feed-forward: D -> F -> D, gated (SwiGLU/GeGLU) or not."""

    cfg: ModelConfig
    out_init_scale: float = 1.0

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, deterministic: bool = True) -> jnp.ndarray:
        cfg = self.cfg
        h_BLF = Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name="wi")(x_BLD)
        h_BLF = activation(cfg.activation, h_BLF)
        if cfg.gated:
            h_BLF = h_BLF * Dense(cfg, cfg.mlp_dim, ("embed", "mlp"), name="wi_up")(x_BLD)
        h_BLF = constrain(h_BLF, ("batch", "length", "act_mlp"))
        h_BLF = nn.Dropout(cfg.dropout_rate)(h_BLF, deterministic=deterministic)
        return Dense(cfg, cfg.d_model, ("mlp", "embed"), self.out_init_scale, name="wo")(h_BLF)


class Block(nn.Module):
    """Self-attention [+ cross-attention] + MLP with residuals, pre-LN or post-LN.

    pre-LN:  x + f(norm(x))   (GPT-2, T5, LLaMA; a final norm follows the stack)
    post-LN: norm(x + f(x))   (BERT, the original Transformer)
    """

    cfg: ModelConfig
    cross: bool = False
    decode: bool = False
    cache_len: int = 0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BLD: jnp.ndarray, mask: Mask, encoded_BSD: jnp.ndarray | None,
                 cross_mask: Mask | None, self_bias: jnp.ndarray | None,
                 cross_bias: jnp.ndarray | None) -> jnp.ndarray:
        cfg = self.cfg
        scale = (2 * (cfg.num_layers + (cfg.decoder_layers if self.cross else 0))) ** -0.5 \
            if cfg.pre_norm else 1.0
        det = self.deterministic

        def sublayer(x, name, fn):
            if on_cpu():
                x = materialize_grad(x)
            drop = nn.Dropout(cfg.dropout_rate)
            if cfg.pre_norm:
                return x + drop(fn(Norm(cfg, name=f"{name}_norm")(x)), deterministic=det)
            return Norm(cfg, name=f"{name}_norm")(x + drop(fn(x), deterministic=det))

        x_BLD = constrain(x_BLD, ("batch", "length", "act_embed"))
        attn = Attention(cfg, decode=self.decode, cache_len=self.cache_len,
                         out_init_scale=scale, name="attention")
        x_BLD = sublayer(x_BLD, "attention",
                         lambda h: attn(h, mask, bias_BHLS=self_bias, deterministic=det))
        if self.cross:
            xattn = Attention(cfg, cross=True, out_init_scale=scale, name="cross_attention")
            x_BLD = sublayer(x_BLD, "cross_attention",
                             lambda h: xattn(h, cross_mask, kv_BSD=encoded_BSD,
                                             bias_BHLS=cross_bias, deterministic=det))
        mlp = Mlp(cfg, out_init_scale=scale, name="mlp")
        return sublayer(x_BLD, "mlp", lambda h: mlp(h, deterministic=det))
