"""Metrics out of a training run: JSONL + TensorBoard (+ optional Weights & Biases),
throughput/MFU, console progress.

Only process 0 writes files or logs; every other process gets no-op objects, so callers can
use the same code on all hosts. `MetricsFetcher` implements the "fetch one step late" rule:
the host reads step N-1's metrics after dispatching step N, so it never waits on the device.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np
from absl import logging

# ----------------------------------------------------------------------------- peak FLOP/s

# Dense (no sparsity) peak FLOP/s per device, keyed by a lower-case substring of
# `device.device_kind`; the first matching entry wins, so specific names come first.
# 'float32' is the rate JAX's *default* matmul precision runs at: TF32 tensor cores on
# Ampere/Hopper GPUs (H100 SXM: 494e12; full-precision CUDA cores would be ~67e12) and bf16
# MXU passes on TPUs (so the bf16 figure).
DEVICE_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100 pcie": {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12},
    "h100": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},
    "h200": {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12},  # also GH200
    "a100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "tpu v4": {"bfloat16": 275e12, "float32": 275e12},
    "tpu v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "tpu v5e": {"bfloat16": 197e12, "float32": 197e12},
    "tpu v5p": {"bfloat16": 459e12, "float32": 459e12},
    "tpu v5": {"bfloat16": 459e12, "float32": 459e12},  # v5p reports "TPU v5"
    "tpu v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "tpu v6e": {"bfloat16": 918e12, "float32": 918e12},
}

CPU_PEAK_ENV = "LM_CPU_PEAK_FLOPS"

_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "fp32": "float32",
    "f32": "float32",
    "tf32": "float32",
}


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, str) and dtype.lower() in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[dtype.lower()]
    return np.dtype(dtype).name


def _cpu_peak(dtype: str) -> float | None:
    """Parse LM_CPU_PEAK_FLOPS: either one number or 'bfloat16=7e11,float32=2.1e11'."""
    raw = os.environ.get(CPU_PEAK_ENV, "").strip()
    if not raw:
        return None
    if "=" not in raw:
        return float(raw)
    table = {}
    for part in raw.split(","):
        key, _, value = part.partition("=")
        table[_dtype_name(key.strip())] = float(value)
    return table.get(dtype)


def device_peak_flops(device: Any, dtype: Any) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in ``dtype``; None when unknown.

    CPUs have no entry: set LM_CPU_PEAK_FLOPS to get an MFU there.
    """
    name = _dtype_name(dtype)
    if getattr(device, "platform", "") == "cpu":
        return _cpu_peak(name)
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, peaks in DEVICE_PEAK_FLOPS.items():
        if key in kind:
            return peaks.get(name)
    return None


# ----------------------------------------------------------------------------- files


def _is_writer() -> bool:
    return jax.process_index() == 0


def _jsonable_config(config: Any) -> Any:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        config = config.to_dict()
    return config


def write_config(workdir: str | os.PathLike[str], config_dict: Any) -> str | None:
    """Write DIR/config.json (process 0 only); returns the path written, or None.

    Values JSON cannot represent (dtypes, tuples of objects, ...) are stored as ``str``.
    """
    if not _is_writer():
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = json.dumps(_jsonable_config(config_dict), indent=2, sort_keys=True, default=str)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)  # never leave a half-written config behind
    return path


def _configured_wandb_project(workdir: str | os.PathLike[str]) -> str:
    """`train.wandb_project` of the run's config.json ('' when absent or unreadable)."""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            return str(json.load(f).get("train", {}).get("wandb_project", "") or "")
    except (OSError, ValueError, AttributeError):
        return ""


class WandbWriter:
    """Scalars to a Weights & Biases run, one per workdir (id from the workdir's path, so a
    resumed run continues the same W&B run); files under DIR/wandb. `WANDB_MODE=offline`
    writes only locally (`wandb sync DIR/wandb/offline-run-*` uploads later)."""

    def __init__(self, workdir: str | os.PathLike[str], project: str) -> None:
        try:
            import wandb  # noqa: PLC0415 (optional extra)
        except ImportError:
            raise ImportError("train.wandb_project is set but wandb is not installed "
                              "(pip install -e '.[wandb]')") from None
        import hashlib  # noqa: PLC0415

        workdir = os.path.abspath(workdir)
        config_path = os.path.join(workdir, "config.json")
        config = {}
        if os.path.exists(config_path):
            with open(config_path) as f:
                config = json.load(f)
        os.makedirs(os.path.join(workdir, "wandb"), exist_ok=True)
        self.run = wandb.init(
            project=project, dir=workdir, name=os.path.basename(workdir), config=config,
            id=hashlib.sha256(workdir.encode()).hexdigest()[:16], resume="allow",
            settings=wandb.Settings(console="off", silent=True))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=int(step))

    def flush(self) -> None:
        pass  # wandb streams on its own

    def close(self) -> None:
        self.run.finish()


