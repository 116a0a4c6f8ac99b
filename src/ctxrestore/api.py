"""The Python API. Each verb is one keyword-only function; the CLI registers the same function,
so the help texts and defaults below are the only list of options."""

from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated

import torch
import typer

from ctxrestore.bench import BenchmarkOptions, BenchmarkResult, run_ablation, run_benchmark
from ctxrestore.bench.comparison import compare_runs, parse_arm
from ctxrestore.data import list_phantoms
from ctxrestore.data.intensity import CT_WINDOWS, MODALITIES
from ctxrestore.data.phantoms.export import export_phantom
from ctxrestore.data.phantoms.gallery import phantom_gallery
from ctxrestore.engine.distributed import on_main, setup_distributed
from ctxrestore.files import atomic_write
from ctxrestore.models import PRETRAINING_NETWORKS
from ctxrestore.pretext import list_pretexts
from ctxrestore.pretext.restoration import RESTORATION_LOSSES
from ctxrestore.pretext.training import PretrainConfig, PretrainResult, run_pretraining
from ctxrestore.pretext.training import load_pretrained as _load_pretrained
from ctxrestore.tasks.localize import BOX_HEADS
from ctxrestore.tasks.predict import PredictResult, run_prediction
from ctxrestore.tasks.probe import ProbeConfig, ProbeResult, run_probe
from ctxrestore.tasks.training import TASK_NAMES, FinetuneConfig, FinetuneResult, run_finetuning

logger = logging.getLogger(__name__)

Network = Enum("Network", {name: name for name in PRETRAINING_NETWORKS}, type=str)
Phantom = Enum("Phantom", {name: name for name in list_phantoms()}, type=str)
Method = Enum("Method", {name: name for name in list_pretexts()}, type=str)
Task = Enum("Task", {name: name for name in TASK_NAMES}, type=str)
RestorationLoss = Enum("RestorationLoss", {name: name for name in RESTORATION_LOSSES}, type=str)
BoxHead = Enum("BoxHead", {name: name for name in BOX_HEADS}, type=str)
_BoxHead = Annotated[
    BoxHead,
    typer.Option(
        help="localize: 'regression' (the paper's: one more conv stage and a fully connected "
        "box regression; only the encoder is pretrained) or 'mask' (a U-Net that predicts each "
        "organ's mask, or its filled box without label maps, and boxes it; its decoder transfers "
        "too, from a sononet_unet pretraining) or 'segment' (the same U-Net segmenting the "
        "organs with one softmax over background and organs, as the segment task; needs label "
        "maps)."
    ),
]
_Projector = Annotated[
    str | None,
    typer.Option(
        help="dense_contrastive and context_restoration_dense: mlp (SimCLR's projection of the "
        "points' features; the default) or none (InfoNCE on the decoder's features themselves, "
        "the ones a segmentation-style head reads)."
    ),
]
_ContrastiveWeight = Annotated[
    float | None,
    typer.Option(
        help="context_restoration_contrastive and context_restoration_dense: weight of the "
        "contrastive term against the restoration term's 1, both normalised (default 1; 0: "
        "restoration of augmented views only)."
    ),
]
_DenseViews = Annotated[
    str | None,
    typer.Option(
        help="context_restoration_dense: read the points in the swapped views (corrupted; "
        "the default, one pass restores both views) or in the clean ones (clean; the first "
        "view alone is swapped and restored, in the same pass)."
    ),
]
_DenseLevel = Annotated[
    int | None,
    typer.Option(
        help="dense_contrastive and context_restoration_dense: read the points at the "
        "decoder's output (0, the default) or this many levels below it (1: half the "
        "resolution; the restoration head then has the output's channels to itself)."
    ),
]
_Placement = Annotated[
    str | None,
    typer.Option(
        help="context_restoration and its hybrids: where the swapped patches go. uniform (the "
        "paper's and the default: each pair isolated, swaps drawn independently) or "
        "poisson_disc (all 2T patches isolated and spread over the image, as Dominic et al. "
        "2023 found best with 32x32 patches; where they do not fit, fewer swaps)."
    ),
]
_RestorationLoss = Annotated[
    RestorationLoss,
    typer.Option(
        help="Loss of the restoration pretexts (context_restoration, autoencoder, "
        "models_genesis, context_restoration_contrastive) against the clean image: mse (the "
        "paper's), l1, or l1_gradient (L1 plus a gradient difference term that charges for "
        "blurred edges)."
    ),
]


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


def _value(option: object) -> object:
    return option.value if isinstance(option, Enum) else option


