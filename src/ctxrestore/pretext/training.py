"""The pretraining stage: images -> pretext task -> engine -> a checkpoint folder.

`PretrainConfig` is the validated, frozen form of `ctxrestore.pretrain(...)`'s options; the
function and the CLI share its fields (a test holds them equal).
"""

from __future__ import annotations

import inspect
import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

import ctxrestore
from ctxrestore.data.loading import FileOptions
from ctxrestore.data.phantoms import get_phantom, list_phantoms, phantom_dataset
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.unlabelled import UnlabelledDataset
from ctxrestore.engine.checkpoint import (
    SPEC_FILE,
    WEIGHTS_FILE,
    load_checkpoint,
    weights_fingerprint,
)
from ctxrestore.engine.distributed import barrier, on_main, setup_distributed
from ctxrestore.engine.loop import FitResult, LoopConfig, fit
from ctxrestore.engine.run_folder import (
    METRICS_FILE,
    check_init_folder,
    check_run_folder,
    check_same_start,
    check_stage_options,
    option_defaults,
    start_run_folder,
)
from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_image_grid
from ctxrestore.files import atomic_write, write_json
from ctxrestore.models import PRETRAINING_NETWORKS, build_model, pretraining_spec
from ctxrestore.models.transfer import (
    GENERIC_CHANNEL,
    TRANSFERABLE_PARTS,
    check_compatible,
    freeze,
    transfer_weights,
)
from ctxrestore.pretext.registry import (
    Pretext,
    create_pretext,
    get_pretext_factory,
    list_pretexts,
)
from ctxrestore.pretext.report import describe_start, write_pretraining_report
from ctxrestore.pretext.restoration import check_restoration_loss

logger = logging.getLogger(__name__)

SPEC_FORMAT = 1
EVALUATION_IMAGES = 32  # held-out images for the final restoration error
# Phantom index offset of those images: far past any training set, so never trained on.
EVALUATION_OFFSET = 1_000_003


# Pretrain options that only some pretexts take (None: the pretext's default), and what the
# others lack, for the error that refuses them.
PRETEXT_SPECIFIC_OPTIONS = {
    "contrastive_weight": "has no contrastive term to weigh",
    "projector": "has no point projection to choose",
    "dense_views": "reads no points in swapped views",
    "dense_level": "reads no points in the decoder",
    "placement": "swaps no patches",
}


@dataclass(frozen=True)
class PretrainConfig(FileOptions):
    out: Path
    data: Path | None = None
    phantom: str = "shapes"
    num_images: int = 2000
    method: str = "context_restoration"
    network: str = "unet"
    width: int = 16
    spatial_dims: int = 2
    image_size: int = 64
    in_channels: int | None = None
    num_swaps: int = 20
    num_swaps_max: int | None = None
    patch_size: int = 8
    foreground_threshold: float | None = None
    restoration_loss: str = "mse"
    contrastive_weight: float | None = None  # None: the pretext's default
    projector: str | None = None  # None: the pretext's default
    dense_views: str | None = None  # None: the pretext's default
    dense_level: int | None = None  # None: the pretext's default
    placement: str | None = None  # None: the pretext's default
    batch_size: int = 32
    epochs: int = 10
    max_steps: int | None = None
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_workers: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    preview_every: int = 0
    compile: bool = False
    init: Path | None = None  # another run whose encoder (and matching decoder) start this one
    freeze_encoder: bool = False  # with init: keep that encoder fixed, train what follows it
    resume: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data is None and self.phantom not in list_phantoms():
            raise CtxRestoreError(
                f"unknown phantom '{self.phantom}'; built-in phantoms: {list_phantoms()}"
            )
        if self.method not in list_pretexts():
            raise CtxRestoreError(
                f"unknown pretraining method '{self.method}'; methods: {list_pretexts()}"
            )
        if self.network not in PRETRAINING_NETWORKS:
            raise CtxRestoreError(
                f"unknown network '{self.network}'; pretraining networks: {PRETRAINING_NETWORKS}"
            )
        check_stage_options(self, ("num_images", "width", "image_size", "epochs", "batch_size"))
        if self.in_channels is not None and self.in_channels < 1:
            raise CtxRestoreError(f"in_channels must be >= 1, got {self.in_channels}")
        check_restoration_loss(self.restoration_loss)
        if self.restoration_loss != "mse" and not takes_option(self.method, "restoration_loss"):
            raise CtxRestoreError(
                f"restoration_loss '{self.restoration_loss}' is for the restoration pretexts "
                f"({', '.join(pretexts_taking('restoration_loss'))}); {self.method} has its own "
                "loss"
            )
        for option, lacking in PRETEXT_SPECIFIC_OPTIONS.items():
            if getattr(self, option) is not None and not takes_option(self.method, option):
                raise CtxRestoreError(
                    f"{option} is for {', '.join(pretexts_taking(option))}; {self.method} {lacking}"
                )
        if self.freeze_encoder and self.init is None:
            raise CtxRestoreError(
                "freeze_encoder keeps the encoder of --init fixed; give --init RUN (a random "
                "encoder kept fixed would teach the pretext nothing)"
            )
        if self.num_swaps_max is not None and self.num_swaps_max < self.num_swaps:
            raise CtxRestoreError(
                f"num_swaps_max {self.num_swaps_max} must be >= num_swaps {self.num_swaps}"
            )

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return (self.image_size,) * self.spatial_dims

    @property
    def swaps(self) -> int | tuple[int, int]:
        return (
            self.num_swaps if self.num_swaps_max is None else (self.num_swaps, self.num_swaps_max)
        )

    def to_json(self) -> dict:
        values = asdict(self)
        return {
            key: str(value) if isinstance(value, Path) else value for key, value in values.items()
        }


