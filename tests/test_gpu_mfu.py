"""benchmarks/gpu_mfu.py at a tiny shape on the CPU: the JSON line's fields, the analytic
FLOP count, and MFU = FLOPs/token x tokens/s / peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PEAK = 2.0e12  # LM_CPU_PEAK_FLOPS for the test, so MFU is checkable


def expected_flops_per_token(name: str, record: dict) -> float:
    """6 x matmul weights (+ the vocabulary projection) + 12 x layers x seq x width, for the
    --tiny shape (2 layers, width 64, MLP 256; BERT scores 15 % of the positions)."""
    layers, d, f = 2, 64, 256
    seq, vocab = record["config"]["seq"], record["config"]["vocab"]
    vocab_tokens = 1.0 if name == "gpt2" else round(0.15 * seq) / seq
    weights = layers * (4 * d * d + 2 * d * f) + vocab_tokens * d * vocab
    return 6 * weights + 12 * layers * seq * d


@pytest.mark.parametrize("name", ["gpt2", "bert"])
def test_tiny_mfu_line(name):
    env = {**os.environ, "LM_CPU_PEAK_FLOPS": f"bfloat16={PEAK}"}
    out = subprocess.run(
        [sys.executable, "benchmarks/gpu_mfu.py", "--tiny", "--model", name, "--steps", "2",
         "--warmup", "0"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
        check=True).stdout
    [record] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert record["what"] == f"mfu_{name}" and record["platform"] == "cpu"
    assert record["config"] | {"tiny": True, "seq": 32, "batch": 4, "dtype": "bfloat16",
                               "param_dtype": "float32", "attention": "xla"} == record["config"]
    assert record["flops_per_token"] == expected_flops_per_token(name, record)
    assert record["peak_source"] == "LM_CPU_PEAK_FLOPS"
    assert record["peak_tflops_per_s"] == PEAK / 1e12
    assert record["tokens_per_sec"] == pytest.approx(32 * 4 / record["step_time_s"], rel=2e-3)
    mfu = record["flops_per_token"] * record["tokens_per_sec"] / PEAK
    assert record["mfu"] == pytest.approx(mfu, abs=1e-4) and 0 < record["mfu"] < 1
    assert isinstance(record["cpu_flags"], list)
