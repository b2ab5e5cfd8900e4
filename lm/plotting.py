"""Plots of training runs, shared by `lm.experiment report` and anyone reading metrics.jsonl.

matplotlib with the Agg backend (no display needed). Curves of several seeds are drawn as
their mean with a band of ± one standard deviation over the steps every seed logged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def pyplot():
    import matplotlib  # noqa: PLC0415 (plots are optional; matplotlib loads only here)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def ema(values: Sequence[float], weight: float) -> np.ndarray:
    """TensorBoard-style exponential smoothing (weight 0: unchanged), bias-corrected."""
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        acc = weight * acc + (1 - weight) * v
        norm = weight * norm + (1 - weight)
        out.append(acc / norm if norm else v)
    return np.asarray(out)


def mean_band(curves: Sequence[Sequence[tuple[int, float]]]
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps every curve has, mean, std (ddof=1; 0 for one curve)) across curves."""
    if not curves:
        return np.array([]), np.array([]), np.array([])
    common = set.intersection(*(set(s for s, _ in c) for c in curves))
    steps = np.array(sorted(common))
    table = np.array([[dict(c)[s] for s in steps] for c in curves], dtype=float)
    std = table.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(steps))
    return steps, table.mean(axis=0), std


def plot_curves(path: str, series: Mapping[str, Sequence[Sequence[tuple[int, float]]]], *,
                ylabel: str, xlabel: str = "step", title: str = "", logy: bool = False) -> str:
    """One line per label (mean over its curves) with a ± std band; written to `path`."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curves in series.items():
        steps, mean, std = mean_band(curves)
        if not len(steps):
            continue
        name = label if len(curves) == 1 else f"{label} (n={len(curves)})"
        (line,) = ax.plot(steps, mean, label=name, lw=1.5)
        if len(curves) > 1:
            ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _numeric(labels: Sequence[str]) -> list[float] | None:
    try:
        return [float(x) for x in labels]
    except ValueError:
        return None


def plot_vs(path: str, axis: str, lines: Mapping[str, Sequence[tuple[str, float, float]]], *,
            ylabel: str, title: str = "") -> str:
    """The metric against one axis: per line, (x label, mean, std) points with error bars.
    Numeric x values go on a numeric axis (log when they span more than 10x)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    all_x = [x for pts in lines.values() for x, _, _ in pts]
    numeric = _numeric(all_x)
    order = sorted(set(all_x), key=lambda x: float(x)) if numeric else list(dict.fromkeys(all_x))
    for label, pts in lines.items():
        pts = sorted(pts, key=lambda p: order.index(p[0]))
        xs = [float(p[0]) if numeric else order.index(p[0]) for p in pts]
        ax.errorbar(xs, [p[1] for p in pts], yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                    marker="o", capsize=3, label=label or None)
    if numeric:
        values = [float(x) for x in order]
        if min(values) > 0 and max(values) / min(values) > 10:
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(order)), order)
    ax.set(xlabel=axis, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if any(lines):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def power_law_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least squares in log-log space: y = a * x^(-alpha) -> (a, alpha)."""
    lx, ly = np.log(np.asarray(x, float)), np.log(np.asarray(y, float))
    slope, intercept = np.polyfit(lx, ly, 1)
    return float(np.exp(intercept)), float(-slope)


def plot_power_law(path: str, x: Sequence[float], y: Sequence[float], yerr: Sequence[float], *,
                   xlabel: str, ylabel: str, title: str = "") -> tuple[float, float]:
    """Points with error bars and their fitted power law on log-log axes; returns (a, alpha)."""
    a, alpha = power_law_fit(x, y)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar(x, y, yerr=yerr, marker="o", ls="", capsize=3, label="runs (mean ± std)")
    grid = np.geomspace(min(x), max(x), 50)
    ax.plot(grid, a * grid ** (-alpha), "--", label=f"fit: {a:.3g} · N^(-{alpha:.3f})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import ScalarFormatter  # noqa: PLC0415 (after pyplot's backend)

    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return a, alpha


def plot_attention_grid(path: str, probs_NHLS: np.ndarray, tokens: Sequence[str], *,
                        title: str = "") -> str:
    """A layers x heads grid of attention maps (query rows, key columns), tokens on the
    first column's and the last row's axes; written to `path`."""
    plt = pyplot()
    n, h, length, keys = probs_NHLS.shape
    fig, axes = plt.subplots(n, h, figsize=(1.6 * h + 1, 1.6 * n + 1), squeeze=False)
    ticks = np.arange(len(tokens))
    for i in range(n):
        for j in range(h):
            ax = axes[i][j]
            ax.imshow(probs_NHLS[i, j], vmin=0.0, vmax=1.0, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"layer {i}", fontsize=8)
            if i == 0:
                ax.set_title(f"head {j}", fontsize=8)
    if length <= 24:  # token names on the last row's keys and the first column's queries
        for ax in axes[-1]:
            ax.set_xticks(ticks[:keys], tokens[:keys], rotation=90, fontsize=5)
        for row in axes:
            row[0].set_yticks(ticks[:length], tokens[:length], fontsize=5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_confusion(path: str, counts: np.ndarray, labels: Sequence[str], *,
                   title: str = "") -> str:
    """A confusion matrix (rows: gold, columns: predicted) with its counts written in."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(counts, cmap="Blues")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set(xlabel="predicted", ylabel="gold", title=title)
    top = counts.max() if counts.size else 0
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center",
                    color="white" if counts[i, j] > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

