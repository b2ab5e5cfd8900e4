"""lm.plot and lm.plotting on hand-written metrics.jsonl files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lm import plot, plotting


def fake_run(path, losses, batch=4, seq=8):
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"train": {"batch_size": batch},
                                                  "data": {"seq_len": seq}}))
    with open(path / "metrics.jsonl", "w") as f:
        for step, loss in losses:
            f.write(json.dumps({"step": step, "train/loss": loss}) + "\n")
        f.write(json.dumps({"step": losses[-1][0], "eval/loss": 9.0}) + "\n")
        f.write('{"step": 99, "train/lo')  # a torn last line from a crash is skipped


def test_series_values_tokens_and_smoothing(tmp_path):
    fake_run(tmp_path / "a", [(1, 4.0), (2, 2.0), (3, 1.0)])
    fake_run(tmp_path / "b", [(1, 3.0), (2, 3.0)], batch=2, seq=16)
    runs = [str(tmp_path / "a"), str(tmp_path / "b")]
    s = plot.series(runs, ["train/loss", "eval/loss"], 0.0, "tokens")
    assert s["a train/loss"] == [(32, 4.0), (64, 2.0), (96, 1.0)]
    assert s["b train/loss"] == [(32, 3.0), (64, 3.0)] and s["a eval/loss"] == [(96, 9.0)]
    smooth = plot.series(runs[:1], ["train/loss"], 0.5, "steps")["a train/loss"]
    # bias-corrected EMA: 2/0.5 = 4, (1 + 1)/0.75 = 8/3, (1 + 0.5)/0.875 = 12/7
    np.testing.assert_allclose([y for _, y in smooth], [4.0, 8 / 3, 12 / 7], rtol=1e-6)


def test_cli_writes_a_png_and_rejects_bad_input(tmp_path, capsys):
    fake_run(tmp_path / "a", [(1, 4.0), (2, 2.0)])
    out = tmp_path / "c.png"
    assert plot.main([str(tmp_path / "a"), "--out", str(out), "--smoothing", "0.6"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    for argv, needle in [([str(tmp_path / "nope")], "no such run directory"),
                         ([str(tmp_path / "a"), "--metric", "eval/bleu"], "--metric"),
                         ([str(tmp_path / "a"), "--smoothing", "1.5"], "--smoothing")]:
        with pytest.raises(SystemExit) as e:
            plot.main(argv)
        assert e.value.code == 1 and needle in capsys.readouterr().err


def test_mean_band_and_power_law_fit():
    steps, mean, std = plotting.mean_band([[(1, 1.0), (2, 2.0)], [(1, 3.0), (2, 4.0), (3, 5.0)]])
    assert steps.tolist() == [1, 2] and mean.tolist() == [2.0, 3.0]
    np.testing.assert_allclose(std, [np.sqrt(2), np.sqrt(2)])
    x = np.array([1e3, 1e4, 1e5, 1e6])
    a, alpha = plotting.power_law_fit(x, 5.0 * x ** -0.25)
    assert abs(a - 5.0) < 1e-9 and abs(alpha - 0.25) < 1e-12
