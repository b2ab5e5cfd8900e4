"""A/B two benchmark commands in fresh processes, alternating A B A B, and report the
median ratio of a field of their JSON lines (for XLA flags, dtypes, steps per call, ...).

Each round runs A, then B, each as a new process; every JSON line a run prints whose
`what` starts with --what is kept, and its --key values (default: wall and CPU seconds
per step) collected. Prints each run's lines (tagged side/round), then one summary line
with, per key, ratio = median(A) / median(B): how many times faster B is, for a time.
`{round}` in a command becomes the round number (a fresh work directory per run).

    python benchmarks/ab.py --rounds 4 --what train_step_gpt \\
      --a "benchmarks/train_step.py --model gpt --only lm --rounds 1" \\
      --b "benchmarks/train_step.py --model gpt --only lm --rounds 1 --dtype bfloat16"
    python benchmarks/ab.py --b_env XLA_FLAGS=--xla_cpu_prefer_vector_width=512 --a ... --b ...
    python benchmarks/ab.py --what process --key process_wall_s process_cpu_s \
      --a "-m lm.main --config=configs/char_lm.py:baby --workdir=/tmp/a{round}" --b "..."
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time

import numpy as np


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--a_env/--b_env: {pair!r} is not NAME=VALUE")
        env[key] = value
    return env


def run_once(command: str, env: dict[str, str], what: str, key: str) -> list[dict]:
    """The JSON lines of one fresh run of `command` that match `what` and have `key`, plus
    a line {"what": "process", "process_wall_s", "process_cpu_s"} for the whole run
    (start-up, compilation, data preparation and evaluations included)."""
    argv = shlex.split(command)
    if argv[0].endswith(".py") or argv[0] == "-m":
        argv = [sys.executable, *argv]
    t0, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **env})
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise SystemExit(f"{command!r} exited {out.returncode}: {out.stderr.strip()[-500:]}")
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith("{")]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    lines.append({"what": "process", "process_wall_s": round(wall, 2),
                  "process_cpu_s": round(cpu, 2)})
    return [r for r in lines if str(r.get("what", "")).startswith(what) and key in r]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="command A (a .py path runs with this Python)")
    p.add_argument("--b", required=True, help="command B")
    p.add_argument("--a_env", nargs="*", default=[], help="NAME=VALUE for A only")
    p.add_argument("--b_env", nargs="*", default=[], help="NAME=VALUE for B only")
    p.add_argument("--what", default="", help="keep JSON lines whose `what` starts so")
    p.add_argument("--key", nargs="+", default=["step_time_s", "step_cpu_s"],
                   help="fields to compare (CPU time is steadier on a shared machine)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--label", default="", help="a name for the summary line")
    args = p.parse_args()
    sides = {"a": (args.a, parse_env(args.a_env)), "b": (args.b, parse_env(args.b_env))}
    values: dict[str, dict[str, list[float]]] = {k: {"a": [], "b": []} for k in args.key}
    for r in range(args.rounds):
        for side, (command, env) in sides.items():
            run = command.replace("{round}", str(r))  # e.g. a fresh workdir per round
            for record in run_once(run, env, args.what, args.key[0]):
                for k in args.key:
                    if k in record:
                        values[k][side].append(float(record[k]))
                print(json.dumps({"side": side, "ab_round": r, **record}), flush=True)
    # imported last: importing lm sets its XLA defaults in os.environ, which the runs inherit
    from lm.runtime import cpu_flags  # noqa: PLC0415

    summary = {"what": "ab", "label": args.label, "rounds": args.rounds, "a": args.a,
               "a_env": sides["a"][1], "b": args.b, "b_env": sides["b"][1]}
    for k, v in values.items():
        med = {s: float(np.median(x)) if x else float("nan") for s, x in v.items()}
        summary[k] = {"a": v["a"], "b": v["b"], "median_a": med["a"], "median_b": med["b"],
                      "ratio_a_over_b": round(med["a"] / med["b"], 3)}
    summary |= {"load_average": os.getloadavg()[0], "cpu_flags": cpu_flags(),
                "cpu_count": os.cpu_count()}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
