"""The run grid of the label-efficiency protocol: initialisations x label fractions x seeds.

Every pretrained initialisation ("arm") is pretrained with the same network, budget
(steps x batch) and unlabelled images, into OUT/pretrain/<arm>/; then every arm is fine-tuned
with the same recipe for every fraction x seed into OUT/runs/<arm>/fraction_<f>/seed_<s>/.
A seed fixes the split, the head's first weights and the data order for every arm, so arms
are compared pair by pair.

By default each arm is pretrained once (seed 0): pretraining's own seed-to-seed variance is
not sampled, and the paired differences are conditional on that one pretraining. With
`pretrain_seeds` K > 1 each arm is pretrained K times (seeds 0..K-1, into
OUT/pretrain/<arm>/seed_<k>/) and fine-tuning seed s starts from pretraining s mod K; the
intervals then cover both sources of variation: pairs that share a pretraining count once
(results.csv's pretrain_seed column; bench/stats.py).

The grid resumes by itself: a run whose metrics.json exists is skipped, a pretraining whose
metrics.json exists is reused, and an interrupted one (a folder without metrics.json) is
continued from its last checkpoint (or restarted with resume off). OUT/benchmark.json holds
the settings; another configuration in the same OUT is refused, naming what differs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ctxrestore.engine.distributed import DistributedContext, on_main
from ctxrestore.engine.environment import environment_fingerprint
from ctxrestore.engine.run_folder import METRICS_FILE, is_finished
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json, write_csv, write_json
from ctxrestore.pretext.training import (
    PRETEXT_SPECIFIC_OPTIONS,
    PretrainConfig,
    run_pretraining,
    takes_option,
)
from ctxrestore.tasks.training import FinetuneConfig, run_finetuning

logger = logging.getLogger(__name__)

SETTINGS_FILE = "benchmark.json"
RESULTS_FILE = "results.csv"
RANDOM = "random"
# Settings that change neither the runs nor their pairing, so an OUT may be continued with
# other values: where the work runs, which metric the summary reads, where arrays are cached.
NOT_COMPARED = ("device", "metric", "resume", "cache", "cache_dir")
# Options added after benchmarks were first written, with the default they ran with.
LATER_OPTIONS = {"modality": None, "window": None, "target_spacing": None, "slice_axis": 0,
                 "skip_bad": False, "transfer_stages": None, "pretrain_seeds": 1,
                 "freeze_encoder": False, "head_only_steps": 0,
                 "box_head": "regression", "fresh_decoder_levels": 0,
                 "contrastive_weight": None, "projector": None, "dense_views": None,
                 "dense_level": None, "placement": None}  # fmt: skip
# Settings that only add runs when they grow: seeds (a count), methods, fractions and an
# ablation's controls and pretraining lengths (lists of arm names).
GRID_SETTINGS = ("seeds", "methods", "fractions", "controls", "pretrain_lengths")
# Grid settings an ablation may be given for the first time (absent = no such arms).
OPTIONAL_ARMS = ("controls", "pretrain_lengths")
# pretrain_seed: which of the arm's pretrainings the run started from ("" for random weights);
# pairs that share one count once in the summary's intervals.
RUN_COLUMNS = ("task", "method", "fraction", "seed", "pretrain_seed", "train_cases", "steps",
               "best_step", "environment")  # fmt: skip


@dataclass(frozen=True)
class Arm:
    """One initialisation. `pretrain`: the pretraining options that differ from the shared
    ones (method, patch_size, ...); None for random weights. `label`: what tables show.
    `schedule_factor`: this arm fine-tunes for that many times the shared schedule (epochs and
    max_steps): random weights trained longer tell whether a pretrained arm's gain is a head
    start (docs/experiments.md, 17). `first_stage`: the arm whose pretraining this one's
    starts from (`pretrain --init`), with that encoder fixed (`pretrain` holds
    freeze_encoder); its seed-k pretraining starts from the first stage's seed-k pretraining."""

    name: str
    pretrain: dict | None = None
    label: str = ""
    schedule_factor: int = 1
    first_stage: str | None = None

    @property
    def title(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Protocol:
    """A validated run grid. `settings` is what OUT/benchmark.json stores and compares (the
    user's option names); the option dicts are the shared PretrainConfig / FinetuneConfig
    fields."""

    kind: str  # "benchmark", "ablation", or "comparison" (runs made by hand: bench/comparison.py)
    task: str
    out: Path
    arms: tuple[Arm, ...]
    fractions: tuple[str, ...]
    seeds: tuple[int, ...]
    metric: str
    pretrain_options: dict
    finetune_options: dict
    settings: dict
    reference: str = RANDOM
    resume: bool = True
    pretrain_seeds: int = 1

    def arm(self, name: str) -> Arm:
        return next(arm for arm in self.arms if arm.name == name)

    @property
    def two_stage_arms(self) -> list[Arm]:
        return [arm for arm in self.arms if arm.first_stage is not None]

    def pretrain_folder(self, arm: Arm, pretrain_seed: int = 0) -> Path:
        folder = self.out / "pretrain" / arm.name
        return folder if self.pretrain_seeds == 1 else folder / f"seed_{pretrain_seed}"

    def pretrain_seed_of(self, seed: int) -> int:
        """The pretraining that fine-tuning seed `seed` starts from."""
        return seed % self.pretrain_seeds

    def run_folder(self, arm: Arm, fraction: str, seed: int) -> Path:
        return self.out / "runs" / arm.name / f"fraction_{fraction}" / f"seed_{seed}"

    def pretrain_config(
        self, arm: Arm, pretrain_seed: int = 0, *, resume: bool = False
    ) -> PretrainConfig:
        options = {**self.pretrain_options, **(arm.pretrain or {}), "seed": pretrain_seed}
        if arm.first_stage is not None:
            options["init"] = self.pretrain_folder(self.arm(arm.first_stage), pretrain_seed)
        method = options.get("method", PretrainConfig.method)
        if not takes_option(method, "restoration_loss"):
            options.pop("restoration_loss", None)  # RP and CE keep their own losses
        for option in PRETEXT_SPECIFIC_OPTIONS:  # e.g. only the dense pretexts project points
            if not takes_option(method, option):
                options.pop(option, None)
        return PretrainConfig(
            out=self.pretrain_folder(arm, pretrain_seed), resume=resume, **options
        )

    def finetune_config(
        self, arm: Arm, fraction: str, seed: int, *, resume: bool = False, init: str | None = None
    ) -> FinetuneConfig:
        if init is None:
            if arm.pretrain is None:
                init = RANDOM
            else:
                init = str(self.pretrain_folder(arm, self.pretrain_seed_of(seed)))
        options = dict(self.finetune_options)
        if init == RANDOM:  # nothing to transfer, in part or in full, nor to hold
            options["transfer_stages"] = None
            options["fresh_decoder_levels"] = 0
            options["head_only_steps"] = 0
        for key in ("epochs", "max_steps"):
            if options.get(key) is not None:
                options[key] *= arm.schedule_factor
        return FinetuneConfig(
            task=self.task,
            out=self.run_folder(arm, fraction, seed),
            init=init,
            fraction=fraction,
            seed=seed,
            resume=resume,
            figures=False,  # hundreds of runs: the benchmark draws its own plot
            **options,
        )

    def grid(self) -> Iterator[tuple[Arm, str, int]]:
        """Seeds outermost: after the first seed, every arm has a paired result."""
        for seed in self.seeds:
            for fraction in self.fractions:
                for arm in self.arms:
                    yield arm, fraction, seed


def check_settings(out: Path, settings: dict) -> None:
    """Write OUT/benchmark.json, or refuse settings that differ from the ones stored there."""
    path = Path(out) / SETTINGS_FILE
    current = {k: v for k, v in settings.items() if k not in NOT_COMPARED}
    if not path.exists():
        if (Path(out) / "runs").exists() or (Path(out) / "pretrain").exists():
            raise CtxRestoreError(
                f"{out} holds runs but no {SETTINGS_FILE}; it was not written by a benchmark. "
                "Choose another --out"
            )
        write_json(path, current)
        return
    saved = read_json(path)
    # A benchmark written before an option existed ran with that option's default.
    stored = {**LATER_OPTIONS, **{k: v for k, v in saved.items() if k not in NOT_COMPARED}}
    # More seeds, methods or fractions extend the grid: the finished runs stay valid and kept.
    extended = [key for key in GRID_SETTINGS if _extends(key, stored.get(key), current.get(key))]
    stored.update({key: current[key] for key in extended})
    changed = sorted(k for k in stored.keys() | current.keys() if stored.get(k) != current.get(k))
    if not changed and extended:
        for key in extended:
            logger.info("extending %s: %s %s -> %s", out, key, saved.get(key), current[key])
        write_json(path, {**saved, **current})
    if changed:
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in changed)
        raise CtxRestoreError(
            f"{out} holds a benchmark with other settings ({details}); runs of different "
            f"settings would be mixed in one table. Use the settings in {path} to continue it, "
            "or choose another --out"
        )