def as_float(outputs):
    """A network's output in float32: a tensor, or a tuple of them (a network with two
    outputs, such as `restoration_contrastive`'s images and projections)."""
    if isinstance(outputs, tuple):
        return tuple(output.float() for output in outputs)
    return outputs.float()


class PretextTraining:
    """Adapts a pretext to the engine's TrainingTask: loss per step, and preview grids."""

    def __init__(self, pretext: Pretext) -> None:
        self.pretext = pretext

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        inputs, targets = self.pretext.make_batch(batch["image"], generator)
        return self.pretext.loss(model(inputs), targets)

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None:
        images = batch["image"][:8]
        inputs, targets = self.pretext.make_batch(images, generator)
        outputs = as_float(model(inputs))
        save_image_grid(path, self.pretext.preview_rows(inputs, targets, outputs))
        latest = path.parent.parent / "preview.png"  # the run folder's newest preview
        atomic_write(latest, lambda temporary: shutil.copyfile(path, temporary))


def build_dataset(config: PretrainConfig, *, length: int | None = None, offset: int = 0):
    """The unlabelled images: a folder, or `length` phantom images starting at `offset`."""
    if config.data is not None:
        return UnlabelledDataset(
            config.data,
            preprocessing=config.preprocessing,
            spatial_size=config.spatial_size,
            cache=config.array_cache(),
            slice_axis=config.slice_axis,
            in_channels=config.in_channels,
            skip_bad=config.skip_bad,
            seed=config.seed,
        )
    info = get_phantom(config.phantom)
    options = {}
    if config.phantom == "shapes":  # the one phantom with a free channel count
        options["in_channels"] = config.in_channels or 1
    elif config.in_channels not in (None, len(info.channel_names)):
        raise CtxRestoreError(
            f"phantom '{config.phantom}' has {len(info.channel_names)} channel(s) "
            f"{info.channel_names}, but in_channels {config.in_channels} was asked for"
        )
    return phantom_dataset(
        config.phantom,
        length or config.num_images,
        seed=config.seed + offset,
        spatial_size=config.spatial_size,
        **options,
    )


def _intensity_spec(config: PretrainConfig) -> dict:
    if config.data is None:
        return get_phantom(config.phantom).intensity
    return config.preprocessing.intensity


def _preprocessing_spec(config: PretrainConfig) -> dict:
    """How files are read, for fine-tuning and prediction on files: the options, or for a
    phantom the preprocessing that matches its scaling."""
    if config.data is not None:
        return {"preprocessing": config.preprocessing.to_json(), "slice_axis": config.slice_axis}
    recorded = get_phantom(config.phantom).preprocessing
    return {"preprocessing": Preprocessing.from_json(recorded).to_json()} if recorded else {}


def _channel_names(config: PretrainConfig, in_channels: int, declared=None) -> list[str]:
    """What each input channel holds (modalities), so that fine-tuning can check the order:
    the phantom's, a dataset.json's (`declared`), else channel_0, channel_1, ..."""
    if config.data is None and config.phantom != "shapes":
        return list(get_phantom(config.phantom).channel_names)
    if declared is not None and len(declared) == in_channels:
        return [str(name) for name in declared]
    return [f"{GENERIC_CHANNEL}{index}" for index in range(in_channels)]


