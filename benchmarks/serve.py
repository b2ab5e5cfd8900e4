"""Serving throughput and latency: `lm.serve` over HTTP with 1, 8 and 32 concurrent
clients vs Hugging Face `generate` called directly at the same batch sizes, alternating
A B A B with each side in a fresh process.

Shape (as benchmarks/decode.py): a random-init GPT of 4 layers, width 256, 4 heads, vocab
50257, learned positions; 16-token prompts (token ids), 64 new tokens each, greedy, no
early stop (`--temperature T`: sampled at temperature T from the whole softmax, top-k
off on both sides; `--top_p P` / `--top_k K` with it: from the nucleus / the k largest,
every request). Our side: the server in its own process (32 slots of 80 tokens), the clients
in another (asyncio + httpx, each client sends its requests one after another, so
`concurrency` requests are in flight); latency is per request, HTTP and JSON included.
HF side: `generate` on a batch of `concurrency` prompts; every sequence's latency is its
call's duration. One JSON line per measurement (tokens/s of new tokens, latency p50/p99),
the CPU's model and flags first, one line per ratio last.

    python benchmarks/serve.py --rounds 2
    python benchmarks/serve.py --concurrency 8 --rounds 1
    python benchmarks/serve.py --rounds 2 --temperature 1
    python benchmarks/serve.py --rounds 2 --temperature 1 --top_p 0.9
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import cpu_info, side_records  # noqa: E402

from lm import runtime  # noqa: E402

SHAPE = dict(layers=4, width=256, heads=4, vocab=50257, max_len=512, prompt=16, new=64)
SLOTS = 32


def prompts(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, SHAPE["vocab"], (n, SHAPE["prompt"]))


def requests_per_client(c: int) -> int:
    return max(2, 16 // c)


def stats(latencies: list[float], tokens: int, wall: float) -> dict:
    return {"tokens_per_sec": round(tokens / wall, 1),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 4),
            "latency_p99_s": round(float(np.percentile(latencies, 99)), 4),
            "requests": len(latencies), "wall_s": round(wall, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


# ------------------------------------------------------------------ our side
class _Tokenizer:
    """Stands in for a run's tokenizer: prompts are token ids; text is one char per id."""

    vocab_size = SHAPE["vocab"]

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(0x4E00 + int(i) % 20000) for i in ids)

    def special_id(self, token: str):
        return None


def serve(port: int) -> None:
    runtime.set_async_dispatch(True)  # as `python -m lm.serve` runs its engine
    import jax
    import jax.numpy as jnp
    import uvicorn

    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder
    from lm.serve.api import create_app
    from lm.serve.engine import Engine

    cfg = ModelConfig(vocab_size=SHAPE["vocab"], d_model=SHAPE["width"],
                      num_layers=SHAPE["layers"], num_heads=SHAPE["heads"],
                      mlp_dim=4 * SHAPE["width"], max_len=SHAPE["max_len"])
    params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    tok = _Tokenizer()
    engine = Engine(cfg, params, decode=tok.decode, eos_id=None, slots=SLOTS,
                    context=SHAPE["prompt"] + SHAPE["new"])
    engine.precompile(SHAPE["prompt"])
    engine.start().warmup()
    uvicorn.run(create_app(engine, tok, "bench"), host="127.0.0.1", port=port,
                log_level="warning")


async def _load(url: str, c: int, per_client: int, sampling: dict
                ) -> tuple[list[float], int, float]:
    import httpx

    ids = prompts(c).tolist()
    latencies: list[float] = []
    tokens = 0

    async def one_client(client, i: int):
        nonlocal tokens
        for j in range(per_client):
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json={
                "prompt": ids[i], "max_tokens": SHAPE["new"], **sampling,
                "seed": i * 1000 + j})
            latencies.append(time.perf_counter() - t0)
            r.raise_for_status()
            got = r.json()["usage"]["completion_tokens"]
            assert got == SHAPE["new"], got
            tokens += got

    limits = httpx.Limits(max_connections=c + 4, max_keepalive_connections=c + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(client, i) for i in range(c)))
        return latencies, tokens, time.perf_counter() - t0