def _extends(key: str, stored: object, current: object) -> bool:
    """Whether `current` adds to the grid of `stored` without dropping any of its runs."""
    if key in OPTIONAL_ARMS and stored is None and current:  # its first control or length
        return True
    if stored is None or current is None or stored == current:
        return False
    if key == "seeds":
        return current > stored
    if key == "fractions":  # comma-separated, as given
        stored, current = stored.split(","), current.split(",")
    return set(stored) < set(current)


def stored_settings(out: Path) -> dict | None:
    path = Path(out) / SETTINGS_FILE
    return read_json(path) if path.exists() else None


def _unfinished(protocol: Protocol, grid: list[tuple[Arm, str, int]]) -> list[int]:
    return [i for i, cell in enumerate(grid) if not is_finished(protocol.run_folder(*cell))]


def _prepare_unfinished(folder: Path, resume: bool) -> bool:
    """Whether to continue the interrupted run in `folder`; without resume it starts over."""
    if not folder.exists():
        return False
    if resume:
        return True
    logger.info("restarting the interrupted run in %s (resume is off)", folder)
    shutil.rmtree(folder)
    return False


def pretrainings(protocol: Protocol) -> list[tuple[Arm, int]]:
    """Every (pretrained arm, pretraining seed), seeds outermost as in the grid."""
    pretrained = [arm for arm in protocol.arms if arm.pretrain is not None]
    return [(arm, seed) for seed in range(protocol.pretrain_seeds) for arm in pretrained]