def check_frozen_encoder(config: PretrainConfig, network: dict) -> None:
    """With the encoder fixed only what follows it trains; if none of that transfers (relative
    position's network is the encoder and a classifier), the run would hand on its --init's
    weights unchanged."""
    after_encoder = [part for part in TRANSFERABLE_PARTS if part != "encoder"]
    if config.freeze_encoder and not any(part in network["prefixes"] for part in after_encoder):
        raise CtxRestoreError(
            f"freeze_encoder: {config.method} on network '{config.network}' trains nothing "
            "after the encoder that a task network takes (its network is "
            f"{', '.join(part.rstrip('.') for part in network['prefixes'].values())}), so the "
            "run would pass on the --init weights unchanged; use a pretext with a decoder"
        )


def build_spec(
    config: PretrainConfig,
    pretext: Pretext,
    in_channels: int,
    channel_names: Sequence[str] | None = None,
) -> dict:
    """The checkpoint contract (DESIGN.md): enough to rebuild and adapt the network.
    `channel_names`: what the data declares its channels to be, if it does."""
    network = pretext.network_spec(
        pretraining_spec(config.network, config.width, config.spatial_dims, in_channels)
    )
    check_frozen_encoder(config, network)
    factor = network["downsampling_factor"]
    if config.image_size % factor:
        raise CtxRestoreError(
            f"image_size {config.image_size} is not divisible by {factor}, the downsampling "
            f"factor of network '{config.network}'; use a multiple of {factor}"
        )
    return {
        "format": SPEC_FORMAT,
        "ctxrestore_version": ctxrestore.__version__,
        "model": network,
        "spatial_dims": config.spatial_dims,
        "in_channels": in_channels,
        "channel_names": _channel_names(config, in_channels, channel_names),
        "image_size": list(config.spatial_size),
        "intensity": _intensity_spec(config),
        **_preprocessing_spec(config),
        "pretext": {"name": pretext.name, "params": pretext.params()},
        "data": {
            "source": str(config.data) if config.data else f"phantom:{config.phantom}",
            "seed": config.seed,
        },
    }


@dataclass(frozen=True)
class PretrainResult:
    """metrics: the pretext's held-out metrics (e.g. restoration_mse and identity_mse)."""

    out: Path
    steps: int
    resumed_from: int
    final_loss: float
    metrics: dict[str, float]


def evaluation_images(
    config: PretrainConfig, dataset: Dataset | None = None, count: int = EVALUATION_IMAGES
) -> Dataset:
    """The images a run's restoration is scored on: `count` unseen phantom images (another
    seed), or a folder's first images (`dataset`, built from the config when not given)."""
    if config.data is None:
        return build_dataset(config, length=count, offset=EVALUATION_OFFSET)
    dataset = build_dataset(config) if dataset is None else dataset
    return Subset(dataset, range(min(len(dataset), count)))


@torch.no_grad()
def evaluate_pretext(
    model: nn.Module, pretext: Pretext, dataset: Dataset, device: torch.device, seed: int
) -> dict[str, float]:
    """The pretext's metrics on held-out images (see Pretext.evaluate)."""
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    inputs, targets = pretext.make_batch(images, generator)
    model.eval()
    return pretext.evaluate(inputs, targets, as_float(model(inputs)))


def _factory_options(method: str) -> set[str]:
    return set(inspect.signature(get_pretext_factory(method)).parameters)


def takes_option(method: str, option: str) -> bool:
    """Whether pretext `method` takes pretrain option `option` (e.g. restoration_loss)."""
    return option in _factory_options(method)


def pretexts_taking(option: str) -> list[str]:
    return [method for method in list_pretexts() if takes_option(method, option)]


def pretext_options(config: PretrainConfig) -> dict:
    """The shared pretrain options that the chosen pretext's factory takes."""
    offered = {
        "num_swaps": config.swaps,
        "patch_size": config.patch_size,
        "foreground_threshold": config.foreground_threshold,
        "restoration_loss": config.restoration_loss,
    }
    for option in PRETEXT_SPECIFIC_OPTIONS:
        if getattr(config, option) is not None:  # None: the pretext's default
            offered[option] = getattr(config, option)
    accepted = _factory_options(config.method)
    return {key: value for key, value in offered.items() if key in accepted}