# Options of every command that reads files: one help text each.
Modality = Enum("Modality", {name: name for name in MODALITIES}, type=str)
_Modality = Annotated[
    Modality | None,
    typer.Option(
        help="Intensity preprocessing of files: ct (HU window), mr (robust z-score in the "
        "foreground, per volume and channel), us (scaled to [0, 1]), generic (0.5-99.5 "
        "percentiles to [0, 1]). Default: when fine-tuning the --init run's, else generic."
    ),
]
_Window = Annotated[
    str | None,
    typer.Option(
        help=f"CT window: a preset ({', '.join(CT_WINDOWS)}; default abdomen) or 'low,high' in HU."
    ),
]
_TargetSpacing = Annotated[
    str | None,
    typer.Option(
        help="Resample to this spacing in mm first: one value for every axis, or 'z,y,x'. "
        "Default: keep each file's spacing."
    ),
]
_SliceAxis = Annotated[
    int, typer.Option(help="2D networks on volumes: slice along this array axis (0 z, 1 y, 2 x).")
]
_Cache = Annotated[
    bool,
    typer.Option(help="Keep preprocessed arrays on disk, so later epochs and runs decode nothing."),
]
_CacheDir = Annotated[
    Path | None,
    typer.Option(help="Cache folder; default $CTXRESTORE_CACHE_DIR or ~/.cache/ctxrestore."),
]
_SkipBad = Annotated[
    bool,
    typer.Option(
        help="Skip unreadable or inconsistent files with a warning (and count them) instead of "
        "stopping before training."
    ),
]


def pretrain(
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Unlabelled images: a folder (read recursively: NIfTI, NRRD, MHA, DICOM files "
            "and series, PNG/JPEG/TIFF/NumPy), a classification CSV or an MSD folder "
            "(dataset.json; images only). Omit it to pretrain on a built-in phantom."
        ),
    ] = None,
    *,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoint, logs, previews.")] = Path(
        "runs/pretrain"
    ),
    phantom: Annotated[
        Phantom, typer.Option(help="Built-in phantom used when DATA is omitted.")
    ] = "shapes",
    num_images: Annotated[int, typer.Option(help="Number of phantom images.")] = 2000,
    method: Annotated[
        Method, typer.Option(help="Pretext task (context_restoration is the paper's method).")
    ] = "context_restoration",
    network: Annotated[
        Network,
        typer.Option(
            help="Image-to-image network whose encoder is pretrained: unet (segmentation), "
            "sononet (SonoNet encoder, the paper's light decoder: classify, localize), "
            "sononet_unet (SonoNet encoder under a U-Net decoder with skips)."
        ),
    ] = "unet",
    width: Annotated[
        int, typer.Option(help="Channels of the first stage (doubled per stage in a U-Net).")
    ] = 16,
    spatial_dims: _SpatialDims = 2,
    image_size: Annotated[
        int, typer.Option(help="Images are resized to this size along every axis.")
    ] = 64,
    in_channels: Annotated[
        int | None, typer.Option(help="Input channels; default: as found in the data.")
    ] = None,
    num_swaps: Annotated[int, typer.Option(help="T, patch pairs swapped per image.")] = 20,
    num_swaps_max: Annotated[
        int | None, typer.Option(help="If set, T is drawn per image in [num_swaps, this].")
    ] = None,
    patch_size: Annotated[int, typer.Option(help="Side of the swapped patches, in pixels.")] = 8,
    foreground_threshold: Annotated[
        float | None,
        typer.Option(
            help="Avoid swapping patches whose values all lie at or below this; "
            "dense_contrastive and context_restoration_dense: draw their points only where some "
            "channel exceeds this."
        ),
    ] = None,
    restoration_loss: _RestorationLoss = "mse",
    contrastive_weight: _ContrastiveWeight = None,
    projector: _Projector = None,
    dense_views: _DenseViews = None,
    dense_level: _DenseLevel = None,
    placement: _Placement = None,
    batch_size: Annotated[int, typer.Option(help="Images per step, over all processes.")] = 32,
    epochs: Annotated[int, typer.Option(help="Passes over the data (unless --max-steps).")] = 10,
    max_steps: Annotated[
        int | None, typer.Option(help="Stop after this many steps (overrides --epochs).")
    ] = None,
    learning_rate: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up, then cosine decay.")] = 50,
    seed: Annotated[int, typer.Option(help="Seed of weights, data order and swaps.")] = 0,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on a GPU.")] = "auto",
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between rows of log.csv.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    preview_every: Annotated[
        int, typer.Option(help="Steps between preview grids (0: only at the end).")
    ] = 0,
    compile: Annotated[bool, typer.Option(help="torch.compile the network.")] = False,
    modality: _Modality = None,
    window: _Window = None,
    target_spacing: _TargetSpacing = None,
    slice_axis: _SliceAxis = 0,
    cache: _Cache = True,
    cache_dir: _CacheDir = None,
    skip_bad: _SkipBad = False,
    init: Annotated[
        Path | None,
        typer.Option(
            help="Start from another run's weights (a pretraining or fine-tuning folder): its "
            "encoder, and its decoder where the network has the same one; the pretext's head "
            "starts random. For a second pretext after a first, e.g. dense_contrastive after "
            "context_restoration."
        ),
    ] = None,
    freeze_encoder: Annotated[
        bool,
        typer.Option(
            help="With --init: keep its encoder fixed (weights and normalisation statistics) "
            "and train only the decoder and the pretext's head, e.g. a dense decoder over "
            "context restoration's encoder."
        ),
    ] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
) -> PretrainResult:
    """Pretrain a network by context restoration on unlabelled images.

    Writes OUT/model.safetensors + OUT/spec.json (load with `load_pretrained`), log.csv,
    loss.png, preview.png and metrics.json. Runs under torchrun for several GPUs or nodes.
    """
    options = {key: _value(value) for key, value in locals().items()}
    config = PretrainConfig(**options)
    result = run_pretraining(config)
    logger.info("pretrained %d steps; wrote %s", result.steps, result.out)
    return result


