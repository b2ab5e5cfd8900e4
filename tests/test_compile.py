"""Ahead-of-time compilation for TPU topologies on this CPU machine (libtpu from the `tpu`
extra). Each compile runs in a subprocess: libtpu has crashed on malformed shardings."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install -e '.[tpu]')")


def compile_cmd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lm.compile", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def param_count(vocab: int) -> int:
    from lm import objectives
    from lm.config_base import to_model_config
    from tests.test_train import load_config

    c = load_config("char_lm", "test")
    objective = objectives.get(c)
    model = objective.build_model(to_model_config(c.model, vocab_size=vocab))
    shapes = jax.eval_shape(lambda: objective.init(model, jax.random.key(0),
                                                   objective.dummy_batch(1)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def reported(out: str, what: str) -> int:
    return int(re.search(rf"per chip: {what} .*?\(([\d,]+) bytes\)", out).group(1)
               .replace(",", ""))


def test_small_config_compiles_and_reports_per_chip_bytes():
    base = ["--config=configs/char_lm.py:test", "--topology=v5e:2x2",
            "--config.model.vocab_size=128"]
    dp = compile_cmd(*base)
    assert dp.returncode == 0, dp.stderr[-3000:]
    assert "chips: 4" in dp.stdout and "of 16.00 GiB" in dp.stdout
    n = param_count(128)
    assert reported(dp.stdout, "parameters") == 4 * n  # replicated: every chip holds all
    flops = float(re.search(r"per chip: ([\d.e+]+) FLOPs", dp.stdout).group(1))
    assert flops > 0
    fsdp = compile_cmd(*base, "--config.mesh.rules=fsdp", "--config.mesh.data=1",
                       "--config.mesh.fsdp=-1")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    sharded = reported(fsdp.stdout, "parameters")
    assert 4 * n / 4 <= sharded < 4 * n  # weights split 4 ways along 'embed', norms whole


def test_oversized_config_exits_1_with_the_oom_line():
    start = time.time()
    proc = compile_cmd("--config=configs/gpt.py:xl", "--topology=v5e:2x2",
                       "--config.model.scan_layers=True")  # traces one layer: seconds
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: v5e:2x2: the step does not fit: RESOURCE_EXHAUSTED")
    assert "exceeds available HBM" in line and "Traceback" not in proc.stderr
    assert time.time() - start < 120


def test_unknown_topology_is_one_line():
    proc = compile_cmd("--config=configs/char_lm.py:test", "--topology=v9:1x1",
                       "--config.model.vocab_size=128")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.startswith("error: --topology")]


def test_scanned_layers_keep_the_batch_sharding():
    """nn.scan loses the batch sharding of its activations unless they are constrained.
    GPT-2 small, batch 64 over 16 chips, needed 58 GiB of temporaries per chip without the
    constraints (an earlier jaxlib) and 6.7 GiB with them (jaxlib 0.10.2; 16 GiB of HBM on
    v5e). This test's smaller decoder (2 scanned layers, width 256, seq 256; a third of the
    compile time) needs 0.41 GiB without them (`constrain` made a no-op) and 0.021 with."""
    proc = compile_cmd("--config=configs/gpt.py:small", "--topology=v5e:4x4",
                       "--config.model.scan_layers=True", "--config.mesh.rules=fsdp",
                       "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                       "--config.train.batch_size=64", "--config.model.num_layers=2",
                       "--config.model.d_model=256", "--config.model.num_heads=4",
                       "--config.model.mlp_dim=1024", "--config.model.max_len=256",
                       "--config.data.seq_len=256")
    assert proc.returncode == 0, proc.stderr[-2000:]
    temps = float(re.search(r"per chip: temporaries ([\d.]+) GiB", proc.stdout).group(1))
    assert temps < 0.1
