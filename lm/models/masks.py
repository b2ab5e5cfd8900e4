"""Attention masks as a small structure, built once at a model's entry.

A `Mask` holds per-token segment ids and positions for the queries and the keys plus two
flags; `allowed()` materialises the boolean [B,1,L,S] table only inside the attention
function, so a fused kernel can take the compact form instead. One rule covers every kind:

    allowed[b, l, s] = kv_segment[b, s] != 0                     (padding)
                       and q_segment[b, l] == kv_segment[b, s]   (packed segments)
                       and (not causal or kv_pos <= q_pos        (causal)
                            or kv_prefix[b, s])                  (prefix-LM)

Cross-attention sets `same_segment=False` when the two sides number segments differently,
and keeps only the key-side padding (plus query-side padding, which just zeroes rows).
Segment id 0 means padding everywhere in `lm`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Mask:
    q_segment_ids: jnp.ndarray  # [B, L] int, 0 = padding
    kv_segment_ids: jnp.ndarray  # [B, S] int
    q_positions: jnp.ndarray  # [B, L] int
    kv_positions: jnp.ndarray  # [B, S] int
    kv_prefix: jnp.ndarray | None = None  # [B, S] bool: bidirectional prefix tokens
    causal: bool = struct.field(pytree_node=False, default=False)
    same_segment: bool = struct.field(pytree_node=False, default=True)
    # False promises one right-padded sequence per row (no packing), letting fused
    # kernels use sequence lengths instead of a mask table.
    packed: bool = struct.field(pytree_node=False, default=True)

    def allowed(self) -> jnp.ndarray:
        """Boolean [B, 1, L, S] table: may query l attend to key s."""
        q_seg = self.q_segment_ids[:, :, None]
        kv_seg = self.kv_segment_ids[:, None, :]
        ok = (kv_seg != 0) & (q_seg != 0)
        if self.same_segment:
            ok &= q_seg == kv_seg
        if self.causal:
            order = self.kv_positions[:, None, :] <= self.q_positions[:, :, None]
            if self.kv_prefix is not None:
                order |= self.kv_prefix[:, None, :]
            ok &= order
        return ok[:, None, :, :]

    @property
    def relative_positions(self) -> jnp.ndarray:
        """[B, L, S] key position minus query position (for relative position biases)."""
        return self.kv_positions[:, None, :] - self.q_positions[:, :, None]


def default_positions(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Positions that restart at 0 at every new segment (packed sequences)."""
    b, length = segment_ids.shape
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    starts = jnp.concatenate(
        [jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def segments_from_lengths(lengths: jnp.ndarray, length: int) -> jnp.ndarray:
    """[B] valid lengths -> [B, length] segment ids (1 on the first `len` tokens, else 0)."""
    return (jnp.arange(length)[None, :] < lengths[:, None]).astype(jnp.int32)


def self_mask(segment_ids: jnp.ndarray, positions: jnp.ndarray, *, causal: bool,
              prefix: jnp.ndarray | None = None) -> Mask:
    """Self-attention mask for a stack's input (padding + segments [+ causal/prefix])."""
    return Mask(segment_ids, segment_ids, positions, positions,
                kv_prefix=None if prefix is None else prefix.astype(bool), causal=causal)


def prefix_from_lengths(prefix_lengths: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
    """[B] prefix lengths -> [B, S] bool marking the bidirectional prefix (prefix-LM)."""
    return positions < prefix_lengths[:, None]


def cross_mask(q_segment_ids: jnp.ndarray, kv_segment_ids: jnp.ndarray,
               q_positions: jnp.ndarray, kv_positions: jnp.ndarray, *,
               same_segment: bool = False) -> Mask:
    """Decoder-to-encoder mask: key padding always; segment matching when both sides pack
    the same examples under the same segment ids."""
    return Mask(q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                causal=False, same_segment=same_segment)
