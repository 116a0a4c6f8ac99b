"""The one training loop: devices, DDP, bf16 autocast, checkpoints, CSV log, progress, resume.

Pretext and downstream training both go through `fit`. What a step computes comes from a
`TrainingTask`; everything about where and how it runs lives here.

With a `Validation`, the model is scored every `every` steps: the best scoring weights go to
`best/` (a checkpoint folder like the run's), and training stops early after `patience`
validations without improvement. Best score and patience count are part of the resumable state.

Randomness inside a step (e.g. where patches are swapped) comes from a generator reseeded from
(seed, rank, step), and the data order from (seed, epoch): a resumed run repeats exactly what an
uninterrupted run would have done, with no random state to store.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from ctxrestore.engine.checkpoint import (
    load_checkpoint,
    load_training_state,
    save_checkpoint,
    save_training_state,
)
from ctxrestore.engine.distributed import (
    DistributedContext,
    barrier,
    broadcast_object,
    mean_over_ranks,
)
from ctxrestore.engine.sampler import EpochSampler
from ctxrestore.errors import CtxRestoreError
from ctxrestore.progress import progress_shown

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
LOG_FILE = "log.csv"
LOG_COLUMNS = ("step", "epoch", "loss", "learning_rate", "images_per_second", "elapsed_seconds")
VALIDATION_FILE = "validation.csv"
BEST_DIR = "best"


@dataclass(frozen=True)
class LoopConfig:
    """How to train; validated here once. batch_size is global (all processes together)."""

    max_steps: int
    batch_size: int
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    precision: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    preview_every: int = 0
    num_workers: int = 0
    seed: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise CtxRestoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "preview_every", "num_workers"):
            if getattr(self, name) < 0:
                raise CtxRestoreError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise CtxRestoreError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.precision not in PRECISIONS:
            raise CtxRestoreError(f"precision '{self.precision}' is not one of {PRECISIONS}")


class TrainingTask(Protocol):
    """What one step computes. `batch` is the dataset's dict, already on the device."""

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor: ...

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None: ...


@dataclass(frozen=True)
class Validation:
    """Score the model every `every` steps (and at the last step) with `evaluate`, which runs
    on the main process and returns metrics including `metric` (higher is better). Stop after
    `patience` validations in a row without a new best (None: never stop early)."""

    every: int
    evaluate: Callable[[nn.Module], dict[str, float]]
    metric: str
    patience: int | None = None

    def __post_init__(self) -> None:
        if self.every < 1:
            raise CtxRestoreError(f"validation every must be >= 1 step, got {self.every}")
        if self.patience is not None and self.patience < 1:
            raise CtxRestoreError(f"patience must be >= 1 validation, got {self.patience}")


@dataclass(frozen=True)
class FitResult:
    steps: int
    final_loss: float
    resumed_from: int
    best_step: int | None = None
    best_score: float | None = None
    stopped_early: bool = False


class _ValidationTracker:
    """Best score, patience count and validation.csv; its state goes into training_state.pt."""

    def __init__(self, validation: Validation, run_dir: Path, state: dict | None) -> None:
        self.validation = validation
        self.path = run_dir / VALIDATION_FILE
        saved = (state or {}).get("validation", {})
        self.best_score: float | None = saved.get("best_score")
        self.best_step: int | None = saved.get("best_step")
        self.stale: int = int(saved.get("stale", 0))
        self.stopped: bool = bool(saved.get("stopped", False))
        self._rows = self._read_rows(int((state or {}).get("step", 0)))

    def _read_rows(self, resume_step: int) -> list[dict]:
        if not resume_step or not self.path.is_file():
            return []
        with self.path.open() as handle:
            return [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]

    def record(self, step: int, epoch: int, metrics: dict[str, float]) -> bool:
        """Note the metrics of `step`; True when they are a new best."""
        if self.validation.metric not in metrics:
            raise CtxRestoreError(
                f"validation returned no {self.validation.metric!r}; it returned {sorted(metrics)}"
            )
        score = float(metrics[self.validation.metric])
        improved = math.isfinite(score) and (self.best_score is None or score > self.best_score)
        if improved:
            self.best_score, self.best_step, self.stale = score, step, 0
        else:
            self.stale += 1
        patience = self.validation.patience
        self.stopped = patience is not None and self.stale >= patience
        self._rows.append({"step": step, "epoch": epoch, "best": int(improved), **metrics})
        columns = list(dict.fromkeys(key for row in self._rows for key in row))
        with self.path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, restval="")
            writer.writeheader()
            writer.writerows(self._rows)
        return improved

    def state(self) -> dict:
        return {
            "best_score": self.best_score,
            "best_step": self.best_step,
            "stale": self.stale,
            "stopped": self.stopped,
        }


