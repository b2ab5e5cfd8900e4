"""Where a hot path's time goes: the top XLA ops of a `jax.profiler` trace, per call.

Runs one of the benchmarked paths a few times under the profiler and prints one JSON line
per op (name, milliseconds per call, occurrences per call), largest first; the names are
those of the optimized HLO (`XLA_FLAGS=--xla_dump_to=DIR` shows what each one is).
A trace inflates small ops; read shares, not sums.

    python benchmarks/profile_ops.py train_step --model gpt --dtype bfloat16
    python benchmarks/profile_ops.py eval --model char --batch 64
    python benchmarks/profile_ops.py decode --batch 8
    python benchmarks/profile_ops.py serve_step --rows 32 --context 80
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lm import runtime  # noqa: E402

_SKIP = ("ThunkExecutor", "$", "Pjit", "Slinky", "end:", "CommonPjRt")


def top_ops(fn, calls: int, top: int) -> list[dict]:
    """Runs `fn` `calls` times under the profiler; the `top` ops by time per call."""
    import jax

    fn()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(calls):
                fn()
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(path))["traceEvents"]
    total: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or e["name"].startswith(_SKIP):
            continue
        total[e["name"]] += e["dur"]
        count[e["name"]] += 1
    names = sorted(total, key=total.get, reverse=True)[:top]
    return [{"what": "op", "name": n, "ms_per_call": round(total[n] / calls / 1e3, 3),
             "per_call": round(count[n] / calls, 2)} for n in names]


def train_step_fn(args):
    import train_step as ts

    if args.model == "char":
        ts.SHAPE.update(ts.CHAR_SHAPE)
    return ts.our_step(args.model, args.dtype)


def eval_fn(args):
    import train_step as ts

    if args.model == "char":
        ts.SHAPE.update(ts.CHAR_SHAPE)
    return ts.our_eval(args.model, args.dtype, args.batch)


def decode_fn(args):
    import decode

    return decode.ours(args.batch, args.mode)


def serve_step_fn(args):
    import jax
    import jax.numpy as jnp

    from lm.models.config import ModelConfig
    from lm.models.transformer import Decoder
    from lm.serve import slots

    shape = __import__("serve").SHAPE
    cfg = ModelConfig(vocab_size=shape["vocab"], d_model=shape["width"],
                      num_layers=shape["layers"], num_heads=shape["heads"],
                      mlp_dim=4 * shape["width"], max_len=shape["max_len"])
    model = Decoder(cfg, decode=True, cache_len=args.context)
    params = Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    n, rows = args.rows, args.rows
    state = {"cache": slots.empty_cache(model, n)}
    ids = jnp.zeros((n,), jnp.int32)
    per_row = (jnp.full((rows,), 5, jnp.int32), jnp.ones((rows,), bool), jnp.int32(5),
               jnp.zeros((rows,), jnp.uint32), jnp.zeros((rows,), jnp.uint32),
               jnp.zeros((rows,)), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,)),
               jnp.asarray(False))  # greedy, no logprobs

    def run():
        out = slots.step(model, params, state["cache"], ids, *per_row, rows=rows)
        state["cache"] = out[0]
        jax.block_until_ready(out)
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=("train_step", "eval", "decode", "serve_step"))
    p.add_argument("--model", default="gpt", choices=("gpt", "bert", "char"))
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch", type=int, default=1, help="decode, eval: rows")
    p.add_argument("--mode", default="greedy", choices=("greedy", "sample"))
    p.add_argument("--rows", type=int, default=32, help="serve_step: occupied slots")
    p.add_argument("--context", type=int, default=80, help="serve_step: cache columns")
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    runtime.set_compute_dtype(args.dtype)  # as lm.main does, before JAX starts
    if args.what == "serve_step":
        runtime.set_async_dispatch(True)  # as the server runs
    fn = {"train_step": train_step_fn, "eval": eval_fn, "decode": decode_fn,
          "serve_step": serve_step_fn}[args.what](args)
    print(json.dumps({"what": "profile", "path": args.what, "cpu_flags": runtime.cpu_flags(),
                      **{k: v for k, v in vars(args).items() if k != "what"}}), flush=True)
    for record in top_ops(fn, args.calls, args.top):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
