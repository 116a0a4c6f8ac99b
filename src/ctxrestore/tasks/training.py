"""The fine-tuning stage: labelled data -> split -> network (+ pretrained weights) -> engine ->
best checkpoint -> test metrics and report.

`FinetuneConfig` is the validated, frozen form of `ctxrestore.finetune(...)`'s options; the
function and the CLI share its fields (a test holds them equal). The run folder is itself a
checkpoint folder (weights + spec.json with the task), so it can be predicted with, resumed,
or used as `--init` of another task.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ctxrestore
from ctxrestore.data.loading import FileOptions
from ctxrestore.data.phantoms import list_phantoms
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.splits import Split, parse_fraction, split_cases, write_split
from ctxrestore.engine.checkpoint import WEIGHTS_FILE, load_checkpoint, weights_fingerprint
from ctxrestore.engine.distributed import broadcast_object, on_main, setup_distributed
from ctxrestore.engine.loop import BEST_DIR, LoopConfig, Validation, fit
from ctxrestore.engine.run_folder import (
    METRICS_FILE,
    check_head_only_steps,
    check_init_folder,
    check_patience,
    check_run_folder,
    check_same_start,
    check_stage_options,
    option_defaults,
    start_run_folder,
)
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import write_json
from ctxrestore.models import build_model
from ctxrestore.models.spec import model_spec
from ctxrestore.models.transfer import (
    TransferReport,
    check_compatible,
    estimate_missing_statistics,
    freeze,
    transfer_weights,
)
from ctxrestore.tasks.augment import Augmentation
from ctxrestore.tasks.datasets import (
    DEFAULT_PHANTOMS,
    FolderOptions,
    LabelledData,
    folder_data,
    phantom_data,
)
from ctxrestore.tasks.localize import DECODER_BOX_HEADS, check_box_head
from ctxrestore.tasks.report import write_finetuning_report

logger = logging.getLogger(__name__)

TASK_NAMES = tuple(DEFAULT_PHANTOMS)
SPEC_FORMAT = 1
SPLIT_FILE = "split.json"
# The labelled phantom cohort is one fixed "hospital", apart from the pretraining images
# (seed 0 upwards) and the same for every --seed: seeds vary the split and the weights.
LABELLED_PHANTOM_SEED = 7_000_001
# An epoch of a tiny subset (5 images) would be one step; validating that often wastes time,
# so an epoch is at least this many steps.
MIN_EPOCH_STEPS = 20
EVALUATION_BATCH = 32
# Default image sizes: the localiser pools 5 times, so at 64 pixels it regresses boxes from a
# 2x2 map and learns no more than the average box (docs/experiments.md, experiment 2).
DEFAULT_IMAGE_SIZES = {"classify": 64, "localize": 128, "segment": 64}


@dataclass(frozen=True)
class FinetuneConfig(FileOptions):
    task: str
    out: Path
    data: Path | None = None
    init: str = "random"
    fraction: str = "1.0"
    phantom: str | None = None
    num_images: int = 1000
    spatial_dims: int = 2
    image_size: int | None = None
    width: int = 16
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    batch_size: int = 16
    epochs: int = 30
    max_steps: int | None = None
    learning_rate: float = 1e-3
    pretrained_lr_scale: float = 1.0
    freeze_encoder: bool = False
    transfer_stages: int | None = None
    fresh_decoder_levels: int = 0
    head_only_steps: int = 0
    box_head: str = "regression"  # localize only: tasks/localize.py BOX_HEADS
    warmup_steps: int = 20
    weight_decay: float = 1e-4
    patience: int = 10
    augment: bool = True
    balance: bool = True
    adapt_channels: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    preview_every: int = 0
    compile: bool = False
    figures: bool = True
    resume: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASK_NAMES:
            raise CtxRestoreError(f"unknown task '{self.task}'; tasks: {', '.join(TASK_NAMES)}")
        if self.phantom is not None and self.phantom not in list_phantoms():
            raise CtxRestoreError(
                f"unknown phantom '{self.phantom}'; built-in phantoms: {list_phantoms()}"
            )
        if self.image_size is None:
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZES.get(self.task, 64))
        check_stage_options(self, ("num_images", "width", "image_size", "epochs", "batch_size"))
        check_patience(self.patience)
        if not 0 < self.pretrained_lr_scale <= 1:
            raise CtxRestoreError(
                f"pretrained_lr_scale must be in (0, 1], got {self.pretrained_lr_scale}; "
                "use --freeze-encoder to keep the encoder fixed"
            )
        parse_fraction(self.fraction)  # fails early on a malformed fraction
        if self.init != "random" and not Path(self.init).is_dir():
            raise CtxRestoreError(
                f"--init {self.init}: no such folder; give a pretraining run folder or 'random'"
            )
        check_head_only_steps(self.head_only_steps, self.freeze_encoder)
        check_box_head(self.box_head, self.task)
        if self.head_only_steps and self.init == "random":
            raise CtxRestoreError(
                "--head-only-steps needs pretrained weights (--init DIR): with random "
                "weights no layer is pretrained, so none would wait for the head"
            )
        if self.transfer_stages is not None:
            if self.init == "random":
                raise CtxRestoreError("--transfer-stages needs pretrained weights (--init DIR)")
            if self.freeze_encoder:
                raise CtxRestoreError(
                    "--transfer-stages and --freeze-encoder together would freeze random "
                    "stages; choose one"
                )
        check_fresh_decoder_levels(
            self.fresh_decoder_levels, self.transfer_stages, self.task, self.box_head
        )
        if self.fresh_decoder_levels and self.init == "random":
            raise CtxRestoreError("--fresh-decoder-levels needs pretrained weights (--init DIR)")

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return (self.image_size,) * self.spatial_dims

    @property
    def phantom_name(self) -> str:
        return self.phantom or DEFAULT_PHANTOMS[self.task]

    def to_json(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FinetuneResult:
    out: Path
    steps: int
    best_step: int | None
    stopped_early: bool
    metrics: dict[str, float]
    transfer: dict


class ItemsDataset(Dataset):
    """Items held in memory, selected by index."""

    def __init__(self, items: list[dict], indices: tuple[int, ...]) -> None:
        self.items = [items[i] for i in indices]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


# ----------------------------------------------------------------------------- initialisation
def default_encoder(task: str, width: int) -> dict:
    """The encoder of a randomly initialised network: SonoNet-like for classify / localize
    (Chen et al.), the U-Net's for segment; the same shapes the pretraining networks use."""
    if task == "segment":
        return {"stage_channels": [width * 2**i for i in range(5)], "convs_per_stage": [2] * 5,
                "norm": "batch"}  # fmt: skip
    return {"stage_channels": [width, 2 * width, 4 * width, 8 * width, 8 * width],
            "convs_per_stage": [2, 2, 3, 3, 3], "norm": "batch"}  # fmt: skip


