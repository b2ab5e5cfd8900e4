"""Transformer stacks: `Encoder` (BERT), `Decoder` (GPT, causal, KV cache) and
`EncoderDecoder` (original Transformer / T5).

Every stack builds its `Mask` once at the entry from `segment_ids` (0 = padding) and
`positions`, and passes it down. Layers run as a Python loop (`layer_0`, `layer_1`, ...)
or as one `nn.scan` layer (`layers`, stacked on a leading axis); `stack_layers` /
`unstack_layers` convert between the two parameter layouts.
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models import masks as masks_lib
from lm.models import positions as pos_lib
from lm.models.config import ModelConfig
from lm.models.layers import Block, Dense, Embed, Norm
from lm.models.masks import Mask

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Embedder(nn.Module):
    """Token + (learned | sinusoidal) position + segment embeddings, optional LayerNorm."""

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.token = Embed(cfg, cfg.vocab_size)
        if cfg.position == "learned":
            self.position = Embed(cfg, cfg.max_len, axes=("position", "embed"))
        if cfg.type_vocab_size:
            self.segment = Embed(cfg, cfg.type_vocab_size, axes=("segment", "embed"))
        if cfg.embed_norm:
            self.norm = Norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(self, ids_BL: jnp.ndarray, positions_BL: jnp.ndarray,
                 token_types_BL: jnp.ndarray | None = None, deterministic: bool = True
                 ) -> jnp.ndarray:
        cfg = self.cfg
        x_BLD = self.token(ids_BL)
        if cfg.scale_embeddings:
            x_BLD = x_BLD * np.sqrt(cfg.d_model).astype(x_BLD.dtype)
        if cfg.position == "learned":
            x_BLD = x_BLD + self.position(positions_BL)
        elif cfg.position == "sinusoidal":
            x_BLD = x_BLD + pos_lib.sinusoidal(positions_BL, cfg.d_model).astype(x_BLD.dtype)
        if cfg.type_vocab_size:
            types = jnp.zeros_like(ids_BL) if token_types_BL is None else token_types_BL
            x_BLD = x_BLD + self.segment(types)
        if cfg.embed_norm:
            x_BLD = self.norm(x_BLD)
        return self.dropout(x_BLD, deterministic=deterministic)

    def attend(self, x_BLD: jnp.ndarray) -> jnp.ndarray:
        if self.cfg.scale_tied_logits:
            x_BLD = x_BLD * self.cfg.d_model**-0.5
        return self.token.attend(x_BLD)


def apply_layers(cfg: ModelConfig, num_layers: int, x_BLD, mask: Mask, *, encoded_BSD=None,
                 cross_mask: Mask | None = None, self_bias=None, cross_bias=None,
                 cross: bool = False, decode: bool = False, cache_len: int = 0,
                 deterministic: bool = True) -> jnp.ndarray:
    """Runs `num_layers` blocks, looped or scanned, optionally rematerialised.

    Call inside a compact method: the blocks become children of the calling module
    (`layer_0..` or `layers`), keeping parameter paths short.
    """
    block_cls: Any = Block
    if cfg.remat != "none":
        block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat],
                             prevent_cse=not cfg.scan_layers)
    kw = dict(cfg=cfg, cross=cross, decode=decode, cache_len=cache_len,
              deterministic=deterministic)
    args = (mask, encoded_BSD, cross_mask, self_bias, cross_bias)
    if not cfg.scan_layers:
        for i in range(num_layers):
            x_BLD = block_cls(**kw, name=f"layer_{i}")(x_BLD, *args)
        return x_BLD
    scanned = nn.scan(
        _scan_body(block_cls),
        variable_axes={"params": 0, "cache": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    x_BLD, _ = scanned(**kw, name="layers")(x_BLD, *args)
    return x_BLD


def _scan_body(block_cls):
    class ScanBlock(block_cls):
        """The block with nn.scan's (carry, output) signature."""

        def __call__(self, x_BLD, *args):
            return super().__call__(x_BLD, *args), None

    ScanBlock.__name__ = block_cls.__name__
    return ScanBlock


