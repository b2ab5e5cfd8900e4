"""The bf16 fused loss's output projection and softmax cross-entropy as AMX kernels on
the CPU (`amx_projection_cpu.cc`): per chunk of T tokens, `chunk_stats` (the loss and
correct counts, for evaluation) and `chunk_grads` (those, the input gradient g E and the
table gradient xᵀ g accumulated into an fp32 [D, V] sum, g the bf16 logits gradient),
without writing the [T, V] logits or gradient to memory; `pack` lays the table out for
both once per step.

In the bf16 GPT step (vocabulary 50257) one 512-token chunk's value and gradients took
119-135 ms through XLA's path and 51-66 ms through the kernels (`benchmarks/cpu_ops.py`,
ops `bf16_chunk_*`): YNNPACK's xᵀ g alone took ~68 ms where x Eᵀ, the same FLOPs, took
~14, and the logits (103 MB per chunk in fp32) went to memory and back (README,
Performance). CPUs
without AMX, fp32, or shapes off the tiles (T or D not a multiple of 32) keep XLA's path;
`LM_AMX_KERNELS=0` switches the kernels off.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from lm.kernels import build

TILE = 32  # T and D must be multiples of this


@functools.cache
def has_amx() -> bool:
    """Whether the CPU has AMX with bf16 and the OS grants its tile state."""
    flags = build.cpu_id().split()
    if not ("amx_tile" in flags and "amx_bf16" in flags and build.available()):
        return False
    return bool(build.library().LmAmxReady())


def usable(x: jnp.ndarray, table: jnp.ndarray) -> bool:
    """bf16 x [T, D] and table [V, D] (g is then [T, V] bf16) with T and D multiples of
    32, on an AMX CPU, kernels built, `LM_AMX_KERNELS=0` not set (read when tracing)."""
    return (x.dtype == table.dtype == jnp.bfloat16 and x.ndim == table.ndim == 2
            and x.shape[1] == table.shape[1] and x.shape[0] % TILE == 0
            and x.shape[1] % TILE == 0 and os.environ.get("LM_AMX_KERNELS", "1") != "0"
            and build.on_cpu() and has_amx())


def pair_columns(table: jnp.ndarray) -> jnp.ndarray:
    """The bf16 table [V, D] as the logits kernel's operand: [D/2, V rounded up to 32]
    uint32 words holding columns 2i and 2i+1 of each row side by side (zero words past
    V). Once per step."""
    v, d = table.shape
    words = jax.lax.bitcast_convert_type(table.reshape(v, d // 2, 2), jnp.uint32)
    return jnp.pad(words.T, ((0, 0), (0, -v % TILE)))


def pack(table: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(`pair_columns(table)`, `pair_rows(table)`) in one kernel call: 3.1-3.6 ms for
    GPT-2's table against XLA's 15.6-18.8 (`benchmarks/cpu_ops.py`, ops `amx_pack_*`)."""
    build.require()
    v, d = table.shape
    cols = jax.ShapeDtypeStruct((d // 2, v + (-v % TILE)), jnp.uint32)
    rows = jax.ShapeDtypeStruct(((v + 1) // 2, d), jnp.uint32)
    return jax.ffi.ffi_call("lm_amx_pack_bf16", (cols, rows))(table)


def chunk_stats(x: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                columns: jnp.ndarray, vocab: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per token of x [T, D]: the weighted loss (logsumexp - target logit) * w and the
    weighted correct flag (target logit >= max: ties count) * w of the logits x tableᵀ,
    without storing them; `columns` = `pair_columns(table)`. Not differentiable."""
    build.require()
    row = jax.ShapeDtypeStruct(x.shape[:1], jnp.float32)
    return jax.ffi.ffi_call("lm_amx_chunk_stats_bf16", (row, row))(
        x, targets.astype(jnp.int32), weights.astype(jnp.float32), columns,
        vocab=np.int64(vocab))


def chunk_grads(x: jnp.ndarray, targets: jnp.ndarray, weights: jnp.ndarray,
                columns: jnp.ndarray, rows: jnp.ndarray, acc: jnp.ndarray
                ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`chunk_stats` and, for the summed weighted loss, the input gradient g @ table (fp32
    [T, D]) and acc + xᵀ g (fp32 [D, V], written over `acc`'s buffer), g the logits'
    gradient (softmax - onehot) * w rounded to bf16 as XLA's path rounds it; `rows` =
    `pair_rows(table)`. Not differentiable."""
    build.require()
    t, d = x.shape
    row = jax.ShapeDtypeStruct((t,), jnp.float32)
    outs = (row, row, jax.ShapeDtypeStruct((t, d), jnp.float32),
            jax.ShapeDtypeStruct(acc.shape, jnp.float32))
    return jax.ffi.ffi_call("lm_amx_chunk_grads_bf16", outs, input_output_aliases={5: 3})(
        x, targets.astype(jnp.int32), weights.astype(jnp.float32), columns, rows, acc)


def pair_rows(table: jnp.ndarray) -> jnp.ndarray:
    """The bf16 table [V, D] as AMX's operand layout: [ceil(V/2), D] uint32 words holding
    rows 2i and 2i+1 side by side (an odd V gets a zero row). Once per step: the table
    does not change across chunks."""
    v, d = table.shape
    paired = jnp.pad(table, ((0, v % 2), (0, 0))).reshape(-1, 2, d).swapaxes(1, 2)
    return jax.lax.bitcast_convert_type(paired, jnp.uint32)
