"""`benchmark` and `ablate`: options -> a validated run grid -> runs -> results.csv,
summary.csv, plot.png and report.md.

A benchmark's initialisations are random weights and every registered pretext (read from the
registry when the benchmark runs) but the opt-in ones (`OPT_IN_PRETEXTS`, run only when named
in --methods), and two-stage ones named FIRST_then_SECOND (SECOND pretrained over FIRST's
encoder, kept fixed); an ablation's are random weights and settings of context
restoration, varied one at a time around a default. Both go through the same protocol.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ctxrestore.bench.plots import fraction_axis, save_metric_plot
from ctxrestore.bench.protocol import (
    RANDOM,
    RESULTS_FILE,
    Arm,
    GridRun,
    Protocol,
    run_grid,
    stored_settings,
    write_results,
)
from ctxrestore.bench.report import DEFAULT_SETTING, write_report
from ctxrestore.bench.summary import extra_metrics, summarize, write_summary
from ctxrestore.corruption.sampling import PLACEMENTS as SWAP_PLACEMENTS
from ctxrestore.data.loading import FileOptions
from ctxrestore.data.phantoms import get_phantom
from ctxrestore.data.splits import parse_fraction
from ctxrestore.engine.checkpoint import load_checkpoint, weights_fingerprint
from ctxrestore.engine.distributed import on_main, resolve_device, setup_distributed
from ctxrestore.engine.run_folder import check_head_only_steps, check_patience
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json
from ctxrestore.models import PRETRAINING_NETWORKS, pretraining_spec
from ctxrestore.models.contrastive import check_projector
from ctxrestore.pretext import create_pretext, list_pretexts
from ctxrestore.pretext.restoration import check_restoration_loss
from ctxrestore.pretext.training import (
    PRETEXT_SPECIFIC_OPTIONS,
    PretrainConfig,
    check_frozen_encoder,
    pretext_options,
    pretexts_taking,
    takes_option,
)
from ctxrestore.tasks.datasets import DEFAULT_PHANTOMS, boxes_only
from ctxrestore.tasks.localize import BOXES_ONLY_MESSAGE, DECODER_BOX_HEADS, check_box_head
from ctxrestore.tasks.probe import PROBE_RECORD, ProbeConfig, run_probe
from ctxrestore.tasks.training import DEFAULT_IMAGE_SIZES, TASK_NAMES, check_fresh_decoder_levels

logger = logging.getLogger(__name__)

# The metric each task is summarised by when --metric is not given.
TASK_METRICS = {"classify": "macro_f1", "localize": "wall_mm/mean", "segment": "global_dice/mean"}
# The network whose encoder is pretrained (Chen et al.): SonoNet-like for classification and
# localisation, a U-Net for segmentation. Random initialisation builds the same encoder.
TASK_NETWORKS = {"classify": "sononet", "localize": "sononet", "segment": "unet"}
SEEDS_ON_CPU, SEEDS_ON_GPU = 3, 5
# Relative position feeds each patch through the whole encoder, which pools 4 times: its
# patches must be a multiple of 16 whatever --patch-size the restoration pretexts use.
RELATIVE_POSITION_PATCH = 16


def method_options(method: str, image_size: int) -> dict:
    """A pretext's own options in the benchmark. Relative position's patches keep a quarter of
    the image (16 at 64, 32 at 128 pixels), so its 3x3 grid spans the same share of the image
    at every size; the other pretexts take the shared --patch-size."""
    if method != "relative_position":
        return {}
    quarters = max(1, image_size // (4 * RELATIVE_POSITION_PATCH))
    return {"patch_size": RELATIVE_POSITION_PATCH * quarters}


# Pretexts beyond the paper's comparison: registered (pretrain --method takes them) but run by
# `benchmark` (and so `demo`) only when named in --methods.
OPT_IN_PRETEXTS = (
    "contrastive", "context_restoration_contrastive", "dense_contrastive",
    "context_restoration_dense",
)  # fmt: skip

# Where an ablation's swaps go: the sampler's placements (uniform, the paper's, first), and
# uniform ones kept off the background ("foreground", by the foreground threshold).
UNIFORM = "uniform"
ABLATION_PLACEMENTS = (UNIFORM, "foreground", *(p for p in SWAP_PLACEMENTS if p != UNIFORM))
CONTEXT_RESTORATION = "context_restoration"
# random_x2, random_x4, ...: random weights fine-tuned for K times the schedule, a control for
# head starts: a pretrained arm that beats random but not random_xK got there sooner, not to a
# better place (docs/experiments.md, 17).
LONGER_RANDOM = re.compile(r"random_x(\d+)")
# FIRST_then_SECOND: SECOND pretrained over FIRST's pretraining with FIRST's encoder fixed, so
# the second pretext trains only what follows the encoder (`pretrain --init --freeze-encoder`;
# docs/experiments.md 44). FIRST must be an arm too: the two-stage arm is read against it.
THEN = "_then_"


@dataclass(frozen=True)
class BenchmarkOptions(FileOptions):
    """The options `benchmark` and `ablate` share, validated (see `ctxrestore.benchmark`)."""

    task: str
    out: Path
    data: Path | None = None
    fractions: str = "0.05,0.1,0.25,0.5,1.0"
    seeds: int | None = None
    metric: str | None = None
    network: str | None = None
    width: int = 16
    image_size: int | None = None
    num_images: int = 1000
    pretrain_data: Path | None = None
    pretrain_images: int = 2000
    # 6,000 steps of 32: context restoration's segmentation gain at 5-10% labels appears only
    # past ~2,000 steps (which the auto-encoder does not gain from; docs/experiments.md 20, 22)
    pretrain_steps: int = 6000
    pretrain_batch_size: int = 32
    pretrain_learning_rate: float = 1e-3
    # Pretrainings per arm; fine-tuning seed s starts from pretraining s mod pretrain_seeds.
    pretrain_seeds: int = 1
    patch_size: int = 8
    num_swaps: int = 20
    foreground_threshold: float | None = None
    restoration_loss: str = "mse"  # for the restoration pretexts; the others keep their own
    # Options of some pretexts (PRETEXT_SPECIFIC_OPTIONS), passed to those that take them;
    # None: each pretext's default.
    contrastive_weight: float | None = None
    projector: str | None = None
    dense_views: str | None = None
    dense_level: int | None = None
    placement: str | None = None
    batch_size: int = 16
    # 60 epochs of at least 20 steps: random weights at 5% labels need ~1,200 steps to converge
    # (30 left them 9 Dice points short, a gap pretraining filled; docs/experiments.md 17-18)
    epochs: int = 60
    max_steps: int | None = None
    learning_rate: float = 1e-3
    pretrained_lr_scale: float = 1.0
    transfer_stages: int | None = None
    fresh_decoder_levels: int = 0
    head_only_steps: int = 0  # LP-FT for pretrained arms; random weights train at once
    box_head: str = "regression"  # localize only (tasks/localize.py BOX_HEADS)
    freeze_encoder: bool = False  # frozen-feature evaluation, random weights included
    patience: int = 0  # every arm trains its whole schedule (docs/experiments.md 16)
    device: str = "auto"
    precision: str = "auto"
    resume: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("out", "data", "pretrain_data"):  # Python callers may pass strings
            if getattr(self, name) is not None:
                object.__setattr__(self, name, Path(getattr(self, name)))
        if self.task not in TASK_NAMES:
            raise CtxRestoreError(f"unknown task '{self.task}'; tasks: {', '.join(TASK_NAMES)}")
        if self.network is not None and self.network not in PRETRAINING_NETWORKS:
            raise CtxRestoreError(
                f"unknown network '{self.network}'; networks: {', '.join(PRETRAINING_NETWORKS)}"
            )
        if self.seeds is not None and self.seeds < 1:
            raise CtxRestoreError(f"seeds must be >= 1, got {self.seeds}")
        for name in ("pretrain_images", "pretrain_steps", "pretrain_batch_size", "pretrain_seeds"):
            if getattr(self, name) < 1:
                raise CtxRestoreError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_patience(self.patience)  # before any pretraining runs
        check_restoration_loss(self.restoration_loss)
        if self.projector is not None:
            check_projector(self.projector)
        if self.freeze_encoder and self.transfer_stages is not None:
            raise CtxRestoreError(
                "freeze_encoder and transfer_stages together would freeze random stages; choose one"
            )
        check_fresh_decoder_levels(
            self.fresh_decoder_levels, self.transfer_stages, self.task, self.box_head
        )
        check_head_only_steps(self.head_only_steps, self.freeze_encoder)
        check_box_head(self.box_head, self.task)
        if self.box_head == "segment" and boxes_only(self.data):  # before any pretraining
            raise CtxRestoreError(f"{self.data}: {BOXES_ONLY_MESSAGE}")
        if self.max_steps is not None and self.head_only_steps >= self.max_steps:
            raise CtxRestoreError(
                f"head_only_steps {self.head_only_steps} is not shorter than max_steps "
                f"{self.max_steps}: the pretrained layers would never train"
            )
        parse_fractions(self.fractions)
        if self.image_size is None:  # the task's own default (finetune's)
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZES[self.task])

    def settings(self) -> dict:
        """The options as OUT/benchmark.json stores them (paths as absolute strings)."""
        values = dataclasses.asdict(self)
        del values["out"]
        for key in ("data", "pretrain_data", "cache_dir"):
            if values[key] is not None:
                values[key] = str(Path(values[key]).resolve())
        return values


@dataclass(frozen=True)
class BenchmarkResult:
    """The files a benchmark wrote, and how many fine-tuning runs it trained now and found
    finished. `summary_rows`: summary.csv's rows."""

    out: Path
    results: Path
    summary: Path
    plot: Path
    report: Path
    runs: int
    trained: int
    skipped: int
    summary_rows: list[dict]