def _autocast(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _schedule(config: LoopConfig, delay: int = 0):
    """Linear warm-up, then cosine decay to zero at max_steps. With a `delay` the factor is 0
    for that many steps and the same warm-up and decay then fit into the steps left."""

    def factor(step: int) -> float:
        step -= delay
        if step < 0:
            return 0.0
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        span = max(1, config.max_steps - delay - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - config.warmup_steps) / span)))

    return factor


def _parameter_groups(
    model: nn.Module, config: LoopConfig, lr_scales: dict[str, float], delays: dict[str, int]
):
    """AdamW groups by (learning-rate scale, delay, weight decay): no decay on norms and
    biases. Each group carries its `delay` (steps at learning rate 0) for the schedule."""
    groups: dict[tuple[float, int, bool], list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        scale = next((v for k, v in lr_scales.items() if name.startswith(k)), 1.0)
        delay = next((v for k, v in delays.items() if name.startswith(k)), 0)
        decays = not (parameter.dim() <= 1 or name.endswith(".bias"))
        groups.setdefault((scale, delay, decays), []).append(parameter)
    if not groups:
        raise CtxRestoreError("no parameter is trainable (all are frozen)")
    return [
        {
            "params": parameters,
            "lr": config.learning_rate * scale,
            "weight_decay": config.weight_decay if decays else 0.0,
            "delay": delay,
        }
        for (scale, delay, decays), parameters in sorted(
            groups.items(), key=lambda g: (-g[0][0], g[0][1], not g[0][2])
        )
    ]


def step_generator(generator: torch.Generator, seed: int, rank: int, step: int):
    """Reseed in place from (seed, rank, step): exact resume without stored random state."""
    return generator.manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if channels_last and value.dim() == 4 and value.is_floating_point():
                value = value.contiguous(memory_format=torch.channels_last)
        moved[key] = value
    return moved


class _CsvLog:
    """log.csv, appended by rank 0; on resume, rows past the resumed step are dropped."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if resume_step and path.is_file():
            with path.open() as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, **row: float) -> None:
        with self.path.open("a", newline="") as handle:
            csv.DictWriter(handle, LOG_COLUMNS).writerow(row)


def read_log(run_dir: Path) -> list[dict[str, float]]:
    """The rows of a run's log.csv as numbers."""
    with (Path(run_dir) / LOG_FILE).open() as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]


