"""From a file's array to what the network sees: resampling, intensity, slices and patches.

`Preprocessing` is recorded in checkpoint specs and applied identically at pretraining,
fine-tuning and prediction. Arrays follow the package convention: images (C, *spatial)
float32, labels (*spatial) integers, spatial (z, y, x) or (y, x), spacing in mm per spatial
axis in the same order. Sampling (`sample_patch_corners`) is separate from applying
(`crop_or_pad`, `take_slice`), which take no randomness.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch

from ctxrestore.data.intensity import (
    DEFAULT_CT_WINDOW,
    MODALITIES,
    intensity_for,
    normalize_intensity,
)
from ctxrestore.errors import CtxRestoreError

__all__ = [
    "MODALITIES",
    "Preprocessing",
    "crop_or_pad",
    "foreground_mask",
    "preprocess",
    "resample",
    "sample_patch_corners",
    "slice_indices",
    "take_slice",
]

# foreground_mask: how far above the background a voxel must be, as a fraction of the
# channel's 1st..99th percentile range (ignores noise in air and hot pixels).
FOREGROUND_TOLERANCE = 0.05
# A slice needs this share of foreground voxels to be trained on (air slices are skipped).
MIN_FOREGROUND = 0.01


@dataclass(frozen=True)
class Preprocessing:
    """What happens to every image between the file and the network; recorded in checkpoint
    specs and applied identically at pretraining, fine-tuning and prediction.

    modality: ct | mr | us | generic (see `intensity.intensity_for`).
    window: CT only; a preset name of `intensity.CT_WINDOWS` or (low, high) HU. None means
        "abdomen" for CT, and is stored as that name so equal settings have equal keys.
    target_spacing: mm per spatial axis, (z, y, x) or (y, x); None keeps the file's spacing.
    """

    modality: str = "generic"
    window: str | tuple[float, float] | None = None
    target_spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise CtxRestoreError(
                f"unknown modality {self.modality!r}; valid: {', '.join(MODALITIES)}"
            )
        if self.modality == "ct":
            window = DEFAULT_CT_WINDOW if self.window is None else self.window
            if not isinstance(window, str):
                window = tuple(float(value) for value in intensity_for("ct", window)["window"])
            object.__setattr__(self, "window", window)
        intensity_for(self.modality, self.window)  # validates the window, or its absence
        if self.target_spacing is not None:
            object.__setattr__(self, "target_spacing", _check_spacing(self.target_spacing))

    @property
    def intensity(self) -> dict:
        """The `normalize_intensity` spec for this modality and window."""
        return intensity_for(self.modality, self.window)

    def to_json(self) -> dict:
        window = list(self.window) if isinstance(self.window, tuple) else self.window
        spacing = None if self.target_spacing is None else list(self.target_spacing)
        return {"modality": self.modality, "window": window, "target_spacing": spacing}

    @classmethod
    def from_json(cls, data: dict) -> Preprocessing:
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise CtxRestoreError(
                f"preprocessing has unknown keys {unknown}; valid keys: {sorted(known)}"
            )
        return cls(**data)

    def key(self) -> str:
        """16 hex characters that change exactly when the preprocessing does."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_spacing(spacing, name: str = "target_spacing") -> tuple[float, ...]:
    try:
        values = tuple(float(value) for value in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) not in (2, 3) or not all(math.isfinite(v) and v > 0 for v in values):
        raise CtxRestoreError(
            f"{name} {spacing!r} is not valid; give 2 (y, x) or 3 (z, y, x) positive spacings in mm"
        )
    return values