def encoder_config(pretrained_model_spec: dict) -> dict:
    """The pretrained network's encoder arguments (rebuilt on the meta device if unrecorded)."""
    if pretrained_model_spec.get("encoder"):
        return dict(pretrained_model_spec["encoder"])
    return model_spec(pretrained_model_spec["name"], **pretrained_model_spec["kwargs"])["encoder"]


def check_init(
    config: FinetuneConfig, data: LabelledData, state: dict | None, spec: dict | None
) -> tuple[dict | None, dict | None]:
    """(pretrained state, pretrained spec), checked against the data before any training."""
    if spec is None:
        return None, None
    check_init_folder(Path(config.init), spec)
    check_compatible(
        spec,
        spatial_dims=config.spatial_dims,
        in_channels=data.in_channels,
        channel_names=list(data.channel_names),
        adapt_channels=config.adapt_channels,
        source=f"checkpoint {config.init}",
        target=f"the {config.task} data ({data.source})",
    )
    if spec.get("intensity") and spec["intensity"] != data.intensity:
        logger.warning(
            "checkpoint %s was pretrained on intensities scaled by %s; the %s data uses %s",
            config.init, spec["intensity"], config.task, data.intensity,
        )  # fmt: skip
    return state, spec


def build_network(
    config: FinetuneConfig, task, data: LabelledData, pretrained: tuple[dict | None, dict | None]
) -> tuple[nn.Module, dict, TransferReport]:
    """The task's network around the pretrained (or default) encoder, weights transferred."""
    state, spec = pretrained
    encoder = (
        default_encoder(config.task, config.width)
        if spec is None
        else encoder_config(spec["model"])
    )
    network = task.network_spec(config.spatial_dims, data.in_channels, encoder)
    factor = network["downsampling_factor"]
    if config.image_size % factor:
        raise CtxRestoreError(
            f"image_size {config.image_size} is not divisible by {factor}, the downsampling "
            f"factor of the {config.task} network; use a multiple of {factor}"
        )
    torch.manual_seed(config.seed)  # heads start equal for random and pretrained runs
    model = build_model(network)
    if state is None:
        parts = {}
        for name in model.state_dict():
            part = name.split(".")[0]
            parts[part] = parts.get(part, 0) + 1
        report = TransferReport(random=parts, reasons=dict.fromkeys(parts, "--init random"))
    else:
        report = transfer_weights(
            model,
            state,
            spec["model"]["prefixes"],
            network["prefixes"],
            adapt_channels=config.adapt_channels,
            encoder_stages=config.transfer_stages,
            fresh_decoder_levels=config.fresh_decoder_levels,
            source=f"checkpoint {config.init}",
        )
    return model, network, report


