"""Serving a causal-LM run over an OpenAI-compatible HTTP API (`python -m lm.serve`).

  slots.py     device side: the slot KV cache, prefill, per-row sampling step, scoring
  engine.py    continuous batching: one thread steps every sequence in flight
  protocol.py  request fields and their checks, the chat template, logprobs layouts
  api.py       FastAPI routes (completions, chat, models, health, tokenizer endpoints)
  __main__.py  the command line
"""
