"""Model library: attention, masks, layers, stacks and heads (compute only)."""

from lm.models.config import ModelConfig
from lm.models.heads import (
    BertPretrainer,
    MLMHead,
    Pooler,
    SequenceClassifier,
    SpanExtractor,
    TokenClassifier,
)
from lm.models.masks import Mask
from lm.models.presets import PRESETS, preset
from lm.models.transformer import Decoder, Encoder, EncoderDecoder, stack_layers, unstack_layers

__all__ = [
    "PRESETS", "BertPretrainer", "Decoder", "Encoder", "EncoderDecoder", "MLMHead", "Mask",
    "ModelConfig", "Pooler", "SequenceClassifier", "SpanExtractor", "TokenClassifier", "preset",
    "stack_layers", "unstack_layers",
]