def fit(
    *,
    model: nn.Module,
    dataset: Dataset,
    task: TrainingTask,
    config: LoopConfig,
    context: DistributedContext,
    run_dir: Path,
    spec: dict,
    resume: bool = False,
    validation: Validation | None = None,
    lr_scales: dict[str, float] | None = None,
    delays: dict[str, int] | None = None,
) -> FitResult:
    """Train `model` for config.max_steps steps, writing checkpoints into `run_dir`.

    The folder gets model.safetensors + spec.json (the checkpoint), training_state.pt (for
    resume), log.csv, and previews/; with `validation` also validation.csv and best/.
    `resume=True` continues from training_state.pt. `lr_scales` maps weight-name prefixes to
    learning-rate multipliers (e.g. a lower rate for pretrained layers); `delays` maps prefixes
    to a number of first steps at learning rate 0 (pretrained layers held while a new head
    learns, then warmed up: LP-FT); parameters with requires_grad off (a frozen encoder) are
    left out of the optimizer.
    """
    run_dir = Path(run_dir)
    device = context.device
    channels_last = device.type == "cuda"
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)

    optimizer = torch.optim.AdamW(
        _parameter_groups(model, config, lr_scales or {}, delays or {}), lr=config.learning_rate
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [_schedule(config, group["delay"]) for group in optimizer.param_groups]
    )

    start_step = 0
    state = None
    if resume:
        state = load_training_state(run_dir)
        if state is None:
            raise CtxRestoreError(f"--resume: {run_dir} holds no training_state.pt to resume from")
        weights, _ = load_checkpoint(run_dir)
        model.load_state_dict(weights)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step = int(state["step"])
        if start_step >= config.max_steps:
            logger.info("run already finished %d of %d steps", start_step, config.max_steps)

    train_model: nn.Module = model
    if context.is_distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        train_model = DistributedDataParallel(train_model, device_ids=device_ids)
    if config.compile:  # after DDP, as PyTorch recommends, so DDP's bucketing is compiled too
        train_model = torch.compile(train_model)

    sampler = EpochSampler(
        len(dataset),
        batch_size=config.batch_size,
        seed=config.seed,
        rank=context.rank,
        world_size=context.world_size,
    )
    loader = DataLoader(
        dataset,
        batch_size=sampler.per_rank,
        sampler=sampler,
        num_workers=config.num_workers,
        pin_memory=device.type == "cuda",
        drop_last=True,
        # Items carry no randomness of their own, so workers can live across epochs instead
        # of restarting (a fraction of a second each, per epoch, on small datasets).
        persistent_workers=config.num_workers > 0,
    )
    generator = torch.Generator(device=device)
    log = _CsvLog(run_dir / LOG_FILE, start_step) if context.is_main else None
    tracker = (
        _ValidationTracker(validation, run_dir, state)
        if validation is not None and context.is_main
        else None
    )
    stopped = bool(state and state.get("validation", {}).get("stopped"))

    def checkpoint(step: int) -> None:
        if context.is_main:
            save_checkpoint(run_dir, model.state_dict(), spec)
            save_training_state(
                run_dir,
                {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "config": asdict(config),
                    "validation": tracker.state() if tracker is not None else {},
                },
            )
        barrier(context)

    def validate(step: int, epoch: int) -> bool:
        """Score the model; save it to best/ when it improved. True: stop early."""
        stop = False
        if tracker is not None:
            model.eval()
            with torch.no_grad(), _autocast(device, config.precision):
                metrics = validation.evaluate(model)
            model.train()
            if tracker.record(step, epoch, metrics):
                save_checkpoint(run_dir / BEST_DIR, model.state_dict(), spec)
            stop = tracker.stopped
        return bool(broadcast_object(stop, context))

    def preview(step: int, batch: dict) -> None:
        if not context.is_main:
            return
        model.eval()
        with torch.no_grad(), _autocast(device, config.precision):
            task.save_preview(
                run_dir / "previews" / f"step_{step:06d}.png",
                model,
                batch,
                step_generator(torch.Generator(device=device), config.seed, 0, step),
            )
        model.train()

    step = start_step
    loss_value = float("nan")
    started = time.perf_counter()
    window_start, window_images = time.perf_counter(), 0
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("loss {task.fields[loss]:.4g}"),
        TimeRemainingColumn(),
        disable=not (context.is_main and progress_shown()),
    )
    model.train()
    batch = None
    with progress:
        bar = progress.add_task("training", total=config.max_steps, completed=step, loss=math.nan)
        while step < config.max_steps and not stopped:
            epoch, offset = divmod(step, sampler.steps_per_epoch)
            sampler.set_position(epoch, offset)
            for batch in loader:
                batch = _to_device(batch, device, channels_last)
                step_generator(generator, config.seed, context.rank, step)
                with _autocast(device, config.precision):
                    loss = task.training_loss(train_model, batch, generator)
                if not torch.isfinite(loss):
                    raise CtxRestoreError(
                        f"the loss became {loss.item()} at step {step + 1}; lower the "
                        f"learning_rate (now {config.learning_rate}) or check the input data"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                window_images += config.batch_size

                if step % config.log_every == 0 or step == config.max_steps:
                    loss_value = float(mean_over_ranks(loss.detach(), context))
                    now = time.perf_counter()
                    if log is not None:
                        log.append(
                            step=step,
                            epoch=epoch,
                            loss=loss_value,
                            learning_rate=scheduler.get_last_lr()[0],
                            images_per_second=window_images / max(now - window_start, 1e-9),
                            elapsed_seconds=now - started,
                        )
                    window_start, window_images = now, 0
                    progress.update(bar, completed=step, loss=loss_value)
                else:
                    progress.update(bar, completed=step)
                if config.preview_every and step % config.preview_every == 0:
                    preview(step, batch)
                if validation is not None and (
                    step % validation.every == 0 or step == config.max_steps
                ):
                    stopped = validate(step, epoch)
                if step % config.checkpoint_every == 0 or step == config.max_steps or stopped:
                    checkpoint(step)
                if step >= config.max_steps or stopped:
                    break
    if batch is not None:
        preview(step, batch)
    best = tracker.state() if tracker is not None else {}
    best = broadcast_object(best, context) if validation is not None else best
    return FitResult(
        steps=step,
        final_loss=loss_value,
        resumed_from=start_step,
        best_step=best.get("best_step"),
        best_score=best.get("best_score"),
        stopped_early=stopped,
    )