def load_pretrained(folder: Path | str, device: str = "cpu") -> torch.nn.Module:
    """Rebuild a pretrained network from its folder (spec.json + model.safetensors), in eval
    mode on `device`. Errors name the folder when files are missing or do not fit."""
    return _load_pretrained(folder, device)


# Options that `finetune` and `probe` share (the probed network is the fine-tuning's).
_TaskPhantom = Annotated[
    Phantom | None,
    typer.Option(help="Phantom used when DATA is omitted (default: the task's)."),
]
_NumImages = Annotated[int, typer.Option(help="Phantom images (cases) in all splits.")]
_SpatialDims = Annotated[int, typer.Option(help="2 for images, 3 for volumes.")]
_RandomWidth = Annotated[
    int, typer.Option(help="First-stage channels of a randomly initialised network.")
]
_TestFraction = Annotated[float, typer.Option(help="Cases held out for the test.")]
_ValFraction = Annotated[float, typer.Option(help="Cases held out for validation.")]
_AdaptChannels = Annotated[
    bool,
    typer.Option(help="Repeat / average the first pretrained layer over other channel counts."),
]


def finetune(
    task: Annotated[Task, typer.Argument(help="classify, localize or segment.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled data: class sub-folders or a CSV of (image, label) (classify); an "
            "MSD/nnU-Net folder with dataset.json (segment; localize, with boxes.csv or boxes "
            "from the masks). Omit it to use the task's built-in phantom (ultrasound, abdomen, "
            "brain)."
        ),
    ] = None,
    *,
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, split, metrics, report.")] = (
        Path("runs/finetune")
    ),
    init: Annotated[
        str, typer.Option(help="A pretraining run folder, or 'random' for no pretraining.")
    ] = "random",
    fraction: Annotated[
        str,
        typer.Option(
            help="Labelled training cases: a fraction ('0.1', '10%') of the training pool or a "
            "count ('25')."
        ),
    ] = "1.0",
    phantom: _TaskPhantom = None,
    num_images: _NumImages = 1000,
    spatial_dims: _SpatialDims = 2,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Images are resized to this size per axis; default 128 for localize, "
            "64 for the others."
        ),
    ] = None,
    width: _RandomWidth = 16,
    test_fraction: _TestFraction = 0.2,
    val_fraction: _ValFraction = 0.1,
    batch_size: Annotated[int, typer.Option(help="Images per step, over all processes.")] = 16,
    epochs: Annotated[
        int, typer.Option(help="Epochs (at least 20 steps each) unless stopped early.")
    ] = 30,
    max_steps: Annotated[int | None, typer.Option(help="Stop after this many steps.")] = None,
    learning_rate: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = 1e-3,
    pretrained_lr_scale: Annotated[
        float, typer.Option(help="Learning-rate factor of the pretrained layers (<= 1).")
    ] = 1.0,
    freeze_encoder: Annotated[
        bool,
        typer.Option(
            help="Keep the encoder fixed (pretrained, or with --init random its random weights, "
            "normalisation statistics estimated from the training images: the random-features "
            "control); train the rest."
        ),
    ] = False,
    transfer_stages: Annotated[
        int | None,
        typer.Option(
            help="Transfer only the first N encoder stages (the deeper ones and the decoder "
            "start random); default: all that fit."
        ),
    ] = None,
    fresh_decoder_levels: Annotated[
        int,
        typer.Option(
            help="The last N levels of a transferred decoder (nearest the output, which served "
            "the pretext's own output) start random; 0: the whole decoder transfers."
        ),
    ] = 0,
    head_only_steps: Annotated[
        int,
        typer.Option(
            help="Hold the pretrained layers for the first N steps while the new head learns, "
            "then warm them up and train everything (LP-FT); 0: all layers from the start."
        ),
    ] = 0,
    box_head: _BoxHead = "regression",
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up, then cosine decay.")] = 20,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-4,
    patience: Annotated[
        int,
        typer.Option(
            help="Stop after this many validations without improvement; 0: never stop early "
            "(the whole schedule runs, the best validation is kept)."
        ),
    ] = 10,
    augment: Annotated[
        bool, typer.Option(help="Affine + intensity augmentation (never left-right flips).")
    ] = True,
    balance: Annotated[bool, typer.Option(help="Weight the loss against class imbalance.")] = True,
    adapt_channels: _AdaptChannels = False,
    seed: Annotated[
        int, typer.Option(help="Seed of the split, the new weights and the order.")
    ] = 0,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on a GPU.")] = "auto",
    num_workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 0,
    log_every: Annotated[int, typer.Option(help="Steps between rows of log.csv.")] = 10,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 500,
    preview_every: Annotated[
        int, typer.Option(help="Steps between preview images (0: only at the end).")
    ] = 0,
    compile: Annotated[bool, typer.Option(help="torch.compile the network.")] = False,
    figures: Annotated[
        bool, typer.Option(help="Draw the report's curves and test pictures.")
    ] = True,
    modality: _Modality = None,
    window: _Window = None,
    target_spacing: _TargetSpacing = None,
    slice_axis: _SliceAxis = 0,
    cache: _Cache = True,
    cache_dir: _CacheDir = None,
    skip_bad: _SkipBad = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out.")] = False,
) -> FinetuneResult:
    """Fine-tune a network for a task, from a pretraining run or from random weights.

    Splits the cases into train (the labelled fraction) / validation / test (fixed by the seed,
    the same for every fraction), trains with validation every epoch and early stopping, keeps
    the best weights in OUT/best/, tests them and writes OUT/metrics.json and OUT/report.md.
    """
    options = {key: _value(value) for key, value in locals().items()}
    result = run_finetuning(FinetuneConfig(**options))
    logger.info(
        "fine-tuned %d steps; test metrics in %s", result.steps, result.out / "metrics.json"
    )
    return result


