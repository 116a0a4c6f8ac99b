"""The benchmark's plot: the metric against the label fraction (log axis), one line per
initialisation with its 95% interval as error bars."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ctxrestore.bench.stats import higher_is_better
from ctxrestore.data.splits import parse_fraction
from ctxrestore.files import atomic_write


def fraction_axis(fractions: Sequence[str], rows: Sequence[dict]) -> tuple[list[float], str]:
    """x values of the fractions and the axis label: the share of the training pool when every
    fraction is a share, otherwise the mean number of labelled training cases."""
    parsed = [parse_fraction(fraction) for fraction in fractions]
    if all(isinstance(value, float) for value in parsed):
        return [float(value) for value in parsed], "labelled fraction of the training pool"
    cases = []
    for fraction in fractions:
        counts = [float(row["train_cases"]) for row in rows if row["fraction"] == fraction]
        cases.append(float(np.mean(counts)) if counts else math.nan)
    return cases, "labelled training cases"


def save_metric_plot(
    path: Path | str,
    summary: Sequence[dict],
    *,
    methods: Sequence[str],
    fractions: Sequence[str],
    x_values: Sequence[float],
    x_label: str,
    metric: str,
    labels: dict[str, str] | None = None,
    title: str = "",
) -> Path:
    """Write a PNG of the summary's mean `metric` per fraction, one line per method; error bars
    span the 95% interval (none where it is undefined). Lines are nudged apart sideways so
    that their bars do not hide each other."""
    labels = labels or {}
    entries = {(entry["method"], entry["fraction"]): entry for entry in summary}
    figure = Figure(figsize=(7.0, 4.5))
    ax = figure.subplots()
    for index, method in enumerate(methods):
        nudge = 1.0 + 0.025 * (index - (len(methods) - 1) / 2)
        xs, means, below, above = [], [], [], []
        for fraction, x in zip(fractions, x_values):
            entry = entries.get((method, fraction))
            if entry is None or not math.isfinite(entry["mean"]):
                continue
            xs.append(x * nudge)
            means.append(entry["mean"])
            bounded = math.isfinite(entry["ci_low"]) and math.isfinite(entry["ci_high"])
            below.append(entry["mean"] - entry["ci_low"] if bounded else 0.0)
            above.append(entry["ci_high"] - entry["mean"] if bounded else 0.0)
        if xs:
            ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, linewidth=1.4,
                        label=labels.get(method, method))  # fmt: skip
    ax.set_xscale("log")
    finite = [x for x in x_values if math.isfinite(x)]
    ax.set_xticks(finite)
    ax.set_xticklabels([f"{x:g}" for x in finite])
    ax.minorticks_off()
    ax.set_xlabel(x_label)
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_ylabel(f"test {metric} ({better} is better)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