def freeze_encoder(model: nn.Module, images: list[torch.Tensor], device: torch.device) -> None:
    """Fix the encoder, after estimating the normalisation statistics it never had (random
    weights) from the training images, so that frozen random features are a fair control."""
    model.encoder.to(device)
    batches = (torch.stack(images[start : start + EVALUATION_BATCH]).to(device)
               for start in range(0, len(images), EVALUATION_BATCH))  # fmt: skip
    estimated = estimate_missing_statistics(model.encoder, batches)
    if estimated:
        logger.info(
            "frozen encoder: running statistics of %d normalisation layers estimated from the "
            "%d training images (they had none)", estimated, len(images),
        )  # fmt: skip
    freeze(model.encoder)


# ----------------------------------------------------------------------------- the stage
def resolve_preprocessing(config: FinetuneConfig, init_spec: dict | None) -> Preprocessing:
    """The options given, else the pretraining run's (so that files are scaled as the
    pretrained network saw them), else generic."""
    recorded = (init_spec or {}).get("preprocessing")
    if config.modality is None and config.window is None and config.target_spacing is None:
        return Preprocessing.from_json(recorded) if recorded else Preprocessing()
    chosen = config.preprocessing
    if recorded and Preprocessing.from_json(recorded) != chosen:
        logger.warning(
            "checkpoint %s was pretrained on files preprocessed as %s; fine-tuning uses %s",
            config.init, recorded, chosen.to_json(),
        )  # fmt: skip
    return chosen


def load_data(config: FinetuneConfig, init_spec: dict | None) -> LabelledData:
    if config.data is None:
        return phantom_data(
            config.task,
            config.phantom_name,
            config.num_images,
            config.spatial_size,
            LABELLED_PHANTOM_SEED,
        )
    options = FolderOptions(
        preprocessing=resolve_preprocessing(config, init_spec),
        cache=config.array_cache(),
        slice_axis=config.slice_axis,
        skip_bad=config.skip_bad,
    )
    return folder_data(config.task, config.data, config.spatial_size, options)


def check_fresh_decoder_levels(
    fresh_decoder_levels: int, transfer_stages: int | None, task: str, box_head: str
) -> None:
    """Fine-tuning's fresh decoder levels: >= 0, only for the networks with a decoder (segment,
    localize with a U-Net box head: DECODER_BOX_HEADS), and not beside --transfer-stages,
    which leaves the whole decoder random already."""
    if fresh_decoder_levels < 0:
        raise CtxRestoreError(f"fresh_decoder_levels must be >= 0, got {fresh_decoder_levels}")
    if fresh_decoder_levels and not (
        task == "segment" or (task == "localize" and box_head in DECODER_BOX_HEADS)
    ):
        raise CtxRestoreError(
            f"fresh_decoder_levels: the {task} network has no decoder (only segment and "
            "localize --box-head mask or segment have one)"
        )
    if fresh_decoder_levels and transfer_stages is not None:
        raise CtxRestoreError(
            "fresh_decoder_levels and transfer_stages together: with transfer_stages the whole "
            "decoder starts random already; choose one"
        )


