"""The model configuration: one frozen dataclass that every module reads.

Modules never see ml_collections; the training system turns `config.model` into a
`ModelConfig` (see `ModelConfig.from_dict`). Shape vocabulary used across `lm.models`:
B batch, L query length, S key length, D width, H query heads, G key/value heads,
K head dim, F MLP width, V vocab, N layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import jax.numpy as jnp

Position = Literal["learned", "sinusoidal", "rope", "relative", "none"]
Norm = Literal["layernorm", "rmsnorm"]
Activation = Literal["gelu", "gelu_tanh", "relu", "swiglu", "geglu", "geglu_tanh"]
# Gated MLPs: act(x W) * (x W_up). geglu_tanh: the tanh-approximated GELU (T5 v1.1 "gated-gelu").
GATED_ACTIVATIONS = ("swiglu", "geglu", "geglu_tanh")
AttentionImpl = Literal["einsum", "xla", "cudnn"]
Remat = Literal["none", "full", "dots", "dots_no_batch"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Transformer stack (encoder, decoder or encoder-decoder)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    mlp_dim: int
    num_kv_heads: int | None = None  # None: = num_heads (plain multi-head); 1: MQA
    head_dim: int | None = None  # None: d_model // num_heads
    num_decoder_layers: int | None = None  # encoder-decoder only; None: = num_layers
    max_len: int = 512  # learned position table size and the default KV-cache length
    type_vocab_size: int = 0  # segment (token-type) embeddings; 0 = none
    position: Position = "learned"
    rope_theta: float = 10_000.0
    relative_buckets: int = 32  # T5 relative position bias
    relative_max_distance: int = 128
    norm: Norm = "layernorm"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    pre_norm: bool = True  # pre-LN (GPT-2, T5, LLaMA) or post-LN (BERT, original Transformer)
    embed_norm: bool = False  # LayerNorm right after the embeddings (BERT)
    use_bias: bool = True  # biases of the attention / MLP projections
    norm_bias: bool = True  # LayerNorm shift (nanoGPT's bias=False drops it and use_bias)
    tie_embeddings: bool = True  # output projection shares the token embedding
    scale_tied_logits: bool = False  # T5: multiply hidden by d_model**-0.5 before tied output
    # Vaswani et al.: token embeddings times sqrt(d_model) at the input, so that N(0, 0.02)
    # embeddings are not drowned by unit-amplitude sinusoidal positions
    scale_embeddings: bool = False
    # softmax(q·k / sqrt(K)). False (T5): no scaling at run time; 1/sqrt(K) is folded into
    # the query kernel's init instead, so the logits start at the same size.
    scale_attention: bool = True
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_impl: AttentionImpl = "einsum"
    scan_layers: bool = False
    remat: Remat = "none"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    init_std: float = 0.02
    pooler: bool = True  # encoder heads: BERT pooler (dense + tanh on [CLS])

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"model.{field}: {why}")

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim", "max_len"):
            if getattr(self, name) <= 0:
                bad(name, f"must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.num_heads:
            bad("num_heads", f"d_model={self.d_model} is not divisible by {self.num_heads}")
        if self.num_heads % self.kv_heads:
            bad("num_kv_heads", f"num_heads={self.num_heads} not divisible by {self.kv_heads}")
        if self.position == "rope" and self.head_size % 2:
            bad("head_dim", "RoPE needs an even head dimension")
        for name, allowed in (
            ("position", Position.__args__),
            ("norm", Norm.__args__),
            ("activation", Activation.__args__),
            ("attention_impl", AttentionImpl.__args__),
            ("remat", Remat.__args__),
        ):
            if getattr(self, name) not in allowed:
                bad(name, f"{getattr(self, name)!r} is not one of {allowed}")
        for name in ("dtype", "param_dtype"):
            try:
                jnp.dtype(getattr(self, name))
            except TypeError:
                bad(name, f"unknown dtype {getattr(self, name)!r}")

    @property
    def gated(self) -> bool:
        return self.activation in GATED_ACTIVATIONS

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def decoder_layers(self) -> int:
        return self.num_decoder_layers or self.num_layers

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Builds from a mapping (e.g. `config.model`), ignoring the `preset` key.

        Unknown keys are an error naming the field, so a misspelt override never
        silently does nothing.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in dict(values).items() if k != "preset"}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(f"model.{unknown[0]}: not a model field")
        return cls(**values)

    # ---------------------------------------------------------------- FLOPs
    def matmul_params_per_layer(self, cross_attention: bool = False) -> int:
        """Weights touched by one matmul per token in one block (no norms, no biases)."""
        d, hk, gk = self.d_model, self.num_heads * self.head_size, self.kv_heads * self.head_size
        attn = 2 * d * hk + 2 * d * gk
        mlp = (3 if self.gated else 2) * d * self.mlp_dim
        return attn * (2 if cross_attention else 1) + mlp

    def flops_per_token(self, seq_len: int, *, kind: str = "decoder", vocab_fraction: float = 1.0
                        ) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token, as in PaLM's MFU.

        Counts 2 FLOPs per multiply-add for every weight matmul, the vocabulary projection
        for `vocab_fraction` of the tokens (MLM scores only ~15 %), and the attention score
        and value matmuls at full (unmasked) length.
        """
        attn_dim = self.num_heads * self.head_size
        if kind == "encoder_decoder":
            n_matmul = (self.num_layers * self.matmul_params_per_layer()
                        + self.decoder_layers * self.matmul_params_per_layer(True))
            layers = self.num_layers + 2 * self.decoder_layers
        else:
            n_matmul = self.num_layers * self.matmul_params_per_layer()
            layers = self.num_layers
        n_matmul += vocab_fraction * self.d_model * self.vocab_size
        return 6.0 * n_matmul + 12.0 * layers * seq_len * attn_dim
