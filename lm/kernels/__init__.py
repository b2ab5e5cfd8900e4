"""Hand-written CPU kernels called from JAX through XLA's FFI (built on first use with the
machine's C++ compiler; the XLA path is kept wherever they cannot be used)."""