def check_every_class_trained(task, train_items: list[dict], fraction: str, split: Split) -> None:
    """A class (label, organ) without a single training example cannot be learned; stop
    before training rather than report a zero score for it later."""
    if task.name == "classify":
        seen = {int(item["label"]) for item in train_items}
        names = dict(enumerate(task.class_names))
    elif task.name == "segment":
        seen = set()
        for item in train_items:
            seen.update(int(v) for v in torch.unique(item["mask"]))
        names = dict(zip(task.label_values, task.label_names))
    else:
        present = torch.stack([item["present"] for item in train_items]).amax(dim=0)
        seen = {index for index, flag in enumerate(present.tolist()) if flag}
        names = dict(enumerate(task.organ_names))
    missing = [name for key, name in names.items() if key not in seen]
    if missing:
        raise CtxRestoreError(
            f"label fraction {fraction} leaves {', '.join(map(repr, missing))} with no training "
            f"example ({len(split.case_ids('train'))} training cases); use a larger --fraction "
            "or more labelled cases"
        )


def split_data(config: FinetuneConfig, data: LabelledData) -> Split:
    """The run's train / validation / test split of the data's cases (fixed by the seed)."""
    return split_cases(
        data.cases,
        data.strata,
        seed=config.seed,
        fraction=parse_fraction(config.fraction),
        test_fraction=config.test_fraction,
        val_fraction=config.val_fraction,
    )


def _loader(items: list[dict], indices: tuple[int, ...]) -> DataLoader:
    return DataLoader(ItemsDataset(items, indices), batch_size=EVALUATION_BATCH)


