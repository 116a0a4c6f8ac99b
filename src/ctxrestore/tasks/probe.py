"""Linear probes: what a network's starting weights already tell apart for a task.

For every `--init` the task's network is built exactly as `finetune` builds it (the same
split, transfer options and seed; head random) and is not trained. The features a fresh head
would read are collected on the labelled training split:

- segment, and localize with a U-Net box head (mask, segment): the head input, i.e. the
  decoder's output, per voxel; the targets are the label map's classes (localize: background
  or organ, from the label maps, or from the boxes where the data has none);
- classify: the head input, i.e. the encoder's output, averaged over space, per image;
- localize with the regression head: the encoder's output upsampled to the voxels (the
  regression head's neck starts random for every initialisation, so its output would probe
  random layers), with the same per-voxel organ targets.

Normalisation layers use statistics estimated on the labelled training images (the average
of their batch statistics, which fine-tuning's first steps normalise by).

A class-weighted multinomial logistic regression (L-BFGS, features standardised on the
training samples) is fitted on them and scored on the validation split (or the test split)
as balanced accuracy: the mean recall over the classes present there. Each class keeps at most
`max_samples_per_class` samples per split, drawn with a fixed seed.

Why: pretrainings of one recipe differ by up to the whole fine-tuning gain, and in
docs/experiments.md 48-49 this probe, scored on validation, told four of them apart as their
fine-tuned box error did (P2 < P1 < P0 ~ S2k, on each of six splits) before any fine-tuning,
in seconds instead of hours. Between different recipes it does not predict transfer
(dense_contrastive's head input probed best of all and gained 1%; experiment 38), so the
report says to compare draws of one recipe.
"""

from __future__ import annotations

import glob
import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ctxrestore.data.loading import FileOptions
from ctxrestore.engine.checkpoint import load_checkpoint, weights_fingerprint
from ctxrestore.engine.distributed import resolve_device
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write, matching_folders, write_csv, write_json
from ctxrestore.models.classifier import Classifier
from ctxrestore.models.localizer import Localizer
from ctxrestore.models.network import EncoderDecoder
from ctxrestore.models.transfer import estimate_missing_statistics
from ctxrestore.tasks.localize import box_masks, organ_labels
from ctxrestore.tasks.training import (
    FinetuneConfig,
    build_network,
    check_every_class_trained,
    check_fresh_decoder_levels,
    check_init,
    load_data,
    resolve_preprocessing,
    split_data,
)

logger = logging.getLogger(__name__)

SCORE_SPLITS = ("val", "test")
PROBE_FILE = "probe.csv"
PROBE_RECORD = "probe.json"  # the config and rows, for the benchmark to reuse
REPORT_FILE = "report.md"
IGNORED = -1  # a sample's target where it has no single class (overlapping boxes)
CHUNK = {2: 16, 3: 2}  # images / volumes per forward pass
L2_PENALTY = 1e-3  # on the standardised features' weights
LBFGS_ITERATIONS = 300
FEATURES = {
    "decoder": "head input: the decoder's output, per voxel",
    "pooled": "head input: the encoder's output averaged over space, per image",
    "encoder": "encoder output upsampled to the voxels, per voxel (the regression head's neck "
    "starts random for every initialisation)",
}


# The options handed to FinetuneConfig as they are (the transfer options are given to the
# pretrained initialisations only: random weights have nothing to transfer).
FINETUNE_OPTIONS = (
    "task", "data", "fraction", "seed", "phantom", "num_images", "spatial_dims", "image_size",
    "width", "test_fraction", "val_fraction", "box_head", "adapt_channels", "device",
    "modality", "window", "target_spacing", "slice_axis", "cache", "cache_dir", "skip_bad",
)  # fmt: skip


def _expand_init(init: str) -> list[str]:
    """A glob pattern stands for the pretraining folders it matches (K draws of a recipe)."""
    if init == "random" or not glob.has_magic(init):
        return [init]
    return [str(folder) for folder in matching_folders(init, "pretraining run folders")]


