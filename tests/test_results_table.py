"""A study's committed results.md reads back into the numbers `results_table` wrote."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from lm.experiment import report


def test_results_table_round_trip(tmp_path):
    rep = SimpleNamespace(metric="eval/loss", mode="last", goal="min")
    rows = [report.Row("main", (("position", "rope"), ("width", "64")), [1.5, 1.7], []),
            report.Row("main", (("position", "learned"), ("width", "64")), [1.9],
                       ["seed=1 failed"]),
            report.Row("main", (("position", "none"), ("width", "64")), [], ["seed=0 running"])]
    rows[0].best = True
    results = SimpleNamespace(study=SimpleNamespace(report=rep), rows=rows)
    (tmp_path / "results.md").write_text(
        "# s: results\n\nGenerated ...\n\n" + report.results_table(results) +
        "\n\n| an | analysis |\n|---|---|\n| 1 | 2 |\n")
    metric, got = report.read_results_table(str(tmp_path))
    assert metric == "eval/loss"
    assert [(r["position"], r["width"], r["seeds"], r["best"], r["left_out"]) for r in got] == [
        ("rope", "64", 2, True, ""), ("learned", "64", 1, False, "seed=1 failed"),
        ("none", "64", 0, False, "seed=0 running")]
    assert got[0]["mean"] == pytest.approx(1.6) and got[0]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert got[1]["mean"] == 1.9 and math.isnan(got[1]["std"])
    assert math.isnan(got[2]["mean"])


def test_results_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results.md"):
        report.read_results_table(str(tmp_path))
    (tmp_path / "results.md").write_text("no table here\n")
    with pytest.raises(ValueError, match="no results table"):
        report.read_results_table(str(tmp_path))