def resample(
    array: np.ndarray,
    spacing: Sequence[float],
    target_spacing: Sequence[float],
    *,
    label: bool = False,
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Resample to about `target_spacing` mm, keeping the physical extent.

    array: an image (C, *spatial), interpolated linearly, returned float32; or with
    label=True a label map (*spatial), nearest neighbour, dtype and values kept. Each axis
    gets round(size * spacing / target) voxels (at least 1, halves round up); the returned
    spacing is size * spacing / new_size, so the extent is exactly the original one. Voxel
    centres follow align_corners=False (the grid of voxel centres, not of corners).
    """
    spatial_shape = array.shape if label else array.shape[1:]
    spacing = _check_spacing(spacing, "spacing")
    target = _check_spacing(target_spacing)
    if not len(spacing) == len(target) == len(spatial_shape):
        kind = "label map" if label else "image (C, *spatial)"
        raise CtxRestoreError(
            f"cannot resample a {kind} of shape {array.shape} with spacing {spacing} to "
            f"target_spacing {target}: need one spacing per spatial axis "
            f"({len(spatial_shape)})"
        )
    new_shape = tuple(
        max(1, math.floor(size * old / new + 0.5))
        for size, old, new in zip(spatial_shape, spacing, target)
    )
    new_spacing = tuple(
        size * old / new_size for size, old, new_size in zip(spatial_shape, spacing, new_shape)
    )
    if new_shape == tuple(spatial_shape):
        return np.array(array, dtype=None if label else np.float32), spacing
    if label:
        return _resample_nearest(np.asarray(array), new_shape), new_spacing
    mode = "bilinear" if len(new_shape) == 2 else "trilinear"
    image = np.ascontiguousarray(array, dtype=np.float32)
    if not image.flags.writeable:  # a memory-mapped cache entry; torch wants writable memory
        image = image.copy()
    tensor = torch.from_numpy(image)[None]
    resampled = torch.nn.functional.interpolate(
        tensor, size=new_shape, mode=mode, align_corners=False
    )
    return resampled[0].numpy(), new_spacing


def _resample_nearest(label: np.ndarray, new_shape: tuple[int, ...]) -> np.ndarray:
    # Indexing by the nearest source voxel centre keeps dtype and values exactly (no float
    # round trip, unlike interpolate(mode="nearest"), which is also off by half a voxel).
    indices = [
        np.minimum(((np.arange(new) + 0.5) * old / new).astype(np.int64), old - 1)
        for old, new in zip(label.shape, new_shape)
    ]
    return label[np.ix_(*indices)]


def preprocess(
    array: np.ndarray,
    spacing: Sequence[float],
    prep: Preprocessing,
    label: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
    """image (C, *spatial), its spacing, and an optional label map (*spatial) -> the image
    resampled to prep.target_spacing (when set) and normalised by prep.intensity (float32),
    its new spacing, and the label resampled the same way (nearest neighbour)."""
    spacing = _check_spacing(spacing, "spacing")
    if label is not None and tuple(label.shape) != tuple(array.shape[1:]):
        raise CtxRestoreError(
            f"label shape {label.shape} does not match the image's spatial shape "
            f"{array.shape[1:]} (image shape {array.shape})"
        )
    if prep.target_spacing is not None:
        if label is not None:
            label, _ = resample(label, spacing, prep.target_spacing, label=True)
        array, spacing = resample(array, spacing, prep.target_spacing)
    return normalize_intensity(array, prep.intensity), spacing, label


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """A normalised image (C, *spatial) -> bool (*spatial), True where any channel is not
    background.

    Channels in [0, 1] (CT windows, unit ranges): air is the channel's minimum, and a voxel
    is foreground when it is more than 5% of the channel's 1st..99th percentile range above
    it (so noise in the air does not count; a channel with no spread counts any voxel above
    its minimum). Channels with negative values are z-scores, whose normalisation set the
    background to exactly 0 and kept the foreground's minimum negative: there a voxel is
    foreground when it is not 0.
    """
    foreground = np.zeros(array.shape[1:], dtype=bool)
    for values in array:
        minimum = values.min()
        if minimum < 0:
            foreground |= values != 0
            continue
        low, high = np.percentile(values, [1.0, 99.0])
        foreground |= values - minimum > FOREGROUND_TOLERANCE * (high - low)
    return foreground


def slice_indices(
    foreground: np.ndarray, axis: int, min_fraction: float = MIN_FOREGROUND
) -> list[int]:
    """Indices along `axis` of a bool mask (z, y, x) whose slices have at least
    `min_fraction` foreground voxels (air slices are skipped). May be empty."""
    if not -foreground.ndim <= axis < foreground.ndim:
        raise CtxRestoreError(
            f"slice axis {axis} does not exist in a mask of shape {foreground.shape}; "
            f"use 0..{foreground.ndim - 1}"
        )
    other_axes = tuple(a for a in range(foreground.ndim) if a != axis % foreground.ndim)
    fractions = foreground.mean(axis=other_axes)
    return [int(index) for index in np.flatnonzero(fractions >= min_fraction)]


def take_slice(array: np.ndarray, axis: int, index: int) -> np.ndarray:
    """(C, z, y, x) -> (C, a, b): the 2D slice `index` along spatial `axis` (0, 1 or 2),
    the remaining axes in their order; a copy, also of a memory-mapped array."""
    spatial_ndim = array.ndim - 1
    if not 0 <= axis < spatial_ndim:
        raise CtxRestoreError(
            f"slice axis {axis} does not exist in an image of shape {array.shape} (C, *spatial);"
            f" use 0..{spatial_ndim - 1}"
        )
    if not 0 <= index < array.shape[axis + 1]:
        raise CtxRestoreError(
            f"slice {index} along axis {axis} does not exist in an image of shape "
            f"{array.shape} (C, *spatial); use 0..{array.shape[axis + 1] - 1}"
        )
    # Basic indexing (a view, then one copy): np.take is ~30x slower on a memory map.
    return np.array(array[(slice(None),) * (axis + 1) + (index,)])


def sample_patch_corners(
    foreground: np.ndarray,
    patch_size: Sequence[int],
    generator: np.random.Generator,
    count: int,
) -> list[tuple[int, ...]]:
    """`count` patch corners (one int per axis of the bool mask `foreground`, (*spatial))
    such that each patch, moved to lie inside the volume, contains a foreground voxel drawn
    uniformly.

    The patch is centred on that voxel, then shifted into the volume; an axis shorter than
    the patch gets corner 0 (the caller pads, `crop_or_pad`). A mask with no foreground gives
    uniform corners. Deterministic for a given generator state. The mask is counted once for
    all `count` corners (counting it per corner made building a 3D dataset slow).
    """
    shape = foreground.shape
    patch = _check_patch_size(patch_size, shape)
    flat = foreground.reshape(shape[0], -1)
    counts = np.count_nonzero(flat, axis=1)
    ends = np.cumsum(counts)

    def corner() -> tuple[int, ...]:
        if ends[-1] == 0:
            return tuple(int(generator.integers(max(s - p, 0) + 1)) for s, p in zip(shape, patch))
        # The k-th foreground voxel, found slice by slice so that no index list of the whole
        # volume is built.
        k = int(generator.integers(ends[-1]))
        first = int(np.searchsorted(ends, k, side="right"))
        within = k - int(ends[first] - counts[first])
        offset = np.flatnonzero(flat[first])[within]
        centre = (first, *(int(i) for i in np.unravel_index(offset, shape[1:])))
        return tuple(
            0 if s <= p else int(np.clip(c - p // 2, 0, s - p))
            for c, s, p in zip(centre, shape, patch)
        )

    return [corner() for _ in range(count)]


def _check_patch_size(patch_size: Sequence[int], shape: tuple[int, ...]) -> tuple[int, ...]:
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != len(shape) or min(patch, default=0) < 1:
        raise CtxRestoreError(
            f"patch_size {tuple(patch_size)} is not valid for spatial shape {shape}; give "
            f"{len(shape)} positive sizes"
        )
    return patch


def crop_or_pad(
    array: np.ndarray, corner: Sequence[int], patch_size: Sequence[int], pad_value: float = 0.0
) -> np.ndarray:
    """(C, *spatial) -> (C, *patch_size): the box starting at `corner`; where it reaches
    outside the volume (a volume smaller than the patch) the rest is `pad_value`.

    The last len(corner) axes are spatial, so a label map (*spatial) works too. dtype kept.
    """
    spatial_ndim = len(corner)
    spatial_shape = array.shape[array.ndim - spatial_ndim :]
    patch = _check_patch_size(patch_size, spatial_shape)
    out = np.full(array.shape[: array.ndim - spatial_ndim] + patch, pad_value, array.dtype)
    source, target = [], []
    for start, size, length in zip(corner, spatial_shape, patch):
        low, high = max(int(start), 0), min(int(start) + length, size)
        if high <= low:
            return out
        source.append(slice(low, high))
        target.append(slice(low - int(start), high - int(start)))
    out[(..., *target)] = array[(..., *source)]
    return out
