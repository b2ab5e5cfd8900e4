"""Single XLA:CPU operations behind lm's CPU choices, timed alone (one JSON line each).

    python benchmarks/cpu_ops.py                       # lm's XLA flags
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT \\
        python benchmarks/cpu_ops.py                   # reductions in XLA's own loops

- row max / row sum over a [512, 50257] logits chunk (the softmax of the fused loss):
  where YNNPACK takes reductions (lm's flag) and where XLA's loops do;
- a bias gradient of [16, 128, 1024] activations (batch, length, width) as a reduction
  over the leading axes and as a product with a ones vector or [8, N] ones
  (`--bias_shape 1 320 30522`: BERT's MLM output bias; past 16,384 columns XLA's reduction
  falls off a cliff: `--bias_shape 1 320 16384|16385 --ops bias_grad_reduce
  bias_grad_ones8_product`);
- the three [512, 50257] x 256 products of one loss chunk (forward and both gradients),
  the table gradient also as [D, V] then transposed (`--vocab 30522 --rows 320`: BERT's
  MLM head), and the three with bf16 operands (`*_bf16`; run with lm's bf16 flag, below);
- the attention softmax's backward p * (g - sum(p * g)) over `char_lm:baby`'s attention
  table, laid out [B, G, 1, L, S] (a size-1 group axis) and [B, H, L, S]
  (`--attention_shape B H L S`);
- `char_lm:baby`'s MLP-backward product alone, times the GELU's slope fused into it, and
  with a clamp between the two that keeps the multiply out of YNNPACK's fusion;
- one loss chunk's loss, correct count and logits gradient (fp32 and bf16 gradient)
  through XLA and through lm's CPU cross-entropy kernel (`ce_chunk_*`);
- one read of as many fp32 values as the GPT 4x256's weights (table + 4 layers of 12 D^2:
  64 MB at the defaults), the memory traffic of one batch-1 decoding step
  (`weights_read`: a column sum, bound by memory bandwidth);
- a batch-8 decoding step's tied logits [8, width] x [vocab, width]ᵀ as XLA's product
  and lm's logits kernel (`decode_logits_*`);
- greedy decoding's token from 1 or 8 hidden rows: the logits kernel then the argmax
  kernel (`pick_logits_argmax_*`), and lm's int8-table kernel with exact rescoring
  (`pick_greedy_kernel_*`, lm.kernels.pick, where the kernels are built and the width
  is a multiple of 16), and the int8 copy itself (`quantize_table`); sampling's
  (temperature 1): the logits kernel then the inverse-CDF draw (`pick_logits_sample_*`),
  and the int8-table kernel with jax's Gumbel noise (`pick_sample_kernel_*`);
- greedy decoding's token choice over 8 logits rows: `lax.top_k(x, 1)`, jnp.argmax and
  lm's CPU argmax kernel (`argmax_*`); sampling's over the same rows (temperature 1, no
  filter): lm.generate's XLA steps and lm's CPU kernel (`sample_*`);
- a bf16 bias gradient as XLA's reduction and as lm's product with [8, N] ones
  (`bias_grad_bf16_*`; run with `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=
  LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE`, lm's bf16 setting);
- lm's GELU without a gradient over `--gelu_shape` (XLA's loop fusion, erf; the vector
  width: `XLA_FLAGS=--xla_cpu_prefer_vector_width=256` against lm's default);
- a kernel's gradient xᵀ g over the token axis (`--weight_grad_shape N in out`) as XLA
  compiles it (Eigen), on x already laid out [in, N] (YNNPACK) and through lm's
  transpose kernel (`weight_grad_*`, lm.models.custom_grads.weight_grad);
- a dense layer's product x w and input gradient g wᵀ (`--dense_shape N in out`) as XLA
  compiles them and in lm's product kernel (`dense_*`, lm.kernels.gemm; on AVX-512 CPUs);
- one bf16 loss chunk, [rows, width] hidden states against the [vocab, width] table:
  its loss sums, or those and both gradients (dx and the table's [D, V] sum), through
  XLA's products and the cross-entropy kernel and through lm's AMX kernels
  (`bf16_chunk_{stats,grads}_{xla,amx}`, on CPUs with AMX; same flag as above), and the
  table's packing for the AMX kernels once per step (`amx_pack_{xla,kernel}`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import runtime  # noqa: E402  (sets lm's XLA flags before JAX starts)


def best_ms(fn, *args, repeats: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def ops(vocab: int, rows: int, width: int, bias_shape: tuple[int, int, int],
        attention_shape: tuple[int, int, int, int] = (12, 4, 64, 64),
        weight_grad_shape: tuple[int, int, int] = (768, 128, 512),
        gelu_shape: tuple[int, int] = (4096, 512),
        dense_shape: tuple[int, int, int] = (768, 128, 512)):
    import jax
    import jax.numpy as jnp

    def dot(a, b, contract):
        return jax.lax.dot_general(a, b, (contract, ((), ())))

    def dot32(a, b, contract):
        return jax.lax.dot_general(a, b, (contract, ((), ())),
                                   preferred_element_type=jnp.float32)

    key = jax.random.key(0)
    logits = jax.random.normal(key, (rows, vocab))
    table = jax.random.normal(key, (vocab, width))
    h = jax.random.normal(key, (rows, width))
    h8 = jax.random.normal(jax.random.key(7), (8, width))
    grad = jax.random.normal(key, bias_shape)
    ones = jnp.ones((bias_shape[0] * bias_shape[1],))
    b, heads, length, keys = attention_shape
    probs = jax.nn.softmax(jax.random.normal(key, attention_shape), -1)
    dprobs = jax.random.normal(jax.random.key(1), attention_shape)

    def softmax_bwd(p, g):
        return p * (g - jnp.sum(p * g, -1, keepdims=True))

    def grouped(x):
        return x.reshape(b, heads, 1, length, keys)

    # char_lm:baby's MLP backward: [768, 128] x [128, 512]ᵀ times the GELU's slope, with the
    # multiply fused into YNNPACK's product (plain) or kept out by a clamp (lm's _gelu_bwd)
    g_out = jax.random.normal(key, (768, 128))
    w_out = jax.random.normal(jax.random.key(2), (512, 128))
    slope = jax.random.normal(jax.random.key(3), (768, 512))
    big = jnp.finfo(jnp.float32).max

    from lm import generate
    from lm.kernels import argmax as argmax_kernel
    from lm.kernels import build
    from lm.kernels import filters as filters_kernel
    from lm.kernels import gemm as gemm_kernel
    from lm.kernels import logits as logits_kernel
    from lm.kernels import pick as pick_kernel
    from lm.models import custom_grads
    from lm.objectives import losses

    targets = jax.random.randint(key, (rows,), 0, vocab)
    weights = jnp.ones((rows,))
    quantized = (pick_kernel.quantize(table * 0.02)
                 if pick_kernel.usable(8, table) else None)

    def pick_logits(x, e):
        return generate.greedy_token(logits_kernel.small_logits(x, e)
                                     if logits_kernel.usable(x, e) else x @ e.T)

    def pick_greedy(x, e, q):
        return pick_kernel.greedy(x, e, q)

    draw_key = jax.random.key(11)

    def pick_logits_sample(x, e):  # temperature 1, no filter: the inverse-CDF draw
        logits = logits_kernel.small_logits(x, e) if logits_kernel.usable(x, e) else x @ e.T
        return generate.sample_token(draw_key, logits, temperature=1.0, top_k=0, top_p=1.0)

    def pick_sample(x, e, q):  # jax.random.categorical(key_b, logits_b) through the int8 copy
        rows = x.shape[0]
        return pick_kernel.sample(x, e, q, jnp.ones((rows,), jnp.float32),
                                  jax.random.split(draw_key, rows))

    def ce_chunk(dtype, kernel: bool):
        def fn(x, t, w):  # x + 0: a fresh buffer the fp32 kernel may overwrite in place
            return losses._chunk_loss_and_grad(x + 0, t, w, dtype)
        if kernel:
            return fn

        def xla(*a):
            with build.switched_off():  # traced with the kernel off
                return fn(*a)
        return xla

    weights_all = jax.random.normal(key, (vocab + 48 * width, width))
    logits8 = logits[:8]
    # a batch-8 decoding step's MLP products, [8, D] x [D, 4D] and [8, 4D] x [4D, D]
    w_in = jax.random.normal(jax.random.key(8), (width, 4 * width))
    w_out8 = jax.random.normal(jax.random.key(9), (4 * width, width))
    h8_wide = jax.random.normal(jax.random.key(10), (8, 4 * width))

    def nucleus_sort(x):  # the nucleus by sorting the row (the filter before bisection)
        sorted_ = jnp.sort(x, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_, axis=-1), axis=-1)
        idx = jnp.minimum(jnp.sum(cum < 0.9, axis=-1, keepdims=True), x.shape[-1] - 1)
        return x >= jnp.take_along_axis(sorted_, idx, axis=-1)

    def nucleus_bisect(x):  # lm.generate.filter_logits's nucleus off the CPU: bisection
        with build.switched_off():  # traced with the kernel off
            return generate.filter_logits(x, top_p=0.9) > jnp.finfo(x.dtype).min

    def nucleus_kernel(x):  # the same on the CPU: the filter kernel
        return filters_kernel.filter_rows(x, 0, 0.9) > jnp.finfo(x.dtype).min
    grad16 = grad.astype(jnp.bfloat16)
    bias16 = jnp.zeros(bias_shape[-1:], jnp.bfloat16)

    def bias_grad_bf16(add):
        return jax.grad(lambda g, b: jnp.sum((add(g, b) * g).astype(jnp.float32)), 1)

    from lm.kernels import amx_projection as amx

    h16, table16 = h.astype(jnp.bfloat16), (table * 0.05).astype(jnp.bfloat16)
    logits16 = logits.astype(jnp.bfloat16)
    acc = jnp.zeros((width, vocab), jnp.float32)

    def xla_chunk(grads: bool):
        def fn(x, e, t, w, a):  # the fused loss's chunk body: lm/objectives/losses.py
            logits = losses._chunk_logits(x[None], e)[0]
            if not grads:
                return losses._chunk_loss(logits, t, w)
            loss, correct, g = losses._chunk_loss_and_grad(logits, t, w, jnp.bfloat16)
            dx = jnp.einsum("kv,vd->kd", g, e, preferred_element_type=jnp.float32)
            return loss, correct, dx, a + jnp.einsum("kd,kv->dv", x, g,
                                                     preferred_element_type=jnp.float32)
        return fn

    amx_ops = {}
    if amx.usable(h16, table16):
        cols, rows_ = jax.jit(amx.pack)(table16)  # once per step in the fused loss
        amx_ops = {
            "bf16_chunk_stats_xla": (xla_chunk(False), (h16, table16, targets, weights, acc)),
            "bf16_chunk_stats_amx": (lambda x, c, t, w: amx.chunk_stats(x, t, w, c, vocab),
                                     (h16, cols, targets, weights)),
            "bf16_chunk_grads_xla": (xla_chunk(True), (h16, table16, targets, weights, acc)),
            "bf16_chunk_grads_amx": (
                lambda x, c, r, t, w, a: amx.chunk_grads(x, t, w, c, r, a),
                (h16, cols, rows_, targets, weights, acc)),
            "amx_pack_xla": (lambda e: (amx.pair_columns(e), amx.pair_rows(e)), (table16,)),
            "amx_pack_kernel": (amx.pack, (table16,)),
        }

    from lm.kernels import transpose as transpose_kernel

    def sample_xla(u, x):
        with build.switched_off():
            return generate.categorical_from_uniform(u, x)

    u8 = jax.random.uniform(jax.random.key(8), (logits8.shape[0],))

    n, d_in, d_out = weight_grad_shape
    wg_x = jax.random.normal(key, (n, d_in))
    wg_g = jax.random.normal(jax.random.key(4), (n, d_out))
    wg_xt = wg_x.T.copy()

    gelu_x = jax.random.normal(key, gelu_shape)
    dn, dd_in, dd_out = dense_shape
    dense_x = jax.random.normal(key, (dn, dd_in))
    dense_w = jax.random.normal(jax.random.key(5), (dd_in, dd_out))
    dense_g = jax.random.normal(jax.random.key(6), (dn, dd_out))
    nt = (((1,), (1,)), ((), ()))
    gemm_ops = {
        # a dense layer's product and input gradient in lm's product kernel (the latter on
        # the kernel transposed by lm's transpose kernel), on AVX-512 CPUs
        "dense_gemm_kernel": (gemm_kernel.matmul, (dense_x, dense_w)),
        "dense_dx_gemm_kernel": (
            lambda g, w: gemm_kernel.matmul(g, transpose_kernel.transpose(w)),
            (dense_g, dense_w)),
    } if gemm_kernel.usable(dense_x, dense_w) and gemm_kernel.usable(
        dense_g, jax.ShapeDtypeStruct(dense_w.shape[::-1], dense_w.dtype)) else {}

    return {
        **amx_ops,
        # lm's exact GELU without a gradient (an XLA loop fusion with erf: the vector
        # width flag's clearest case, `XLA_FLAGS=--xla_cpu_prefer_vector_width=256` against
        # lm's 512 on AVX-512 CPUs)
        "gelu": (custom_grads.gelu, (gelu_x,)),
        # a kernel's gradient xᵀ g over the token axis: as XLA gets it (Eigen), on an
        # operand already laid out [in, N] (YNNPACK), and lm's form (custom_grads.weight_grad)
        "weight_grad_2d": (lambda x, g: x.T @ g, (wg_x, wg_g)),
        "weight_grad_pretransposed": (lambda xt, g: xt @ g, (wg_xt, wg_g)),
        **({"weight_grad_kernel_transposed": (custom_grads.weight_grad, (wg_x, wg_g))}
           if transpose_kernel.usable(wg_x) else {}),
        # the same two products as XLA compiles them (YNNPACK)
        "dense_xla": (lambda x, w: x @ w, (dense_x, dense_w)),
        "dense_dx_xla": (lambda g, w: dot(g, w, nt[0]), (dense_g, dense_w)),
        **gemm_ops,
        "row_max": (lambda x: jnp.max(x, -1), (logits,)),
        "row_sum": (lambda x: jnp.sum(x, -1), (logits,)),
        "bias_grad_reduce": (lambda g: jnp.sum(g, (0, 1)), (grad,)),
        "bias_grad_ones_product": (lambda g: ones @ g.reshape(ones.shape[0], -1), (grad,)),
        # [8, N] ones: XLA rewrites the vector form above back into the reduction
        "bias_grad_ones8_product": (
            lambda g: (jnp.ones((8, ones.shape[0])) @ g.reshape(ones.shape[0], -1))[0], (grad,)),
        "logits_h_Et": (lambda h, e: dot(h, e, ((1,), (1,))), (h, table)),
        "dh_g_E": (lambda g, e: g @ e, (logits, table)),
        "dE_gt_h": (lambda g, h: dot(g, h, ((0,), (0,))), (logits, h)),
        # the same table gradient as [D, V], transposed once (lm's fused loss, tied_product)
        "dE_ht_g_then_T": (lambda g, h: dot(h, g, ((0,), (0,))).T, (logits, h)),
        # the same three products with bf16 operands and fp32 accumulation (lm's bf16 step)
        "logits_h_Et_bf16": (lambda h, e: dot32(h, e, ((1,), (1,))), (h16, table16)),
        "dh_g_E_bf16": (lambda g, e: dot32(g, e, ((1,), (0,))), (logits16, table16)),
        "dE_ht_g_bf16": (lambda g, h: dot32(h, g, ((0,), (0,))), (logits16, h16)),
        "softmax_bwd_BG1LS": (softmax_bwd, (grouped(probs), grouped(dprobs))),
        "softmax_bwd_BHLS": (softmax_bwd, (probs, dprobs)),
        "mlp_bwd_product": (lambda g, w: g @ w.T, (g_out, w_out)),
        "mlp_bwd_product_times_slope": (lambda g, w, s: (g @ w.T) * s, (g_out, w_out, slope)),
        "mlp_bwd_product_clamp_times_slope": (
            lambda g, w, s: jnp.clip(g @ w.T, -big, big) * s, (g_out, w_out, slope)),
        **{f"ce_chunk_{impl}_{name}": (ce_chunk(dtype, impl == "kernel"),
                                        (logits, targets, weights))
           for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16))
           for impl in ("xla", "kernel")},
        "weights_read": (lambda w: jnp.sum(w, 0), (weights_all,)),
        # a batch-8 decoding step's tied logits, x [8, D] against the [V, D] table: XLA's
        # product and lm's kernel (lm.kernels.logits; XLA's where the kernel is not built)
        "decode_logits_xla": (lambda x, e: dot(x, e, ((1,), (1,))), (h8, table)),
        "decode_logits_kernel": (logits_kernel.small_logits if logits_kernel.usable(h8, table)
                                 else lambda x, e: dot(x, e, ((1,), (1,))), (h8, table)),
        # decoding's few-row products: XLA's and lm's kernel (AVX2: 8 rows at a time)
        "decode_mlp_in_xla": (lambda x, w: x @ w, (h8, w_in)),
        "decode_mlp_out_xla": (lambda x, w: x @ w, (h8_wide, w_out8)),
        **({"decode_mlp_in_kernel": (gemm_kernel.matmul, (h8, w_in)),
            "decode_mlp_out_kernel": (gemm_kernel.matmul, (h8_wide, w_out8))}
           if gemm_kernel.usable(h8, w_in) and gemm_kernel.usable(h8_wide, w_out8) else {}),
        # the nucleus (top_p 0.9) of 1 and 8 logits rows: by sorting, by bisection (XLA)
        # and by lm's kernel (lm.kernels.filters)
        **{f"nucleus_{how}_{rows}": (fn, (logits8[:rows],)) for rows in (1, 8)
           for how, fn in (("sort", nucleus_sort), ("bisect", nucleus_bisect))},
        **({f"nucleus_kernel_{rows}": (nucleus_kernel, (logits8[:rows],)) for rows in (1, 8)}
           if filters_kernel.usable(logits8) else {}),
        # greedy decoding's token from the hidden state: logits then argmax (the logits
        # path), and where the kernels apply the int8 table with exact rescoring
        # (lm.kernels.pick) and its copy; the table scaled like a GPT's (0.02)
        **{f"pick_logits_argmax_{rows}": (pick_logits, (h8[:rows], table * 0.02))
           for rows in (1, 8)},
        **({f"pick_greedy_kernel_{rows}": (pick_greedy, (h8[:rows], table * 0.02, quantized))
            for rows in (1, 8)} if quantized else {}),
        **({"quantize_table": (pick_kernel.quantize, (table * 0.02,))} if quantized else {}),
        # sampling's token from the hidden state (temperature 1): logits then the inverse-
        # CDF draw, and the int8 table with jax's Gumbel noise (lm.kernels.pick)
        **{f"pick_logits_sample_{rows}": (pick_logits_sample, (h8[:rows], table * 0.02))
           for rows in (1, 8)},
        **({f"pick_sample_kernel_{rows}": (pick_sample, (h8[:rows], table * 0.02, quantized))
            for rows in (1, 8)} if quantized else {}),
        # greedy decoding's token choice over [8, vocab] logits
        "argmax_top_k1": (lambda x: jax.lax.top_k(x, 1)[1][:, 0], (logits8,)),
        "argmax_jnp": (lambda x: jnp.argmax(x, -1), (logits8,)),
        # (XLA's top_k where the kernel cannot be built)
        "argmax_kernel": (argmax_kernel.argmax if argmax_kernel.usable(logits8)
                          else lambda x: jax.lax.top_k(x, 1)[1][:, 0], (logits8,)),
        # sampling's token choice (temperature 1, no filter) over the same logits: XLA's
        # steps (lm.generate.categorical_from_uniform) and lm's CPU kernel
        "sample_xla": (sample_xla, (u8, logits8)),
        "sample_kernel": (argmax_kernel.sample if argmax_kernel.usable(logits8)
                          else sample_xla, (u8, logits8)),
        "bias_grad_bf16_reduce": (bias_grad_bf16(lambda g, b: g + b), (grad16, bias16)),
        "bias_grad_bf16_ones8_product": (bias_grad_bf16(custom_grads.add_bias),
                                         (grad16, bias16)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--bias_shape", type=int, nargs=3, default=[16, 128, 1024])
    p.add_argument("--attention_shape", type=int, nargs=4, default=[12, 4, 64, 64])
    p.add_argument("--weight_grad_shape", type=int, nargs=3, default=[768, 128, 512],
                   help="N in out: x [N, in], g [N, out] (char_lm:baby's MLP input)")
    p.add_argument("--gelu_shape", type=int, nargs=2, default=[4096, 512],
                   help="rows width (char_lm:baby's validation batch of 64 windows)")
    p.add_argument("--dense_shape", type=int, nargs=3, default=[768, 128, 512],
                   help="N in out: a dense layer's x [N, in] @ w [in, out] and its input "
                        "gradient g [N, out] @ wᵀ (char_lm:baby's MLP input projection)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--ops", nargs="+", default=None, help="time only these ops (names above)")
    args = p.parse_args()
    import jax

    flags = os.environ.get("XLA_FLAGS", "")
    for name, (fn, operands) in ops(args.vocab, args.rows, args.width,
                                    tuple(args.bias_shape),
                                    tuple(args.attention_shape),
                                    tuple(args.weight_grad_shape),
                                    tuple(args.gelu_shape),
                                    tuple(args.dense_shape)).items():
        if args.ops and name not in args.ops:
            continue
        ms = best_ms(jax.jit(fn), *operands, repeats=args.repeats)
        print(json.dumps({"what": "cpu_op", "op": name,
                          "shapes": [list(o.shape) for o in jax.tree.leaves(operands)],
                          "best_ms": round(ms, 3),
                          "xla_flags": flags, "cpu_flags": runtime.cpu_flags()}), flush=True)


if __name__ == "__main__":
    main()