@dataclass(frozen=True)
class ProbeConfig(FileOptions):
    """`ctxrestore.probe(...)`'s options; the network options are finetune's (the probed
    network is the one `finetune` with them would start from)."""

    task: str
    init: tuple[str, ...]
    out: Path
    data: Path | None = None
    fraction: str = "1.0"
    seed: int = 0
    score_on: str = "val"
    max_samples_per_class: int = 20_000
    phantom: str | None = None
    num_images: int = 1000
    spatial_dims: int = 2
    image_size: int | None = None
    width: int = 16
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    box_head: str = "regression"
    transfer_stages: int | None = None
    fresh_decoder_levels: int = 0
    adapt_channels: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        inits = tuple(name for init in self.init for name in _expand_init(init))
        if not inits:
            raise CtxRestoreError("give at least one --init (a pretraining folder or 'random')")
        repeated = sorted({init for init in inits if inits.count(init) > 1})
        if repeated:
            raise CtxRestoreError(f"--init {repeated[0]} is given twice; give each once")
        object.__setattr__(self, "init", inits)
        if self.score_on not in SCORE_SPLITS:
            raise CtxRestoreError(
                f"score_on must be one of {SCORE_SPLITS}, got '{self.score_on}' (validation is "
                "what a pretraining may be chosen by without touching the test split)"
            )
        if self.max_samples_per_class < 10:
            raise CtxRestoreError(
                f"max_samples_per_class must be >= 10, got {self.max_samples_per_class}"
            )
        check_fresh_decoder_levels(
            self.fresh_decoder_levels, self.transfer_stages, self.task, self.box_head
        )
        transfers_part = self.transfer_stages is not None or self.fresh_decoder_levels
        if transfers_part and set(inits) == {"random"}:
            raise CtxRestoreError(
                "--transfer-stages and --fresh-decoder-levels act on pretrained weights; give "
                "a pretraining folder as --init"
            )
        # finetune's checks, once per initialisation (folders exist, transfer options fit)
        configs = [self.finetune_config(init) for init in inits]
        object.__setattr__(self, "image_size", configs[0].image_size)

    @classmethod
    def for_finetuning(
        cls, finetune: FinetuneConfig, inits: Sequence[str], out: Path, **options
    ) -> ProbeConfig:
        """The probe of the network `finetune` would start from, for each of `inits`."""
        copied = (*FINETUNE_OPTIONS, "transfer_stages", "fresh_decoder_levels")
        return cls(init=tuple(inits), out=out,
                   **{key: getattr(finetune, key) for key in copied}, **options)  # fmt: skip

    def finetune_config(self, init: str) -> FinetuneConfig:
        """The fine-tuning whose starting network is probed for `init`."""
        pretrained = init != "random"
        return FinetuneConfig(
            **{key: getattr(self, key) for key in FINETUNE_OPTIONS}, init=init, out=self.out,
            transfer_stages=self.transfer_stages if pretrained else None,
            fresh_decoder_levels=self.fresh_decoder_levels if pretrained else 0,
        )  # fmt: skip

    def to_json(self) -> dict:
        return {key: str(value) if isinstance(value, Path) else value
                for key, value in asdict(self).items()} | {"init": list(self.init)}  # fmt: skip


@dataclass(frozen=True)
class ProbeResult:
    out: Path
    rows: list[dict]  # one per initialisation, in the order given

    def best(self) -> dict:
        return max(self.rows, key=lambda row: row["balanced_accuracy"])


# ----------------------------------------------------------------------------- features
def feature_kind(model: nn.Module) -> str:
    """Which features of this network a probe reads (a FEATURES key)."""
    if isinstance(model, EncoderDecoder):
        return "decoder"
    if isinstance(model, Classifier):
        return "pooled"
    if isinstance(model, Localizer):
        return "encoder"
    raise CtxRestoreError(f"cannot probe a {type(model).__name__}: no task network")


