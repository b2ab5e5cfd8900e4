"""Attention forward + backward on the local device: the einsum reference vs
`jax.nn.dot_product_attention` (XLA), causal mask, L = 128 ... 2048. On a CPU with
AVX-512 'einsum' runs lm's C++ kernel (lm/kernels) for fp32; 'einsum_xla' is the same
path with the kernel switched off (LM_CPU_KERNELS=0), XLA's einsums and softmax.

One JSON line per (implementation, length): ms per fwd+bwd, GFLOP/s of the attention
matmuls (4 * B * H * L^2 * K forward, x3 with backward), and XLA's peak temporary memory
for the compiled computation.

    python benchmarks/attention.py [--lengths 128,256,512,1024,2048] [--repeats 5]
    python benchmarks/attention.py --impls einsum_xla,einsum --lengths 64 --batch 12 \
        --heads 4 --head_dim 32 --repeats 50        # char_lm:baby's attention, per layer
    python benchmarks/attention.py --forward_only --impls einsum --lengths 64 --batch 64 \
        --heads 4 --head_dim 32 --repeats 200       # its 64-window validation batch

`--forward_only` times the output alone (no gradient: the kernel's inference form, as in
evaluation and decoding).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import runtime
from lm.kernels import build
from lm.models import masks
from lm.models.attention import dot_product_attention


def make_fn(impl: str, forward_only: bool = False):
    kernel_off = impl == "einsum_xla"
    impl = "einsum" if kernel_off else impl

    def loss(q, k, v, mask):
        return jnp.sum(dot_product_attention(q, k, v, mask, impl=impl).astype(jnp.float32) ** 2)

    fn = jax.jit(loss if forward_only else jax.value_and_grad(loss, argnums=(0, 1, 2)))
    if not kernel_off:
        return fn

    class KernelOff:  # the kernel is chosen when tracing: trace with it switched off
        def lower(self, *args):
            with build.switched_off():
                return fn.lower(*args)

    return KernelOff()


def bench(impl: str, length: int, batch: int, heads: int, head_dim: int, dtype, repeats: int,
          forward_only: bool = False):
    rng = np.random.default_rng(0)
    shape = (batch, length, heads, head_dim)
    q, k, v = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(3))
    seg = jnp.ones((batch, length), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(length), (batch, length))
    mask = masks.self_mask(seg, pos, causal=True).replace(packed=False)
    fn = make_fn(impl, forward_only)
    compiled = fn.lower(q, k, v, mask).compile()
    mem = compiled.memory_analysis()
    peak = getattr(mem, "temp_size_in_bytes", 0) + getattr(mem, "output_size_in_bytes", 0)
    jax.block_until_ready(compiled(q, k, v, mask))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(q, k, v, mask))
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    flops = (1 if forward_only else 3) * 4 * batch * heads * length * length * head_dim
    what = "attention_fwd" if forward_only else "attention_fwd_bwd"
    return {"what": what, "impl": impl, "L": length, "B": batch, "H": heads, "K": head_dim,
            "dtype": jnp.dtype(dtype).name, "ms": round(ms, 3),
            "gflops_per_s": round(flops / (ms / 1e3) / 1e9, 2),
            "peak_mem_mb": round(peak / 2**20, 2), "device": jax.devices()[0].device_kind,
            "cpu_flags": runtime.cpu_flags()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,256,512,1024,2048")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--impls", default="einsum,xla")
    p.add_argument("--forward_only", action="store_true", help="no gradient (inference form)")
    args = p.parse_args()
    for length in map(int, args.lengths.split(",")):
        for impl in args.impls.split(","):  # alternate A B at every length
            print(json.dumps(bench(impl, length, args.batch, args.heads, args.head_dim,
                                   jnp.dtype(args.dtype), args.repeats, args.forward_only)),
                  flush=True)


if __name__ == "__main__":
    main()
