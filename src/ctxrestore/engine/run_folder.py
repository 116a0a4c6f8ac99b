"""What pretraining and fine-tuning runs share about their folder and their options: never
overwrite a run by accident, resume only a run started with the same options, and the option
checks every stage makes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from ctxrestore.engine.checkpoint import SPEC_FILE, TRAINING_STATE_FILE, WEIGHTS_FILE
from ctxrestore.engine.distributed import DEVICES
from ctxrestore.engine.environment import record_environment
from ctxrestore.engine.loop import PRECISIONS
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json, write_json

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# Written last by pretraining and fine-tuning alike: a folder holding it is a finished run;
# one with checkpoints but without it is still running or was interrupted.
METRICS_FILE = "metrics.json"
# Options that may change on --resume: how long and where to run, how often to log or draw.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "epochs", "resume", "device", "num_workers", "checkpoint_every",
     "log_every", "preview_every", "compile", "figures", "cache", "cache_dir"}
)  # fmt: skip


def is_finished(folder: Path) -> bool:
    return (Path(folder) / METRICS_FILE).is_file()


def check_init_folder(folder: Path, spec: dict) -> None:
    """A folder that --init names (to pretrain or fine-tune from): its spec must be one
    ctxrestore wrote, with the network's parts named (refused by name otherwise), and a run
    still going or interrupted is warned about."""
    model = spec.get("model")
    parts_named = isinstance(model, dict) and "prefixes" in model
    if not parts_named or not {"spatial_dims", "in_channels"} <= spec.keys():
        raise CtxRestoreError(
            f"{Path(folder) / SPEC_FILE} is not a ctxrestore spec (no network with named "
            "parts, spatial_dims and in_channels): --init takes a folder that `ctxrestore "
            "pretrain` or `finetune` wrote"
        )
    warn_if_unfinished(folder)


def warn_if_unfinished(folder: Path) -> None:
    """Before starting from `folder`'s weights: a run writes its checkpoint every few hundred
    steps and metrics.json at the end, so a folder with a training state but no metrics.json
    is still running, or was interrupted."""
    folder = Path(folder)
    if (folder / TRAINING_STATE_FILE).is_file() and not is_finished(folder):
        logger.warning(
            "%s holds an unfinished run (a checkpoint, no %s yet): starting from its last "
            "checkpoint, not its final weights; finish it with --resume to use those",
            folder, METRICS_FILE,
        )  # fmt: skip


def option_defaults(config_class: type) -> dict:
    """The default of every option of a config dataclass, as its to_json() writes it."""
    defaults = {}
    for field in dataclasses.fields(config_class):
        if field.default is not dataclasses.MISSING:
            value = field.default
        elif field.default_factory is not dataclasses.MISSING:
            value = field.default_factory()
        else:
            continue
        defaults[field.name] = str(value) if isinstance(value, Path) else value
    return defaults


def check_run_folder(
    out: Path,
    options: dict,
    resume: bool,
    may_change: Iterable[str] = (),
    defaults: dict | None = None,
) -> None:
    """Refuse an --out that holds a run unless resuming it, and a resume whose options
    differ from the saved config.json (other than RESUMABLE_CHANGES and `may_change`).

    An option missing from config.json was added after the run started; it counts as
    unchanged when it has its default (`defaults`), the behaviour the run was started with."""
    out = Path(out)
    has_run = (out / WEIGHTS_FILE).exists() or (out / CONFIG_FILE).exists()
    if has_run and not resume:
        raise CtxRestoreError(
            f"{out} already holds a run; pass --resume to continue it, or choose another --out"
        )
    if resume and (out / CONFIG_FILE).exists():
        saved = read_json(out / CONFIG_FILE)
        ignore = RESUMABLE_CHANGES | set(may_change)
        defaults = defaults or {}
        missing = object()

        def before(key: str) -> object:
            return saved.get(key, defaults.get(key, missing))

        changed = sorted(k for k in options if k not in ignore and before(k) != options[k])
        if changed:
            details = ", ".join(
                f"{k}: {saved.get(k)!r} -> {options[k]!r}"
                if k in saved
                else f"{k}: not recorded (default {defaults.get(k)!r}) -> {options[k]!r}"
                for k in changed
            )
            raise CtxRestoreError(
                f"--resume with options that differ from the run in {out}: {details}"
            )


def check_same_start(out: Path, init: Path, init_weights: str) -> None:
    """A resumed run continues from the weights it started from: refuse an --init folder
    pretrained again in between (its metrics, and its record of where it started, would mix
    two pretrainings)."""
    spec_path = Path(out) / SPEC_FILE
    started = read_json(spec_path).get("init", {}).get("weights") if spec_path.is_file() else None
    if started and started != init_weights:
        raise CtxRestoreError(
            f"{out} started from weights {started}, but {init} now holds {init_weights} (it "
            "was pretrained again since): start a new --out"
        )


def start_run_folder(
    out: Path, options: dict, device: torch.device, world_size: int, resume: bool
) -> None:
    """What every run writes when it starts (rank 0, after check_run_folder): OUT, its
    config.json and one more environment.json entry (engine/environment.py)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_FILE, options)
    record_environment(out, device, world_size, resume)


def check_stage_options(config: object, positive: Iterable[str]) -> None:
    """Checks every stage's config makes: spatial dims, device, precision, counts >= 1."""
    if config.spatial_dims not in (2, 3):
        raise CtxRestoreError(f"spatial_dims must be 2 or 3, got {config.spatial_dims}")
    if config.device not in DEVICES:
        raise CtxRestoreError(f"device '{config.device}' is not one of {DEVICES}")
    if config.precision not in PRECISIONS:
        raise CtxRestoreError(f"precision '{config.precision}' is not one of {PRECISIONS}")
    for name in positive:
        if getattr(config, name) < 1:
            raise CtxRestoreError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.max_steps is not None and config.max_steps < 1:
        raise CtxRestoreError(f"max_steps must be >= 1, got {config.max_steps}")


def check_patience(patience: int) -> None:
    """Fine-tuning's early-stopping patience: validations without a new best; 0 never stops."""
    if patience < 0:
        raise CtxRestoreError(
            f"patience must be >= 0 validations (0: never stop early), got {patience}"
        )


def check_head_only_steps(head_only_steps: int, freeze_encoder: bool) -> None:
    """Fine-tuning's LP-FT hold: steps >= 0, and not with an encoder that never trains."""
    if head_only_steps < 0:
        raise CtxRestoreError(f"head_only_steps must be >= 0, got {head_only_steps}")
    if head_only_steps and freeze_encoder:
        raise CtxRestoreError(
            "head_only_steps and freeze_encoder together: a frozen encoder never trains; choose one"
        )
