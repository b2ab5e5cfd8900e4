"""benchmarks/cpu_ops.py: every op it times computes what its name says."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import scipy.special

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("cpu_ops", ROOT / "benchmarks" / "cpu_ops.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ops_compute_their_reference_values():
    ops = _module().ops(vocab=37, rows=6, width=16, bias_shape=(3, 3, 4),
                        attention_shape=(2, 3, 4, 5), weight_grad_shape=(24, 5, 9),
                        gelu_shape=(3, 7), dense_shape=(13, 5, 32))
    (x,) = ops["row_max"][1]
    x = np.asarray(x, np.float64)
    want = {"row_max": x.max(-1), "row_sum": x.sum(-1)}
    (g,) = ops["bias_grad_reduce"][1]
    want["bias_grad_reduce"] = want["bias_grad_ones_product"] = np.asarray(g).sum((0, 1))
    want["bias_grad_ones8_product"] = want["bias_grad_reduce"]
    h, e = (np.asarray(a, np.float64) for a in ops["logits_h_Et"][1])
    want.update(logits_h_Et=h @ e.T, dh_g_E=x @ e, dE_gt_h=x.T @ h, dE_ht_g_then_T=x.T @ h)
    h16, e16 = (np.asarray(a, np.float64) for a in ops["logits_h_Et_bf16"][1])
    x16 = np.asarray(ops["dh_g_E_bf16"][1][0], np.float64)
    want.update(logits_h_Et_bf16=h16 @ e16.T, dh_g_E_bf16=x16 @ e16, dE_ht_g_bf16=h16.T @ x16)
    p, g = (np.asarray(a, np.float64) for a in ops["softmax_bwd_BHLS"][1])
    want["softmax_bwd_BHLS"] = p * g - p * (p * g).sum(-1, keepdims=True)
    want["softmax_bwd_BG1LS"] = want["softmax_bwd_BHLS"][:, :, None]
    np.testing.assert_allclose(ops["softmax_bwd_BG1LS"][1][0], p[:, :, None], rtol=1e-6)
    g_out, w_out, slope = (np.asarray(a, np.float64) for a in ops["mlp_bwd_product_times_slope"][1])
    want["mlp_bwd_product"] = g_out @ w_out.T
    want["mlp_bwd_product_times_slope"] = want["mlp_bwd_product_clamp_times_slope"] = (
        g_out @ w_out.T * slope)
    # one loss chunk: (loss sum, correct count, (softmax - onehot) * w), kernel and XLA
    logits, targets, weights = (np.asarray(a) for a in ops["ce_chunk_xla_f32"][1])
    z = logits.astype(np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    xt = z[np.arange(len(z)), targets]
    soft = np.exp(z - lse[:, None]) - np.eye(z.shape[1])[targets]
    chunk = ((lse - xt) @ weights, (xt >= z.max(-1)) @ weights, soft * weights[:, None])
    for name in ("ce_chunk_xla_f32", "ce_chunk_kernel_f32", "ce_chunk_xla_bf16",
                 "ce_chunk_kernel_bf16"):
        want[name] = chunk
    g16, _ = ops["bias_grad_bf16_reduce"][1]
    g16 = np.asarray(g16.astype(np.float32), np.float64)
    want["bias_grad_bf16_reduce"] = want["bias_grad_bf16_ones8_product"] = g16.sum((0, 1))
    (w_all,) = ops["weights_read"][1]
    assert w_all.shape == (37 + 48 * 16, 16)
    want["weights_read"] = np.asarray(w_all, np.float64).sum(0)
    h8, e = (np.asarray(a, np.float64) for a in ops["decode_logits_kernel"][1])
    assert h8.shape == (8, 16)
    want["decode_logits_xla"] = want["decode_logits_kernel"] = h8 @ e.T
    x_in, w_in = (np.asarray(a, np.float64) for a in ops["decode_mlp_in_xla"][1])
    x_out, w_out8 = (np.asarray(a, np.float64) for a in ops["decode_mlp_out_xla"][1])
    assert (x_in.shape, w_in.shape, x_out.shape, w_out8.shape) == (
        (8, 16), (16, 64), (8, 64), (64, 16))
    want["decode_mlp_in_xla"] = x_in @ w_in
    want["decode_mlp_out_xla"] = x_out @ w_out8
    if "decode_mlp_in_kernel" in ops:  # where the CPU kernels are built
        want["decode_mlp_in_kernel"] = want["decode_mlp_in_xla"]
        want["decode_mlp_out_kernel"] = want["decode_mlp_out_xla"]
    for rows in (1, 8):  # the nucleus 0.9: the smallest set of largest logits reaching 0.9
        (z_,) = (np.asarray(a, np.float64) for a in ops[f"nucleus_sort_{rows}"][1])
        order = np.sort(z_, -1)[:, ::-1]
        cum = np.cumsum(np.exp(order - order[:, :1]), -1)
        cut = order[np.arange(len(z_)), (cum < 0.9 * cum[:, -1:]).sum(-1)]
        want[f"nucleus_sort_{rows}"] = want[f"nucleus_bisect_{rows}"] = z_ >= cut[:, None]
        if f"nucleus_kernel_{rows}" in ops:  # where the CPU kernels are built
            want[f"nucleus_kernel_{rows}"] = want[f"nucleus_sort_{rows}"]
    for rows in (1, 8):  # greedy tokens from the hidden state
        x_, table_ = (np.asarray(a, np.float64) for a in ops[f"pick_logits_argmax_{rows}"][1])
        want[f"pick_logits_argmax_{rows}"] = (x_ @ table_.T).argmax(-1)
        if f"pick_greedy_kernel_{rows}" in ops:  # where the CPU kernels are built
            want[f"pick_greedy_kernel_{rows}"] = want[f"pick_logits_argmax_{rows}"]
        # sampled (temperature 1): at quantile u of the softmax, and argmax(gumbel + logits)
        z_ = x_ @ table_.T
        cdf = np.exp(z_ - z_.max(-1, keepdims=True)).cumsum(-1)
        u_ = np.asarray(jax.random.uniform(jax.random.key(11), (rows,)), np.float64)
        want[f"pick_logits_sample_{rows}"] = (cdf <= (u_ * cdf[:, -1])[:, None]).sum(-1)
        if f"pick_sample_kernel_{rows}" in ops:
            keys = jax.random.split(jax.random.key(11), rows)
            noise = jax.vmap(lambda k, n=z_.shape[1]: jax.random.gumbel(k, (n,)))(keys)
            want[f"pick_sample_kernel_{rows}"] = (np.asarray(noise, np.float64) + z_).argmax(-1)
    if "quantize_table" in ops:  # int8 rows, their scales and error radii
        (w_,) = (np.asarray(a, np.float64) for a in ops["quantize_table"][1])
        s_ = np.abs(w_).max(-1) / 127
        q_ = np.rint(w_ / s_[:, None])
        width = w_.shape[1]
        gamma = 2 * (width + 2) * 2.0**-24
        share = 0.52 * np.sqrt(width) / min(32767, (2**31 - 1) // (127 * width))  # int16 x
        radius = (np.linalg.norm(w_ - s_[:, None] * q_, axis=-1) + gamma * (
            np.linalg.norm(w_, axis=-1) + s_ * np.linalg.norm(q_, axis=-1))
            + share * s_ * np.linalg.norm(q_, axis=-1)) * 1.001
        want["quantize_table"] = (q_, s_, radius)
    u8, x8s = (np.asarray(a, np.float64) for a in ops["sample_kernel"][1])
    p8 = np.exp(x8s - x8s.max(-1, keepdims=True)).cumsum(-1)
    want["sample_xla"] = want["sample_kernel"] = (p8 <= (u8 * p8[:, -1])[:, None]).sum(-1)
    (x8,) = ops["argmax_kernel"][1]
    want["argmax_top_k1"] = want["argmax_jnp"] = want["argmax_kernel"] = np.asarray(x8).argmax(-1)
    wx, wg = (np.asarray(a, np.float64) for a in ops["weight_grad_2d"][1])
    assert (wx.shape, wg.shape) == ((24, 5), (24, 9))
    np.testing.assert_array_equal(ops["weight_grad_pretransposed"][1][0], wx.T)
    want["weight_grad_2d"] = want["weight_grad_pretransposed"] = wx.T @ wg
    if "weight_grad_kernel_transposed" in ops:  # where the CPU kernels are built
        want["weight_grad_kernel_transposed"] = wx.T @ wg
    (gx,) = (np.asarray(a, np.float64) for a in ops["gelu"][1])
    assert gx.shape == (3, 7)
    want["gelu"] = gx * 0.5 * (1 + scipy.special.erf(gx / np.sqrt(2)))
    dx_, dw_ = (np.asarray(a, np.float64) for a in ops["dense_xla"][1])
    dg_ = np.asarray(ops["dense_dx_xla"][1][0], np.float64)
    assert (dx_.shape, dw_.shape, dg_.shape) == ((13, 5), (5, 32), (13, 32))
    want["dense_xla"] = dx_ @ dw_
    want["dense_dx_xla"] = dg_ @ dw_.T
    if "dense_gemm_kernel" in ops:  # on AVX-512 CPUs with the kernels built
        want["dense_gemm_kernel"], want["dense_dx_gemm_kernel"] = dx_ @ dw_, dg_ @ dw_.T
    assert set(ops) == set(want)
    for name, (fn, operands) in ops.items():
        got = jax.jit(fn)(*operands)
        rtol = 1e-2 if "bf16" in name else 1e-4
        for g, w in zip(got if isinstance(got, tuple) else (got,),
                        want[name] if isinstance(want[name], tuple) else (want[name],),
                        strict=True):
            np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=rtol, atol=rtol,
                                       err_msg=name)


def _run(*extra: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_ops.py"), "--vocab", "64", "--rows",
         "8", "--width", "4", "--bias_shape", "2", "8", "8", "--attention_shape", "2", "2",
         "4", "4", "--repeats", "2", *extra],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        check=True).stdout.splitlines()
    return [json.loads(line) for line in out]


def test_prints_one_line_per_op():
    lines = _run()
    assert [r["op"] for r in lines] == list(_module().ops(8, 2, 2, (2, 2, 2)))
    assert all(r["what"] == "cpu_op" and r["best_ms"] > 0 for r in lines)
    picked = _run("--ops", "bias_grad_reduce", "row_max")  # in the table's order
    assert [r["op"] for r in picked] == ["row_max", "bias_grad_reduce"]


def test_bf16_chunk_ops_agree_between_xla_and_the_amx_kernels():
    from lm.kernels import amx_projection

    if not amx_projection.has_amx():
        pytest.skip("the AMX ops exist only on a CPU with AMX (amx_tile, amx_bf16)")
    ops = _module().ops(vocab=37, rows=32, width=32, bias_shape=(2, 2, 2))
    for what in ("stats", "grads"):
        xla = jax.jit(ops[f"bf16_chunk_{what}_xla"][0])(*ops[f"bf16_chunk_{what}_xla"][1])
        ours = jax.jit(ops[f"bf16_chunk_{what}_amx"][0])(*ops[f"bf16_chunk_{what}_amx"][1])
        ours = (ours[0].sum(), ours[1].sum(), *ours[2:])  # the kernel's sums are per token
        for o, x in zip(ours, xla, strict=True):
            np.testing.assert_allclose(np.asarray(o, np.float64), np.asarray(x, np.float64),
                                       rtol=1e-2, atol=1e-3, err_msg=what)
    cols, rows = jax.jit(ops["amx_pack_kernel"][0])(*ops["amx_pack_kernel"][1])
    want_cols, want_rows = ops["amx_pack_xla"][0](*ops["amx_pack_xla"][1])
    np.testing.assert_array_equal(np.asarray(cols), np.asarray(want_cols))
    np.testing.assert_array_equal(np.asarray(rows), np.asarray(want_rows))
