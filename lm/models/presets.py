"""Named model shapes from the papers (and the released checkpoints' config files).

Parameter counts (tests/test_models.py checks them exactly, with tied weights counted
once): BERT-base 109,482,240 and BERT-large 335,141,888 (encoder + pooler, as the
"110M / 340M" of Devlin et al.); GPT-2 small 124,439,808 and medium 354,823,168 (output
projection tied to the token embedding); T5-small 60,506,624 (one embedding shared by
encoder, decoder and output). The T5 shapes are T5 v1.0 exactly (no 1/sqrt(K) attention
scaling, tied output scaled by d_model**-0.5), so they export to Hugging Face's T5; v1.1 is
`activation="geglu_tanh", tie_embeddings=False, scale_tied_logits=False`.
"""

from __future__ import annotations

from typing import Any

from lm.models.config import ModelConfig

_BERT = dict(vocab_size=30522, max_len=512, type_vocab_size=2, position="learned",
             norm="layernorm", norm_eps=1e-12, activation="gelu", pre_norm=False,
             embed_norm=True, dropout_rate=0.1, attention_dropout_rate=0.1)
_GPT2 = dict(vocab_size=50257, max_len=1024, position="learned", norm="layernorm",
             norm_eps=1e-5, activation="gelu_tanh", pre_norm=True, dropout_rate=0.1,
             attention_dropout_rate=0.1)
_T5 = dict(vocab_size=32128, max_len=512, position="relative", norm="rmsnorm", norm_eps=1e-6,
           activation="relu", pre_norm=True, use_bias=False, scale_tied_logits=True,
           scale_attention=False, dropout_rate=0.1, head_dim=64, init_std=0.05)
_LLAMA = dict(vocab_size=32000, max_len=2048, position="rope", norm="rmsnorm", norm_eps=1e-5,
              activation="swiglu", pre_norm=True, use_bias=False, tie_embeddings=False)


def _bert(layers: int, width: int) -> dict[str, Any]:
    # Turc et al. (2019): heads = width / 64, MLP = 4 x width.
    return dict(_BERT, num_layers=layers, d_model=width, num_heads=width // 64,
                mlp_dim=4 * width)


PRESETS: dict[str, dict[str, Any]] = {
    "bert_tiny": _bert(2, 128),
    "bert_mini": _bert(4, 256),
    "bert_small": _bert(4, 512),
    "bert_medium": _bert(8, 512),
    "bert_base": _bert(12, 768),
    "bert_large": _bert(24, 1024),
    "gpt2_small": dict(_GPT2, num_layers=12, d_model=768, num_heads=12, mlp_dim=3072),
    "gpt2_medium": dict(_GPT2, num_layers=24, d_model=1024, num_heads=16, mlp_dim=4096),
    "gpt2_large": dict(_GPT2, num_layers=36, d_model=1280, num_heads=20, mlp_dim=5120),
    "gpt2_xl": dict(_GPT2, num_layers=48, d_model=1600, num_heads=25, mlp_dim=6400),
    "t5_small": dict(_T5, num_layers=6, d_model=512, num_heads=8, mlp_dim=2048),
    "t5_base": dict(_T5, num_layers=12, d_model=768, num_heads=12, mlp_dim=3072),
    # A small LLaMA-style decoder: RoPE, RMSNorm, SwiGLU (F ~ 8/3 D), 4 query heads per
    # key/value head.
    "llama_small": dict(_LLAMA, num_layers=8, d_model=512, num_heads=8, num_kv_heads=2,
                        mlp_dim=1408),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named shape with `overrides` applied (e.g. dtype, scan_layers, vocab_size)."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: unknown preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
