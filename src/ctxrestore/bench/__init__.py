"""The label-efficiency protocol: initialisations x label fractions x seeds, its statistics,
summary tables, plot and report (`benchmark`, `ablate`)."""

from ctxrestore.bench.benchmark import (
    BenchmarkOptions,
    BenchmarkResult,
    run_ablation,
    run_benchmark,
)
from ctxrestore.bench.stats import mean_ci, paired_difference, relative_reduction

__all__ = [
    "BenchmarkOptions",
    "BenchmarkResult",
    "mean_ci",
    "paired_difference",
    "relative_reduction",
    "run_ablation",
    "run_benchmark",
]
