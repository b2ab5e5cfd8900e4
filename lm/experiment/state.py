"""What a run directory says about its run, wherever it ran (local, SLURM, TPU VM, GKE).

Files the study layer keeps beside the trainer's own (`config.json`, `metrics.jsonl`,
`checkpoints/<step>/`, `.lock`):
  run.json    the run's identity (study, stage, name, id, command), written before it starts
  run.log     its stdout + stderr (appended across launches)
  exit.json   {"returncode": N, "error": last error line} when a launcher saw it end

State: finished (a checkpoint at the last step), running (the workdir lock is held),
failed (it ended with a non-zero code), interrupted (it has progress but is none of those:
it resumes on the next launch), pending (nothing yet).
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from lm import rundir
from lm.rundir import read_metrics

RUN_FILE, LOG_FILE, EXIT_FILE = "run.json", "run.log", "exit.json"
STATES = ("pending", "running", "interrupted", "failed", "finished")


@dataclasses.dataclass
class RunState:
    state: str
    step: int  # last step with a metrics record
    error: str = ""
    holder: str = ""


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, value: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def last_error_line(workdir: str) -> str:
    """The last `error:` line of run.log, else its last non-empty line."""
    try:
        with open(os.path.join(workdir, LOG_FILE), errors="replace") as f:
            lines = [ln.strip() for ln in f.readlines()[-200:] if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors or lines or [""])[-1][:300]


def run_state(workdir: str, final_step: int) -> RunState:
    metrics = read_metrics(workdir)
    step = metrics[-1]["step"] if metrics else 0
    if final_step in rundir.run_steps(workdir):
        return RunState("finished", max(step, final_step))
    who = rundir.holder(workdir) if os.path.isdir(workdir) else None
    if who is not None:
        return RunState("running", step, holder=f"{who.get('host')}:{who.get('pid')}")
    ended = read_json(os.path.join(workdir, EXIT_FILE))
    if ended and ended.get("returncode", 0) != 0:
        return RunState("failed", step, error=ended.get("error", ""))
    if metrics or rundir.run_steps(workdir):
        return RunState("interrupted", step)
    return RunState("pending", 0)


# ------------------------------------------------------------------ running one


def _die_with_parent() -> None:
    """In the child: SIGTERM when the launcher dies (the trainer then checkpoints and
    exits; the next launch resumes it), so no run outlives its launcher unseen."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def start(cmd: Sequence[str], workdir: str, cwd: str, env: Mapping[str, str] | None = None
          ) -> subprocess.Popen:
    """Starts one run's process, its output appended to WORKDIR/run.log."""
    os.makedirs(workdir, exist_ok=True)
    log = open(os.path.join(workdir, LOG_FILE), "ab")  # noqa: SIM115 (the child keeps it)
    log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
    log.flush()
    try:
        return subprocess.Popen(list(cmd), cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                preexec_fn=_die_with_parent)
    finally:
        log.close()


def record_exit(workdir: str, returncode: int) -> None:
    error = last_error_line(workdir) if returncode else ""
    if returncode < 0:
        error = f"killed by signal {-returncode}" + (f" ({error})" if error else "")
    write_json(os.path.join(workdir, EXIT_FILE), {"returncode": returncode, "error": error,
                                                  "time": time.time()})


def run_one(cmd: Sequence[str], workdir: str, cwd: str,
            env: Mapping[str, str] | None = None) -> int:
    """Runs one run to its end (what a SLURM task executes); raises when it fails."""
    proc = start(cmd, workdir, cwd, env)
    returncode = proc.wait()
    record_exit(workdir, returncode)
    if returncode:
        raise RuntimeError(f"{workdir}: exit {returncode}: {last_error_line(workdir)}")
    return returncode
