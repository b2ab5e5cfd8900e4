"""Launching a study: what changed since the last launch, and the local process pool.

Every backend shares `plan`: it compares the expanded runs with the run directories under the
sweep dir (each holds the `run.json` of its identity) and sorts them into finished (skipped),
to start or resume, changed (refused: a changed run's old checkpoints must not be resumed
under its new config; `--on_change=restart` moves the old directory aside, never deletes it),
and runs removed from the study (left alone, listed).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence

from lm.errors import ConfigError
from lm.experiment import state as st
from lm.experiment.study import Run, Study, main_args, python


@dataclasses.dataclass
class Plan:
    todo: list[Run]  # to start or resume, parents before children
    finished: list[Run]
    changed: list[Run]
    removed: list[str]  # run keys on disk that the study no longer has
    running: list[Run]
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # changed run -> why


def _ran_with(wd: str, record: dict) -> dict | None:
    """The config a run directory's run used: its config.json (what the trainer saw), else
    the resolved config its launch recorded."""
    ran = st.read_json(os.path.join(wd, "config.json"))
    return ran if isinstance(ran, dict) else record.get("resolved")


def changed_field(old: dict | None, new: dict, prefix: str = "") -> str | None:
    """'optim.lr: 0.001 -> 0.002' for the first field whose value differs, else None.

    Fields only in `new` do not count: an option added to the codebase since the run
    started keeps the old behaviour at its default (the project's rule for new options),
    so every study does not restart when a field is added. A removed field does count."""
    if old is None:
        return None
    for key in sorted(old):
        name = f"{prefix}{key}"
        if key not in new:
            return f"{name}: no longer a config field"
        a, b = old[key], new[key]
        if isinstance(a, dict) and isinstance(b, dict):
            why = changed_field(a, b, name + ".")
            if why:
                return why
        elif a != b and not (isinstance(a, list | tuple) and isinstance(b, list | tuple)
                             and list(a) == list(b)):
            return f"{name}: {a!r} -> {b!r}"
    return None


def workdir(sweep_dir: str, run: Run) -> str:
    return os.path.join(sweep_dir, run.stage, run.name)


def command(run: Run, sweep_dir: str, exe: str | None = None) -> list[str]:
    return [exe or python(), "-m", "lm.main", *main_args(run, workdir(sweep_dir, run))]


def _on_disk(sweep_dir: str) -> dict[str, dict]:
    out = {}
    if not os.path.isdir(sweep_dir):
        return out
    for stage in sorted(os.listdir(sweep_dir)):
        stage_dir = os.path.join(sweep_dir, stage)
        if not os.path.isdir(stage_dir):
            continue
        for name in sorted(os.listdir(stage_dir)):
            if ".old-" in name:  # a changed run's earlier directory, moved aside
                continue
            record = st.read_json(os.path.join(stage_dir, name, st.RUN_FILE))
            if isinstance(record, dict) and "id" in record:
                out[f"{stage}/{name}"] = record
    return out


def plan(runs: Sequence[Run], sweep_dir: str) -> Plan:
    disk = _on_disk(sweep_dir)
    p = Plan([], [], [], [], [])
    keys = {r.key for r in runs}
    p.removed = sorted(k for k in disk if k not in keys)
    changed_keys: set[str] = set()
    for run in runs:
        wd = workdir(sweep_dir, run)
        record = disk.get(run.key)
        why = None
        if run.parent in changed_keys:
            why = f"its parent {run.parent} changed"
        elif record is not None:
            why = changed_field(_ran_with(wd, record), run.resolved)
            if why is None and "resolved" not in record and not os.path.exists(
                    os.path.join(wd, "config.json")) and record["id"] != run.id:
                why = "its identity changed"
        if why is not None:
            changed_keys.add(run.key)
            p.changed.append(run)
            p.reasons[run.key] = why
            continue
        s = st.run_state(workdir(sweep_dir, run), run.final_step)
        if s.state == "finished":
            p.finished.append(run)
        elif s.state == "running":
            p.running.append(run)
        else:
            p.todo.append(run)
    return p


def describe(p: Plan) -> list[str]:
    lines = [f"{len(p.finished)} finished (skipped), {len(p.todo)} to run or resume, "
             f"{len(p.running)} running elsewhere, {len(p.changed)} changed, "
             f"{len(p.removed)} no longer in the study"]
    lines += [f"  changed: {r.key} ({p.reasons.get(r.key, 'its config differs')})"
              for r in p.changed]
    lines += [f"  removed: {k} (left on disk)" for k in p.removed]
    lines += [f"  running: {r.key} (skipped)" for r in p.running]
    return lines


def resolve_changes(p: Plan, sweep_dir: str, on_change: str) -> None:
    """`refuse`: a ConfigError naming the changed runs; `restart`: move them aside."""
    if not p.changed:
        return
    if on_change != "restart":
        names = ", ".join(r.key for r in p.changed[:5])
        raise ConfigError(f"study: {len(p.changed)} run(s) changed since they were launched "
                          f"({names}); relaunch with --on_change=restart to move their old "
                          "directories aside and start them again")
    for run in p.changed:
        src = workdir(sweep_dir, run)
        if not os.path.isdir(src):  # changed through its parent, never started itself
            continue
        old = st.read_json(os.path.join(src, st.RUN_FILE)) or {}
        dst = f"{src}.old-{old.get('id', 'unknown')}"
        shutil.move(src, dst)
        print(f"moved {src} -> {dst}")
    p.todo = sorted(p.todo + p.changed, key=lambda r: r.key)
    p.changed = []


def write_run_record(study: Study, run: Run, sweep_dir: str, cmd: Sequence[str]) -> None:
    wd = workdir(sweep_dir, run)
    os.makedirs(wd, exist_ok=True)
    st.write_json(os.path.join(wd, st.RUN_FILE), {
        "study": study.name, "stage": run.stage, "name": run.name, "id": run.id,
        "seed": run.seed, "setting": dict(run.setting), "parent": run.parent,
        "config": run.config, "overrides": dict(run.overrides), "command": list(cmd),
        "resolved": run.resolved})
    try:
        os.remove(os.path.join(wd, st.EXIT_FILE))
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------- local pool


def _gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def default_parallel() -> int:
    """One run per GPU; on a CPU, one run per 4 cores (each run uses several threads)."""
    gpus = _gpu_count()
    return gpus if gpus else max(1, (os.cpu_count() or 1) // 4)


def run_local(study: Study, todo: Sequence[Run], sweep_dir: str, root: str, parallel: int,
              everything: Sequence[Run] = (), poll_s: float = 0.5) -> dict[str, int]:
    """Runs `todo` with at most `parallel` processes; a child starts when its parent
    finished. Returns {run key: exit code} (-1: not started because its parent failed).

    SIGINT / SIGTERM stop the pool: the runs get SIGTERM, checkpoint and exit; so does a
    run whose launcher is killed (its parent-death signal), and the next launch resumes it.
    """
    gpus = _gpu_count() if parallel > 1 else 0
    waiting = list(todo)
    running: dict[str, tuple[subprocess.Popen, Run, int]] = {}
    done: dict[str, int] = {}
    stop = {"flag": False}

    def handle(signum, frame) -> None:
        stop["flag"] = True
        for proc, _, _ in running.values():
            proc.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    pending_keys = {r.key for r in todo}
    by_key = {r.key: r for r in everything}
    try:
        while waiting or running:
            free = [i for i in range(parallel) if i not in {slot for *_, slot in running.values()}]
            for run in list(waiting):
                if stop["flag"] or not free:
                    break
                if run.parent in pending_keys and run.parent not in done:
                    continue  # its parent has not ended yet
                waiting.remove(run)
                parent = by_key.get(run.parent)
                if parent is not None and run.parent not in pending_keys and st.run_state(
                        workdir(sweep_dir, parent), parent.final_step).state != "finished":
                    done[run.key] = -1
                    print(f"skipped  {run.key}: its parent {run.parent} has not finished",
                          flush=True)
                    continue
                if run.parent is not None and done.get(run.parent, 0) != 0:
                    done[run.key] = -1
                    print(f"skipped  {run.key}: its parent {run.parent} failed", flush=True)
                    continue
                slot = free.pop(0)
                cmd = command(run, sweep_dir)
                write_run_record(study, run, sweep_dir, cmd)
                env = {"CUDA_VISIBLE_DEVICES": str(slot)} if gpus else None
                running[run.key] = (st.start(cmd, workdir(sweep_dir, run), root, env), run, slot)
                print(f"started  {run.key}", flush=True)
            if stop["flag"] and not running:
                break
            time.sleep(poll_s)
            for key, (proc, run, _) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[key]
                done[key] = code
                st.record_exit(workdir(sweep_dir, run), code)
                final = st.run_state(workdir(sweep_dir, run), run.final_step)
                msg = final.error if code else final.state
                print(f"{'ended' if code == 0 else 'FAILED':8} {key}: {msg}", flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return done
