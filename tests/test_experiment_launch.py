"""Launching real sweeps: the local pool survives SIGKILL of its launcher; SLURM end to end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lm import rundir
from lm.experiment import state as st
from lm.init_from import read_run_params

ROOT = Path(__file__).resolve().parents[1]


def make_project(tmp_path: Path, steps: int, seeds=(0, 1, 2)) -> Path:
    rng = np.random.default_rng(0)
    words = ["the", "king", "speaks", "to", "all", "men", "of", "rome", "good", "night"]
    lines = [" ".join(rng.choice(words, size=8)) + ".\n" for _ in range(1500)]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(lines))
    study_dir = tmp_path / "proj" / "experiments" / "demo"
    study_dir.mkdir(parents=True)
    (study_dir / "study.py").write_text(f"""
from lm.experiment import Report, Stage, Study
def get_study():
    return Study("demo", [Stage("main", "{ROOT}/configs/char_lm.py:test", overrides={{
        "data.path": "{corpus}", "mesh.num_devices": 1, "train.steps": {steps},
        "train.checkpoint_every": 50, "train.log_every": 10, "train.eval_every": {steps},
        "train.async_checkpoint": False}}, seeds={list(seeds)})],
        report=Report("eval/loss"))
""")
    return study_dir


def experiment(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm.experiment", *args], capture_output=True,
                          text=True, timeout=600, **kw)


def last_step(workdir: Path) -> int:
    records = st.read_metrics(str(workdir))
    return records[-1]["step"] if records else 0


def test_sigkilled_launcher_relaunch_skips_finished_and_resumes_exactly(tmp_path):
    steps = 300  # the kill lands at step >= 50: PR_SET_PDEATHSIG stops the run at once
    study_dir = make_project(tmp_path, steps=steps)
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = experiment("launch", str(study_dir), f"--sweep_dir={straight}", "--parallel=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr

    launcher = subprocess.Popen([sys.executable, "-m", "lm.experiment", "launch", str(study_dir),
                                 f"--sweep_dir={split}", "--parallel=1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = split / "main" / "seed=1"
    deadline = time.time() + 300
    while last_step(second) < 50 and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 120  # the orphaned run gets SIGTERM, checkpoints and exits
    while rundir.holder(str(second)) is not None and time.time() < deadline:
        time.sleep(0.2)
    assert rundir.holder(str(second)) is None, "the run outlived its launcher"
    assert st.run_state(str(split / "main" / "seed=0"), steps).state == "finished"
    assert st.run_state(str(second), steps).state == "interrupted"
    assert st.run_state(str(split / "main" / "seed=2"), steps).state == "pending"
    status = experiment("status", str(study_dir), f"--sweep_dir={split}")
    assert "1 pending" in status.stdout and "1 interrupted" in status.stdout, status.stdout

    proc = experiment("launch", str(study_dir), f"--sweep_dir={split}", "--parallel=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 finished (skipped), 2 to run or resume" in proc.stdout
    starts = {s: len(re.findall(r"^=== \d{4}-\d\d-\d\d ",  # the launcher's header
                                (split / "main" / f"seed={s}" / "run.log").read_text(), re.M))
              for s in range(3)}
    assert starts == {0: 1, 1: 2, 2: 1}
    assert "resumed from step" in (second / "run.log").read_text()
    for seed in range(3):
        a, step_a = read_run_params(str(straight / "main" / f"seed={seed}"))
        b, step_b = read_run_params(str(split / "main" / f"seed={seed}"))
        assert step_a == step_b == steps
        flat_a, flat_b = _flat(a), _flat(b)
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            np.testing.assert_array_equal(flat_a[k], flat_b[k], err_msg=f"seed={seed} {k}")
    again = experiment("launch", str(study_dir), f"--sweep_dir={split}")
    assert "3 finished (skipped)" in again.stdout and "nothing to do" in again.stdout


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = np.asarray(v)
    return out


def test_second_trainer_on_a_workdir_refuses(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with rundir.WorkdirLock(str(workdir)):
        proc = subprocess.run(
            [sys.executable, "-m", "lm.main", "--config=configs/char_lm.py:test",
             f"--workdir={workdir}", "--config.mesh.num_devices=1",
             f"--config.data.path={ROOT / 'README.md'}"],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --workdir: {workdir} is in use by pid {os.getpid()} on host "
        f"{os.uname().nodename} (stop that run first)")
    assert "Traceback" not in proc.stderr
    assert not (workdir / "checkpoints").exists()


def slurm_unavailable() -> str | None:
    """None when a SLURM controller answers, else why not."""
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (scripts/local_slurm.sh installs and starts it)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no slurmctld"
    if out.returncode != 0 or not out.stdout.strip():
        return f"no SLURM controller answers ({out.stderr.strip()[:100]})"
    if not any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split()):
        return f"no usable SLURM node (states: {out.stdout.split()})"
    return None


def test_slurm_sweep_runs_and_reports(tmp_path):
    why = slurm_unavailable()
    if why:
        pytest.skip(why)
    pytest.importorskip("submitit")
    from lm.experiment import cloud

    assert cloud.max_array_size() == 1001  # read from the cluster (scripts/local_slurm.sh)
    study_dir = make_project(tmp_path, steps=20, seeds=(0, 1))
    sweep = tmp_path / "sweep"
    proc = experiment("launch", str(study_dir), "--backend=slurm", f"--sweep_dir={sweep}",
                      "--wait", "--time_min=10", "--cpus_per_task=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "submitted demo-main: array job" in proc.stdout
    for seed in (0, 1):
        wd = sweep / "main" / f"seed={seed}"
        assert st.run_state(str(wd), 20).state == "finished", (wd / "run.log").read_text()[-2000:]
        assert st.read_json(str(wd / "exit.json"))["returncode"] == 0
    rep = experiment("report", str(study_dir), f"--sweep_dir={sweep}")
    assert rep.returncode == 0, rep.stderr
    assert "| **" in rep.stdout and "| 2 |" in rep.stdout
