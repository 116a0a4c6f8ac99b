"""The summary of a benchmark: per label fraction x initialisation, the mean of the chosen
metric with its 95% interval, and the paired difference from the reference initialisation
(random weights), as rows for summary.csv and as a Markdown table."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ctxrestore.bench.stats import (
    PairedDifference,
    higher_is_better,
    mean_ci,
    paired_difference,
    relative_reduction,
)
from ctxrestore.files import write_csv

# Regions that BraTS is scored on; segmentation summaries show their global Dice too.
BRATS_REGIONS = ("whole_tumour", "tumour_core", "enhancing_tumour")


def class_metrics(metric: str, available: Iterable[str]) -> tuple[str, ...]:
    """The per-class members of `metric`'s family among `available` keys: 'wall_mm/mean' ->
    'wall_mm/<class>', 'macro_f1' -> 'f1/<class>'; () for a metric that averages no classes."""
    if metric.endswith("/mean"):
        prefix = metric[: -len("mean")]
    elif metric.startswith("macro_"):
        prefix = metric[len("macro_") :] + "/"
    else:
        return ()
    return tuple(sorted(key for key in set(available)
                        if key.startswith(prefix) and key != f"{prefix}mean"))  # fmt: skip


def extra_metrics(task: str, metric: str, available: Sequence[str]) -> tuple[str, ...]:
    """Columns shown next to the chosen metric: for segmentation, the global Dice per BraTS
    region (per foreground class when the labels are not BraTS')."""
    if task != "segment":
        return ()
    regions = [f"global_dice/{region}" for region in BRATS_REGIONS]
    if not all(key in available for key in regions):
        regions = class_metrics("global_dice/mean", available)
    return tuple(key for key in regions if key != metric)


def _value(row: dict, metric: str) -> float:
    value = row.get(metric)
    return math.nan if value is None or value == "" else float(value)


def _by_seed(rows: Sequence[dict], method: str, fraction: str) -> dict[int, dict]:
    return {
        int(row["seed"]): row
        for row in rows
        if row["method"] == method and row["fraction"] == fraction
    }


def pretraining_of(row: dict) -> str:
    """Which pretraining run a run started from ("" for random weights, or a results file
    from before the column existed)."""
    value = row.get("pretrain_seed")
    return "" if value is None else str(value)


def _paired(
    rows: Sequence[dict], metric: str, method: str, reference: str, fraction: str
) -> tuple[list[float], list[float], list[tuple[str, str]]]:
    """Both sides' values over the seeds both ran at this fraction, and each pair's
    pretrainings (method's, reference's): pairs that share one are not independent."""
    runs, baseline = _by_seed(rows, method, fraction), _by_seed(rows, reference, fraction)
    seeds = sorted(runs.keys() & baseline.keys())
    return (
        [_value(runs[s], metric) for s in seeds],
        [_value(baseline[s], metric) for s in seeds],
        [(pretraining_of(runs[s]), pretraining_of(baseline[s])) for s in seeds],
    )


def compare(
    rows: Sequence[dict], metric: str, method: str, reference: str, fraction: str
) -> PairedDifference:
    """method - reference over the seeds both ran at this fraction; pairs that started from
    the same pretraining count once in the interval (bench/stats.py)."""
    values, baseline, groups = _paired(rows, metric, method, reference, fraction)
    return paired_difference(
        values, baseline, higher_is_better=higher_is_better(metric), groups=groups
    )


def _differences(
    rows: Sequence[dict], metric: str, method: str, reference: str | None, fraction: str
) -> dict:
    """The paired-difference columns of one summary row (None where there is no reference)."""
    lower = not higher_is_better(metric)
    columns = dict.fromkeys(("diff_mean", "diff_low", "diff_high", "wins", "pairs"))
    if lower:
        columns |= dict.fromkeys(("rel_reduction", "rel_low", "rel_high"))
    if reference is None or method == reference or not _by_seed(rows, reference, fraction):
        return columns
    values, baseline, groups = _paired(rows, metric, method, reference, fraction)
    difference = paired_difference(values, baseline, higher_is_better=not lower, groups=groups)
    columns |= {"diff_mean": difference.mean, "diff_low": difference.low,
                "diff_high": difference.high, "wins": difference.wins,
                "pairs": difference.n}  # fmt: skip
    if lower:
        reduction = relative_reduction(values, baseline, groups=groups)
        columns |= dict(zip(("rel_reduction", "rel_low", "rel_high"), reduction))
    return columns


def summarize(
    rows: Sequence[dict],
    *,
    methods: Sequence[str],
    fractions: Sequence[str],
    metric: str,
    reference: str | None = "random",
    extras: Sequence[str] = (),
) -> list[dict]:
    """One row per fraction x method: n, mean, ci_low, ci_high of `metric`; the same for each
    of `extras` ("<extra> mean"...); and the paired difference from `reference` (diff_mean,
    diff_low, diff_high, wins, pairs), plus the relative reduction (rel_reduction, rel_low,
    rel_high) where lower is better."""
    table = []
    for fraction in fractions:
        for method in methods:
            runs = _by_seed(rows, method, fraction)
            values = [_value(runs[seed], metric) for seed in sorted(runs)]
            mean, low, high = mean_ci(values)
            entry = {"fraction": fraction, "method": method, "metric": metric,
                     "n": sum(math.isfinite(v) for v in values),
                     "mean": mean, "ci_low": low, "ci_high": high}  # fmt: skip
            for extra in extras:
                estimate = mean_ci([_value(runs[seed], extra) for seed in runs])
                entry |= dict(
                    zip((f"{extra} mean", f"{extra} ci_low", f"{extra} ci_high"), estimate)
                )
            table.append(entry | _differences(rows, metric, method, reference, fraction))
    return table


def write_summary(path: Path, summary: Sequence[dict]) -> Path:
    return write_csv(path, summary)


# ----------------------------------------------------------------------------- Markdown
def number(value: float | None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def interval(mean: float | None, low: float | None, high: float | None, signed=False) -> str:
    """'0.812 [0.790, 0.834]'; just the mean when the bounds are undefined (one run)."""
    text = number(mean, signed)
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return text
    return f"{text} [{number(low, signed)}, {number(high, signed)}]"


def percent_interval(mean: float | None, low: float | None, high: float | None) -> str:
    if mean is None or not math.isfinite(mean):
        return "n/a"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{100 * mean:.1f}%"
    return f"{100 * mean:.1f}% [{100 * low:.1f}%, {100 * high:.1f}%]"


def _interval_of(entry: dict, prefix: str = "") -> str:
    """An entry's interval: prefix "" (the metric), "diff_" or "<extra> "."""
    if prefix == "diff_":
        return interval(entry["diff_mean"], entry["diff_low"], entry["diff_high"], signed=True)
    low, high = ("ci_low", "ci_high") if prefix == "" else (f"{prefix}ci_low", f"{prefix}ci_high")
    return interval(entry[f"{prefix}mean"], entry[low], entry[high])


def markdown_table(
    summary: Sequence[dict], *, metric: str, reference: str | None, labels: dict[str, str]
) -> list[str]:
    """The summary as Markdown lines; `labels`: method name -> what the table shows."""
    lower = not higher_is_better(metric)
    extras = [key[: -len(" mean")] for key in summary[0] if key.endswith(" mean")]
    header = ["fraction", "initialisation", "seeds", f"{metric} (95% CI)"]
    if reference is not None:
        header += [f"difference from {reference} (95% CI)", "better in"]
        if lower:
            header.append(f"reduction from {reference}")
    header += [f"{extra} (95% CI)" for extra in extras]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for entry in summary:
        cells = [entry["fraction"], labels.get(entry["method"], entry["method"]),
                 str(entry["n"]), _interval_of(entry)]  # fmt: skip
        if reference is not None and entry["pairs"] is None:
            cells += ["(reference)", ""] + ([""] if lower else [])
        elif reference is not None:
            cells += [_interval_of(entry, "diff_"), f"{entry['wins']}/{entry['pairs']}"]
            if lower:
                reduction = (entry["rel_reduction"], entry["rel_low"], entry["rel_high"])
                cells.append(percent_interval(*reduction))
        cells += [_interval_of(entry, f"{extra} ") for extra in extras]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