# Options that `benchmark` and `ablate` share: one help text each.
_BenchData = Annotated[
    Path | None,
    typer.Argument(
        help="Labelled data, as for finetune. Omit it to use the task's phantom (ultrasound, "
        "abdomen, brain), whose unlabelled images are then pretrained on too."
    ),
]
_BenchTask = Annotated[Task, typer.Option(help="classify, localize or segment.")]
_Fractions = Annotated[
    str,
    typer.Option(help="Comma-separated label fractions ('0.1', '10%') or case counts ('25')."),
]
_Seeds = Annotated[
    int | None,
    typer.Option(
        help="Fine-tuning seeds per fraction (split, head, order); default 3 on CPU, 5 on a GPU."
    ),
]
_Metric = Annotated[
    str | None,
    typer.Option(
        help="Test metric to summarise; default macro_f1 (classify), wall_mm/mean "
        "(localize, lower is better), global_dice/mean (segment)."
    ),
]
_BenchNetwork = Annotated[
    Network | None,
    typer.Option(
        help="Pretrained network; default sononet (classify, localize), unet (segment), "
        "sononet_unet (localize --box-head mask). sononet_unet: the classify / localize encoder "
        "under a U-Net decoder with skips."
    ),
]
_BenchWidth = Annotated[int, typer.Option(help="Channels of the first encoder stage.")]
_BenchImageSize = Annotated[
    int | None,
    typer.Option(
        help="Images are resized to this size per axis; default 128 for localize, "
        "64 for the others."
    ),
]
_BenchImages = Annotated[int, typer.Option(help="Labelled phantom cases (all splits).")]
_PretrainData = Annotated[
    Path | None,
    typer.Option(
        help="Unlabelled images to pretrain on (any layout pretrain reads); default: DATA's "
        "images, or the phantom's without DATA."
    ),
]
_PretrainImages = Annotated[int, typer.Option(help="Unlabelled phantom images to pretrain on.")]
_PretrainSteps = Annotated[int, typer.Option(help="Pretraining steps, the same for every method.")]
_PretrainBatch = Annotated[int, typer.Option(help="Pretraining images per step.")]
_PretrainRate = Annotated[float, typer.Option(help="Pretraining AdamW peak learning rate.")]
_PretrainSeeds = Annotated[
    int,
    typer.Option(
        help="Pretrain each initialisation this many times (seeds 0..K-1); fine-tuning seed s "
        "starts from pretraining s mod K. K > 1: the paired intervals also cover the "
        "variation between pretraining runs (pairs that share one count once); 1 (default): "
        "one pretraining, which every seed shares."
    ),
]
_BenchBatch = Annotated[int, typer.Option(help="Fine-tuning images per step.")]
_BenchEpochs = Annotated[
    int, typer.Option(help="Fine-tuning epochs (an epoch is at least 20 steps).")
]
_BenchMaxSteps = Annotated[int | None, typer.Option(help="Stop each fine-tuning at this step.")]
_BenchRate = Annotated[float, typer.Option(help="Fine-tuning AdamW peak learning rate.")]
_BenchLrScale = Annotated[
    float, typer.Option(help="Learning-rate factor of the pretrained layers (<= 1).")
]
_BenchTransferStages = Annotated[
    int | None,
    typer.Option(
        help="Transfer only the first N encoder stages of each pretraining; default: all."
    ),
]
_BenchFreshDecoder = Annotated[
    int,
    typer.Option(
        help="The last N decoder levels of each pretraining start random (segment, localize "
        "--box-head mask); 0: the whole decoder transfers."
    ),
]
_BenchHeadOnly = Annotated[
    int,
    typer.Option(
        help="Pretrained initialisations hold their pretrained layers for the first N "
        "fine-tuning steps while the new head learns (LP-FT); random weights train at once."
    ),
]
_BenchFreeze = Annotated[
    bool,
    typer.Option(
        help="Frozen-feature evaluation: every initialisation's encoder stays fixed (random "
        "weights too: random features), only the decoder / head trains. Tells what each "
        "pretext's encoder alone carries."
    ),
]
_BenchPatience = Annotated[
    int,
    typer.Option(
        help="Stop fine-tuning after this many validations without improvement; 0 (default): "
        "never stop early, the whole schedule runs and the best validation is kept, so a lucky "
        "early score cannot end one arm's run (docs/experiments.md, 16)."
    ),
]
_BenchResume = Annotated[
    bool,
    typer.Option(
        help="Continue interrupted runs from their last checkpoint (--no-resume: restart them). "
        "Finished runs are always skipped."
    ),
]


