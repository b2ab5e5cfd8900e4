"""`python -m lm.serve --workdir=RUN [--host 127.0.0.1 --port 8000 --step N --api_key KEY
--slots 32 --context N --model_name NAME]`: serve a causal-LM run over an OpenAI-compatible
HTTP API (needs the `serve` extra: `pip install -e '.[serve]'`).

Binds to 127.0.0.1 unless --host says otherwise; with --api_key every request needs
`Authorization: Bearer KEY`. The API key may also come from $LM_SERVE_API_KEY.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

from lm import errors, runtime


def parse(argv: list[str] | None):
    p = argparse.ArgumentParser(prog="python -m lm.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="run directory of a causal-LM run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
    p.add_argument("--api_key", default=os.environ.get("LM_SERVE_API_KEY"))
    p.add_argument("--slots", type=int, default=32, help="sequences decoded together")
    p.add_argument("--context", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: model max_len)")
    p.add_argument("--model_name", default=None, help="name in the API (default: run dir)")
    return p.parse_args(argv)


def check(args) -> None:
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"--workdir: no such directory: {args.workdir}")
    if not 0 < args.port < 65536:
        raise ValueError(f"--port={args.port}: must be in [1, 65535]")
    if args.slots < 1:
        raise ValueError(f"--slots={args.slots}: must be >= 1")
    if args.context is not None and args.context < 2:
        raise ValueError(f"--context={args.context}: must be >= 2")
    if args.api_key == "":
        raise ValueError("--api_key: must not be empty")
    with open(os.path.join(args.workdir, "config.json")) as f:
        objective = json.load(f).get("objective")
    if objective != "causal_lm":
        raise ValueError(f"--workdir: {args.workdir} is a {objective!r} run; serving needs "
                         "a causal_lm run")


def build(args):
    """(engine, app) for the parsed arguments; the engine is started and warmed up."""
    from lm.sample import load_run
    from lm.serve.api import create_app
    from lm.serve.engine import Engine

    # the engine overlaps host work with the running step: asynchronous dispatch
    # (1 client 453 against 349-381 tok/s inline; benchmarks/serve.py)
    runtime.set_async_dispatch(True)
    cfg, params, tokenizer = load_run(args.workdir, args.step)
    engine = Engine(cfg, params, decode=tokenizer.decode, eos_id=tokenizer.special_id("</s>"),
                    slots=args.slots, context=args.context).start()
    engine.warmup()
    name = args.model_name or os.path.basename(os.path.abspath(args.workdir))
    return engine, create_app(engine, tokenizer, name, api_key=args.api_key)


@errors.boundary()
def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    check(args)
    try:
        import uvicorn
    except ImportError:
        raise ImportError("lm.serve needs fastapi and uvicorn: pip install -e '.[serve]'"
                          ) from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    engine, app = build(args)
    print(f"serving {args.workdir} on http://{args.host}:{args.port}/v1 "
          f"({engine.slots} slots x {engine.context} tokens)", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