def _relative_bias(cfg: ModelConfig, mask: Mask, bidirectional: bool, name: str):
    if cfg.position != "relative":
        return None
    return pos_lib.RelativeBias(cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
                                bidirectional, cfg.init_std, name=name)(mask.relative_positions)


def _defaults(ids_BL, segment_ids, positions):
    packed = segment_ids is not None
    if segment_ids is None:
        segment_ids = jnp.ones_like(ids_BL, dtype=jnp.int32)
    if positions is None:
        positions = masks_lib.default_positions(segment_ids)
    return segment_ids, positions, packed


class Encoder(nn.Module):
    """Bidirectional stack (BERT): ids -> hidden states [B, L, D]."""

    cfg: ModelConfig
    embedder: Embedder | None = None  # shared with a decoder in EncoderDecoder

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, positions=None, token_types=None,
                 deterministic: bool = True) -> jnp.ndarray:
        cfg = self.cfg
        segment_ids, positions, packed = _defaults(ids_BL, segment_ids, positions)
        mask = masks_lib.self_mask(segment_ids, positions, causal=False).replace(packed=packed)
        embedder = self.embedder or Embedder(cfg, name="embedder")
        x_BLD = embedder(ids_BL, positions, token_types, deterministic)
        bias = _relative_bias(cfg, mask, True, "relative_bias")
        x_BLD = apply_layers(cfg, cfg.num_layers, x_BLD, mask, self_bias=bias,
                             deterministic=deterministic)
        if cfg.pre_norm:
            x_BLD = Norm(cfg, name="final_norm")(x_BLD)
        return x_BLD


class Decoder(nn.Module):
    """Causal stack (GPT) -> fp32 logits [B, L, V]; with `cross`, the decoder of an
    encoder-decoder. With `decode=True` it keeps a static cache of `cache_len` slots:
    call it on a prompt of any length, then one token at a time."""

    cfg: ModelConfig
    decode: bool = False
    cache_len: int = 0
    cross: bool = False
    embedder: Embedder | None = None

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, positions=None, *, prefix=None,
                 encoded_BSD=None, encoder_segment_ids=None, deterministic: bool = True,
                 return_hidden: bool = False) -> jnp.ndarray:
        cfg = self.cfg
        segment_ids, positions, packed = _defaults(ids_BL, segment_ids, positions)
        if self.decode:
            mask = self._cached_mask(segment_ids, positions)
        else:
            mask = masks_lib.self_mask(segment_ids, positions, causal=True, prefix=prefix
                                       ).replace(packed=packed)
        cross_mask = None
        if self.cross:
            enc_seg = encoder_segment_ids
            if enc_seg is None:
                enc_seg = jnp.ones(encoded_BSD.shape[:2], jnp.int32)
            enc_pos = jnp.zeros_like(enc_seg)  # unused by cross-attention
            # Both sides number packed pairs alike (pair k is segment k on each side), and
            # an unpacked or cached decoder is segment 1 against encoder segment 1: matching
            # segments keeps every pair's cross-attention inside the pair.
            cross_mask = masks_lib.cross_mask(segment_ids.astype(jnp.int32),
                                              enc_seg.astype(jnp.int32), positions, enc_pos,
                                              same_segment=True)
        embedder = self.embedder or Embedder(cfg, name="embedder")
        x_BLD = embedder(ids_BL, positions, None, deterministic)
        bias = _relative_bias(cfg, mask, False, "relative_bias")
        x_BLD = apply_layers(
            cfg, cfg.decoder_layers if self.cross else cfg.num_layers, x_BLD, mask,
            encoded_BSD=encoded_BSD, cross_mask=cross_mask, self_bias=bias, cross=self.cross,
            decode=self.decode, cache_len=self.cache_len, deterministic=deterministic)
        if cfg.pre_norm:
            x_BLD = Norm(cfg, name="final_norm")(x_BLD)
        if return_hidden:
            return x_BLD
        if cfg.tie_embeddings:
            return embedder.attend(x_BLD)
        return Dense(cfg, cfg.vocab_size, ("embed", "vocab"), use_bias=False, name="lm_head")(
            x_BLD).astype(jnp.float32)

    @staticmethod
    def output_table(cfg: ModelConfig, params) -> tuple[jnp.ndarray, float]:
        """(table [V, D] in the compute dtype, scale): logits = (scale * hidden) @ tableᵀ,
        for losses that fuse the output projection (`return_hidden=True` hidden states)."""
        if cfg.tie_embeddings:
            table = params["embedder"]["token"]["embedding"]
            scale = cfg.d_model**-0.5 if cfg.scale_tied_logits else 1.0
        else:
            table, scale = params["lm_head"]["kernel"].T, 1.0
        return jnp.asarray(table, cfg.compute_dtype), scale

    def _cached_mask(self, segment_ids, positions) -> Mask:
        """Writes this call's segment ids / positions into the cache and returns the mask of
        the new queries over every cache slot (unwritten slots have segment 0)."""
        b, length = segment_ids.shape
        initialized = self.has_variable("cache", "segment_ids")
        seg = self.variable("cache", "segment_ids", jnp.zeros, (b, self.cache_len), jnp.int32)
        pos = self.variable("cache", "positions", jnp.zeros, (b, self.cache_len), jnp.int32)
        idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        if initialized:
            seg.value = jax.lax.dynamic_update_slice(seg.value, segment_ids.astype(jnp.int32),
                                                     (0, idx.value))
            pos.value = jax.lax.dynamic_update_slice(pos.value, positions.astype(jnp.int32),
                                                     (0, idx.value))
            idx.value = idx.value + length
        return Mask(segment_ids, seg.value, positions, pos.value, causal=True)