def benchmark(
    data: _BenchData = None,
    *,
    task: _BenchTask,
    out: Annotated[
        Path, typer.Option(help="Folder for the runs, results.csv, summary, plot and report.")
    ] = Path("runs/benchmark"),
    fractions: _Fractions = "0.05,0.1,0.25,0.5,1.0",
    methods: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated initialisations: 'random', pretext names, 'random_xK' "
            "(random weights fine-tuned K times as long: if they catch up, a pretrained gain is "
            "a head start) and 'FIRST_then_SECOND' (two pretexts: SECOND pretrained over "
            "FIRST's pretraining with its encoder fixed; FIRST must be named too); default: "
            "random and the paper's pretexts (every registered one but "
            "contrastive, context_restoration_contrastive, dense_contrastive and "
            "context_restoration_dense, which run only when named)."
        ),
    ] = None,
    seeds: _Seeds = None,
    metric: _Metric = None,
    network: _BenchNetwork = None,
    width: _BenchWidth = 16,
    image_size: _BenchImageSize = None,
    num_images: _BenchImages = 1000,
    pretrain_data: _PretrainData = None,
    pretrain_images: _PretrainImages = 2000,
    pretrain_steps: _PretrainSteps = 6000,
    pretrain_batch_size: _PretrainBatch = 32,
    pretrain_learning_rate: _PretrainRate = 1e-3,
    pretrain_seeds: _PretrainSeeds = 1,
    patch_size: Annotated[
        int, typer.Option(help="Side of the swapped / masked patches (pretexts that use one).")
    ] = 8,
    num_swaps: Annotated[int, typer.Option(help="T, context restoration's swaps per image.")] = 20,
    foreground_threshold: Annotated[
        float | None,
        typer.Option(
            help="Avoid patches whose values all lie at or below this (dense_contrastive and "
            "context_restoration_dense: their points lie where some channel exceeds this)."
        ),
    ] = None,
    restoration_loss: _RestorationLoss = "mse",
    contrastive_weight: _ContrastiveWeight = None,
    projector: _Projector = None,
    dense_views: _DenseViews = None,
    dense_level: _DenseLevel = None,
    placement: _Placement = None,
    batch_size: _BenchBatch = 16,
    epochs: _BenchEpochs = 60,
    max_steps: _BenchMaxSteps = None,
    learning_rate: _BenchRate = 1e-3,
    pretrained_lr_scale: _BenchLrScale = 1.0,
    transfer_stages: _BenchTransferStages = None,
    fresh_decoder_levels: _BenchFreshDecoder = 0,
    head_only_steps: _BenchHeadOnly = 0,
    freeze_encoder: _BenchFreeze = False,
    box_head: _BoxHead = "regression",
    patience: _BenchPatience = 0,
    modality: _Modality = None,
    window: _Window = None,
    target_spacing: _TargetSpacing = None,
    slice_axis: _SliceAxis = 0,
    cache: _Cache = True,
    cache_dir: _CacheDir = None,
    skip_bad: _SkipBad = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on a GPU.")] = "auto",
    resume: _BenchResume = True,
) -> BenchmarkResult:
    """Compare initialisations over label fractions and seeds: is pretraining worth it here?

    Pretrains every method (same network, steps x batch and images; once, or --pretrain-seeds
    times) into OUT/pretrain/, fine-tunes each one and random weights with the same recipe for
    every fraction x seed into OUT/runs/, and writes OUT/results.csv (one row per run),
    summary.csv (mean and 95% interval per fraction x method, paired difference from random),
    plot.png and report.md. Rerunning skips finished runs and continues interrupted ones; other
    settings in the same OUT are refused.
    """
    options = {key: _value(value) for key, value in locals().items()}
    methods = options.pop("methods")
    return run_benchmark(BenchmarkOptions(**options), methods)


