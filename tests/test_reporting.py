"""Tests for lm.reporting: files written, throughput arithmetic, one-step-late fetching."""

import glob
import json
import os
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import pytest
from tensorboardX.proto import event_pb2

from lm import reporting


def _read_tb_scalars(tb_dir):
    """Parse TFRecord event files: {tag: [(step, value), ...]}."""
    out = {}
    for path in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metric_writer_jsonl_and_tensorboard(tmp_path):
    with reporting.MetricWriter(tmp_path) as w:
        w.write(10, {"loss": 2.5, "perf/mfu": jnp.float32(0.25)})
        # Flushed per write: readable before close.
        assert (tmp_path / "metrics.jsonl").read_text() == (
            '{"step": 10, "loss": 2.5, "perf/mfu": 0.25}\n'
        )
        w.write(20, {"loss": 1.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == [
        {"step": 10, "loss": 2.5, "perf/mfu": 0.25},
        {"step": 20, "loss": 1.25},
    ]
    events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert len(events) == 1 and os.path.getsize(events[0]) > 0
    scalars = _read_tb_scalars(tmp_path / "tb")
    assert scalars["loss"] == [(10, 2.5), (20, 1.25)]
    assert scalars["perf/mfu"] == [(10, 0.25)]

    # Resume appends.
    with reporting.MetricWriter(tmp_path, tensorboard=False) as w:
        w.write(30, {"loss": 1.0})
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]


def test_metric_writer_truncate_after_on_resume(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.0}\n{"step": 30, "lo'
    )
    with reporting.MetricWriter(tmp_path, tensorboard=False, truncate_after=10) as w:
        w.write(20, {"loss": 2.1})
    assert (tmp_path / "metrics.jsonl").read_text() == (
        '{"step": 10, "loss": 3.0}\n{"step": 20, "loss": 2.1}\n'
    )


def test_only_process_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    w = reporting.MetricWriter(tmp_path / "run")
    w.write(1, {"loss": 1.0})
    w.flush()
    w.close()
    assert reporting.write_config(tmp_path / "run", {"a": 1}) is None
    lines = []
    progress = reporting.ProgressLine(10, every=1, log_fn=lines.append)
    assert progress.maybe_log(1, {"loss": 1.0}) is None
    assert lines == []
    assert not (tmp_path / "run").exists()


def test_write_config(tmp_path):
    path = reporting.write_config(tmp_path, {"model": {"d": 64, "dtype": jnp.bfloat16}, "lr": 1e-3})
    assert path == os.path.join(tmp_path, "config.json")
    got = json.loads((tmp_path / "config.json").read_text())
    assert got["model"]["d"] == 64 and got["lr"] == 1e-3
    assert "bfloat16" in got["model"]["dtype"]
    assert not (tmp_path / "config.json.tmp").exists()


def test_device_peak_flops(monkeypatch):
    def dev(kind, platform="gpu"):
        return types.SimpleNamespace(device_kind=kind, platform=platform)

    assert reporting.device_peak_flops(dev("NVIDIA H100 80GB HBM3"), jnp.bfloat16) == 989e12
    assert reporting.device_peak_flops(dev("NVIDIA H100 80GB HBM3"), "float32") == 494e12
    assert reporting.device_peak_flops(dev("NVIDIA H100 PCIe"), "bf16") == 756e12
    assert reporting.device_peak_flops(dev("NVIDIA H200"), "bf16") == 989e12
    assert reporting.device_peak_flops(dev("NVIDIA A100-SXM4-80GB"), "bfloat16") == 312e12
    assert reporting.device_peak_flops(dev("TPU v4", "tpu"), "bfloat16") == 275e12
    assert reporting.device_peak_flops(dev("TPU v5 lite", "tpu"), "bfloat16") == 197e12
    assert reporting.device_peak_flops(dev("TPU v5", "tpu"), "bfloat16") == 459e12
    assert reporting.device_peak_flops(dev("TPU v5p", "tpu"), "bfloat16") == 459e12
    assert reporting.device_peak_flops(dev("TPU v6 lite", "tpu"), "bfloat16") == 918e12
    assert reporting.device_peak_flops(dev("Mystery accelerator"), "bfloat16") is None

    cpu = jax.devices("cpu")[0]
    monkeypatch.delenv(reporting.CPU_PEAK_ENV, raising=False)
    assert reporting.device_peak_flops(cpu, jnp.float32) is None
    monkeypatch.setenv(reporting.CPU_PEAK_ENV, "2.1e11")
    assert reporting.device_peak_flops(cpu, jnp.float32) == 2.1e11
    monkeypatch.setenv(reporting.CPU_PEAK_ENV, "bf16=7e11,fp32=2.1e11")
    assert reporting.device_peak_flops(cpu, jnp.bfloat16) == 7e11
    assert reporting.device_peak_flops(cpu, "float32") == 2.1e11


def test_throughput_golden():
    tp = reporting.Throughput(
        flops_per_token=6e9, tokens_per_step=4096, num_devices=8, peak_flops=1e15, total_steps=110
    )
    assert tp.update(0, now=100.0) == {}
    out = tp.update(10, now=105.0)  # 10 steps in 5 s
    assert out == pytest.approx(
        {
            "perf/step_time_s": 0.5,
            "perf/tokens_per_sec": 8192.0,
            "perf/tflops_per_device": 6e9 * 8192 / 8 / 1e12,  # 6.144
            "perf/mfu": 6e9 * 8192 / 8 / 1e15,  # 0.006144
            "perf/eta_s": 100 * 0.5,
        }
    )
    out = tp.update(12, now=107.0)  # rates are over the last interval only
    assert out["perf/step_time_s"] == pytest.approx(1.0)
    assert out["perf/eta_s"] == pytest.approx(98.0)


def test_throughput_without_peak_or_total():
    tp = reporting.Throughput(1e6, 100, 1, None)
    tp.reset(0, now=0.0)
    out = tp.update(4, now=2.0)
    assert "perf/mfu" not in out and "perf/eta_s" not in out
    assert out["perf/tokens_per_sec"] == pytest.approx(200.0)
    assert tp.update(4, now=3.0) == {}  # no progress: nothing to report


def test_throughput_uses_clock():
    t = iter([10.0, 12.0])
    tp = reporting.Throughput(1.0, 10, 1, 100.0, clock=lambda: next(t))
    tp.update(1)
    assert tp.update(3)["perf/mfu"] == pytest.approx(10 / 1.0 / 100.0)


def test_progress_line():
    lines = []
    progress = reporting.ProgressLine(2000, every=20, log_fn=lines.append)
    metrics = {"train/loss": 2.3454, "perf/tokens_per_sec": 12345.0, "perf/eta_s": 192.0}
    assert progress.maybe_log(110, metrics) is None
    line = progress.maybe_log(120, metrics)
    assert line == "step 120/2000 | loss 2.3454 | 12.3k tok/s | eta 3m12s"
    assert lines == [line]
    assert (
        progress.format(5, {"loss": 1.0, "perf/mfu": 0.4123})
        == "step 5/2000 | loss 1.0000 | mfu 41.2%"
    )
    assert progress.maybe_log(7, {}, force=True) == "step 7/2000"


@pytest.mark.parametrize(
    "seconds, text", [(0.4, "0s"), (45, "45s"), (192, "3m12s"), (3725, "1h02m"), (90061, "1d01h")]
)
def test_format_duration(seconds, text):
    assert reporting.format_duration(seconds) == text


def test_format_count():
    assert reporting.format_count(950) == "950"
    assert reporting.format_count(12345) == "12.3k"
    assert reporting.format_count(123456) == "123k"
    assert reporting.format_count(2.5e6) == "2.5M"


def test_metrics_fetcher_is_one_step_late():
    fetcher = reporting.MetricsFetcher()
    step_fn = jax.jit(lambda x: {"loss": x * 2.0, "grad": {"norm": x + 1.0}})
    assert fetcher.push(1, step_fn(jnp.float32(1.0))) == []
    [got] = fetcher.push(2, step_fn(jnp.float32(2.0)))
    assert got == reporting.StepMetrics(1, {"loss": 2.0, "grad/norm": 2.0})
    assert all(type(v) is float for v in got.metrics.values())
    [got] = fetcher.flush()
    assert got.step == 2 and got.metrics == {"loss": 4.0, "grad/norm": 3.0}
    assert fetcher.flush() == []
    assert fetcher.push(3, {"loss": jnp.float32(0.5)}) == []  # restarts after a flush


def test_metrics_fetcher_unstacks_a_call_of_several_steps():
    fetcher = reporting.MetricsFetcher()
    assert fetcher.push(7, {"loss": jnp.array([1.0, 2.0, 3.0])}, count=3) == []
    got = fetcher.flush()
    assert [(m.step, m.metrics["loss"]) for m in got] == [(5, 1.0), (6, 2.0), (7, 3.0)]


def test_metric_writer_does_not_import_torch(tmp_path):
    """tensorboardX imports PyTorch when installed (1.3 s of start-up); the writer keeps it
    out and still writes TensorBoard scalars."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: nothing to keep out")
    code = (
        "import sys\n"
        "from lm import reporting\n"
        f"w = reporting.MetricWriter({str(tmp_path)!r}, wandb_project='')\n"
        "w.write(3, {'train/loss': 1.5})\n"
        "w.close()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import torch\n"  # and importable afterwards
    )
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                   env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
    assert _read_tb_scalars(tmp_path / "tb") == {"train/loss": [(3, 1.5)]}
