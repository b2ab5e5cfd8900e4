"""`python -m lm.plot RUN [RUN ...] [--metric eval/loss] [--out FILE.png]`: curves of runs.

Reads each run directory's metrics.jsonl and draws one line per run and metric (train/loss
and eval/loss by default), with optional TensorBoard-style smoothing and the x axis in
steps or tokens (steps x train.batch_size x data.seq_len from the run's config.json).
matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from lm import plotting
from lm.errors import boundary
from lm.rundir import read_metrics


def tokens_per_step(run: str) -> int:
    path = os.path.join(run, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        return int(config["train"]["batch_size"]) * int(config["data"]["seq_len"])
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: cannot count tokens per step ({e})") from None


def series(runs: list[str], metrics: list[str], smoothing: float, x: str
           ) -> dict[str, list[tuple[float, float]]]:
    """{'RUN metric': [(x, value), ...]} for every run and metric it logged."""
    out = {}
    for run in runs:
        if not os.path.isdir(run):
            raise FileNotFoundError(f"{run}: no such run directory")
        records = read_metrics(run)
        if not records:
            raise ValueError(f"{run}: no metrics.jsonl records")
        scale = tokens_per_step(run) if x == "tokens" else 1
        for metric in metrics:
            points = [(r["step"] * scale, r[metric]) for r in records if metric in r]
            if not points:
                continue
            ys = plotting.ema([y for _, y in points], smoothing)
            label = f"{os.path.basename(os.path.normpath(run))} {metric}"
            out[label] = [(px, float(y)) for (px, _), y in zip(points, ys, strict=True)]
    if not out:
        raise ValueError(f"--metric: none of {metrics} was logged by {', '.join(runs)}")
    return out


@boundary()
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lm.plot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--metric", action="append", default=None,
                   help="repeatable (default: train/loss and eval/loss)")
    p.add_argument("--smoothing", type=float, default=0.0, help="EMA weight in [0, 1)")
    p.add_argument("--x", choices=("steps", "tokens"), default="steps")
    p.add_argument("--logy", action="store_true")
    p.add_argument("--out", default="curves.png")
    args = p.parse_args(argv)
    if not 0.0 <= args.smoothing < 1.0:
        raise ValueError(f"--smoothing={args.smoothing}: must be in [0, 1)")
    metrics = args.metric or ["train/loss", "eval/loss"]
    curves = series(args.runs, metrics, args.smoothing, args.x)
    path = plotting.plot_curves(args.out, {k: [v] for k, v in curves.items()},
                                ylabel=", ".join(metrics), xlabel=args.x, logy=args.logy)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
