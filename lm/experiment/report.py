"""From run directories to a study's results: status table, mean ± std table, plots, README.

Every number comes from the runs' own `metrics.jsonl`; runs that failed or have not
finished are listed in the table's "left out" column and never averaged in silently.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from collections.abc import Sequence

import numpy as np

from lm import plotting
from lm.experiment import state as st
from lm.experiment.launch import workdir
from lm.experiment.study import Run, Study
from lm.rundir import read_metrics

START, END = "<!-- results:start -->", "<!-- results:end -->"


@dataclasses.dataclass
class RunResult:
    run: Run
    state: st.RunState
    value: float | None  # the reported metric (None: not finished or never logged)
    curve: list[tuple[int, float]]  # (step, metric) of every record that has it
    workdir: str


@dataclasses.dataclass
class Row:
    stage: str
    setting: tuple[tuple[str, str], ...]
    values: list[float]
    left_out: list[str]  # 'seed=2 failed', ...
    best: bool = False

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values)) if self.values else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else math.nan

    @property
    def label(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.setting) or self.stage


@dataclasses.dataclass
class Results:
    study: Study
    runs: list[RunResult]
    rows: list[Row]
    sweep_dir: str


def metric_value(records: Sequence[dict], metric: str, mode: str, goal: str) -> float | None:
    values = [r[metric] for r in records if metric in r]
    if not values:
        return None
    if mode == "last":
        return float(values[-1])
    return float(min(values) if goal == "min" else max(values))


def collect(study: Study, runs: Sequence[Run], sweep_dir: str) -> Results:
    rep = study.report
    stages = list(rep.stages) or [study.stages[-1].name]
    unknown = [s for s in stages if s not in {x.name for x in study.stages}]
    if unknown:
        raise ValueError(f"report.stages: {unknown[0]!r} is not a stage of {study.name}")
    results = []
    for run in runs:
        wd = workdir(sweep_dir, run)
        state = st.run_state(wd, run.final_step)
        records = read_metrics(wd)
        curve = [(int(r["step"]), float(r[rep.metric])) for r in records if rep.metric in r]
        value = (metric_value(records, rep.metric, rep.mode, rep.goal)
                 if state.state == "finished" else None)
        results.append(RunResult(run, state, value, curve, wd))
    rows: dict[tuple, Row] = {}
    for r in results:
        if r.run.stage not in stages:
            continue
        row = rows.setdefault((r.run.stage, r.run.setting), Row(r.run.stage, r.run.setting, [], []))
        seed = f"seed={r.run.seed}"
        if r.value is not None:
            row.values.append(r.value)
        elif r.state.state == "finished":
            row.left_out.append(f"{seed} logged no {rep.metric}")
        else:
            row.left_out.append(f"{seed} {r.state.state}")
    scored = [row for row in rows.values() if row.values]
    if scored:
        pick = min if rep.goal == "min" else max
        pick(scored, key=lambda row: row.mean).best = True
    return Results(study, results, list(rows.values()), sweep_dir)


# ---------------------------------------------------------------------- tables


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "–"
    return f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}"


def status_table(results: Results) -> str:
    metric = results.study.report.metric
    lines = [f"{'run':58} {'state':12} {'step':>7} {metric:>12}  note"]
    for r in results.runs:
        last = r.curve[-1][1] if r.curve else math.nan
        note = r.state.error or (f"held by {r.state.holder}" if r.state.holder else "")
        lines.append(f"{r.run.key:58} {r.state.state:12} {r.state.step:>7} {_fmt(last):>12}"
                     f"  {note}")
    counts = {s: sum(r.state.state == s for r in results.runs) for s in st.STATES}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def results_table(results: Results) -> str:
    rep = results.study.report
    names = list(dict.fromkeys(k for row in results.rows for k, _ in row.setting))
    multi_stage = len({row.stage for row in results.rows}) > 1
    head = (["stage"] if multi_stage else []) + names + [
        f"{rep.metric} ({rep.mode}, mean ± std)", "seeds", "left out"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results.rows:
        setting = dict(row.setting)
        cell = f"{_fmt(row.mean)} ± {_fmt(row.std)}" if row.values else "–"
        if row.best:
            cell = f"**{cell}** (best)"
        cells = ([row.stage] if multi_stage else []) + [setting.get(n, "") for n in names] + [
            cell, str(row.n), ", ".join(row.left_out) or ""]
        lines.append("| " + " | ".join(cells) + " |")
    goal = "lower" if rep.goal == "min" else "higher"
    lines.append("")
    lines.append(f"{rep.metric}: {goal} is better; std is the sample standard deviation "
                 "(ddof=1) over seeds; runs that failed or did not finish are left out.")
    return "\n".join(lines)


def read_results_table(study_dir: str) -> tuple[str, list[dict[str, str | float]]]:
    """(metric, rows) of a study's committed results.md, read back from `results_table`'s
    markdown: each row has its setting columns (strings), 'mean', 'std' (nan for one seed),
    'seeds' (int), 'best' (bool) and 'left_out' (string). For a fresh clone, where the runs
    themselves live in a sweep directory on another machine."""
    path = os.path.join(study_dir, "results.md")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no results.md (run python -m lm.experiment report)")
    lines: list[str] = []
    for ln in open(path, encoding="utf-8"):  # the first table only (analyses add more)
        if ln.strip().startswith("|"):
            lines.append(ln.strip())
        elif lines:
            break
    if len(lines) < 3:
        raise ValueError(f"{path}: no results table")
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    value_col = next((i for i, c in enumerate(head) if c.endswith("mean ± std)")), None)
    if value_col is None:
        raise ValueError(f"{path}: no 'mean ± std' column in {head}")
    metric = head[value_col].split(" (")[0]
    rows = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        row: dict[str, str | float] = dict(zip(head[:value_col], cells[:value_col],
                                               strict=True))
        cell = cells[value_col]
        row["best"] = "(best)" in cell
        numbers = re.findall(r"[-+]?\d+(?:\.\d+)?|–", cell.replace("**", ""))
        row["mean"], row["std"] = (float("nan") if x == "–" else float(x)
                                   for x in (numbers + ["–", "–"])[:2])
        row["seeds"] = int(cells[value_col + 1])
        row["left_out"] = cells[value_col + 2] if len(cells) > value_col + 2 else ""
        rows.append(row)
    return metric, rows


# ----------------------------------------------------------------------- plots


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def make_plots(results: Results, out_dir: str) -> list[str]:
    """curves.png (the metric per setting over steps) and vs_<axis>.png per varied axis."""
    rep = results.study.report
    os.makedirs(out_dir, exist_ok=True)
    stages = {row.stage for row in results.rows}
    series: dict[str, list] = {}
    for r in results.runs:
        if r.run.stage in stages and r.curve and r.state.state == "finished":
            label = ",".join(f"{k}={v}" for k, v in r.run.setting) or r.run.stage
            series.setdefault(label, []).append(r.curve)
    paths = []
    if series:
        paths.append(plotting.plot_curves(os.path.join(out_dir, "curves.png"), series,
                                          ylabel=rep.metric, title=results.study.name))
    names = list(dict.fromkeys(k for row in results.rows for k, _ in row.setting))
    for axis in names:
        values = {dict(row.setting).get(axis) for row in results.rows}
        if len(values) < 2:
            continue
        lines: dict[str, list] = {}
        for row in results.rows:
            if not row.values:
                continue
            setting = dict(row.setting)
            rest = ",".join(f"{k}={v}" for k, v in row.setting if k != axis)
            lines.setdefault(rest, []).append((setting.get(axis, ""), row.mean, row.std))
        paths.append(plotting.plot_vs(os.path.join(out_dir, f"vs_{_safe(axis)}.png"), axis,
                                      lines, ylabel=f"{rep.metric} ({rep.mode})",
                                      title=results.study.name))
    return paths


# ----------------------------------------------------------------- results.md


def render(results: Results, out_dir: str, command: str) -> str:
    """results.md's text; plots and analyses are written into `out_dir`."""
    study = results.study
    parts = [f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from "
             f"{len(results.runs)} runs.", "", results_table(results), ""]
    os.makedirs(os.path.join(out_dir, "plots"), exist_ok=True)  # analyses draw there too
    for analysis in study.analyses:
        parts += [analysis(results, out_dir).strip(), ""]
    for path in make_plots(results, os.path.join(out_dir, "plots")):
        rel = os.path.relpath(path, out_dir)
        parts.append(f"![{os.path.basename(path)}]({rel})")
    return "\n".join(parts).strip() + "\n"


def update_readme(readme: str, body: str) -> None:
    """Replaces what lies between the results markers (appends a section if there are none)."""
    text = open(readme).read() if os.path.exists(readme) else ""
    block = f"{START}\n{body.rstrip()}\n{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + ("\n\n" if text else "") + "## Results\n\n" + block + "\n"
    tmp = readme + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, readme)


def write_report(results: Results, study_dir: str, command: str) -> str:
    body = render(results, study_dir, command)
    path = os.path.join(study_dir, "results.md")
    with open(path, "w") as f:
        f.write(f"# {results.study.name}: results\n\n{body}")
    update_readme(os.path.join(study_dir, "README.md"), body)
    return path
