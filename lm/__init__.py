"""lm: JAX/Flax research codebase for Transformer language models."""

from lm import runtime as _runtime

_runtime.configure_xla()
_runtime.configure_malloc()
_runtime.configure_dispatch()
