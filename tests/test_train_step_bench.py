"""benchmarks/train_step.py --eval: the validation forward's JSON lines, ours and the peer's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lines(*args: str) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--model", "char",
         "--eval", "--batch", "3", "--steps", "2", "--rounds", "1", *args],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        check=True).stdout.splitlines()
    return [json.loads(line) for line in out if line.startswith("{")]


def test_eval_mode_times_the_forward_of_our_model():
    (line,) = [r for r in _lines("--only", "lm") if r["what"].startswith("eval_")]
    assert line["what"] == "eval_char" and line["impl"] == "lm"
    assert line["config"]["eval"] is True and line["config"]["steps_per_call"] == 1
    # step_time_s is rounded to 0.1 ms in the line; tokens_per_sec is not
    assert line["tokens_per_sec"] == pytest.approx(3 * 64 / line["step_time_s"], rel=0.05)
    assert line["model_gflops_per_s"] > 0 and line["cpu_flags"] is not None


def test_eval_mode_times_the_peer_forward_for_char():
    pytest.importorskip("torch", reason="the PyTorch peer needs torch (extra: hf)")
    (line,) = [r for r in _lines("--only", "hf") if r["what"].startswith("eval_")]
    assert line["impl"] == "hf" and line["dtype"] == "float32" and line["step_time_s"] > 0
