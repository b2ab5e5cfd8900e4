"""Objectives by name (imported lazily so each pulls in only what it needs)."""

from __future__ import annotations

import importlib

from ml_collections import ConfigDict

from lm.objectives.base import Objective

OBJECTIVES = {
    "causal_lm": "lm.objectives.causal_lm:CausalLM",
    "bert": "lm.objectives.bert:BertPretraining",
    "classification": "lm.objectives.classification:Classification",
    "tagging": "lm.objectives.tagging:Tagging",
    "seq2seq": "lm.objectives.seq2seq:Seq2Seq",
    "span_corruption": "lm.objectives.span_corruption:SpanCorruption",
    "prefix_lm": "lm.objectives.span_corruption:PrefixLM",
}


def get(config: ConfigDict) -> Objective:
    """Instantiates `config.objective`."""
    name = config.objective
    if name not in OBJECTIVES:
        raise ValueError(f"objective: unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)(config)
