"""The statistics of the label-efficiency protocol: Student-t intervals of a mean and of the
paired difference between two initialisations fine-tuned with the same seeds.

Runs with the same seed share the split, the head's initial weights and the data order, so
two initialisations are compared pair by pair; the pairs' spread is then only what the
initialisation changes, which a t-interval of the paired differences measures.

Values that are not finite (a metric undefined for a run, e.g. the box error of an organ never
present) are left out; a pair is left out when either side is.

Pairs that started from the same pretraining run are not independent: pretraining varies
too, and K pretrainings shared by n > K pairs carry only K draws of it. Given each pair's
pretraining (`groups`), the interval is that of the mean over pretrainings of each one's mean
difference, so it covers pretraining's variation as well as fine-tuning's (a two-stage,
cluster-level interval: K - 1 degrees of freedom). One shared pretraining cannot show its own
variation; its pairs are then taken as they are.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import NamedTuple

import numpy as np
from scipy import stats

from ctxrestore.errors import CtxRestoreError

# Metric families ("family/name" keys) where a smaller value is better: distances and errors.
LOWER_IS_BETTER = ("wall_mm", "centre_mm", "hd95", "false_alarm_rate", "loss", "mse")


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of `metric` ("macro_f1", "wall_mm/mean"...) is better."""
    return metric.split("/", 1)[0] not in LOWER_IS_BETTER


def _finite(values: Sequence[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    return array[np.isfinite(array)]


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the Student-t confidence interval of the mean of `values`.

    One value gives NaN bounds (no spread to estimate); no value gives NaN throughout.
    """
    if not 0 < confidence < 1:
        raise CtxRestoreError(f"confidence must be in (0, 1), got {confidence}")
    array = _finite(values)
    if array.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(array.mean())
    if array.size == 1:
        return mean, math.nan, math.nan
    half = stats.t.ppf((1 + confidence) / 2, array.size - 1) * array.std(ddof=1)
    half /= math.sqrt(array.size)
    return mean, mean - float(half), mean + float(half)


class PairedDifference(NamedTuple):
    """a - b over pairs: mean and its t-interval; wins = pairs where a is better than b."""

    mean: float
    low: float
    high: float
    wins: int
    n: int


def _pairs(
    a: Sequence[float], b: Sequence[float], groups: Sequence[Hashable] | None = None
) -> tuple[np.ndarray, np.ndarray, list | None]:
    first = np.asarray(a, dtype=np.float64).reshape(-1)
    second = np.asarray(b, dtype=np.float64).reshape(-1)
    if first.shape != second.shape:
        raise CtxRestoreError(
            f"paired values need the same number of runs on both sides, got {first.size} and "
            f"{second.size}"
        )
    if groups is not None and len(groups) != first.size:
        raise CtxRestoreError(
            f"one pretraining label per pair is needed, got {len(groups)} for {first.size} pairs"
        )
    keep = np.isfinite(first) & np.isfinite(second)
    kept_groups = None if groups is None else [g for g, k in zip(groups, keep) if k]
    return first[keep], second[keep], kept_groups


def _per_group(values: np.ndarray, groups: list | None) -> np.ndarray:
    """Each group's mean (pairs from one pretraining count as one draw of it); the values
    themselves without groups, or when they all share one group."""
    if groups is None or len(set(groups)) < 2:
        return values
    labels = list(dict.fromkeys(groups))
    return np.array([values[[g == label for g in groups]].mean() for label in labels])


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    higher_is_better: bool = True,
    confidence: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> PairedDifference:
    """The paired difference a - b (a[i] and b[i] share a seed); a "win" is a pair where a is
    better: larger when `higher_is_better`, smaller otherwise. Ties are not wins. `groups`:
    the pretraining(s) pair i started from; the mean and interval are then over pretrainings
    (module docstring), wins and n still count pairs."""
    first, second, groups = _pairs(a, b, groups)
    difference = first - second
    mean, low, high = mean_ci(_per_group(difference, groups), confidence)
    wins = int((difference > 0).sum() if higher_is_better else (difference < 0).sum())
    return PairedDifference(mean, low, high, wins, int(difference.size))


def relative_reduction(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    groups: Sequence[Hashable] | None = None,
) -> tuple[float, float, float]:
    """(mean, low, high) over pairs of (b - a) / b: how much smaller a is than b, as a share
    of b (0.15 = 15% lower), for metrics where lower is better. Pairs with b == 0 are left
    out. `groups` as in `paired_difference`."""
    first, second, groups = _pairs(a, b, groups)
    keep = second != 0
    reductions = (second[keep] - first[keep]) / second[keep]
    if groups is not None:
        groups = [g for g, k in zip(groups, keep) if k]
    return mean_ci(_per_group(reductions, groups), confidence)