class MetricWriter:
    """Scalars to DIR/metrics.jsonl (one object per `write`) and TensorBoard DIR/tb/, and to
    Weights & Biases when a project is named.

    The JSONL file is appended to (a resumed run continues it) and flushed on every write.
    ``truncate_after``: on resume from step N, drop JSONL records with step > N first, so
    steps re-run after the checkpoint are not listed twice. ``wandb_project``: None reads
    `train.wandb_project` from DIR/config.json (the trainer writes it first); '' = no W&B.
    No-op on processes != 0.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        tensorboard: bool = True,
        truncate_after: int | None = None,
        wandb_project: str | None = None,
    ) -> None:
        self.enabled = _is_writer()
        self._jsonl = None
        self._tb = None
        self._wandb: WandbWriter | None = None
        if not self.enabled:
            return
        if wandb_project is None:
            wandb_project = _configured_wandb_project(workdir)
        if wandb_project:
            self._wandb = WandbWriter(workdir, wandb_project)
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if truncate_after is not None:
            self._truncate(truncate_after)
        self._jsonl = open(self.jsonl_path, "a")  # closed in close()
        if tensorboard:
            self._tb = _summary_writer()(logdir=os.path.join(workdir, "tb"), flush_secs=30)

    def _truncate(self, last_step: int) -> None:
        if not os.path.exists(self.jsonl_path):
            return
        with open(self.jsonl_path) as f:
            lines = f.readlines()
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a crash
        with open(self.jsonl_path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalar ``metrics`` for ``step`` (values converted with float())."""
        if not self.enabled or self._jsonl is None:
            return
        values = {k: float(v) for k, v in metrics.items()}
        record = {"step": int(step), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, global_step=int(step))
        if self._wandb is not None:
            self._wandb.write(step, values)

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ----------------------------------------------------------------------------- throughput