def probe_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) images -> features (B, F, *S) per voxel, or (B, F) per image (classify)."""
    kind = feature_kind(model)
    if kind == "decoder":
        return model.decoder(model.encoder.forward_features(images))
    features = model.encoder(images)
    if kind == "pooled":
        return features.mean(dim=tuple(range(2, features.ndim)))
    return F.interpolate(features, size=images.shape[2:], mode="nearest")


def probe_targets(task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """A batch's probe classes: (B,) for classify, (B, *S) per voxel otherwise; IGNORED where
    a voxel lies in several organs' boxes."""
    if task.name == "classify":
        return batch["label"].long()
    if task.name == "segment":
        return task.class_indices(batch["mask"])
    if task.organ_values is not None and "mask" in batch:
        return organ_labels(batch["mask"], task.organ_values)[:, 0]
    return box_labels(batch["boxes"], batch["present"], batch["image"].shape[2:])


def box_labels(
    boxes: torch.Tensor, present: torch.Tensor, spatial_size: Sequence[int]
) -> torch.Tensor:
    """Boxes (B, O, 2, D) and present (B, O) -> (B, *S): organ k + 1 inside organ k's box
    alone, 0 outside every box, IGNORED where boxes overlap (no single answer there)."""
    masks = box_masks(boxes, present, spatial_size)  # (B, O, *S)
    count = masks.sum(dim=1)
    labels = masks.argmax(dim=1) + 1
    labels[count == 0] = 0
    labels[count > 1] = IGNORED
    return labels.long()


def probe_class_names(task) -> tuple[str, ...]:
    """The probe's class names, index order."""
    if task.name == "classify":
        return tuple(task.class_names)
    if task.name == "segment":
        return tuple(task.label_names)
    return ("background", *task.organ_names)


