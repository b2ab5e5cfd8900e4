"""Position information: sinusoidal tables, rotary embeddings (RoPE), T5 relative bias.

Positions are always passed in ([B, L] ints), so packed sequences restart at 0 and the
KV cache keeps absolute positions.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np


def sinusoidal(positions_BL: jnp.ndarray, dim: int, max_timescale: float = 10_000.0
               ) -> jnp.ndarray:
    """Vaswani et al. (2017): sin on the first half of the channels, cos on the second."""
    half = dim // 2
    inv = np.exp(-np.log(max_timescale) * np.arange(half) / half)  # 1 / 10000^(2i/D)
    angles = positions_BL[..., None].astype(jnp.float32) * inv
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, dim - 2 * half)])


def apply_rope(x_BLHK: jnp.ndarray, positions_BL: jnp.ndarray, theta: float = 10_000.0
               ) -> jnp.ndarray:
    """Rotates channel pairs (i, i + K/2) by position * theta^(-2i/K) (the GPT-NeoX/LLaMA
    half-split layout), computed in fp32."""
    k = x_BLHK.shape[-1]
    inv_freq = 1.0 / theta ** (np.arange(0, k, 2, dtype=np.float32) / k)
    angles_BLF = positions_BL[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angles_BLF)[:, :, None, :], jnp.cos(angles_BLF)[:, :, None, :]
    x = x_BLHK.astype(jnp.float32)
    x1, x2 = x[..., : k // 2], x[..., k // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BLHK.dtype)


def relative_bucket(relative_BLS: jnp.ndarray, *, bidirectional: bool, num_buckets: int,
                    max_distance: int) -> jnp.ndarray:
    """T5's log-spaced buckets of (key position - query position)."""
    n = -relative_BLS
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    log_ratio = jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / np.log(
        max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


class RelativeBias(nn.Module):
    """Learned per-head bias over relative-position buckets, shared by all layers of a
    stack (T5)."""

    num_heads: int
    num_buckets: int
    max_distance: int
    bidirectional: bool
    init_std: float = 0.02

    @nn.compact
    def __call__(self, relative_BLS: jnp.ndarray) -> jnp.ndarray:
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.init_std),
                                         ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), jnp.float32)
        buckets = relative_bucket(relative_BLS, bidirectional=self.bidirectional,
                                  num_buckets=self.num_buckets, max_distance=self.max_distance)
        return jnp.transpose(jnp.asarray(table)[buckets], (0, 3, 1, 2))  # [B, H, L, S]
