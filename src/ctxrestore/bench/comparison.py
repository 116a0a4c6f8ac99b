"""`compare`: the benchmark's statistics over fine-tuning runs made by hand.

A user who ran `ctxrestore finetune` once per seed and initialisation (to try a recipe, or on
a cluster, one job per run) names each initialisation's run folders; runs pair by label
fraction and seed, as in a benchmark, and the same results.csv, summary.csv, plot.png and
report.md come out. What a benchmark guarantees by construction is checked here instead:
every run finished, one task, one run per initialisation x fraction x seed, and paired runs
fine-tuned on the same split. Settings that differ between the initialisations beyond the
starting weights are listed in the report, since they, too, are in each difference.

Runs that started from the same pretrained weights (the fingerprint each run records) share a
draw of pretraining: the intervals are then over pretrainings, as a benchmark's with
--pretrain-seeds (bench/stats.py). An initialisation with runs of every seed from each of
several pretrainings (a crossed design) is averaged within each seed instead: its intervals
are over seeds, with those pretrainings held fixed.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ctxrestore.bench.benchmark import TASK_METRICS, BenchmarkResult
from ctxrestore.bench.plots import fraction_axis, save_metric_plot
from ctxrestore.bench.protocol import (
    RANDOM,
    RESULTS_FILE,
    Arm,
    Protocol,
    check_metric,
    write_results,
)
from ctxrestore.bench.report import (
    best_section,
    comparison_lines,
    environment_caveat,
    lost_class_lines,
    per_class_lines,
    summary_section,
)
from ctxrestore.bench.stats import higher_is_better
from ctxrestore.bench.summary import (
    extra_metrics,
    number,
    summarize,
    write_summary,
)
from ctxrestore.data.splits import parse_fraction
from ctxrestore.engine.environment import environment_fingerprint
from ctxrestore.engine.run_folder import CONFIG_FILE, METRICS_FILE
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write, matching_folders, read_json
from ctxrestore.tasks.training import SPLIT_FILE

logger = logging.getLogger(__name__)

ARM_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
# config.json entries that are bookkeeping or the grid itself, not the recipe.
NOT_RECIPE = ("out", "init", "seed", "fraction", "resume", "figures", "cache", "cache_dir",
              "num_workers", "log_every", "checkpoint_every", "preview_every")  # fmt: skip


@dataclass(frozen=True)
class ComparedRun:
    """One finished fine-tuning run: the folder and what its files say."""

    arm: str
    folder: Path
    config: dict
    metrics: dict
    split: dict

    @property
    def key(self) -> tuple[str, int]:
        return str(self.metrics["fraction"]), int(self.metrics["seed"])

    @property
    def pretraining(self) -> str:
        """Which pretraining the run started from ("" for random weights): runs that share one
        share a draw of pretraining. The weights' fingerprint where the run recorded it (a
        relative --init names different folders from different directories, and one folder
        pretrained again is another draw); the resolved folder for older runs."""
        init = str(self.metrics.get("init", RANDOM))
        if init == RANDOM:
            return ""
        return self.metrics.get("init_weights") or str(Path(init).resolve())

    @property
    def started_from(self) -> str:
        """--init as given (Markdown code), with the weights' fingerprint where the run
        recorded it."""
        init = f"`{self.metrics.get('init', RANDOM)}`"
        weights = self.metrics.get("init_weights")
        return f"{init} (weights {weights})" if weights else init


def parse_arm(text: str) -> tuple[str, str]:
    """'NAME=RUNS' -> (NAME, RUNS): RUNS is a run folder or a glob pattern of them."""
    name, separator, runs = text.partition("=")
    name, runs = name.strip(), runs.strip()
    if not separator or not name or not runs:
        raise CtxRestoreError(
            f"--arm '{text}': expected NAME=RUNS, e.g. --arm random='runs/random_s*' (a run "
            "folder or a quoted glob pattern of run folders; give an arm again to add more)"
        )
    if not ARM_NAME.match(name):
        raise CtxRestoreError(
            f"--arm '{text}': the name '{name}' may hold only letters, digits and _ . + -"
        )
    return name, runs


def run_folders(pattern: str) -> list[Path]:
    """The fine-tuning run folders a folder name or glob pattern names."""
    return matching_folders(pattern, "a fine-tuning run's OUT")


def load_run(arm: str, folder: Path) -> ComparedRun:
    """A finished fine-tuning run, or an error that names the folder and what is missing."""
    if not (folder / METRICS_FILE).is_file():
        raise CtxRestoreError(
            f"{folder} is not a finished fine-tuning run: it has no {METRICS_FILE} (still "
            "running, interrupted - finish it with finetune --resume - or not a run at all)"
        )
    metrics = read_json(folder / METRICS_FILE)
    if "task" not in metrics or "test" not in metrics:
        raise CtxRestoreError(
            f"{folder} is not a fine-tuning run: its {METRICS_FILE} has no task and test "
            "metrics (a pretraining run's folder?)"
        )
    return ComparedRun(arm, folder, read_json(folder / CONFIG_FILE), metrics,
                       read_json(folder / SPLIT_FILE))  # fmt: skip


def collect_runs(arms: Mapping[str, Sequence[str | Path]]) -> list[ComparedRun]:
    """Every arm's runs, checked: one task, one run per arm x fraction x seed, and one split
    per fraction x seed across the arms."""
    if len(arms) < 2:
        raise CtxRestoreError(
            f"compare needs at least two initialisations, got {len(arms)}: give --arm twice"
        )
    runs = [load_run(arm, folder) for arm, patterns in arms.items()
            for pattern in patterns for folder in run_folders(str(pattern))]  # fmt: skip
    tasks = defaultdict(list)
    for run in runs:
        tasks[run.metrics["task"]].append(run)
    if len(tasks) > 1:
        listed = "; ".join(f"{task}: {found[0].folder}" for task, found in tasks.items())
        raise CtxRestoreError(f"the runs are of {len(tasks)} tasks ({listed}); compare one task")
    owners: dict[Path, ComparedRun] = {}
    for run in runs:
        owner = owners.setdefault(run.folder.resolve(), run)
        if owner.arm != run.arm:
            raise CtxRestoreError(
                f"{run.folder} is named by two initialisations, '{owner.arm}' and '{run.arm}': "
                "a run started from one set of weights"
            )
    cells: dict[tuple[str, str, int], list[ComparedRun]] = defaultdict(list)
    for run in runs:
        cell = cells[(run.arm, *run.key)]
        other = next((o for o in cell if o.pretraining == run.pretraining), None)
        if other is not None:
            raise CtxRestoreError(
                f"{other.folder} and {run.folder} are both '{run.arm}' at fraction {run.key[0]}, "
                f"seed {run.key[1]}, from the same starting weights: an initialisation needs one "
                "run per fraction and seed (or per pretraining, when several are averaged)"
            )
        cell.append(run)
    _check_crossed(cells)
    _check_splits(runs)
    return runs


def _check_crossed(cells: Mapping[tuple[str, str, int], Sequence[ComparedRun]]) -> None:
    """An arm with runs from several pretrainings at one seed is averaged within each seed:
    every seed must then have a run from each of them, or the averages are of different
    things."""
    started: dict[tuple[str, str], dict[int, dict[str, ComparedRun]]] = defaultdict(dict)
    for (arm, fraction, seed), cell in cells.items():
        started[arm, fraction][seed] = {run.pretraining: run for run in cell}
    for (arm, fraction), seeds in started.items():
        if all(len(found) == 1 for found in seeds.values()):
            continue  # one run per seed: the usual design
        every = {name: run for found in seeds.values() for name, run in found.items()}
        for seed, found in sorted(seeds.items()):
            missing = [every[name].started_from for name in every if name not in found]
            if missing:
                raise CtxRestoreError(
                    f"'{arm}' at fraction {fraction} has runs from {len(every)} pretrainings, "
                    f"averaged within each seed, but seed {seed} has none from "
                    f"{', '.join(sorted(missing))}: fine-tune each seed from each pretraining, "
                    "or compare them as separate initialisations"
                )


def _check_splits(runs: Sequence[ComparedRun]) -> None:
    """Runs paired by fraction and seed must have trained and been tested on the same cases;
    otherwise their difference is the data's as much as the initialisation's."""
    first: dict[tuple[str, int], ComparedRun] = {}
    for run in runs:
        pair = first.setdefault(run.key, run)
        if pair.split.get("cases") != run.split.get("cases"):
            raise CtxRestoreError(
                f"{pair.folder} and {run.folder} pair at fraction {run.key[0]}, seed "
                f"{run.key[1]}, but their splits ({SPLIT_FILE}) differ: they were fine-tuned "
                "or tested on other cases, so their difference would not be the "
                "initialisation's; compare runs made from the same data, --num-images and "
                "split fractions"
            )


def _row(run: ComparedRun) -> dict:
    """A results.csv row, as the benchmark writes one (bench/protocol.py, result_row)."""
    row = {
        "task": run.metrics["task"],
        "method": run.arm,
        "fraction": run.key[0],
        "seed": run.key[1],
        "pretrain_seed": run.pretraining,
        "train_cases": run.metrics["split"]["train"]["cases"],
        "steps": run.metrics["steps"],
        "best_step": run.metrics["best_step"],
        "environment": environment_fingerprint(run.folder),
    }
    return {**row, **run.metrics["test"]}


def _seed_row(rows: Sequence[dict], test_metrics: Sequence[str]) -> dict:
    """The row an initialisation contributes at one fraction and seed: its run's row, or, with
    runs from several pretrainings, their average (each of `test_metrics`' mean;
    `pretrain_seed` names them all, the same label at every seed, so the pairs are over
    seeds)."""
    if len(rows) == 1:
        return rows[0]
    averaged = dict(rows[0])
    for key in test_metrics:
        values = [row.get(key) for row in rows]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        averaged[key] = sum(values) / len(values) if numbers else None
    for key in ("pretrain_seed", "environment"):
        averaged[key] = "+".join(sorted({str(row[key]) for row in rows}))
    averaged["best_step"] = round(sum(row["best_step"] for row in rows) / len(rows))
    return averaged


def recipe_differences(runs: Sequence[ComparedRun]) -> dict[str, dict[str, list]]:
    """setting -> arm -> the values its runs used, for the config.json settings (beyond the
    starting weights and the grid) that are not the same in every run."""
    arms = list(dict.fromkeys(run.arm for run in runs))
    keys = sorted({key for run in runs for key in run.config} - set(NOT_RECIPE))
    differences = {}
    for key in keys:
        values = {arm: sorted({repr(run.config.get(key)) for run in runs if run.arm == arm})
                  for arm in arms}  # fmt: skip
        if len({value for found in values.values() for value in found}) > 1:
            differences[key] = values
    return differences


def _pretraining_lines(runs: Sequence[ComparedRun]) -> list[str]:
    """Per arm: random weights, one shared pretraining, or K pretrainings (the intervals of
    its differences are then over those K)."""
    lines = []
    for arm in dict.fromkeys(run.arm for run in runs):
        own = [run for run in runs if run.arm == arm]
        pretrainings = sorted({run.pretraining for run in own} - {""})
        started = ", ".join(sorted({run.started_from for run in own}))
        crossed = len(own) > len({run.key for run in own})
        if not pretrainings:
            lines.append(f"- {arm}: random weights in all {len(own)} runs.")
        elif crossed:
            lines.append(
                f"- {arm}: {len(own)} runs, every seed fine-tuned from each of "
                f"{len(pretrainings)} pretrainings ({started}) and the {len(pretrainings)} "
                "averaged within the seed; its intervals are over seeds and hold these "
                "pretrainings fixed, so a further pretraining may differ by more than they say."
            )
        elif len(pretrainings) == 1:
            lines.append(
                f"- {arm}: all {len(own)} runs started from one pretraining "
                f"({started}), so its intervals cover fine-tuning's variation, not pretraining's."
            )
        else:
            lines.append(
                f"- {arm}: {len(own)} runs from {len(pretrainings)} pretrainings "
                f"({started}); runs that share one count once, so its intervals are over the "
                f"{len(pretrainings)} pretrainings ({len(pretrainings) - 1} degrees of freedom) "
                "and cover pretraining's variation too."
            )
    return lines


def _recipe_lines(runs: Sequence[ComparedRun]) -> list[str]:
    differences = recipe_differences(runs)
    if not differences:
        return ["- Every run used the same fine-tuning settings; only the starting weights "
                "differ between the initialisations."]  # fmt: skip
    arms = list(dict.fromkeys(run.arm for run in runs))
    lines = [
        "Settings that differ between runs (config.json); each difference between the "
        "initialisations below is theirs as well as the starting weights':",
        "",
        "| setting | " + " | ".join(arms) + " |",
        "|" + " --- |" * (len(arms) + 1),
    ]
    for key, values in differences.items():
        lines.append(f"| {key} | " + " | ".join(", ".join(values[arm]) for arm in arms) + " |")
    return lines


def _runs_table(runs: Sequence[ComparedRun], out: Path, metric: str) -> list[str]:
    lines = ["| initialisation | fraction | seed | run | started from | test " + metric + " |",
             "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for run in runs:
        link = Path(os.path.relpath(run.folder.resolve(), out.resolve())).as_posix()
        lines.append(
            f"| {run.arm} | {run.key[0]} | {run.key[1]} | [{run.folder}]({link}) | "
            f"{run.started_from} | {number(run.metrics['test'].get(metric))} |"
        )
    return lines


def compare_runs(
    out: Path | str,
    arms: Mapping[str, Sequence[str | Path]],
    *,
    reference: str | None = None,
    metric: str | None = None,
) -> BenchmarkResult:
    """Summarise finished fine-tuning runs as a benchmark would: `arms` maps each
    initialisation's name to its run folders or glob patterns; `reference` (default: the
    first arm) is what the others are paired against. Writes OUT/results.csv, summary.csv,
    plot.png and report.md."""
    out = Path(out)
    runs = collect_runs(arms)
    names = list(arms)
    reference = reference or names[0]
    if reference not in names:
        raise CtxRestoreError(
            f"--reference '{reference}' is not among the initialisations ({', '.join(names)})"
        )
    task = runs[0].metrics["task"]
    metric = metric or TASK_METRICS[task]
    check_metric(metric, runs[0].metrics["test"], runs[0].folder)
    fractions = tuple(sorted({run.key[0] for run in runs}, key=parse_fraction))
    # The reference first: the tables and the plot read against it.
    order = [reference, *(name for name in names if name != reference)]
    protocol = Protocol(
        kind="comparison",
        task=task,
        out=out,
        arms=tuple(Arm(name) for name in order),
        fractions=fractions,
        seeds=tuple(sorted({run.key[1] for run in runs})),
        metric=metric,
        pretrain_options={},
        finetune_options={},
        settings={},
        reference=reference,
    )
    runs = sorted(runs, key=lambda run: (order.index(run.arm), parse_fraction(run.key[0]),
                                         run.key[1]))  # fmt: skip
    # results.csv: one row per run; the statistics: one per initialisation x fraction x seed
    # (runs from several pretrainings at a seed averaged).
    run_rows = [_row(run) for run in runs]
    cells: dict[tuple[str, str, int], list[dict]] = defaultdict(list)
    for run, row in zip(runs, run_rows):
        cells[(run.arm, *run.key)].append(row)
    rows = [_seed_row(cell, list(runs[0].metrics["test"])) for cell in cells.values()]
    out.mkdir(parents=True, exist_ok=True)
    results = write_results(out / RESULTS_FILE, run_rows)
    extras = extra_metrics(task, metric, list(rows[0]))
    table = summarize(rows, methods=order, fractions=fractions, metric=metric,
                      reference=reference, extras=extras)  # fmt: skip
    summary = write_summary(out / "summary.csv", table)
    x_values, x_label = fraction_axis(fractions, rows)
    plot = save_metric_plot(out / "plot.png", table, methods=order, fractions=fractions,
                            x_values=x_values, x_label=x_label, metric=metric,
                            title=f"{task}: test {metric} against labelled data")  # fmt: skip
    report = _write_report(out / "report.md", protocol, runs, run_rows, rows, table, plot)
    logger.info("%d runs of %d initialisations compared; report: %s", len(runs), len(order),
                report)  # fmt: skip
    return BenchmarkResult(out, results, summary, plot, report, len(runs), 0, len(runs), table)


def _write_report(
    path: Path,
    protocol: Protocol,
    runs: Sequence[ComparedRun],
    run_rows: Sequence[dict],
    rows: Sequence[dict],
    table: Sequence[dict],
    plot: Path,
) -> Path:
    """report.md; `run_rows`: one per run (a lost class, a machine belong to runs), `rows`:
    one per initialisation x fraction x seed (the statistics)."""
    metric, reference = protocol.metric, protocol.reference
    others = [arm.name for arm in protocol.arms if arm.name != reference]
    direction = "higher" if higher_is_better(metric) else "lower"
    lines = [
        f"# Comparison of fine-tuning runs: {protocol.task}",
        "",
        f"{len(runs)} runs of {len(protocol.arms)} initialisations at {len(protocol.fractions)} "
        f"label fraction(s). Test metric: `{metric}` ({direction} is better); intervals are 95% "
        "Student-t intervals over seeds, differences are paired by fraction and seed (each pair "
        "was checked to share its split).",
        "",
        *best_section(protocol, rows, table),
        f"Each initialisation against {reference}:",
        "",
        *comparison_lines(protocol, rows, reference, others),
        "",
        "Where the runs started:",
        "",
        *_pretraining_lines(runs),
        "",
        *_recipe_lines(runs),
        "",
    ]
    caveat = environment_caveat(run_rows).strip()
    if caveat:
        lines += [f"Caveat: {caveat}", ""]
    lines += summary_section(table, metric, reference, {}, plot)
    for other in others:
        classes = per_class_lines(protocol, rows, other, reference)
        if classes:
            lines += [f"## Per class: {other}", "", *classes, ""]
    lost = lost_class_lines(protocol, run_rows)
    if lost:
        lines += ["## Lost classes", "", *lost, ""]
    lines += ["## Runs", "", *_runs_table(runs, path.parent, metric), ""]
    text = "\n".join(lines)
    return atomic_write(path, lambda temporary: temporary.write_text(text))