def run_pretraining(config: PretrainConfig) -> PretrainResult:
    """Pretrain by the pretext on unlabelled images; see `ctxrestore.pretrain`."""
    context = setup_distributed(config.device)
    pretext = create_pretext(config.method, **pretext_options(config))
    dataset = build_dataset(config)
    in_channels = int(dataset[0]["image"].shape[0])
    spec = build_spec(config, pretext, in_channels, getattr(dataset, "channel_names", None))
    # The patch must fit the images; fail now rather than at the first step.
    pretext.make_batch(torch.zeros(1, in_channels, *config.spatial_size), torch.Generator())
    torch.manual_seed(config.seed)  # same initial weights on every rank and every run
    model = build_model(spec["model"])
    out = Path(config.out)
    if config.init is not None:  # checked before the run folder is made; a resume then
        spec["init"] = start_from(  # loads its own weights
            model, Path(config.init), spec, freeze_encoder=config.freeze_encoder
        )
        if config.resume:
            check_same_start(out, Path(config.init), spec["init"]["weights"])
    on_main(
        context,
        check_run_folder,
        out,
        config.to_json(),
        config.resume,
        defaults=option_defaults(PretrainConfig),
    )
    if context.is_main:
        start_run_folder(out, config.to_json(), context.device, context.world_size, config.resume)
    steps_per_epoch = len(dataset) // config.batch_size
    max_steps = config.max_steps or max(1, steps_per_epoch) * config.epochs
    loop = LoopConfig(
        max_steps=max_steps,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        warmup_steps=min(config.warmup_steps, max_steps // 2),
        precision=config.precision,
        log_every=config.log_every,
        checkpoint_every=config.checkpoint_every,
        preview_every=config.preview_every,
        num_workers=config.num_workers,
        seed=config.seed,
        compile=config.compile,
    )
    result: FitResult = fit(
        model=model,
        dataset=dataset,
        task=PretextTraining(pretext),
        config=loop,
        context=context,
        run_dir=out,
        spec=spec,
        resume=config.resume and (out / WEIGHTS_FILE).exists(),
    )
    metrics = evaluate_pretext(
        model, pretext, evaluation_images(config, dataset), context.device, config.seed
    )
    if context.is_main:
        write_json(
            out / METRICS_FILE,
            {
                "steps": result.steps,
                "final_loss": result.final_loss,
                **metrics,
                "summary": pretext.summary(metrics),
                **({"skipped_files": dataset.skipped} if getattr(dataset, "skipped", None) else {}),
            },
        )
        write_pretraining_report(out)
    barrier(context)  # every rank leaves together (see tasks/training.py)
    return PretrainResult(out, result.steps, result.resumed_from, result.final_loss, metrics)


def start_from(model: nn.Module, folder: Path, spec: dict, *, freeze_encoder: bool) -> dict:
    """--init: `folder`'s encoder, and its decoder where the architecture is the same, into
    the pretraining network; the pretext's own head and projection start random. For a
    pretext that continues another's training (e.g. dense_contrastive after context
    restoration); `freeze_encoder` keeps that encoder fixed, so the second pretext trains only
    what follows it. Returns what moved (and what is fixed), for the spec and the report."""
    state, init_spec = load_checkpoint(folder)
    check_init_folder(folder, init_spec)
    source = f"--init {folder}"
    check_compatible(
        init_spec,
        spatial_dims=spec["spatial_dims"],
        in_channels=spec["in_channels"],
        channel_names=spec["channel_names"],
        adapt_channels=False,
        source=source,
        target="the pretraining data",
    )
    report = transfer_weights(
        model,
        state,
        init_spec["model"]["prefixes"],
        spec["model"]["prefixes"],
        source=source,
        destination=f"the pretraining network ({spec['model']['name']})",
    )
    init = {"folder": str(folder), "weights": weights_fingerprint(state), **report.to_json()}
    if freeze_encoder:
        freeze(model.get_submodule(spec["model"]["prefixes"]["encoder"].rstrip(".")))
        init["frozen"] = ["encoder"]
    logger.info("%s", describe_start(init))
    return init


def load_pretrained(folder: Path | str, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the network from a checkpoint folder's spec and load its weights (no pickle)."""
    state_dict, spec = load_checkpoint(Path(folder))
    if spec.get("format") != SPEC_FORMAT or "model" not in spec:
        raise CtxRestoreError(
            f"{Path(folder) / SPEC_FILE} is not a ctxrestore spec of format {SPEC_FORMAT}"
        )
    model = build_model(spec["model"])
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        name
        for name in set(expected) & set(state_dict)
        if expected[name].shape != state_dict[name].shape
    )
    if missing or unexpected or wrong:
        raise CtxRestoreError(
            f"weights in {folder} do not fit the network its spec describes: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    model.load_state_dict(state_dict)
    return model.to(device).eval()