def ablate(
    data: _BenchData = None,
    *,
    task: _BenchTask,
    out: Annotated[
        Path, typer.Option(help="Folder for the runs, results.csv, summary, plot and report.")
    ] = Path("runs/ablation"),
    patch_sizes: Annotated[
        str, typer.Option(help="Patch sizes; the first is the default the others are varied from.")
    ] = "8,4,16",
    num_swaps: Annotated[
        str, typer.Option(help="Swaps per image (T); the first is the default.")
    ] = "20,5,50",
    placements: Annotated[
        str,
        typer.Option(
            help="uniform, foreground (avoid background patches) and/or poisson_disc (all "
            "patches isolated and spread); the first is the default."
        ),
    ] = "uniform,foreground",
    foreground_threshold: Annotated[
        float,
        typer.Option(help="Foreground placement: values at or below this are background."),
    ] = 0.0,
    controls: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated random_xK: random weights fine-tuned K times as long, so the "
            "report says whether each setting's gain is a head start (as benchmark --methods)."
        ),
    ] = None,
    pretrain_lengths: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated pretraining steps to compare with --pretrain-steps (the "
            "default setting's), one arm each: does longer pretraining transfer better?"
        ),
    ] = None,
    fractions: _Fractions = "0.1",
    seeds: _Seeds = None,
    metric: _Metric = None,
    network: _BenchNetwork = None,
    width: _BenchWidth = 16,
    image_size: _BenchImageSize = None,
    num_images: _BenchImages = 1000,
    pretrain_data: _PretrainData = None,
    pretrain_images: _PretrainImages = 2000,
    pretrain_steps: _PretrainSteps = 6000,
    pretrain_batch_size: _PretrainBatch = 32,
    pretrain_learning_rate: _PretrainRate = 1e-3,
    pretrain_seeds: _PretrainSeeds = 1,
    restoration_loss: _RestorationLoss = "mse",
    batch_size: _BenchBatch = 16,
    epochs: _BenchEpochs = 60,
    max_steps: _BenchMaxSteps = None,
    learning_rate: _BenchRate = 1e-3,
    pretrained_lr_scale: _BenchLrScale = 1.0,
    transfer_stages: _BenchTransferStages = None,
    fresh_decoder_levels: _BenchFreshDecoder = 0,
    head_only_steps: _BenchHeadOnly = 0,
    freeze_encoder: _BenchFreeze = False,
    box_head: _BoxHead = "regression",
    patience: _BenchPatience = 0,
    modality: _Modality = None,
    window: _Window = None,
    target_spacing: _TargetSpacing = None,
    slice_axis: _SliceAxis = 0,
    cache: _Cache = True,
    cache_dir: _CacheDir = None,
    skip_bad: _SkipBad = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    precision: Annotated[Precision, typer.Option(help="auto: bf16 autocast on a GPU.")] = "auto",
    resume: _BenchResume = True,
) -> BenchmarkResult:
    """Ablate context restoration's patch size, T, placement and pretraining length on one
    task.

    Varies one setting at a time around the default (the first value of each list), pretrains
    each (once, or --pretrain-seeds times) and fine-tunes it and random weights for every
    fraction x seed, with the benchmark's statistics, plot and report in OUT.
    """
    options = {key: _value(value) for key, value in locals().items()}
    ablation = {key: options.pop(key) for key in
                ("patch_sizes", "num_swaps", "placements", "foreground_threshold",
                 "controls", "pretrain_lengths")}  # fmt: skip
    return run_ablation(BenchmarkOptions(**options), **ablation)


def compare(
    *,
    arm: Annotated[
        list[str],
        typer.Option(
            help="NAME=RUNS: an initialisation and its fine-tuning run folders (a folder or a "
            "quoted glob pattern such as 'runs/random_s*'); give --arm once per "
            "initialisation, or again with the same NAME to add runs (runs of one seed from "
            "several pretrainings are averaged within the seed)."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="Folder for results.csv, summary.csv, plot.png and report.md.")
    ] = Path("runs/comparison"),
    reference: Annotated[
        str | None,
        typer.Option(help="The initialisation the others are paired against; default: the first."),
    ] = None,
    metric: _Metric = None,
) -> BenchmarkResult:
    """Compare fine-tuning runs made one by one, with the benchmark's statistics.

    Runs pair by label fraction and seed, as in `benchmark`; each pair must share its split.
    Writes OUT/results.csv, summary.csv (mean and 95% interval per fraction x initialisation,
    paired difference from the reference), plot.png and report.md, which also lists the
    fine-tuning settings that differ between the initialisations and which runs share a
    pretraining (their intervals are then over pretrainings).
    """
    arms: dict[str, list[str]] = {}
    for text in arm:
        name, runs = parse_arm(text)
        arms.setdefault(name, []).append(runs)
    # Under torchrun, rank 0 alone reads the runs and writes the outputs.
    return on_main(setup_distributed(), compare_runs, out, arms, reference=reference,
                   metric=metric)  # fmt: skip