class EncoderDecoder(nn.Module):
    """Encoder + decoder with cross-attention sharing one token embedding (T5, the
    original Transformer). Call `encode` once, then `decode` (cached or not)."""

    cfg: ModelConfig
    decode_mode: bool = False
    cache_len: int = 0

    def setup(self) -> None:
        self.embedder = Embedder(self.cfg)
        self.encoder = Encoder(self.cfg, embedder=self.embedder)
        self.decoder = Decoder(self.cfg, decode=self.decode_mode, cache_len=self.cache_len,
                               cross=True, embedder=self.embedder)

    def encode(self, inputs_BS, segment_ids=None, positions=None, deterministic: bool = True):
        return self.encoder(inputs_BS, segment_ids, positions, deterministic=deterministic)

    def decode(self, encoded_BSD, targets_BL, segment_ids=None, positions=None, *,
               encoder_segment_ids=None, deterministic: bool = True) -> jnp.ndarray:
        return self.decoder(targets_BL, segment_ids, positions, encoded_BSD=encoded_BSD,
                            encoder_segment_ids=encoder_segment_ids, deterministic=deterministic)

    def __call__(self, inputs_BS, targets_BL, *, input_segment_ids=None, input_positions=None,
                 target_segment_ids=None, target_positions=None, deterministic: bool = True):
        encoded = self.encode(inputs_BS, input_segment_ids, input_positions, deterministic)
        return self.decode(encoded, targets_BL, target_segment_ids, target_positions,
                           encoder_segment_ids=input_segment_ids, deterministic=deterministic)


# ------------------------------------------------------------ parameter layouts
_LAYER = re.compile(r"layer_(\d+)$")


def stack_layers(tree: dict) -> dict:
    """Loop layout (`layer_0..layer_{N-1}`) -> scan layout (`layers`, leading axis N)."""
    if not isinstance(tree, dict):
        return tree
    out, layers = {}, {}
    for key, value in tree.items():
        m = _LAYER.match(key)
        if m:
            layers[int(m.group(1))] = value
        else:
            out[key] = stack_layers(value)
    if layers:
        ordered = [layers[i] for i in range(len(layers))]
        out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)
    return out


def unstack_layers(tree: dict) -> dict:
    """Scan layout -> loop layout (inverse of `stack_layers`)."""
    if not isinstance(tree, dict):
        return tree
    out = {}
    for key, value in tree.items():
        if key == "layers":
            n = jax.tree.leaves(value)[0].shape[0]
            for i in range(n):
                out[f"layer_{i}"] = jax.tree.map(lambda x, i=i: x[i], value)
        else:
            out[key] = unstack_layers(value)
    return out