# ----------------------------------------------------------------------------- parsing
def _items(text: str, name: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise CtxRestoreError(f"{name} '{text}' is empty; give a comma-separated list")
    if len(set(items)) < len(items):
        raise CtxRestoreError(f"{name} '{text}' names a value twice")
    return items


def parse_fractions(text: str) -> tuple[str, ...]:
    """'0.05,0.1,10%' -> each checked by the finetune rule (share, percent or case count)."""
    fractions = _items(text, "fractions")
    values = [parse_fraction(fraction) for fraction in fractions]
    if len(set(values)) < len(values):
        raise CtxRestoreError(f"fractions '{text}' give the same fraction twice")
    return tuple(fractions)


def longer_random_factor(method: str) -> int | None:
    """K for 'random_xK' (K >= 2), None for any other name."""
    match = LONGER_RANDOM.fullmatch(method)
    return int(match.group(1)) if match and int(match.group(1)) >= 2 else None


def longer_random_arm(method: str) -> Arm:
    """The arm of 'random_xK': random weights fine-tuned for K times the shared schedule."""
    factor = longer_random_factor(method)
    return Arm(method, label=f"random, {factor}x schedule", schedule_factor=factor)


def two_stages(method: str) -> tuple[str, str] | None:
    """(FIRST, SECOND) for 'FIRST_then_SECOND' with two registered pretexts, else None."""
    stages = method.split(THEN)
    if len(stages) == 2 and all(stage in list_pretexts() for stage in stages):
        return stages[0], stages[1]
    return None


def two_stage_arm(method: str, image_size: int) -> Arm:
    """The arm of 'FIRST_then_SECOND': SECOND's pretext, started from FIRST's pretraining with
    its encoder kept fixed."""
    first, second = two_stages(method)
    return Arm(
        method,
        {"method": second, **method_options(second, image_size), "freeze_encoder": True},
        label=f"{first}, then {second} (encoder fixed)",
        first_stage=first,
    )


def parse_controls(text: str | None) -> tuple[str, ...]:
    """Ablation controls: random_xK names, checked, shortest schedule first."""
    if text is None:
        return ()
    controls = _items(text, "controls")
    unknown = [c for c in controls if longer_random_factor(c) is None]
    if unknown:
        raise CtxRestoreError(
            f"unknown control(s) {', '.join(unknown)}; controls are random_xK (K >= 2: random "
            "weights fine-tuned K times as long, a head-start control)"
        )
    return tuple(sorted(controls, key=longer_random_factor))


def parse_methods(text: str | None) -> tuple[str, ...]:
    """None: random and every registered pretext but the opt-in ones (OPT_IN_PRETEXTS); else
    the named ones, checked, in the order random, its longer controls (random_xK), the
    pretexts as registered, then two-stage arms (FIRST_then_SECOND), each after its FIRST."""
    known = [RANDOM, *list_pretexts()]
    if text is None:
        return tuple(method for method in known if method not in OPT_IN_PRETEXTS)
    methods = _items(text, "methods")
    unknown = [
        m for m in methods
        if m not in known and longer_random_factor(m) is None and two_stages(m) is None
    ]  # fmt: skip
    if unknown:
        raise CtxRestoreError(
            f"unknown method(s) {', '.join(unknown)}; methods: {', '.join(known)}, "
            "random_xK (K >= 2: random weights fine-tuned K times as long, a head-start control) "
            "and FIRST_then_SECOND (two pretexts: SECOND trained over FIRST's pretraining with "
            "its encoder fixed)"
        )
    for method in methods:
        stages = two_stages(method)
        if stages is not None and stages[0] not in methods:
            raise CtxRestoreError(
                f"method {method} continues {stages[0]}'s pretraining; add {stages[0]} to "
                "--methods (its pretraining is the first stage, and its runs are what the "
                "second stage is read against)"
            )

    def order(method: str) -> tuple[int, ...]:
        factor = longer_random_factor(method)
        if factor is not None:
            return (1, factor)
        stages = two_stages(method)
        if stages is not None:
            return (3, *(known.index(stage) for stage in stages))
        position = known.index(method)
        return (0 if position == 0 else 2, position)

    return tuple(sorted(methods, key=order))


def _integers(text: str, name: str) -> list[int]:
    items = _items(text, name)
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise CtxRestoreError(f"{name} '{text}' must be whole numbers, e.g. 8,4,16") from None
    if min(values) < 1:
        raise CtxRestoreError(f"{name} '{text}' must all be >= 1")
    return values


# ----------------------------------------------------------------------------- the grid
def _default_seeds(options: BenchmarkOptions) -> int:
    stored = stored_settings(options.out)
    if stored and stored.get("seeds"):  # continue an OUT with the seeds it started with
        return int(stored["seeds"])
    on_gpu = resolve_device(options.device).type == "cuda"
    return SEEDS_ON_GPU if on_gpu else SEEDS_ON_CPU


def _pretrain_source(options: BenchmarkOptions) -> dict:
    if options.pretrain_data is not None:
        return {"data": options.pretrain_data}
    if options.data is None:
        return {"phantom": DEFAULT_PHANTOMS[options.task]}
    return {"data": options.data}  # every labelled layout: its images, labels unused


def build_protocol(
    options: BenchmarkOptions,
    kind: str,
    arms: tuple[Arm, ...],
    extra_settings: dict,
    unused: tuple[str, ...] = (),
) -> Protocol:
    """The run grid, every run's configuration checked before anything trains. `unused`:
    options that this kind of grid sets per arm instead, left out of the stored settings."""
    task = options.task
    own = TASK_NETWORKS[task]
    # The mask box head is a U-Net: a U-Net decoder on the localiser's encoder transfers whole.
    network = options.network or ("sononet_unet" if options.box_head in DECODER_BOX_HEADS else own)
    # The task network is built around the pretrained encoder; the decoder may differ.
    encoders = [pretraining_spec(name, options.width)["encoder"] for name in (network, own)]
    if encoders[0] != encoders[1] and any(arm.pretrain is None for arm in arms):
        raise CtxRestoreError(
            f"network '{network}': random initialisation builds the {task} task's own "
            f"{own} encoder, which '{network}' does not have, so the comparison would not be "
            f"of one architecture; use --network {own} (or one with its encoder) or leave out "
            "random"
        )
    for option in PRETEXT_SPECIFIC_OPTIONS:
        if getattr(options, option) is not None and not any(
            arm.pretrain and takes_option(arm.pretrain["method"], option) for arm in arms
        ):
            raise CtxRestoreError(
                f"{option} is for {', '.join(pretexts_taking(option))}, and --methods names "
                "none of them"
            )
    seeds = options.seeds or _default_seeds(options)
    if options.pretrain_seeds > seeds:
        raise CtxRestoreError(
            f"pretrain_seeds {options.pretrain_seeds} is more than the {seeds} fine-tuning "
            f"seeds: fine-tuning seed s starts from pretraining s mod pretrain_seeds, so "
            f"pretrainings beyond {seeds} would never be used; use at most {seeds}"
        )
    # How files are read: the same for pretraining and fine-tuning.
    files = options.file_options
    pretrain_options = {
        **_pretrain_source(options),
        "num_images": options.pretrain_images, "network": network, "width": options.width,
        "image_size": options.image_size, "patch_size": options.patch_size,
        "num_swaps": options.num_swaps, "foreground_threshold": options.foreground_threshold,
        "restoration_loss": options.restoration_loss,
        **{option: getattr(options, option) for option in PRETEXT_SPECIFIC_OPTIONS},
        "batch_size": options.pretrain_batch_size, "max_steps": options.pretrain_steps,
        "learning_rate": options.pretrain_learning_rate, "seed": 0, "device": options.device,
        "precision": options.precision, **files,
    }  # fmt: skip
    finetune_options = {
        "data": options.data, "num_images": options.num_images, "image_size": options.image_size,
        "width": options.width, "batch_size": options.batch_size, "epochs": options.epochs,
        "max_steps": options.max_steps, "learning_rate": options.learning_rate,
        "pretrained_lr_scale": options.pretrained_lr_scale,
        "transfer_stages": options.transfer_stages,
        "fresh_decoder_levels": options.fresh_decoder_levels,
        "freeze_encoder": options.freeze_encoder,
        "head_only_steps": options.head_only_steps, "box_head": options.box_head,
        "patience": options.patience,
        "device": options.device, "precision": options.precision, **files,
    }  # fmt: skip
    settings = {**options.settings(), "kind": kind, "network": network, "seeds": seeds,
                "metric": options.metric or TASK_METRICS[task], **extra_settings}  # fmt: skip
    if "phantom" in pretrain_options:
        settings["phantom"] = pretrain_options["phantom"]
    for key in unused:
        del settings[key]
    protocol = Protocol(
        kind=kind,
        task=task,
        out=Path(options.out),
        arms=arms,
        fractions=parse_fractions(options.fractions),
        seeds=tuple(range(seeds)),
        metric=options.metric or TASK_METRICS[task],
        pretrain_options=pretrain_options,
        finetune_options=finetune_options,
        settings=settings,
        resume=options.resume,
        pretrain_seeds=options.pretrain_seeds,
    )
    for arm in arms:
        protocol.finetune_config(arm, protocol.fractions[0], 0, init=RANDOM)
        if arm.pretrain is not None:
            _check_pretext(protocol.pretrain_config(arm), arm)
    return protocol


def _check_pretext(config: PretrainConfig, arm: Arm) -> None:
    """Corrupt a blank batch (a patch that does not fit fails now, not after other arms), and
    check that a second stage has something to train after the fixed encoder."""
    pretext = create_pretext(config.method, **pretext_options(config))
    channels = 1 if config.data is not None else len(get_phantom(config.phantom).channel_names)
    try:
        pretext.make_batch(torch.zeros(2, channels, *config.spatial_size), torch.Generator())
        check_frozen_encoder(
            config,
            pretext.network_spec(
                pretraining_spec(config.network, config.width, config.spatial_dims, channels)
            ),
        )
    except CtxRestoreError as error:
        raise CtxRestoreError(f"initialisation {arm.title}: {error}") from None


def probe_pretrainings(protocol: Protocol) -> dict[tuple[str, int], float]:
    """With several pretrainings per initialisation, each one's linear probe (`ctxrestore
    probe`, into OUT/probe/<arm>/) on the split of the first seed and fraction, scored on its
    validation split: (arm, pretraining seed) -> balanced accuracy. Pretrainings of one recipe
    differ by up to the whole gain, and the probe told the weak draws from the strong ones
    before fine-tuning (docs/experiments.md 48-49); the report puts it beside each draw's
    transfer, so every such benchmark tests that again."""
    if protocol.pretrain_seeds == 1:
        return {}
    fraction, seed = protocol.fractions[0], protocol.seeds[0]
    scores = {}
    for arm in protocol.arms:
        if arm.pretrain is None:
            continue
        draws = range(protocol.pretrain_seeds)
        folders = [str(protocol.pretrain_folder(arm, draw)) for draw in draws]
        finetune = protocol.finetune_config(arm, fraction, seed)
        config = ProbeConfig.for_finetuning(finetune, folders, protocol.out / "probe" / arm.name)
        rows = _earlier_probe(config) or run_probe(config).rows
        for draw, row in zip(draws, rows):
            scores[arm.name, draw] = row["balanced_accuracy"]
    return scores


def _earlier_probe(config: ProbeConfig) -> list[dict] | None:
    """The rows an earlier report wrote for the same probe of the same weights (checked by
    fingerprint: a pretraining deleted and run again is probed again), so that resuming a
    benchmark does not probe again; None when there are none."""
    path = Path(config.out) / PROBE_RECORD
    if not path.exists():
        return None
    earlier = read_json(path)
    if earlier.get("config") != json.loads(json.dumps(config.to_json())):  # as stored
        return None
    fingerprints = [weights_fingerprint(load_checkpoint(Path(init))[0]) for init in config.init]
    if [row.get("init_weights") for row in earlier["rows"]] != fingerprints:
        return None
    logger.info("linear probes of %s: reusing %s (the same weights)", config.init[0], path)
    return earlier["rows"]


def run_protocol(protocol: Protocol) -> BenchmarkResult:
    """Run the grid (resuming), then write results.csv, summary.csv, plot.png, report.md
    (under torchrun on rank 0, which hands every process the result)."""
    context = setup_distributed(protocol.finetune_options["device"])  # once, for every run
    return on_main(context, _write_outputs, protocol, run_grid(protocol, context))


def _write_outputs(protocol: Protocol, grid: GridRun) -> BenchmarkResult:
    out, rows, metric = protocol.out, grid.rows, protocol.metric
    results = write_results(out / RESULTS_FILE, rows)
    methods = [arm.name for arm in protocol.arms]
    reference = protocol.reference if protocol.reference in methods else None
    table = summarize(
        rows,
        methods=methods,
        fractions=protocol.fractions,
        metric=metric,
        reference=reference,
        extras=extra_metrics(protocol.task, metric, list(rows[0])),
    )
    summary = write_summary(out / "summary.csv", table)
    x_values, x_label = fraction_axis(protocol.fractions, rows)
    plot = save_metric_plot(
        out / "plot.png",
        table,
        methods=methods,
        fractions=protocol.fractions,
        x_values=x_values,
        x_label=x_label,
        metric=metric,
        labels={arm.name: arm.title for arm in protocol.arms},
        title=f"{protocol.task}: test {metric} against labelled data",
    )
    report = write_report(out / "report.md", protocol, rows, table, plot,
                          probes=probe_pretrainings(protocol))  # fmt: skip
    logger.info("%d runs (%d trained now, %d finished before); report: %s",
                len(rows), grid.trained, grid.skipped, report)  # fmt: skip
    return BenchmarkResult(out, results, summary, plot, report, len(rows), grid.trained,
                           grid.skipped, table)  # fmt: skip


def run_benchmark(options: BenchmarkOptions, methods: str | None = None) -> BenchmarkResult:
    """Fine-tune every initialisation in `methods` (default: random + every registered
    pretext but the opt-in ones) for every fraction x seed; see `ctxrestore.benchmark`."""
    arms = []
    for method in parse_methods(methods):
        if method == RANDOM:
            arms.append(Arm(RANDOM))
        elif longer_random_factor(method) is not None:
            arms.append(longer_random_arm(method))
        elif two_stages(method) is not None:
            arms.append(two_stage_arm(method, options.image_size))
        else:
            arms.append(
                Arm(method, {"method": method, **method_options(method, options.image_size)})
            )
    settings = {"methods": [arm.name for arm in arms]}
    return run_protocol(build_protocol(options, "benchmark", tuple(arms), settings))


def ablation_arms(
    patch_sizes: str,
    num_swaps: str,
    placements: str,
    foreground_threshold: float,
    controls: str | None = None,
    pretrain_lengths: str | None = None,
    pretrain_steps: int | None = None,
) -> tuple[Arm, ...]:
    """Random weights, its longer controls (random_xK), the default setting (the first value
    of each list), and one arm per other value, varying one of patch size, T, placement and
    pretraining length (steps other than the shared `pretrain_steps`) at a time."""
    sizes, swaps = _integers(patch_sizes, "patch_sizes"), _integers(num_swaps, "num_swaps")
    lengths = [] if pretrain_lengths is None else sorted(
        _integers(pretrain_lengths, "pretrain_lengths"))  # fmt: skip
    if pretrain_steps in lengths:
        raise CtxRestoreError(
            f"pretrain_lengths '{pretrain_lengths}' repeats --pretrain-steps {pretrain_steps}, "
            "the default setting's length; give only the other lengths to compare with it"
        )
    where = _items(placements, "placements")
    unknown = [placement for placement in where if placement not in ABLATION_PLACEMENTS]
    if unknown:
        raise CtxRestoreError(
            f"unknown placement(s) {', '.join(unknown)}; placements: "
            f"{', '.join(ABLATION_PLACEMENTS)}"
        )

    def placed(placement: str) -> dict:
        """The pretrain options of a placement (None: the default, uniform)."""
        foreground = placement == "foreground"
        return {"foreground_threshold": foreground_threshold if foreground else None,
                "placement": None if foreground or placement == UNIFORM else placement}  # fmt: skip

    default = {"method": CONTEXT_RESTORATION, "patch_size": sizes[0], "num_swaps": swaps[0],
               **placed(where[0])}  # fmt: skip
    label = f"default (patch {sizes[0]}, T {swaps[0]}, {where[0]})"
    arms = [Arm(RANDOM), *map(longer_random_arm, parse_controls(controls))]
    arms.append(Arm(DEFAULT_SETTING, default, label))
    arms += [Arm(f"patch_size_{size}", {**default, "patch_size": size}, f"patch {size}")
             for size in sizes[1:]]  # fmt: skip
    arms += [Arm(f"num_swaps_{count}", {**default, "num_swaps": count}, f"T {count}")
             for count in swaps[1:]]  # fmt: skip
    arms += [Arm(f"placement_{place}", {**default, **placed(place)}, f"{place} placement")
             for place in where[1:]]  # fmt: skip
    # The same pretext pretrained for longer (or shorter): does the transfer follow the
    # restoration? It did for segmentation, not classification (docs/experiments.md 15, 20, 22).
    arms += [Arm(f"pretrain_steps_{steps}", {**default, "max_steps": steps},
                 f"pretrained {steps} steps") for steps in lengths]  # fmt: skip
    return tuple(arms)


def run_ablation(
    options: BenchmarkOptions,
    *,
    patch_sizes: str = "8,4,16",
    num_swaps: str = "20,5,50",
    placements: str = "uniform,foreground",
    foreground_threshold: float = 0.0,
    controls: str | None = None,
    pretrain_lengths: str | None = None,
) -> BenchmarkResult:
    """An ablation of context restoration's patch size, T, placement and pretraining length;
    see `ctxrestore.ablate`."""
    if CONTEXT_RESTORATION not in list_pretexts():
        raise CtxRestoreError(f"pretext '{CONTEXT_RESTORATION}' is not registered")
    arms = ablation_arms(patch_sizes, num_swaps, placements, foreground_threshold, controls,
                         pretrain_lengths, options.pretrain_steps)  # fmt: skip
    settings = {"patch_sizes": patch_sizes, "num_swaps": num_swaps, "placements": placements,
                "foreground_threshold": foreground_threshold}  # fmt: skip
    # Both absent from ablations written before they existed, so those stay comparable.
    if controls is not None:
        settings["controls"] = [arm.name for arm in arms if arm.schedule_factor > 1]
    if pretrain_lengths is not None:
        settings["pretrain_lengths"] = [arm.name for arm in arms
                                        if "max_steps" in (arm.pretrain or {})]  # fmt: skip
    protocol = build_protocol(options, "ablation", arms, settings, unused=("patch_size",))
    return run_protocol(protocol)
