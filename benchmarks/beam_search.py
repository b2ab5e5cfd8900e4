"""Beam-search throughput: `lm.generate.beam_search` (the whole search one compiled on-device
loop) vs Hugging Face `generate(num_beams=4)` (PyTorch eager, KV cache) on the same T5
weights, alternating A B A B with each side in a fresh process.

Shape: a T5 v1.0-layout encoder-decoder, 3 + 3 layers, width 256, 4 heads, MLP 1024,
vocab 8,100 (translate_multi30k.py:small's size), random weights made by transformers and
converted with `lm.convert.hf_t5`, so both sides search the same model; a 32-token source,
beam 4, 32 new tokens (end-of-sequence suppressed on both sides, so every call does the same
work), batch 1 and 8. One JSON line per measurement (tokens/s of new tokens of the best
beam, seconds per call, peak RSS, the best beam's tokens' hash so that the two sides'
outputs can be compared), the CPU's flags first, one line per ratio last.

    python benchmarks/beam_search.py --rounds 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import cpu_info, side_records  # noqa: E402

SHAPE = dict(layers=3, width=256, heads=4, mlp=1024, vocab=8100, source=32, new=32, beams=4)


def hf_model():
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=SHAPE["vocab"], d_model=SHAPE["width"], d_kv=SHAPE["width"] //
                   SHAPE["heads"], d_ff=SHAPE["mlp"], num_layers=SHAPE["layers"],
                   num_heads=SHAPE["heads"], dropout_rate=0.0, feed_forward_proj="relu",
                   tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1)
    return T5ForConditionalGeneration(cfg).eval()


def source(batch: int) -> np.ndarray:
    return np.random.default_rng(0).integers(2, SHAPE["vocab"], (batch, SHAPE["source"]))


def ours(batch: int):
    from lm.convert.hf_t5 import params_from_hf
    from lm.generate import beam_search

    model = hf_model()
    tensors = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg, params, _ = params_from_hf(tensors, model.config.to_dict(), "random T5")
    ids = source(batch).astype(np.int32)

    def run():
        seqs, _ = beam_search(cfg, params, ids, beam_size=SHAPE["beams"], alpha=0.6,
                              max_len=SHAPE["new"], eos_id=-1)
        return seqs[:, 0]

    return run


def hf(batch: int):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    model = hf_model()
    ids = torch.tensor(source(batch), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                 num_beams=SHAPE["beams"], max_new_tokens=SHAPE["new"],
                                 min_new_tokens=SHAPE["new"], do_sample=False)
        return out[:, 1:].numpy()  # without the decoder start token

    return run


def measure(impl: str, batch: int, repeats: int) -> dict:
    fn = (ours if impl == "lm" else hf)(batch)
    t0 = time.perf_counter()
    out = fn()  # compile (ours) / warm-up (both)
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    digest = hashlib.sha256(np.asarray(out, np.int64).tobytes()).hexdigest()[:12]
    return {"what": "beam_search", "impl": impl, "batch": batch, "config": SHAPE,
            "seconds": round(best, 4), "first_call_s": round(first, 3),
            "tokens_per_sec": round(batch * SHAPE["new"] / best, 1), "output_sha": digest,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed calls per process (best)")
    p.add_argument("--batch", type=int, action="append", default=None)
    p.add_argument("--only", choices=("lm", "hf"), default=None, help="(internal) one side")
    args = p.parse_args()
    batches = args.batch or [1, 8]
    if args.only:
        for batch in batches:
            print(json.dumps(measure(args.only, batch, args.repeats)), flush=True)
        return
    print(json.dumps(cpu_info()), flush=True)
    seconds: dict[tuple, list[float]] = {}
    outputs: dict[tuple, set] = {}
    for r in range(args.rounds):
        for impl in ("lm", "hf"):
            cmd = [sys.executable, __file__, "--only", impl, "--repeats", str(args.repeats)]
            cmd += [f"--batch={b}" for b in batches]
            for record in side_records(cmd, impl, r):
                seconds.setdefault((impl, record["batch"]), []).append(record["seconds"])
                outputs.setdefault(record["batch"], set()).add(record["output_sha"])
                print(json.dumps(record), flush=True)
    for batch in batches:
        lm_s, hf_s = seconds[("lm", batch)], seconds[("hf", batch)]
        print(json.dumps({"what": "ratio_beam_search", "batch": batch,
                          "lm_over_hf_speed": round(float(np.median(hf_s) / np.median(lm_s)),
                                                    2),
                          "same_best_beam": len(outputs[batch]) == 1}), flush=True)


if __name__ == "__main__":
    main()