def _batches(items: Sequence[dict]):
    """The items in chunks of near-equal size, at least two items each where there are two:
    batch statistics of one image at a one-voxel stage do not exist."""
    if not items:
        return
    count = math.ceil(len(items) / CHUNK[items[0]["image"].ndim - 1])
    count = max(1, min(count, len(items) // 2))  # chunks of at least two items
    bounds = [round(index * len(items) / count) for index in range(count + 1)]
    for start, stop in itertools.pairwise(bounds):
        chunk = items[start:stop]
        yield {key: torch.stack([item[key] for item in chunk]) for key in chunk[0]
               if isinstance(chunk[0][key], torch.Tensor)}  # fmt: skip


def keep_rates(task, items: Sequence[dict], num_classes: int, cap: int) -> torch.Tensor:
    """Per class, the share of its samples kept so that about `cap` remain (1 when fewer)."""
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for batch in _batches(items):
        targets = probe_targets(task, batch)
        counts += torch.bincount(targets[targets >= 0].flatten(), minlength=num_classes)
    return (cap / counts.clamp_min(1)).clamp(max=1.0)


def estimate_statistics(model: nn.Module, items: Sequence[dict], device: torch.device) -> None:
    """Every normalisation layer's statistics from the labelled training images: the average
    of their batch statistics, which fine-tuning's first steps normalise by (random weights'
    running statistics are their initial 0 and 1, and a pretraining's describe its own
    images). Train and scored splits are then normalised alike, whatever their chunking."""
    if len(items) < 2:
        raise CtxRestoreError(
            "one labelled training image: normalisation statistics need at least two; use a "
            "larger --fraction"
        )
    batches = (batch["image"].to(device) for batch in _batches(items))
    estimate_missing_statistics(model.to(device), batches, every_layer=True)


def collect(
    model: nn.Module, task, items: Sequence[dict], rates: torch.Tensor, device: torch.device,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(samples, F) features and (samples,) classes: each class's samples kept at its rate."""
    features, targets = [], []
    model.to(device).eval()
    with torch.no_grad():
        for batch in _batches(items):
            target = probe_targets(task, batch)
            keep = target >= 0
            keep &= torch.rand(target.shape, generator=generator) < rates[target.clamp_min(0)]
            feature = probe_features(model, batch["image"].to(device)).float().cpu()
            feature = feature.movedim(1, -1)  # (B, *S, F)
            features.append(feature[keep])
            targets.append(target[keep])
    return torch.cat(features), torch.cat(targets)


# ----------------------------------------------------------------------------- the probe
def fit_linear_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression, class-weighted, on standardised features:
    (mean, std, weight, bias)."""
    train_x = train_x.double()
    mean, std = train_x.mean(0), train_x.std(0).nan_to_num() + 1e-6
    x = (train_x - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    counts = torch.bincount(train_y, minlength=num_classes).to(x.dtype)
    present = counts > 0
    class_weight = counts.sum() / (present.sum() * counts.clamp_min(1))
    optimizer = torch.optim.LBFGS(
        [weight, bias], max_iter=LBFGS_ITERATIONS, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, train_y, weight=class_weight)
        loss = loss + L2_PENALTY * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return mean, std, weight.detach(), bias.detach()


def predict_linear_probe(probe, x: torch.Tensor) -> torch.Tensor:
    mean, std, weight, bias = probe
    return (((x.double() - mean) / std) @ weight + bias).argmax(dim=1)


def class_recalls(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int) -> list:
    """Recall per class; None for a class absent from `truth` (no recall, rather than 0)."""
    recalls = []
    for index in range(num_classes):
        members = truth == index
        total = int(members.sum())
        recalls.append(int((predicted[members] == index).sum()) / total if total else None)
    return recalls


def balanced_accuracy(recalls: Sequence[float | None]) -> float:
    present = [recall for recall in recalls if recall is not None]
    return sum(present) / len(present) if present else math.nan


# ----------------------------------------------------------------------------- the stage
def _check_one_preprocessing(config: ProbeConfig, specs: dict[str, dict | None]):
    """Every initialisation must see the data scaled the same way, or the probe compares
    scalings; without explicit options each pretraining's recorded preprocessing is used."""
    if config.data is None:  # phantoms are generated in their final scaling
        return
    chosen = {init: resolve_preprocessing(config.finetune_config(init), specs[init])
              for init in config.init}  # fmt: skip
    first, *others = chosen
    for init in others:
        if chosen[init] != chosen[first]:
            raise CtxRestoreError(
                f"--init {first} and --init {init} were pretrained on files preprocessed "
                f"differently ({chosen[first].to_json()} and {chosen[init].to_json()}); give "
                "--modality (and --window / --target-spacing) so that every initialisation is "
                "probed on the same images"
            )


def run_probe(config: ProbeConfig) -> ProbeResult:
    """Probe every initialisation; write OUT/probe.csv, OUT/probe.json and OUT/report.md."""
    device = resolve_device(config.device)
    out = Path(config.out)
    checkpoints = {init: (None, None) if init == "random" else load_checkpoint(Path(init))
                   for init in config.init}  # fmt: skip
    _check_one_preprocessing(config, {init: spec for init, (_, spec) in checkpoints.items()})
    first_spec = next((spec for _, spec in checkpoints.values() if spec is not None), None)
    first = config.finetune_config(config.init[0])  # data and split: the same for every init
    data = load_data(first, first_spec)
    split = split_data(first, data)
    train_items = [data.items[i] for i in split.train]
    score_items = [data.items[i] for i in getattr(split, config.score_on)]
    if not score_items:
        raise CtxRestoreError(
            f"the {config.score_on} split is empty ({data.source}); raise --{config.score_on}"
            "-fraction or score on the other split (--score-on)"
        )
    check_every_class_trained(data.task, train_items, config.fraction, split)
    task = data.task
    if config.task == "localize":
        task = replace(task, box_head=config.box_head)
        task.check_head_fits_data()
    names = probe_class_names(task)
    cap = config.max_samples_per_class
    train_rates = keep_rates(task, train_items, len(names), cap)
    score_rates = keep_rates(task, score_items, len(names), cap)
    rows = []
    for init in config.init:
        finetune = config.finetune_config(init)
        state, spec = checkpoints[init]
        pretrained = check_init(finetune, data, state, spec)
        model, _, transfer = build_network(finetune, task, data, pretrained)
        estimate_statistics(model, train_items, device)
        generator = torch.Generator().manual_seed(0)  # the same samples for every init
        train_x, train_y = collect(model, task, train_items, train_rates, device, generator)
        score_x, score_y = collect(model, task, score_items, score_rates, device, generator)
        probe = fit_linear_probe(train_x, train_y, len(names))
        recalls = class_recalls(predict_linear_probe(probe, score_x), score_y, len(names))
        row = {
            "init": init,
            "init_weights": None if state is None else weights_fingerprint(state),
            "features": feature_kind(model),
            "channels": train_x.shape[1],
            "train_samples": len(train_y),
            "scored_samples": len(score_y),
            "scored_on": config.score_on,
            "balanced_accuracy": balanced_accuracy(recalls),
            **{f"recall/{name}": recall for name, recall in zip(names, recalls)},
            "transferred": ", ".join(part.rstrip(".") for part in transfer.prefixes) or "nothing",
        }
        logger.info("%s: balanced accuracy %.3f on the %s split (%d samples)", init,
                    row["balanced_accuracy"], config.score_on, len(score_y))  # fmt: skip
        rows.append(row)
    write_csv(out / PROBE_FILE, rows)
    write_json(out / PROBE_RECORD, {"config": config.to_json(), "rows": rows,
                                    "split": split.summary()})  # fmt: skip
    report = probe_report(config, rows, split, data.source)
    atomic_write(out / REPORT_FILE, lambda path: path.write_text(report))
    return ProbeResult(out, rows)


def _score(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def probe_report(config: ProbeConfig, rows: list[dict], split, source: str) -> str:
    ranked = sorted(rows, key=lambda row: -row["balanced_accuracy"])
    recall_names = [key for key in rows[0] if key.startswith("recall/")]
    header = ["rank", "init", "balanced accuracy", *[key[7:] for key in recall_names], "samples"]
    lines = [
        f"# Linear probe: {config.task}",
        "",
        f"Data: {source}. Split seed {config.seed}, label fraction {config.fraction}: "
        f"{len(split.case_ids('train'))} training cases probed, scored on the "
        f"{config.score_on} split ({len(split.case_ids(config.score_on))} cases).",
        "",
        f"Features: {FEATURES[rows[0]['features']]} ({rows[0]['channels']} channels), from "
        "each network as `ctxrestore finetune` with these options would start it, untrained. "
        "A class-weighted logistic regression is fitted on the training samples and scored as "
        "balanced accuracy (mean recall over the classes present), at most "
        f"{config.max_samples_per_class} samples per class and split.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for rank, row in enumerate(ranked, 1):
        init = f"`{row['init']}`" + (f" (weights {row['init_weights']})"
                                      if row["init_weights"] else "")  # fmt: skip
        recalls = [_score(row[key]) for key in recall_names]
        score = f"**{_score(row['balanced_accuracy'])}**"
        cells = [str(rank), init, score, *recalls, str(row["scored_samples"])]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "How to read it: the probe tells what a linear head could read from the starting "
        "features before any fine-tuning step, in seconds to minutes. Between pretrainings of "
        "one recipe (seeds, machines) it told the weak draws from the strong ones in the order "
        "of their fine-tuned box error, on every split tried (docs/experiments.md 48-49): "
        "pretrain more than once and fine-tune the draw it reads best; differences of a few "
        "thousandths are not a ranking. Between different pretexts it does not predict "
        "transfer (a dense contrastive pretext probed best of all and gained 1%; experiment "
        "38), and it is no substitute for fine-tuning the one you keep. Scored on the "
        "validation split it uses no test image.",
    ]
    return "\n".join(lines) + "\n"
