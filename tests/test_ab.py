"""benchmarks/ab.py: alternation, per-side environments, {round} and the median ratio."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, os, sys
step = float(os.environ.get("STEP", "1.0")) * (1 + int(sys.argv[1]))
print("noise")
print(json.dumps({"what": "train_step_x", "step_time_s": step, "step_cpu_s": step / 2}))
"""


def test_ab_alternates_and_reports_median_ratios(tmp_path):
    script = tmp_path / "fake.py"
    script.write_text(SCRIPT)
    out = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--rounds", "3", "--what", "train_step",
         "--a", f"{script} {{round}}", "--b", f"{script} {{round}}", "--b_env", "STEP=0.5"],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120).stdout
    lines = [json.loads(x) for x in out.splitlines()]
    assert [(x["side"], x["ab_round"]) for x in lines[:-1]] == [
        ("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    summary = lines[-1]
    assert summary["step_time_s"]["a"] == [1.0, 2.0, 3.0]  # {round} reached the command
    assert summary["step_time_s"]["b"] == [0.5, 1.0, 1.5]  # and STEP only side B
    assert summary["step_time_s"]["ratio_a_over_b"] == 2.0
    assert summary["step_cpu_s"]["median_a"] == 1.0
    assert "cpu_flags" in summary and summary["b_env"] == {"STEP": "0.5"}


def test_ab_times_whole_processes(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time; time.sleep(0.2)\n")
    out = subprocess.run(
        [sys.executable, "benchmarks/ab.py", "--rounds", "1", "--what", "process",
         "--key", "process_wall_s", "--a", str(script), "--b", str(script)],
        cwd=ROOT, capture_output=True, text=True, check=True, timeout=120).stdout
    summary = json.loads(out.splitlines()[-1])
    assert all(0.2 <= t < 10 for t in summary["process_wall_s"]["a"] + summary[
        "process_wall_s"]["b"])
