"""The built-in phantoms by name: generator, downstream task, labels, intensity scaling."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

from ctxrestore.data.phantoms.abdomen import ABDOMEN_LABELS, ABDOMEN_ORGANS, abdomen_phantom
from ctxrestore.data.phantoms.base import Generator, PhantomDataset
from ctxrestore.data.phantoms.brain import (
    BRAIN_CHANNELS,
    BRATS_LABELS,
    BRATS_REGIONS,
    brain_phantom,
)
from ctxrestore.data.phantoms.shapes import shapes_sample
from ctxrestore.data.phantoms.ultrasound import ULTRASOUND_CLASSES, ultrasound_phantom
from ctxrestore.errors import CtxRestoreError

TASKS = ("pretrain", "classify", "localize", "segment")


@dataclass(frozen=True)
class PhantomInfo:
    """task: the downstream task the phantom's labels serve ("pretrain": unlabelled).
    intensity: how raw values become network inputs (see data.intensity).
    preprocessing: the file preprocessing (data.preprocess.Preprocessing JSON) that matches it
    for the phantom's exported files: recorded by a pretraining on the phantom, so that
    fine-tuning on real files of that modality scales them alike."""

    name: str
    generator: Generator
    task: str
    intensity: dict
    channel_names: tuple[str, ...]
    class_names: tuple[str, ...] = ()
    labels: dict[int, str] = field(default_factory=dict)
    organs: tuple[str, ...] = ()
    preprocessing: dict | None = None
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)  # unions of labels


def _abdomen(name: str, phase: str) -> PhantomInfo:
    """The abdominal CT phantom in one contrast phase (the same bodies, other tissue HU)."""
    return PhantomInfo(
        name,
        functools.partial(abdomen_phantom, phase=phase),
        "localize",
        # A soft-tissue CT window (level 50, width 500 HU): enhanced kidneys stay below 300.
        {"method": "window", "window": [-200.0, 300.0]},
        ("CT",),
        labels={0: "background", **ABDOMEN_LABELS},
        organs=ABDOMEN_ORGANS,
        preprocessing={"modality": "ct", "window": [-200.0, 300.0]},
    )


PHANTOMS: dict[str, PhantomInfo] = {
    info.name: info
    for info in (
        PhantomInfo("shapes", shapes_sample, "pretrain", {"method": "unit"}, ("contrast_0",)),
        PhantomInfo(
            "ultrasound",
            ultrasound_phantom,
            "classify",
            {"method": "unit"},
            ("ultrasound",),
            class_names=ULTRASOUND_CLASSES,
            preprocessing={"modality": "us"},
        ),
        _abdomen("abdomen", "unenhanced"),
        _abdomen("abdomen_contrast", "portal_venous"),
        PhantomInfo(
            "brain",
            brain_phantom,
            "segment",
            {"method": "zscore_foreground"},
            BRAIN_CHANNELS,
            labels=BRATS_LABELS,
            preprocessing={"modality": "mr"},
            regions=BRATS_REGIONS,
        ),
    )
}


def list_phantoms() -> list[str]:
    return sorted(PHANTOMS)


def get_phantom(name: str) -> PhantomInfo:
    if name not in PHANTOMS:
        raise CtxRestoreError(f"unknown phantom '{name}'; built-in phantoms: {list_phantoms()}")
    return PHANTOMS[name]


def phantom_dataset(
    name: str,
    length: int,
    *,
    seed: int = 0,
    spatial_size: Sequence[int] = (128, 128),
    normalized: bool = True,
    **options,
) -> PhantomDataset:
    """A Dataset of `length` samples of phantom `name`; images normalised for a network."""
    info = get_phantom(name)
    return PhantomDataset(
        info.generator,
        length,
        seed=seed,
        spatial_size=spatial_size,
        intensity=info.intensity if normalized else None,
        **options,
    )
