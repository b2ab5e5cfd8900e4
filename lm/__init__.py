"""lm: JAX/Flax research codebase for Transformer language models."""