def run_finetuning(config: FinetuneConfig) -> FinetuneResult:
    """Fine-tune one task from pretrained or random weights; see `ctxrestore.finetune`."""
    context = setup_distributed(config.device)
    out = Path(config.out)
    on_main(
        context,
        check_run_folder,
        out,
        config.to_json(),
        config.resume,
        may_change=("patience",),
        defaults=option_defaults(FinetuneConfig),
    )
    state, init_spec, init_weights = None, None, None
    if config.init != "random":  # read once: its intensity scaling, then its weights
        state, init_spec = load_checkpoint(Path(config.init))
        init_weights = weights_fingerprint(state)
        if config.resume:
            check_same_start(out, Path(config.init), init_weights)
    data = load_data(config, init_spec)
    pretrained = check_init(config, data, state, init_spec)
    split = split_data(config, data)
    train_items = [data.items[i] for i in split.train]
    check_every_class_trained(data.task, train_items, config.fraction, split)
    task = data.task
    if config.task == "localize":
        task = dataclasses.replace(task, box_head=config.box_head)
        task.check_head_fits_data()
    if config.balance:
        task = task.balanced(train_items)
    if config.augment:
        task = dataclasses.replace(task, augmentation=Augmentation())
    model, network, transfer = build_network(config, task, data, pretrained)
    if config.freeze_encoder:
        freeze_encoder(model, [item["image"] for item in train_items], context.device)
    spec = {
        "format": SPEC_FORMAT,
        "ctxrestore_version": ctxrestore.__version__,
        "model": network,
        "spatial_dims": config.spatial_dims,
        "in_channels": data.in_channels,
        "channel_names": list(data.channel_names),
        "image_size": list(config.spatial_size),
        "intensity": data.intensity,
        **(
            {"preprocessing": data.preprocessing, "slice_axis": config.slice_axis}
            if data.preprocessing
            else {}
        ),
        "task": task.to_json(),
        "init": {
            "source": config.init,
            "weights": init_weights,
            "transfer": transfer.to_json(),
        },
        "data": {"source": data.source, "split_seed": config.seed},
    }
    if context.is_main:
        start_run_folder(out, config.to_json(), context.device, context.world_size, config.resume)
        write_split(out / SPLIT_FILE, split)

    batch_size = min(config.batch_size, len(split.train))
    batch_size -= batch_size % context.world_size
    if batch_size < config.batch_size:
        logger.warning(
            "%d training images: batch size %d instead of %d",
            len(split.train), batch_size, config.batch_size,
        )  # fmt: skip
    validate_every = max(len(split.train) // batch_size, MIN_EPOCH_STEPS)
    max_steps = validate_every * config.epochs
    if config.max_steps is not None:
        max_steps = min(max_steps, config.max_steps)
    if config.head_only_steps >= max_steps:
        raise CtxRestoreError(
            f"--head-only-steps {config.head_only_steps} is not shorter than the "
            f"{max_steps}-step schedule: the pretrained layers would never train "
            "(use --freeze-encoder for that)"
        )
    loop = LoopConfig(
        max_steps=max_steps,
        batch_size=batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=min(config.warmup_steps, max_steps // 2),
        precision=config.precision,
        log_every=min(config.log_every, max_steps),
        checkpoint_every=config.checkpoint_every,
        preview_every=config.preview_every,
        num_workers=config.num_workers,
        seed=config.seed,
        compile=config.compile,
    )
    device = context.device
    validation = None
    if split.val:
        validation = Validation(
            every=validate_every,
            evaluate=lambda m: task.evaluate(m, _loader(data.items, split.val), device),
            metric=task.metric,
            # 0: run the whole schedule and keep the best validation (fair comparisons:
            # a noisy early score must not end a run; docs/experiments.md 16)
            patience=config.patience or None,
        )
    else:
        logger.warning("no validation split: training %d steps, keeping the last", max_steps)
    result = fit(
        model=model,
        dataset=ItemsDataset(data.items, split.train),
        task=task,
        config=loop,
        context=context,
        run_dir=out,
        spec=spec,
        resume=config.resume and (out / WEIGHTS_FILE).exists(),
        validation=validation,
        lr_scales=dict.fromkeys(transfer.prefixes, config.pretrained_lr_scale),
        # LP-FT (Kumar et al. 2022): the new head first learns on fixed pretrained
        # features, so its first random gradients do not rewrite them
        delays=dict.fromkeys(transfer.prefixes, config.head_only_steps),
    )
    metrics: dict[str, float] = {}
    if context.is_main:
        metrics = _test(out, model, task, data, split, device)
        summary = {
            "task": config.task,
            "init": config.init,
            "init_weights": init_weights,
            "fraction": config.fraction,
            "seed": config.seed,
            "split": {
                name: {"cases": len(split.case_ids(name)), "items": len(getattr(split, name))}
                for name in ("train", "val", "test")
            },
            "split_summary": split.summary(),
            "skipped_files": data.skipped,
            "steps": result.steps,
            "best_step": result.best_step,
            "best_validation": {task.metric: result.best_score},
            "stopped_early": result.stopped_early,
            "transfer": transfer.to_json(),
            "test": metrics,
        }
        write_json(out / METRICS_FILE, summary)
        write_finetuning_report(out, task, model, data, split, device, config.figures)
    # Every rank returns the test metrics (a benchmark checks them on each), and every rank
    # leaves together: one that left while rank 0 still tested aborted gloo under load.
    metrics = broadcast_object(metrics, context)
    return FinetuneResult(
        out, result.steps, result.best_step, result.stopped_early, metrics,
        transfer.to_json(),
    )  # fmt: skip


def _test(out: Path, model: nn.Module, task, data: LabelledData, split: Split, device):
    """Test metrics of the best checkpoint (the last weights when validation never improved)."""
    if (out / BEST_DIR / WEIGHTS_FILE).is_file():
        weights, _ = load_checkpoint(out / BEST_DIR)
        model.load_state_dict(weights)
    model.to(device).eval()
    if not split.test:
        logger.warning("no test split: %s has no test metrics", out)
        return {}
    return task.evaluate(model, _loader(data.items, split.test), device)
