"""Task mixtures on the data side: mixing rates, the mixed training stream, mixed eval.

Rates (`data.mixing`), over tasks m with e_m training examples:
  explicit     r_m = rate_m / sum_n rate_n (the tasks' own `rate` fields)
  examples     r_m = min(e_m, K) / sum_n min(e_n, K)   (K = `data.rate_cap`; 0: no cap)
  temperature  the examples-proportional rates (capped the same way) raised to 1/T
               (T = `data.temperature`) and renormalised; T = 1 is `examples`, large T
               tends to equal rates.

Batches (`data.batching`):
  task  every step's batch comes from one task, drawn by rate (the default). Any rate is
        realised exactly in expectation at any batch size, each step costs one task's
        forward/backward at that task's own shapes (tasks may differ in seq_len, and a
        one-task mixture is the single-task run), at the price of one compiled step per
        task and a gradient that sees one task per step.
  rows  every step's batch holds every task, round(B * r_m) rows of task m (largest
        remainder, in multiples of the batch shard count): a smoother gradient, but rates
        are quantised to 1/B and every step pays for all tasks.

A mixed batch is flat: task m's field `k` is `m/k`, so the loop shards it like any batch.
The draw of step s is a function of (seed, s) alone, and the iterator's state is the step
plus every task's own iterator state, so a resumed run sees the same batches.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

MIXING = ("explicit", "examples", "temperature")
BATCHING = ("task", "rows")
SEP = "/"
_STREAM = 0x6D6978  # keeps the task draw independent of the other users of the seed


def mixing_rates(kind: str, names: Sequence[str], *, rates: Mapping[str, float] | None = None,
                 examples: Mapping[str, int] | None = None, cap: float = 0,
                 temperature: float = 1.0) -> dict[str, float]:
    """Normalised rates {task: r} (see the module docstring); all-zero rates are an error
    naming the tasks."""
    if kind == "explicit":
        raw = np.array([float((rates or {})[n]) for n in names])
    elif kind in ("examples", "temperature"):
        raw = np.array([float((examples or {})[n]) for n in names])
        if cap:
            raw = np.minimum(raw, cap)
        if kind == "temperature":
            raw = raw ** (1.0 / temperature)
    else:
        raise ValueError(f"data.mixing: {kind!r} is not one of {', '.join(MIXING)}")
    if np.any(raw < 0) or not np.all(np.isfinite(raw)):
        bad = names[int(np.argmax((raw < 0) | ~np.isfinite(raw)))]
        raise ValueError(f"tasks.{bad}: its rate must be a finite number >= 0")
    if raw.sum() <= 0:
        what = "rate" if kind == "explicit" else "number of training examples"
        raise ValueError(f"tasks: every task's {what} is 0 ({', '.join(names)}); nothing to "
                         "sample")
    return {n: float(r) for n, r in zip(names, raw / raw.sum(), strict=True)}


def allocate_rows(rates: Mapping[str, float], batch_size: int, multiple: int = 1
                  ) -> dict[str, int]:
    """Rows per task for `rows` batching: batch_size * r_m rounded (largest remainder) to
    multiples of `multiple` (the batch shards), summing to batch_size. Tasks may get 0."""
    if batch_size % multiple:
        raise ValueError(f"train.batch_size={batch_size} is not a multiple of {multiple}")
    units = batch_size // multiple
    names = list(rates)
    exact = np.array([rates[n] * units for n in names])
    rows = np.floor(exact).astype(int)
    order = np.argsort(-(exact - rows), kind="stable")
    rows[order[: units - rows.sum()]] += 1
    return {n: int(r) * multiple for n, r in zip(names, rows, strict=True)}


def prefix(name: str, batch: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{name}{SEP}{k}": v for k, v in batch.items()}


def split(batch: Mapping[str, Any], names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Flat mixed batch -> {task: its own batch} for the tasks present."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        head = name + SEP
        sub = {k[len(head):]: v for k, v in batch.items() if k.startswith(head)}
        if sub:
            out[name] = sub
    return out


def _encode(state: Any) -> dict[str, Any]:
    if isinstance(state, bytes | bytearray):
        return {"bytes": base64.b64encode(bytes(state)).decode("ascii")}
    return {"json": json.loads(json.dumps(state))}


def _decode(blob: Mapping[str, Any]) -> Any:
    return base64.b64decode(blob["bytes"]) if "bytes" in blob else blob["json"]


class MixtureIterator:
    """The mixed training stream over the tasks' own iterators (see the module docstring).

    `rows` (batching 'rows'): rows per task; each task's iterator must yield batches of
    exactly that many rows (tasks with 0 rows are never read)."""

    def __init__(self, iterators: Mapping[str, Iterator], rates: Mapping[str, float],
                 seed: int, batching: str = "task", rows: Mapping[str, int] | None = None):
        if batching not in BATCHING:
            raise ValueError(f"data.batching: {batching!r} is not one of {', '.join(BATCHING)}")
        self.iterators, self.rates, self.seed, self.batching = iterators, rates, seed, batching
        self.names = list(iterators)
        self.rows = dict(rows or {})
        self.cumulative = np.cumsum([rates[n] for n in self.names])
        self.step = 0  # batches handed out so far

    def task_at(self, step: int) -> str:
        """The task of batch `step` (0-based) in 'task' batching: a pure function of the
        seed and the step, which is what makes the mixture resumable by its step alone."""
        u = np.random.default_rng((self.seed & 0xFFFFFFFF, _STREAM, step)).random()
        i = int(np.searchsorted(self.cumulative, u * self.cumulative[-1], side="right"))
        return self.names[min(i, len(self.names) - 1)]

    def __iter__(self) -> MixtureIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.batching == "task":
            name = self.task_at(self.step)
            batch = prefix(name, next(self.iterators[name]))
        else:
            batch = {}
            for name in self.names:
                if self.rows.get(name, 0):
                    batch.update(prefix(name, next(self.iterators[name])))
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step,
                "tasks": {n: _encode(it.get_state()) for n, it in self.iterators.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.iterators) - set(state["tasks"]))
        if missing:
            raise ValueError(f"tasks.{missing[0]}: the checkpoint's data state has no position "
                             f"for this task (it has {sorted(state['tasks'])})")
        self.step = int(state["step"])
        for name, it in self.iterators.items():
            it.set_state(_decode(state["tasks"][name]))


class MixtureEval:
    """One validation pass over every task: batch b holds the b-th batch of each task that
    still has one (so `evals.max_batches` caps each task, not the whole pass)."""

    def __init__(self, passes: Mapping[str, Iterable[Mapping[str, np.ndarray]]]):
        self.passes = passes

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        streams = {n: iter(p) for n, p in self.passes.items()}
        while streams:
            batch: dict[str, np.ndarray] = {}
            for name in list(streams):
                item = next(streams[name], None)
                if item is None:
                    del streams[name]
                else:
                    batch.update(prefix(name, item))
            if batch:
                yield batch
