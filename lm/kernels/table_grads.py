"""The bf16 fused loss's two backward products as one AMX kernel on the CPU
(`table_grads_cpu.cc`): per chunk of T tokens, the input gradient g E and the table
gradient xᵀ g accumulated into an fp32 [D, V] sum, g the chunk's bf16 logits gradient.

In the bf16 GPT step (vocabulary 50257) XLA's YNNPACK products took 30-40 ms each per
512-token chunk, against ~15 ms for the logits product of the same FLOPs; the kernel walks
g once in L2-sized blocks with AMX tiles (README, Performance). CPUs without AMX, fp32,
or shapes off its tiles (T or D not a multiple of 32) keep XLA's products.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp

from lm.kernels import build

TILE = 32  # T and D must be multiples of this


@functools.cache
def has_amx() -> bool:
    """Whether the CPU has AMX with bf16 and the OS grants its tile state."""
    flags = build.cpu_id().split()
    if not ("amx_tile" in flags and "amx_bf16" in flags and build.available()):
        return False
    return bool(build._state["lib"].LmAmxReady())


def usable(x: jnp.ndarray, table: jnp.ndarray) -> bool:
    """bf16 x [T, D] and table [V, D] (g is then [T, V] bf16) with T and D multiples of
    32, on an AMX CPU, kernels built, `LM_AMX_KERNELS=0` not set (read when tracing)."""
    return (x.dtype == table.dtype == jnp.bfloat16 and x.ndim == table.ndim == 2
            and x.shape[1] == table.shape[1] and x.shape[0] % TILE == 0
            and x.shape[1] % TILE == 0 and os.environ.get("LM_AMX_KERNELS", "1") != "0"
            and build.on_cpu() and has_amx())


def pair_rows(table: jnp.ndarray) -> jnp.ndarray:
    """The bf16 table [V, D] as AMX's operand layout: [ceil(V/2), D] uint32 words holding
    rows 2i and 2i+1 side by side (an odd V gets a zero row). Once per step: the table
    does not change across chunks."""
    v, d = table.shape
    paired = jnp.pad(table, ((0, v % 2), (0, 0))).reshape(-1, 2, d).swapaxes(1, 2)
    return jax.lax.bitcast_convert_type(paired, jnp.uint32)


def table_grads(g: jnp.ndarray, x: jnp.ndarray, paired: jnp.ndarray, acc: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(g @ table in fp32 [T, D], acc + xᵀ g [D, V]); `paired` = `pair_rows(table)`.
    The sum is written over `acc`'s buffer. Not differentiable."""
    build.require()
    t, d = x.shape
    outs = (jax.ShapeDtypeStruct((t, d), jnp.float32), jax.ShapeDtypeStruct(acc.shape,
                                                                            jnp.float32))
    return jax.ffi.ffi_call("lm_table_grads_bf16", outs, input_output_aliases={3: 1})(
        g, x, paired, acc)
