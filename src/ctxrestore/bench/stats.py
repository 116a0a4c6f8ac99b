"""The statistics of the label-efficiency protocol: Student-t intervals of a mean and of the
paired difference between two initialisations fine-tuned with the same seeds.

Runs with the same seed share the split, the head's initial weights and the data order, so
two initialisations are compared pair by pair; the pairs' spread is then only what the
initialisation changes, which a t-interval of the paired differences measures.

Values that are not finite (a metric undefined for a run, e.g. the box error of an organ never
present) are left out; a pair is left out when either side is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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


def _pairs(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    first = np.asarray(a, dtype=np.float64).reshape(-1)
    second = np.asarray(b, dtype=np.float64).reshape(-1)
    if first.shape != second.shape:
        raise CtxRestoreError(
            f"paired values need the same number of runs on both sides, got {first.size} and "
            f"{second.size}"
        )
    keep = np.isfinite(first) & np.isfinite(second)
    return first[keep], second[keep]


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    higher_is_better: bool = True,
    confidence: float = 0.95,
) -> PairedDifference:
    """The paired difference a - b (a[i] and b[i] share a seed); a "win" is a pair where a is
    better: larger when `higher_is_better`, smaller otherwise. Ties are not wins."""
    first, second = _pairs(a, b)
    difference = first - second
    mean, low, high = mean_ci(difference, confidence)
    wins = int((difference > 0).sum() if higher_is_better else (difference < 0).sum())
    return PairedDifference(mean, low, high, wins, int(difference.size))


def relative_reduction(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """(mean, low, high) over pairs of (b - a) / b: how much smaller a is than b, as a share
    of b (0.15 = 15% lower), for metrics where lower is better. Pairs with b == 0 are left
    out."""
    first, second = _pairs(a, b)
    keep = second != 0
    return mean_ci((second[keep] - first[keep]) / second[keep], confidence)
