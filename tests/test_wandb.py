"""Weights & Biases as an optional metric writer: what a run logs reaches W&B's run file.

Runs with WANDB_MODE=offline (no network, no account) and reads the values back from the
offline run's `.wandb` file (W&B's record log: 32 KiB blocks of CRC-framed protobuf records).
"""

from __future__ import annotations

import glob
import json
import struct
import time

import pytest

from lm import reporting

wandb = pytest.importorskip("wandb", reason="wandb not installed (pip install -e '.[wandb]')")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from tests.test_train import make_config, read_metrics  # noqa: E402

_BLOCK, _HEADER = 32768, 7  # the log's block size; both the file and record header are 7 bytes


def _records(path: str):
    """Protobuf records of a `.wandb` run file (full=1, first=2, middle=3, last=4 pieces)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", path
    pos, parts = _HEADER, []
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _HEADER])
        if left < _HEADER or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        parts.append(data[pos + _HEADER:pos + _HEADER + length])
        pos += _HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _finished_records(workdir, timeout_s: float = 60.0) -> list:
    """The run file's records once its 'exit' record is there: W&B's service process writes
    the file asynchronously, shortly after `finish()` returns."""
    (path,) = glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s"
        time.sleep(0.2)


def logged(workdir) -> tuple[list[dict], dict]:
    """(history rows without W&B's own '_' keys, the run record's fields) of a workdir."""
    rows, run = [], {}
    for r in _finished_records(workdir):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in r.history.item}
            rows.append({k: v for k, v in row.items() if not k.startswith("_") or k == "_step"})
        elif kind == "run":
            run = {"project": r.run.project, "name": r.run.display_name, "id": r.run.run_id,
                   "config": {u.key: json.loads(u.value_json) for u in r.run.config.update}}
    return rows, run


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))


def test_writer_logs_the_same_values_as_jsonl(tmp_path):
    run = tmp_path / "run"
    with reporting.MetricWriter(run, tensorboard=False, wandb_project="proj") as w:
        w.write(1, {"train/loss": 2.5})
        w.write(2, {"train/loss": 2.25, "eval/loss": 3.0})
    rows, meta = logged(run)
    assert rows == [{"train/loss": 2.5, "_step": 1},
                    {"train/loss": 2.25, "eval/loss": 3.0, "_step": 2}]
    assert meta["project"] == "proj" and meta["name"] == "run"
    assert [{k: v for k, v in m.items() if k != "step"} for m in read_metrics(run)] == [
        {"train/loss": 2.5}, {"train/loss": 2.25, "eval/loss": 3.0}]


def test_training_run_logs_every_metric_to_wandb(tmp_path):
    from lm import train

    c = make_config(tmp_path, **{"train.steps": 4, "train.log_every": 2, "train.eval_every": 4,
                                 "train.wandb_project": "lm-test"})
    train.train_and_evaluate(c, str(tmp_path / "on"))
    rows, meta = logged(tmp_path / "on")
    jsonl = read_metrics(tmp_path / "on")
    # every JSONL record reached W&B at its step, value for value (floats as JSON numbers)
    by_step: dict[int, dict] = {}
    for row in rows:
        by_step.setdefault(row["_step"], {}).update(row)
    for record in jsonl:
        step = record["step"]
        got = {k: v for k, v in by_step[step].items() if k != "_step"}
        want = {k: v for k, v in record.items() if k != "step"}
        assert set(want) <= set(got), step
        assert all(got[k] == pytest.approx(want[k], rel=1e-12) for k in want), step
    assert {"train/loss", "eval/loss"} <= {k for r in rows for k in r}
    assert meta["config"]["train"]["wandb_project"] == "lm-test"
    assert meta["config"]["model"]["num_layers"] == c.model.num_layers



def test_no_project_no_wandb(tmp_path, monkeypatch):
    """An empty train.wandb_project (the default) never starts W&B: same files as before."""
    monkeypatch.setattr(wandb, "init", lambda *a, **k: pytest.fail("wandb.init called"))
    run = tmp_path / "run"
    reporting.write_config(run, {"train": {"wandb_project": ""}})
    with reporting.MetricWriter(run, tensorboard=False) as w:  # reads config.json
        w.write(1, {"train/loss": 1.0})
    with reporting.MetricWriter(tmp_path / "bare", tensorboard=False) as w:  # no config.json
        w.write(1, {"train/loss": 1.0})
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "metrics.jsonl"]
    assert sorted(p.name for p in (tmp_path / "bare").iterdir()) == ["metrics.jsonl"]
