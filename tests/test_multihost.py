"""Two processes on this machine through jax.distributed (gloo): each reads only its rows of
every global batch, only process 0 writes metrics, both join checkpoints, and both resume;
the global batch does not depend on the process count, so the losses equal a one-process
run's (to the tolerance of tests/test_train.py::test_eight_devices_match_one)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.test_train import ROOT, corpus, losses, run_main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(workdir, common) -> None:
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "lm.main", "--config=configs/char_lm.py:test",
         f"--workdir={workdir}", *common, "--config.train.distributed=True",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    path = corpus(tmp_path)
    common = [f"--config.data.path={path}", "--config.train.log_every=1",
              "--config.train.eval_every=4", "--config.train.checkpoint_every=2",
              "--config.train.batch_size=8", "--config.optim.decay_steps=6"]
    run_main(tmp_path / "one", *common, "--config.train.steps=4")
    workdir = tmp_path / "two"
    run_two(workdir, [*common, "--config.train.steps=4"])
    two = losses(workdir)
    assert sorted(two) == [1, 2, 3, 4]  # one line per step: only process 0 writes
    one = losses(tmp_path / "one")
    for step in (1, 2, 3, 4):  # the same global batches, sharded over 2 x 2 devices
        assert abs(two[step] - one[step]) < 1e-5, (step, two[step], one[step])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
    data_files = sorted(f for f in os.listdir(workdir / "checkpoints" / "4" / "data")
                        if f.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]

    run_two(workdir, [*common, "--config.train.steps=6"])  # both processes resume at 4
    assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4", "6"]


def test_srun_two_processes_match_one_process_and_resume(tmp_path):
    """`srun -n 2` on the one-node SLURM: jax.distributed.initialize() finds the job by
    itself; the run trains, checkpoints and resumes, and its parameters equal one process'."""
    import jax
    import numpy as np
    import pytest

    from lm.init_from import read_run_params
    from tests.test_experiment_launch import slurm_unavailable

    why = slurm_unavailable()
    if why:
        pytest.skip(why)
    path = corpus(tmp_path)
    common = [f"--config.data.path={path}", "--config.train.log_every=1",
              "--config.train.eval_every=6", "--config.train.checkpoint_every=2",
              "--config.train.batch_size=8", "--config.optim.decay_steps=6"]
    run_main(tmp_path / "one", *common, "--config.train.steps=6")
    workdir = tmp_path / "two"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    for steps in (4, 6):  # the second srun resumes from step 4
        proc = subprocess.run(
            ["srun", "-n", "2", "--time=10", sys.executable, "-m", "lm.main",
             "--config=configs/char_lm.py:test", f"--workdir={workdir}", *common,
             f"--config.train.steps={steps}", "--config.train.distributed=True"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr.count("JAX distributed initialized") == 2  # two processes joined
    assert "resumed from step 4" in proc.stderr
    assert sorted(losses(workdir)) == [1, 2, 3, 4, 5, 6]
    one, _ = read_run_params(str(tmp_path / "one"), 6)
    two, _ = read_run_params(str(workdir), 6)
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
