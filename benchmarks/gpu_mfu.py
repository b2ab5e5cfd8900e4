"""Model FLOPs utilisation of our training step on one accelerator: GPT-2 124M (seq 1024,
bf16 compute, fp32 master weights, cuDNN fused attention) and BERT-base MLM + NSP (seq 512),
each our real jitted train step (AdamW) on a fixed random batch.

MFU = (training FLOPs per token x tokens/s) / the device's peak dense bf16 FLOP/s, where
the FLOPs per token are the objective's analytic count (`ModelConfig.flops_per_token`:
6 x matmul parameters + 12 x layers x seq x width for attention; the vocabulary projection
for every token of GPT, for the masked positions only of BERT) and the peak comes from
`lm.reporting.DEVICE_PEAK_FLOPS` (H100 SXM / H200: 989e12, A100: 312e12, ...). On a CPU,
set LM_CPU_PEAK_FLOPS (e.g. `bfloat16=1.4e12`); without it the peak is this process's
measured 2048^3 GEMM rate, and `peak_source` says so.

One JSON line per model (what, config, step time, tokens/s, FLOPs/token, achieved TFLOP/s,
peak, MFU, peak memory):

    python benchmarks/gpu_mfu.py                      # both models, on the default device
    python benchmarks/gpu_mfu.py --model gpt2 --batch 32 --steps 20
    python benchmarks/gpu_mfu.py --tiny               # a tiny shape for CPU tests
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
from ml_collections import ConfigDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step as bench  # noqa: E402 (the shared one-device step builder)

from lm import reporting  # noqa: E402
from lm.config_base import model_config, to_model_config  # noqa: E402
from lm.objectives import get as get_objective  # noqa: E402
from lm.runtime import cpu_flags  # noqa: E402

# name -> (preset, seq, default batch, vocab); GPT-2's vocabulary padded to a multiple of 64
MODELS = {"gpt2": ("gpt2_small", 1024, 16, 50304), "bert": ("bert_base", 512, 32, 30522)}
TINY = dict(num_layers=2, d_model=64, num_heads=2, mlp_dim=256)  # --tiny: CPU test shape
TINY_SEQ, TINY_BATCH, TINY_VOCAB = 32, 4, 512


def config_for(name: str, tiny: bool, dtype: str, attention: str) -> tuple[ConfigDict, int]:
    """(our experiment config, batch size) for `name` at full or tiny size."""
    preset, seq, batch, vocab = MODELS[name]
    shape = TINY if tiny else {}
    seq, batch, vocab = (TINY_SEQ, TINY_BATCH, TINY_VOCAB) if tiny else (seq, batch, vocab)
    c = bench.our_config("gpt" if name == "gpt2" else "bert", dtype)  # objective + optimizer
    c.model = model_config(preset, **shape, max_len=seq, vocab_size=vocab, dropout_rate=0.0,
                           attention_dropout_rate=0.0, dtype=dtype, param_dtype="float32",
                           attention_impl=attention)
    if name == "bert":
        c.data.max_predictions = max(1, round(0.15 * seq))  # BERT's 15 % masking
    c.data.seq_len, c.train.batch_size = seq, batch
    return c, batch


def peak_flops(dtype: str) -> tuple[float, str]:
    """(peak FLOP/s of device 0 in `dtype`, where the figure comes from)."""
    device = jax.devices()[0]
    peak = reporting.device_peak_flops(device, dtype)
    if peak:
        source = reporting.CPU_PEAK_ENV if device.platform == "cpu" else "DEVICE_PEAK_FLOPS"
        return peak, source
    return bench.gemm_ceiling(dtype) * 1e9, "measured_gemm"


def measure(name: str, args) -> dict:
    config, batch = config_for(name, args.tiny, args.dtype, args.attention)
    if args.batch:
        config.train.batch_size = batch = args.batch
    seq = config.data.seq_len
    flops_per_token = get_objective(config).flops_per_token(to_model_config(config.model))
    t0 = time.perf_counter()
    run = bench.step_on_one_device(config, batch)  # compiles and runs one step
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        run()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        run()
    step_time = (time.perf_counter() - t0) / args.steps
    tokens_per_sec = batch * seq / step_time
    achieved = flops_per_token * tokens_per_sec
    peak, source = peak_flops(args.dtype)
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    return {
        "what": f"mfu_{name}", "device": device.device_kind, "platform": device.platform,
        "jax": jax.__version__,
        "config": {"preset": MODELS[name][0], "tiny": args.tiny, "seq": seq, "batch": batch,
                   "vocab": config.model.vocab_size, "dtype": args.dtype,
                   "param_dtype": "float32", "attention": args.attention},
        "compile_and_first_step_s": round(compile_s, 2), "steps": args.steps,
        "step_time_s": round(step_time, 5), "tokens_per_sec": round(tokens_per_sec, 1),
        "flops_per_token": flops_per_token, "achieved_tflops_per_s": round(achieved / 1e12, 3),
        "peak_tflops_per_s": round(peak / 1e12, 3), "peak_source": source,
        "mfu": round(achieved / peak, 4),
        "peak_memory_gb": round(stats.get("peak_bytes_in_use", 0) / 2**30, 2),
        "cpu_flags": cpu_flags(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["gpt2", "bert", "both"], default="both")
    p.add_argument("--tiny", action="store_true", help="2 layers, width 64, seq 32 (CPU tests)")
    p.add_argument("--dtype", default="bfloat16", help="compute dtype (weights stay fp32)")
    p.add_argument("--attention", default=None,
                   help="attention implementation (default: cudnn on a GPU, xla elsewhere)")
    p.add_argument("--batch", type=int, default=0, help="0: the model's default")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    if args.attention is None:
        args.attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
    for name in (["gpt2", "bert"] if args.model == "both" else [args.model]):
        print(json.dumps(measure(name, args)), flush=True)


if __name__ == "__main__":
    main()
