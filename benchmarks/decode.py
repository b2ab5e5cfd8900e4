"""Decoding throughput: `lm.generate` (the whole decode one compiled on-device loop) vs
Hugging Face `generate` (PyTorch eager, KV cache) on the same GPT shape, alternating
A B A B with each side in a fresh process.

Shape: 4 layers, width 256, 4 heads, vocab 50257, learned positions (max_len 512), a
16-token prompt and 256 new tokens (no early stop), batch 1 and 8, greedy and sampling
(temperature 1, no top-k; both our paths pick tokens through the int8 copy of the
table, lm.kernels.pick: greedy the logits' argmax, sampling jax.random.categorical's
draw). One JSON line per measurement (tokens/s of new tokens, seconds per call, peak
RSS), the CPU's model and bf16/AMX flags first, one line per ratio last.

    python benchmarks/decode.py --rounds 2
    python benchmarks/decode.py --batch 1 --mode greedy --rounds 3
    python benchmarks/decode.py --mode top_k --rounds 2    # top-k 40 sampling
    python benchmarks/decode.py --mode top_p --rounds 2    # nucleus 0.9 sampling
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from lm import runtime

TOP_K = 40  # --mode top_k: the demo page's default
TOP_P = 0.9  # --mode top_p (no top-k): the nucleus over the whole vocabulary
SHAPE = dict(layers=4, width=256, heads=4, vocab=50257, max_len=512, prompt=16, new=256)


def cpu_info() -> dict:
    info = {"model": "", "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not info["model"]:
                    info["model"] = line.split(":", 1)[1].strip()
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16",
                                                    "amx_bf16", "amx_tile"})
                    break
    except OSError:
        pass
    return {"what": "cpu", **info, "cores": os.cpu_count()}


def side_records(cmd: list[str], impl: str, round_: int) -> list[dict]:
    """The JSON lines (tagged with `round`) of one side run in a fresh process: ours as
    is, a peer ("hf") without lm's process settings (`runtime.peer_env`), as its users
    run it. A failed run ends the benchmark with its stderr."""
    out = subprocess.run(cmd, capture_output=True, text=True,
                         env=None if impl == "lm" else runtime.peer_env())
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return [json.loads(line) | {"round": round_} for line in out.stdout.splitlines()
            if line.startswith("{")]


def prompt(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, SHAPE["vocab"], (batch, SHAPE["prompt"]))


def ours(batch: int, mode: str):
    import jax
    import jax.numpy as jnp

    from lm.generate import generate
    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder

    cfg = ModelConfig(vocab_size=SHAPE["vocab"], d_model=SHAPE["width"],
                      num_layers=SHAPE["layers"], num_heads=SHAPE["heads"],
                      mlp_dim=4 * SHAPE["width"], max_len=SHAPE["max_len"])
    ids = prompt(batch).astype(np.int32)
    params = Decoder(cfg).init(jax.random.key(0), jnp.asarray(ids))["params"]
    temperature = 0.0 if mode == "greedy" else 1.0

    def run():
        out = generate(cfg, params, ids, max_new_tokens=SHAPE["new"], temperature=temperature,
                       top_k=TOP_K if mode == "top_k" else 0,
                       top_p=TOP_P if mode == "top_p" else 1.0)
        assert out.shape == (batch, SHAPE["prompt"] + SHAPE["new"])

    return run


def hf(batch: int, mode: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=SHAPE["vocab"], n_embd=SHAPE["width"], n_layer=SHAPE["layers"],
        n_head=SHAPE["heads"], n_positions=SHAPE["max_len"])).eval()
    ids = torch.tensor(prompt(batch), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=SHAPE["new"], min_new_tokens=SHAPE["new"],
                                 do_sample=mode != "greedy", temperature=1.0,
                                 top_k=TOP_K if mode == "top_k" else 0,
                                 top_p=TOP_P if mode == "top_p" else 1.0,
                                 pad_token_id=0, eos_token_id=None)
        assert tuple(out.shape) == (batch, SHAPE["prompt"] + SHAPE["new"])

    return run


def measure(impl: str, batch: int, mode: str, repeats: int) -> dict:
    fn = (ours if impl == "lm" else hf)(batch, mode)
    t0 = time.perf_counter()
    fn()  # compile (ours) / warm-up (both)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return {"what": "decode", "impl": impl, "mode": mode, "batch": batch,
            "config": SHAPE, "seconds": round(best, 4), "first_call_s": round(first, 3),
            "tokens_per_sec": round(batch * SHAPE["new"] / best, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per process (best)")
    p.add_argument("--batch", type=int, action="append", default=None)
    p.add_argument("--mode", choices=("greedy", "sample", "top_k", "top_p"), action="append",
                   default=None, help="default: greedy and sample; top_k: top-k 40 sampling; "
                   "top_p: nucleus 0.9 sampling")
    p.add_argument("--only", choices=("lm", "hf"), default=None, help="(internal) one side")
    args = p.parse_args()
    batches, modes = args.batch or [1, 8], args.mode or ["greedy", "sample"]
    if args.only:
        for batch in batches:
            for mode in modes:
                print(json.dumps(measure(args.only, batch, mode, args.repeats)), flush=True)
        return
    print(json.dumps(cpu_info()), flush=True)
    seconds: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for impl in ("lm", "hf"):
            cmd = [sys.executable, __file__, "--only", impl, "--repeats", str(args.repeats)]
            cmd += [f"--batch={b}" for b in batches] + [f"--mode={m}" for m in modes]
            for record in side_records(cmd, impl, r):
                seconds.setdefault((impl, record["batch"], record["mode"]), []).append(
                    record["seconds"])
                print(json.dumps(record), flush=True)
    for batch in batches:
        for mode in modes:
            lm_s, hf_s = seconds[("lm", batch, mode)], seconds[("hf", batch, mode)]
            print(json.dumps({"what": "ratio_decode", "batch": batch, "mode": mode,
                              "lm_over_hf_tokens_per_sec":
                                  round(float(np.median(hf_s) / np.median(lm_s)), 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