def run_pretrainings(protocol: Protocol, context: DistributedContext) -> None:
    todo = pretrainings(protocol)
    for index, (arm, seed) in enumerate(todo, start=1):
        folder = protocol.pretrain_folder(arm, seed)
        if on_main(context, is_finished, folder):
            logger.info("pretraining %d/%d: %s (seed %d) is done; reusing %s", index, len(todo),
                        arm.title, seed, folder)  # fmt: skip
            continue
        resume = on_main(context, _prepare_unfinished, folder, protocol.resume)
        config = protocol.pretrain_config(arm, seed, resume=resume)
        logger.info(
            "pretraining %d/%d: %s (seed %d), %d steps x %d images%s",
            index, len(todo), arm.title, seed, config.max_steps, config.batch_size,
            " (resumed)" if resume else "",
        )  # fmt: skip
        run_pretraining(config)


def check_metric(metric: str, test_metrics: dict, source: Path) -> None:
    if metric not in test_metrics:
        raise CtxRestoreError(
            f"metric '{metric}' is not among the test metrics of {source}; "
            f"available: {', '.join(sorted(test_metrics))}"
        )


@dataclass(frozen=True)
class GridRun:
    """What one pass over the grid did: rows (one per finished run), and how many runs it
    trained now and found finished."""

    rows: list[dict]
    trained: int
    skipped: int


def run_grid(protocol: Protocol, context: DistributedContext) -> GridRun:
    """Pretrain every arm (once per pretraining seed), then fine-tune every arm x fraction x
    seed (resuming). Under torchrun every process trains every run, and rank 0 alone decides
    what is finished and clears what is not (on_main), so no two processes race on a folder."""
    on_main(context, check_settings, protocol.out, protocol.settings)
    run_pretrainings(protocol, context)
    grid = list(protocol.grid())
    unfinished = on_main(context, _unfinished, protocol, grid)
    pending = [grid[index] for index in unfinished]
    logger.info(
        "%d fine-tuning runs: %d finished, %d to run", len(grid), len(grid) - len(pending),
        len(pending),
    )  # fmt: skip
    metric_checked = False
    for index, (arm, fraction, seed) in enumerate(pending, start=1):
        folder = protocol.run_folder(arm, fraction, seed)
        resume = on_main(context, _prepare_unfinished, folder, protocol.resume)
        logger.info(
            "fine-tuning %d/%d: %s, fraction %s, seed %d%s", index, len(pending), arm.title,
            fraction, seed, " (resumed)" if resume else "",
        )  # fmt: skip
        result = run_finetuning(protocol.finetune_config(arm, fraction, seed, resume=resume))
        if not metric_checked:  # fail after one run, not after the whole grid
            check_metric(protocol.metric, result.metrics, folder)
            metric_checked = True
    rows = [result_row(protocol, *cell) for cell in grid]
    first_test = {k: v for k, v in rows[0].items() if k not in RUN_COLUMNS}
    check_metric(protocol.metric, first_test, protocol.run_folder(*grid[0]))
    return GridRun(rows, trained=len(pending), skipped=len(grid) - len(pending))


def result_row(protocol: Protocol, arm: Arm, fraction: str, seed: int) -> dict:
    """One results.csv row from a finished run's metrics.json."""
    folder = protocol.run_folder(arm, fraction, seed)
    summary = read_json(folder / METRICS_FILE)
    row = {
        "task": protocol.task,
        "method": arm.name,
        "fraction": fraction,
        "seed": seed,
        "pretrain_seed": "" if arm.pretrain is None else protocol.pretrain_seed_of(seed),
        "train_cases": summary["split"]["train"]["cases"],
        "steps": summary["steps"],
        "best_step": summary["best_step"],
        "environment": environment_fingerprint(folder),
    }
    return {**row, **summary["test"]}


def write_results(path: Path, rows: list[dict]) -> Path:
    """results.csv: one row per run, the run columns then every test metric (sorted)."""
    metrics = sorted({key for row in rows for key in row} - set(RUN_COLUMNS))
    return write_csv(path, rows, [*RUN_COLUMNS, *metrics])