class Throughput:
    """Step time, tokens/s, MFU and ETA from wall-clock time between `update` calls.

    ``flops_per_token`` is the model's training FLOPs per token (forward + backward, e.g.
    6 * params + attention); ``peak_flops`` is one device's peak (see `device_peak_flops`),
    None to omit MFU. The first `update` only sets the reference time.
    """

    def __init__(
        self,
        flops_per_token: float,
        tokens_per_step: int,
        num_devices: int,
        peak_flops: float | None,
        *,
        total_steps: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.flops_per_token = float(flops_per_token)
        self.tokens_per_step = int(tokens_per_step)
        self.num_devices = int(num_devices)
        self.peak_flops = peak_flops
        self.total_steps = total_steps
        self._clock = clock
        self._last: tuple[int, float] | None = None

    def reset(self, step: int, now: float | None = None) -> None:
        """Restart timing at ``step`` (e.g. after an eval or a checkpoint pause)."""
        self._last = (step, self._clock() if now is None else now)

    def update(self, step: int, now: float | None = None) -> dict[str, float]:
        """Rates averaged over the steps since the previous call; {} on the first call."""
        now = self._clock() if now is None else now
        last, self._last = self._last, (step, now)
        if last is None or step <= last[0] or now <= last[1]:
            return {}
        steps = step - last[0]
        step_time = (now - last[1]) / steps
        tokens_per_sec = self.tokens_per_step / step_time
        flops_per_sec_per_device = self.flops_per_token * tokens_per_sec / self.num_devices
        out = {
            "perf/step_time_s": step_time,
            "perf/tokens_per_sec": tokens_per_sec,
            "perf/tflops_per_device": flops_per_sec_per_device / 1e12,
        }
        if self.peak_flops:
            out["perf/mfu"] = flops_per_sec_per_device / self.peak_flops
        if self.total_steps is not None:
            out["perf/eta_s"] = max(self.total_steps - step, 0) * step_time
        return out


def format_count(x: float) -> str:
    """12345 -> '12.3k', 2.5e6 -> '2.5M' (3 significant digits)."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            v = x / div
            return f"{v:.3g}{suffix}" if v < 100 else f"{v:.0f}{suffix}"
    return f"{x:.3g}"


def format_duration(seconds: float) -> str:
    """192 -> '3m12s', 3725 -> '1h02m', 90061 -> '1d01h'."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class ProgressLine:
    """Console line every ``every`` steps, process 0 only, e.g.

    ``step 120/2000 | loss 2.345 | 12.3k tok/s | eta 3m12s`` (plus ``| mfu 41.2%`` if known).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        every: int = 100,
        log_fn: Callable[[str], None] = logging.info,
    ) -> None:
        self.total_steps = total_steps
        self.every = every
        self.log_fn = log_fn

    def format(self, step: int, metrics: Mapping[str, float]) -> str:
        parts = [f"step {step}/{self.total_steps}"]
        loss = metrics.get("train/loss", metrics.get("loss"))
        if loss is not None:
            parts.append(f"loss {float(loss):.4f}")
        if "perf/tokens_per_sec" in metrics:
            parts.append(f"{format_count(float(metrics['perf/tokens_per_sec']))} tok/s")
        if "perf/mfu" in metrics:
            parts.append(f"mfu {100 * float(metrics['perf/mfu']):.1f}%")
        if "perf/eta_s" in metrics:
            parts.append(f"eta {format_duration(float(metrics['perf/eta_s']))}")
        return " | ".join(parts)

    def maybe_log(
        self, step: int, metrics: Mapping[str, float], *, force: bool = False
    ) -> str | None:
        """Log and return the line when ``step % every == 0`` (or ``force``)."""
        if not (force or step % self.every == 0) or not _is_writer():
            return None
        line = self.format(step, metrics)
        self.log_fn(line)
        return line


# ----------------------------------------------------------------------------- fetching


class StepMetrics(NamedTuple):
    step: int
    metrics: dict[str, float]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, name + "/"))
        else:
            out[name] = v
    return out


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported (lazily: only process 0 needs it) without
    PyTorch: tensorboardX imports torch when it is installed, only to accept its tensors,
    1.3 s of every run's start-up here (0.08 s without). Where torch is already loaded
    it is left as it is."""
    if "torch" in sys.modules or "tensorboardX" in sys.modules:
        from tensorboardX import SummaryWriter  # noqa: PLC0415

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError meanwhile
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsFetcher:
    """Read metrics one call late so the host never blocks on the step it just dispatched.

    ``push(step, device_metrics, count)`` keeps this call's (still computing) arrays, starts
    their device-to-host copy, and returns the previous push as a list of StepMetrics (empty
    on the first push). A call of ``count`` > 1 steps has metrics with a leading axis of
    ``count`` for steps ``step - count + 1 .. step``. Nested dicts are flattened with '/'
    ("grad/norm"). `flush` returns the pending push.
    """

    def __init__(self) -> None:
        self._pending: tuple[int, int, dict[str, Any]] | None = None

    def push(self, step: int, metrics: Mapping[str, Any], count: int = 1
             ) -> list[StepMetrics]:
        flat = _flatten(metrics)
        for value in flat.values():
            copy = getattr(value, "copy_to_host_async", None)
            if copy is not None:
                copy()  # non-blocking; overlaps the transfer with the next step
        previous, self._pending = self._pending, (int(step), int(count), flat)
        return [] if previous is None else self._fetch(previous)

    def flush(self) -> list[StepMetrics]:
        previous, self._pending = self._pending, None
        return [] if previous is None else self._fetch(previous)

    @staticmethod
    def _fetch(item: tuple[int, int, dict[str, Any]]) -> list[StepMetrics]:
        step, count, flat = item
        host = {k: np.asarray(v) for k, v in jax.device_get(flat).items()}
        if count == 1:
            return [StepMetrics(step, {k: float(v) for k, v in host.items()})]
        return [StepMetrics(step - count + 1 + i, {k: float(v[i]) for k, v in host.items()})
                for i in range(count)]


class Profiler:
    """A jax.profiler trace of steps [start, start + steps) into WORKDIR/profile; call
    `before(step)` ahead of dispatching a step and `after(step, tree)` once it is queued
    (the trace stops when that step's outputs are ready, so it holds whole steps)."""

    def __init__(self, workdir: str, start: int, steps: int):
        self.dir = os.path.join(workdir, "profile")
        self.first, self.last = start, start + steps - 1
        self.enabled = steps > 0
        self.active = False

    def before(self, first: int, last: int | None = None) -> None:
        """Ahead of dispatching the call that runs steps first..last (default: first)."""
        start = max(self.first, 1)
        if self.enabled and not self.active and first <= start <= (last or first):
            jax.profiler.start_trace(self.dir)
            self.active = True

    def after(self, step: int, tree: Any) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(tree)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("profile of steps %d-%d written to %s", max(self.first, 1), step,
                         self.dir)