def ours(concurrency: list[int], sampling: dict) -> list[dict]:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read().decode()[-3000:])
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
            if time.time() > deadline:
                raise RuntimeError("server did not start")
        out = []
        for c in concurrency:
            asyncio.run(_load(url, c, 1, sampling))  # compiles this batch's prefill shapes
            latencies, tokens, wall = asyncio.run(_load(url, c, requests_per_client(c),
                                                        sampling))
            out.append({"what": "serve", "impl": "lm", "concurrency": c, "config": SHAPE,
                        **sampling, "slots": SLOTS}
                       | stats(latencies, tokens, wall))
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# ------------------------------------------------------------------ Hugging Face side
def hf(concurrency: list[int], sampling: dict, threads: int | None = None) -> list[dict]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=SHAPE["vocab"], n_embd=SHAPE["width"], n_layer=SHAPE["layers"],
        n_head=SHAPE["heads"], n_positions=SHAPE["max_len"])).eval()
    temperature = sampling["temperature"]
    how = (dict(do_sample=True, temperature=temperature, top_k=sampling["top_k"],
                top_p=sampling["top_p"]) if temperature > 0 else dict(do_sample=False))
    out = []
    for c in concurrency:
        ids = torch.tensor(prompts(c), dtype=torch.long)

        def call(ids=ids, c=c):
            with torch.no_grad():
                o = model.generate(ids, attention_mask=torch.ones_like(ids),
                                   max_new_tokens=SHAPE["new"], min_new_tokens=SHAPE["new"],
                                   pad_token_id=0, eos_token_id=None, **how)
            assert tuple(o.shape) == (c, SHAPE["prompt"] + SHAPE["new"])

        call()  # warm-up
        latencies = []
        t0 = time.perf_counter()
        for _ in range(requests_per_client(c)):
            t1 = time.perf_counter()
            call()
            latencies += [time.perf_counter() - t1] * c
        wall = time.perf_counter() - t0
        out.append({"what": "serve", "impl": "hf", "concurrency": c, "config": SHAPE,
                    **sampling, "torch_threads": torch.get_num_threads()}
                   | stats(latencies, len(latencies) * SHAPE["new"], wall))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--concurrency", type=int, action="append", default=None)
    p.add_argument("--only", choices=("lm", "hf"), default=None, help="(internal) one side")
    p.add_argument("--serve", type=int, default=None, help="(internal) run the server")
    p.add_argument("--hf_threads", type=int, default=None,
                   help="PyTorch threads (default: all cores; 1 avoids oversubscription "
                   "on a loaded machine)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (default); > 0: sampled at this temperature")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus (with --temperature)")
    p.add_argument("--top_k", type=int, default=0, help="k largest (with --temperature)")
    args = p.parse_args()
    if args.temperature < 0:
        p.error(f"--temperature={args.temperature}: must be >= 0")
    if not 0 < args.top_p <= 1:
        p.error(f"--top_p={args.top_p}: must be in (0, 1]")
    if args.top_k < 0:
        p.error(f"--top_k={args.top_k}: must be >= 0")
    if (args.top_p < 1 or args.top_k) and args.temperature == 0:
        p.error("--top_p / --top_k: need --temperature > 0 (greedy ignores them)")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.serve:
        return serve(args.serve)
    conc = args.concurrency or [1, 8, 32]
    if args.only:
        records = (ours(conc, sampling) if args.only == "lm"
                   else hf(conc, sampling, args.hf_threads))
        for record in records:
            print(json.dumps(record), flush=True)
        return
    print(json.dumps(cpu_info()), flush=True)
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for impl in ("lm", "hf"):
            cmd = [sys.executable, __file__, "--only", impl] + [f"--concurrency={c}"
                                                                 for c in conc]
            if args.hf_threads:
                cmd.append(f"--hf_threads={args.hf_threads}")
            cmd += [f"--temperature={args.temperature}", f"--top_p={args.top_p}",
                    f"--top_k={args.top_k}"]
            for record in side_records(cmd, impl, r):
                results.setdefault((impl, record["concurrency"]), []).append(record)
                print(json.dumps(record), flush=True)
    for c in conc:
        med = {impl: {k: float(np.median([x[k] for x in results[(impl, c)]]))
                      for k in ("tokens_per_sec", "latency_p50_s", "latency_p99_s")}
               for impl in ("lm", "hf")}
        print(json.dumps({
            "what": "ratio_serve", "concurrency": c, **sampling,
            "lm_over_hf_tokens_per_sec": round(med["lm"]["tokens_per_sec"]
                                               / med["hf"]["tokens_per_sec"], 2),
            "lm_over_hf_latency_p50": round(med["lm"]["latency_p50_s"]
                                            / med["hf"]["latency_p50_s"], 2),
            "lm_over_hf_latency_p99": round(med["lm"]["latency_p99_s"]
                                            / med["hf"]["latency_p99_s"], 2)}), flush=True)


if __name__ == "__main__":
    main()