def probe(
    task: Annotated[Task, typer.Argument(help="classify, localize or segment.")],
    data: Annotated[
        Path | None,
        typer.Argument(help="Labelled data, as for finetune; omit it for the task's phantom."),
    ] = None,
    *,
    init: Annotated[
        list[str],
        typer.Option(
            help="A pretraining run folder, a quoted glob pattern of them (several "
            "pretrainings of one recipe: 'runs/pre_s*'), or 'random'; give --init once per "
            "initialisation or pattern."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Folder for probe.csv, probe.json and report.md.")] = (
        Path("runs/probe")
    ),
    fraction: Annotated[
        str,
        typer.Option(
            help="Labelled training cases the probe is fitted on, as finetune's --fraction (the "
            "same seed and fraction give the same split)."
        ),
    ] = "1.0",
    seed: Annotated[
        int, typer.Option(help="Seed of the split (and of random weights), as finetune's.")
    ] = 0,
    score_on: Annotated[
        str,
        typer.Option(
            help="Split the probe is scored on: val (choose a pretraining without touching the "
            "test split) or test."
        ),
    ] = "val",
    max_samples_per_class: Annotated[
        int,
        typer.Option(help="Samples (voxels, or images for classify) kept per class and split."),
    ] = 20_000,
    phantom: _TaskPhantom = None,
    num_images: _NumImages = 1000,
    spatial_dims: _SpatialDims = 2,
    image_size: Annotated[
        int | None,
        typer.Option(help="As finetune's: default 128 for localize, 64 for the others."),
    ] = None,
    width: _RandomWidth = 16,
    test_fraction: _TestFraction = 0.2,
    val_fraction: _ValFraction = 0.1,
    box_head: _BoxHead = "regression",
    transfer_stages: Annotated[
        int | None,
        typer.Option(help="As finetune's: transfer only the first N encoder stages."),
    ] = None,
    fresh_decoder_levels: Annotated[
        int, typer.Option(help="As finetune's: the last N decoder levels start random.")
    ] = 0,
    adapt_channels: _AdaptChannels = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    modality: _Modality = None,
    window: _Window = None,
    target_spacing: _TargetSpacing = None,
    slice_axis: _SliceAxis = 0,
    cache: _Cache = True,
    cache_dir: _CacheDir = None,
    skip_bad: _SkipBad = False,
) -> ProbeResult:
    """Rank initialisations before fine-tuning by a linear probe of their features.

    Builds each network as `finetune` with the same options would start it, fits a
    class-weighted logistic regression on the features its new head would read (per voxel for
    segment and localize, per image for classify) over the labelled training split, and scores
    it on the validation split as balanced accuracy. Writes OUT/probe.csv, probe.json and
    report.md. Use it to choose between pretrainings of one recipe, then fine-tune the best.
    """
    options = {key: _value(value) for key, value in locals().items()}
    # Under torchrun rank 0 alone probes and writes, and hands every process the result.
    result = on_main(setup_distributed(options["device"]), run_probe, ProbeConfig(**options))
    best = result.best()
    logger.info(
        "best: %s (balanced accuracy %.3f on %s); report in %s",
        best["init"], best["balanced_accuracy"], best["scored_on"], result.out / "report.md",
    )  # fmt: skip
    return result


def predict(
    run: Annotated[Path, typer.Argument(help="A fine-tuning run folder.")],
    images: Annotated[
        Path,
        typer.Argument(
            help="An image file, a folder (read recursively: NIfTI, NRRD, MHA, DICOM files and "
            "series, PNG/JPEG/TIFF/NumPy), or an MSD/nnU-Net folder."
        ),
    ],
    *,
    out: Annotated[Path, typer.Option(help="Folder for the predictions.")] = Path("predictions"),
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images (or slices) per forward pass.")] = 16,
    skip_bad: _SkipBad = False,
) -> PredictResult:
    """Predict new images with a fine-tuned run (its best checkpoint).

    classify: OUT/predictions.csv; localize: OUT/boxes.csv; segment: one label map per image
    (NIfTI on the input's grid and position, or PNG for 2D images). OUT/predictions.png shows
    some of them. Inputs are preprocessed as the run's training data was (its spec).
    """
    context = setup_distributed(_value(device))  # under torchrun rank 0 alone predicts
    result = on_main(context, run_prediction, run, images, out, device=_value(device),
                     batch_size=batch_size, skip_bad=skip_bad)  # fmt: skip
    logger.info("predicted %d inputs into %s", result.count, result.out)
    return result


DEMO_TASKS = {"classify": "ultrasound", "localize": "abdomen", "segment": "brain"}
# Benchmark settings of `demo` for every task. Quick: two initialisations, one fraction, a
# minute or two on 2 CPU cores. Default: all six initialisations, 10% and 100% of the labels,
# 3 seeds, at each task's default image size (64; localisation at 96, below; relative
# position needs at least 60 pixels for its 3x3 grid of 16-pixel patches); 23.7 minutes on 2
# CPU cores (target: 30; docs/experiments.md, 7). Both are far from converged: read them as a
# working pipeline with honest statistics, not as the method's merit (see `benchmark` for
# real settings).
DEMO_SETTINGS = {
    True: dict(methods="random,context_restoration", fractions="0.25", seeds=2, image_size=32,
               width=4, num_images=60, pretrain_images=64, pretrain_steps=10,
               pretrain_batch_size=16, patch_size=4, num_swaps=10, batch_size=8,
               max_steps=10),
    False: dict(methods=None, fractions="0.1,1.0", seeds=3, image_size=None, width=8,
                num_images=240, pretrain_images=1000, pretrain_steps=100,
                pretrain_batch_size=32, patch_size=8, num_swaps=20, batch_size=16,
                max_steps=50),
}  # fmt: skip
# The default demo's localisation at 96 px instead of the task's 128: at the demo's 50-60 steps
# neither size learns more than the average box (docs/experiments.md, 4), and 128 px alone
# took 18 of the demo's 36 minutes on 2 cores.
DEMO_TASK_SETTINGS = {True: {}, False: {"localize": {"image_size": 96}}}


def demo(
    *,
    out: Annotated[Path, typer.Option(help="Folder for the demo's runs and report.md.")] = Path(
        "runs/demo"
    ),
    quick: Annotated[
        bool, typer.Option(help="Two initialisations, one fraction: under a minute on a CPU.")
    ] = False,
    device: Annotated[Device, typer.Option(help="auto: CUDA when present.")] = "auto",
) -> Path:
    """The whole pipeline on built-in phantoms, with no data and no network access.

    For each task (classify on ultrasound, localize on abdomen, segment on brain): pretrain
    every initialisation, fine-tune it on few and on all labels over several seeds, test, and
    compare with random initialisation (`benchmark`). Writes OUT/report.md with each task's
    table, plot and verdict, a context-restoration preview and labelled phantom samples.
    Interrupted? Run it again: finished runs are skipped.
    """
    out = Path(out)
    settings = DEMO_SETTINGS[quick]
    lines = [
        "# ctxrestore demo",
        "",
        "Pretraining -> fine-tuning -> test on the built-in phantoms, for the paper's three "
        "tasks, with small settings that run on a laptop CPU: far from converged, so read the "
        "numbers as what this budget gives, not as the method's merit. "
        f"Settings: {settings}.",
        "",
    ]
    for task, phantom in DEMO_TASKS.items():
        task_settings = {**settings, **DEMO_TASK_SETTINGS[quick].get(task, {})}
        result = benchmark(task=task, out=out / task, device=_value(device), **task_settings)
        preview = out / task / "pretrain" / "context_restoration" / "preview.png"
        task_report = result.report.read_text().splitlines()
        lines += [f"## {task} ({phantom} phantom)", ""]
        # The task report, one heading level down, with its links made relative to OUT.
        for line in task_report[1:]:
            line = "#" + line if line.startswith("#") else line
            lines.append(line.replace("](", f"]({task}/").replace(f"]({task}/http", "](http"))
        if preview.is_file():
            lines += ["", f"Context restoration on held-out {phantom} images (original / "
                      "corrupted / restored):", "", f"![preview]({task}/pretrain/"
                      "context_restoration/preview.png)", ""]  # fmt: skip
    lines += [
        "## The built-in phantoms",
        "",
        "Samples with their labels (classes, organ masks and boxes, BraTS tumour labels); "
        "`ctxrestore phantoms NAME --out DIR` writes them as files.",
        "",
    ]
    for phantom in DEMO_TASKS.values():
        lines += [f"![{phantom} phantom](phantoms/{phantom}.png)", ""]
    # Under torchrun rank 0 alone draws and writes (the benchmarks above did the same).
    context = setup_distributed(_value(device))
    return on_main(context, _write_demo_report, out, "\n".join(lines), settings["image_size"])


def _write_demo_report(out: Path, text: str, image_size: int | None) -> Path:
    for phantom in DEMO_TASKS.values():
        gallery = out / "phantoms" / f"{phantom}.png"
        phantom_gallery(phantom, gallery, count=6, image_size=image_size or 64)
    report = out / "report.md"
    atomic_write(report, lambda temporary: temporary.write_text(text))
    logger.info("demo report: %s", report)
    return report


def phantoms(
    name: Annotated[Phantom, typer.Argument(help="Which built-in phantom to write.")],
    *,
    out: Annotated[Path, typer.Option(help="New folder for the images and labels.")],
    count: Annotated[int, typer.Option("--n", "--count", help="Number of samples.")] = 100,
    spatial_dims: Annotated[
        int, typer.Option("--dims", "--spatial-dims", help="2 for images, 3 for volumes.")
    ] = 2,
    image_size: Annotated[int, typer.Option(help="Size along every axis, in voxels.")] = 128,
    seed: Annotated[int, typer.Option(help="Sample i depends on (seed, i) only.")] = 0,
) -> Path:
    """Write a built-in phantom in the layout real data of its task uses.

    ultrasound: class sub-folders; brain: MSD/nnU-Net dataset.json + imagesTr/labelsTr;
    abdomen: the same plus boxes.csv; shapes: a folder of unlabelled images. Also writes
    OUT/gallery.png (samples with their labels) and OUT/phantom.json (provenance).
    """
    name = _value(name)
    out = export_phantom(
        name, Path(out), count=count, spatial_dims=spatial_dims, image_size=image_size, seed=seed
    )
    phantom_gallery(
        name,
        out / "gallery.png",
        count=min(count, 12),
        spatial_dims=spatial_dims,
        image_size=image_size,
        seed=seed,
    )
    logger.info("wrote %d %s phantom samples to %s", count, name, out)
    return out
