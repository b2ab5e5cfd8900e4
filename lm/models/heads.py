"""Output heads over encoder hidden states, and the encoder task models built from them.

`MLMHead` gathers the chosen positions first and only then projects to the vocabulary:
that projection is most of a BERT step's FLOPs, and it is paid for ~15 % of tokens.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from lm.models.config import ModelConfig
from lm.models.custom_grads import add_bias
from lm.models.layers import Dense, Norm, activation, tied_logits
from lm.models.transformer import Decoder, Encoder


def gather_positions(x_BLD: jnp.ndarray, positions_BP: jnp.ndarray) -> jnp.ndarray:
    """x[b, positions[b, p]] -> [B, P, D]."""
    return jnp.take_along_axis(x_BLD, positions_BP[..., None].astype(jnp.int32), axis=1)


class MLMHead(nn.Module):
    """BERT's masked-LM head: dense + GELU + LayerNorm, tied decoder + output bias."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD, positions_BP, embedding_VD) -> jnp.ndarray:
        cfg = self.cfg
        h_BPD = gather_positions(x_BLD, positions_BP)
        h_BPD = Dense(cfg, cfg.d_model, ("embed", "mlp"), use_bias=True, name="transform")(h_BPD)
        h_BPD = Norm(cfg.replace(norm="layernorm"), name="norm")(
            activation(cfg.activation, h_BPD))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                               ("vocab",)),
                          (cfg.vocab_size,), cfg.params_dtype)
        logits = tied_logits(h_BPD, embedding_VD, cfg.compute_dtype)  # fp32
        return add_bias(logits, jnp.asarray(bias, logits.dtype))


class Pooler(nn.Module):
    """BERT pooler: dense + tanh on the first ([CLS]) token."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BLD) -> jnp.ndarray:
        return jnp.tanh(Dense(self.cfg, self.cfg.d_model, ("embed", "mlp"), use_bias=True,
                              name="dense")(x_BLD[:, 0]))


class Classifier(nn.Module):
    """Dropout + linear to `num_classes` fp32 logits (NSP, sequence or token labels)."""

    cfg: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, x, deterministic: bool = True) -> jnp.ndarray:
        x = nn.Dropout(self.cfg.dropout_rate)(x, deterministic=deterministic)
        return Dense(self.cfg, self.num_classes, ("embed", "classes"), use_bias=True,
                     name="dense")(x).astype(jnp.float32)


class BertPretrainer(nn.Module):
    """Encoder + MLM head (+ pooler + NSP head): returns (mlm_logits [B,P,V], nsp [B,2])."""

    cfg: ModelConfig
    nsp: bool = True

    def setup(self) -> None:
        self.encoder = Encoder(self.cfg)
        self.mlm = MLMHead(self.cfg)
        if self.nsp:
            self.pooler = Pooler(self.cfg)
            self.nsp_head = Classifier(self.cfg, 2)

    def __call__(self, ids_BL, masked_positions_BP, segment_ids=None, token_types=None,
                 positions=None, deterministic: bool = True):
        h_BLD = self.encoder(ids_BL, segment_ids, positions, token_types, deterministic)
        table = nn.unbox(self.encoder.variables["params"]["embedder"]["token"]["embedding"])
        mlm_logits = self.mlm(h_BLD, masked_positions_BP, table)
        if not self.nsp:
            return mlm_logits, None
        return mlm_logits, self.nsp_head(self.pooler(h_BLD), deterministic)


class SequenceClassifier(nn.Module):
    """Encoder + pooler + classifier (single sentences and sentence pairs)."""

    cfg: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, token_types=None, positions=None,
                 deterministic: bool = True) -> jnp.ndarray:
        h_BLD = Encoder(self.cfg, name="encoder")(ids_BL, segment_ids, positions, token_types,
                                                  deterministic)
        pooled = Pooler(self.cfg, name="pooler")(h_BLD) if self.cfg.pooler else h_BLD[:, 0]
        return Classifier(self.cfg, self.num_classes, name="classifier")(pooled, deterministic)


class TokenClassifier(nn.Module):
    """Encoder + per-token classifier (BIO tagging): [B, L, num_classes]."""

    cfg: ModelConfig
    num_classes: int

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, token_types=None, positions=None,
                 deterministic: bool = True) -> jnp.ndarray:
        h_BLD = Encoder(self.cfg, name="encoder")(ids_BL, segment_ids, positions, token_types,
                                                  deterministic)
        return Classifier(self.cfg, self.num_classes, name="classifier")(h_BLD, deterministic)


class SpanExtractor(nn.Module):
    """Encoder + start/end scores per token (extractive QA): two [B, L] fp32 arrays,
    padding positions set to a large negative."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, token_types=None, positions=None,
                 deterministic: bool = True):
        h_BLD = Encoder(self.cfg, name="encoder")(ids_BL, segment_ids, positions, token_types,
                                                  deterministic)
        logits_BL2 = Classifier(self.cfg, 2, name="span")(h_BLD, deterministic)
        if segment_ids is not None:
            logits_BL2 = jnp.where((segment_ids != 0)[..., None], logits_BL2, -1e9)
        return logits_BL2[..., 0], logits_BL2[..., 1]


class DecoderClassifier(Decoder):
    """Causal stack + classifier on each row's last real token (GPT-style sequence
    classification). The stack's parameters sit at the root, named as `Decoder`'s
    (`embedder`, `layers`, `final_norm`), so they load from and into a causal LM; the head
    is `classifier`. Token types are not embedded (a decoder has no segment table)."""

    num_classes: int = 2

    @nn.compact
    def __call__(self, ids_BL, segment_ids=None, token_types=None, positions=None,
                 deterministic: bool = True) -> jnp.ndarray:
        h_BLD = super().__call__(ids_BL, segment_ids, positions, deterministic=deterministic,
                                 return_hidden=True)
        real_BL = (segment_ids if segment_ids is not None else jnp.ones_like(ids_BL)) != 0
        last_B = jnp.maximum(real_BL.sum(-1) - 1, 0)
        pooled_BD = jnp.take_along_axis(h_BLD, last_B[:, None, None], axis=1)[:, 0]
        return Classifier(self.cfg, self.num_classes, name="classifier")(pooled_BD,
                                                                         deterministic)
