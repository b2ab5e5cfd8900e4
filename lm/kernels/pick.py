"""Decoding's next token from the hidden state, reading an int8 copy of the output table
(`pick_cpu.cc`, `top_k_cpu.cc`): greedy, the same token as argmax(`logits.small_logits(x,
table)`) bit for bit; sampled, jax.random.categorical's Gumbel draw from the tempered
logits; top-k sampling's k largest tempered logits, as lax.top_k gives them.

Greedy decoding at batch 1 reads the whole fp32 output table per token (51 MB for GPT-2's
vocabulary at width 256), two thirds of the step. `quantize` makes, once per decode, an
int8 copy (13 MB) with one scale and one error radius per row; `greedy` scores every row
approximately from it, bounds each exact fp32 logit within ||x|| * radius of its
approximation, and computes exactly (with the logits kernel's own tiles, so the same
fp32 values) only the rows whose upper bound reaches the best lower bound, of which the
argmax is always one. The bound is worst-case (Cauchy-Schwarz plus the fp32 rounding of
both products), so the token never differs; only the number of rows computed again
depends on the data (`greedy_with_count`: 1-12, 2.1 on average, on the benchmarks' random
GPT 4x256). On a 2-core AVX2 CPU the pick from the hidden state takes 0.96-1.52 ms
against 2.86-2.96 for the logits kernel and argmax (1 row), 2.48-2.75 against 6.12-6.46
(8 rows), the copy 4.8-5.2 ms (`python benchmarks/cpu_ops.py --ops pick_logits_argmax_1
pick_greedy_kernel_1 pick_logits_argmax_8 pick_greedy_kernel_8 quantize_table`): greedy
decoding 2.07x (batch 1) and 1.72x (batch 8) faster (README, Performance).

`sample` draws the first argmax of g + logits / t, g jax's Gumbel noise for the row's key
(`gumbel.h`, the same Threefry bits; `gumbel` returns it): fp32 division and addition are
monotone, so the bounds on the logits bound the scores, and only rows whose upper score
reaches the best lower score are computed exactly. 0.80-1.79 ms against 2.29-3.70 for the
logits kernel and the inverse-CDF draw (1 row), 3.26-3.54 against 5.65-7.13 (8 rows;
`cpu_ops.py --ops pick_logits_sample_1 pick_sample_kernel_1 pick_logits_sample_8
pick_sample_kernel_8`): sampled decoding 1.49x (batch 1) and 1.54x (batch 8) faster.

With AVX2 (not AVX-512) the approximate pass multiplies the int8 rows by an int16 copy of
each row of x (`vpmaddwd`: 16 exact products per instruction where the fp32 pass widened
every table value and did 8 FMAs); `radius` includes a share for that rounding of x
(pick_cpu.h, HiddenShare), checked for every row at run time. 8 rows: 1.25x
(README, Performance).

`top_k` gives lax.top_k(logits * c, k) bit for bit (top-k sampling's candidates, before
its nucleus filter and draw): every row of the top k has a logit at least the k-th
largest lower bound, so only rows whose scaled upper bound reaches it are computed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lm.kernels import build

# the rows of x per call: the approximate logits are kept for all of them ([rows, V] fp32)
MAX_ROWS = 32
# widths the kernel's tiles cover exactly (a multiple of both vector widths)
WIDTH_MULTIPLE = 16


class Quantized(NamedTuple):
    """An fp32 table [V, D] as int8 rows q [V, D] with scale [V] (row ≈ scale * q) and
    radius [V]: |fp32 x·row - the kernels' estimate of it| <= ||x|| * radius for every x
    (the estimate fp32 scale·(x·q), or with AVX2 scale·sh·(hq·q) for x's int16 copy)."""

    q: jnp.ndarray
    scale: jnp.ndarray
    radius: jnp.ndarray


def usable(rows: int, table: jnp.ndarray) -> bool:
    """For `rows` fp32 rows of x: at most MAX_ROWS, an fp32 table [V, D] with D a multiple
    of WIDTH_MULTIPLE, on a CPU with AVX-512 or AVX2, kernels built."""
    return (table.dtype == jnp.float32 and table.ndim == 2 and 0 < rows <= MAX_ROWS
            and table.shape[1] % WIDTH_MULTIPLE == 0 and table.shape[0] > 0
            and build.on_cpu())


def quantize(table: jnp.ndarray) -> Quantized:
    """The int8 form of an fp32 table [V, D] (one pass over it; once per decode)."""
    build.require()
    v, d = table.shape
    out = (jax.ShapeDtypeStruct((v, d), jnp.int8), jax.ShapeDtypeStruct((v,), jnp.float32),
           jax.ShapeDtypeStruct((v,), jnp.float32))
    return Quantized(*jax.ffi.ffi_call("lm_quantize_rows", out)(table))


def greedy_with_count(x: jnp.ndarray, table: jnp.ndarray, quantized: Quantized
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(argmax over the vocabulary of x @ tableᵀ per row of x [..., D], int32 [...]; the
    number of exact logits computed for each row, int32 [...])."""
    build.require()
    out = (jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32),
           jax.ShapeDtypeStruct(x.shape[:-1], jnp.int32))
    return jax.ffi.ffi_call("lm_greedy_tied", out, vmap_method="sequential")(
        x, table, quantized.q, quantized.scale, quantized.radius)


def greedy(x: jnp.ndarray, table: jnp.ndarray, quantized: Quantized) -> jnp.ndarray:
    """int32 argmax of x @ tableᵀ along the vocabulary (first index on ties; NaN as
    jnp.argmax), equal to argmax(`logits.small_logits(x, table)`)."""
    return greedy_with_count(x, table, quantized)[0]


def sample_with_count(x: jnp.ndarray, table: jnp.ndarray, quantized: Quantized,
                      temperature: jnp.ndarray, keys: jax.Array
                      ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(a token per row of x [B, D], int32 [B]; the exact logits computed per row).

    Row b with temperature t_b > 0 draws `jax.random.categorical(keys[b], logits_b / t_b)`,
    i.e. the first argmax of gumbel(keys[b], (V,)) + logits_b / t_b with jax's noise (its
    Threefry bits and uniform map; the two logarithms within a few fp32 ulps of XLA's, so a
    draw can differ from jax's only where two scores tie to that precision); a row with
    t_b == 0 is greedy, as `greedy`. `keys` are typed keys [B] (threefry2x32)."""
    build.require()
    b = x.shape[0]
    if x.ndim != 2 or temperature.shape != (b,) or keys.shape != (b,):
        raise ValueError(f"need x [B, D], temperature [B] and keys [B]; got {x.shape}, "
                         f"{temperature.shape}, {keys.shape}")
    data = jax.random.key_data(keys)
    if data.shape != (b, 2):
        raise ValueError(f"keys: threefry2x32 keys are needed (key data [B, 2]), got {data.shape}")
    out = (jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32))
    return jax.ffi.ffi_call("lm_sample_tied", out, vmap_method="sequential")(
        x, table, quantized.q, quantized.scale, quantized.radius,
        temperature.astype(jnp.float32), data.astype(jnp.uint32))


def sample(x: jnp.ndarray, table: jnp.ndarray, quantized: Quantized, temperature: jnp.ndarray,
           keys: jax.Array) -> jnp.ndarray:
    """int32 token per row: a draw from softmax(x @ tableᵀ / t) (see `sample_with_count`)."""
    return sample_with_count(x, table, quantized, temperature, keys)[0]


def gumbel(keys: jax.Array, vocab: int) -> jnp.ndarray:
    """The noise `sample` adds: jax.random.gumbel(keys[b], (vocab,)) per key, [B, vocab] fp32
    (from the kernel's own Threefry and logarithm)."""
    build.require()
    data = jax.random.key_data(keys).astype(jnp.uint32)
    out = jax.ShapeDtypeStruct((data.shape[0], vocab), jnp.float32)
    return jax.ffi.ffi_call("lm_gumbel_rows", out)(data)


def top_k(x: jnp.ndarray, table: jnp.ndarray, quantized: Quantized, factor: jnp.ndarray,
          k: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`lax.top_k(small_logits(x, table) * factor[:, None], k)` from the int8 copy: (values
    [B, k] fp32, indices [B, k] int32, ok [B] bool). The same values and order, larger
    first and the lower index first on ties, bit for bit, where `ok`; a row whose bounds
    or logits are not finite is not ok (the caller computes that row's logits instead).
    `factor` > 0 per row (the reciprocal of the temperature)."""
    build.require()
    b, v = x.shape[0], table.shape[0]
    if x.ndim != 2 or factor.shape != (b,) or not 0 < k <= v:
        raise ValueError(f"need x [B, D], factor [B] and 0 < k <= {v}; got {x.shape}, "
                         f"{factor.shape}, k={k}")
    out = (jax.ShapeDtypeStruct((b, k), jnp.float32), jax.ShapeDtypeStruct((b, k), jnp.int32),
           jax.ShapeDtypeStruct((b,), jnp.int32))
    values, indices, rescored = jax.ffi.ffi_call("lm_top_k_tied", out, vmap_method="sequential")(
        x, table, quantized.q, quantized.scale, quantized.radius, factor.astype(jnp.float32))
    return values, indices, rescored >= 0
