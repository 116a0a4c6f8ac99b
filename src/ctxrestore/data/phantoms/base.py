"""What every task phantom returns, and one Dataset over any phantom generator.

A phantom generator is a pure function `(index, *, seed, spatial_size) -> PhantomSample`
drawing from `np.random.default_rng([seed, index])`: a sample depends on (seed, index) only,
not on the order of reads or the worker that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from ctxrestore.data.intensity import normalize_intensity
from ctxrestore.errors import CtxRestoreError

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (first voxel, one past the last voxel) per axis


@dataclass(frozen=True)
class PhantomSample:
    """One phantom image with its exact labels.

    image: (C, *spatial) float32. spacing: mm per spatial axis.
    label: class index (classification phantoms).
    mask: (*spatial) uint8 label map (segmentation / organ masks), 0 = background.
    boxes: per organ name, the box of its mask, or None when the organ is not in view.
    """

    image: np.ndarray
    spacing: tuple[float, ...]
    channel_names: tuple[str, ...]
    label: int | None = None
    mask: np.ndarray | None = None
    boxes: dict[str, Box | None] | None = None
    meta: dict = field(default_factory=dict)


Generator = Callable[..., PhantomSample]


def check_spatial_size(name: str, spatial_size: Sequence[int], minimum: int = 16) -> tuple:
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in (2, 3):
        raise CtxRestoreError(
            f"{name} phantom: spatial_size {tuple(spatial_size)} has {len(size)} axes; give 2 "
            f"(H, W) or 3 (D, H, W)"
        )
    if min(size) < minimum:
        raise CtxRestoreError(
            f"{name} phantom: spatial_size {size} is too small; every axis must be >= {minimum}"
        )
    return size


def mask_box(mask: np.ndarray) -> Box | None:
    """The tight box (first, one-past-last voxel per axis) of a boolean mask; None if empty."""
    if not mask.any():
        return None
    first, last = [], []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        first.append(int(present[0]))
        last.append(int(present[-1]) + 1)
    return tuple(first), tuple(last)


class PhantomDataset(Dataset):
    """`length` samples of one generator as dicts of tensors, for the engine's DataLoader.

    `intensity` (see data.intensity) normalises the image for a network; None keeps raw values.

    Keys: "image" (C, *spatial) float32, and, where the phantom has them, "label" (int64
    scalar), "mask" (*spatial) int64, "spacing" (D,) float32.
    """

    def __init__(
        self,
        generator: Generator,
        length: int,
        *,
        seed: int = 0,
        spatial_size: Sequence[int] = (128, 128),
        intensity: dict | None = None,
        **options,
    ) -> None:
        if length < 1:
            raise CtxRestoreError(f"a phantom dataset needs length >= 1, got {length}")
        self.generator = generator
        self.length = length
        self.seed = seed
        self.spatial_size = tuple(spatial_size)
        self.intensity = intensity
        self.options = options

    def __len__(self) -> int:
        return self.length

    def sample(self, index: int) -> PhantomSample:
        if not 0 <= index < self.length:
            raise IndexError(f"phantom index {index} out of range [0, {self.length})")
        return self.generator(index, seed=self.seed, spatial_size=self.spatial_size, **self.options)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.sample(index)
        image = sample.image
        if self.intensity is not None:
            image = normalize_intensity(image, self.intensity)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "spacing": torch.tensor(sample.spacing, dtype=torch.float32),
        }
        if sample.label is not None:
            item["label"] = torch.tensor(sample.label, dtype=torch.int64)
        if sample.mask is not None:
            item["mask"] = torch.from_numpy(sample.mask.astype(np.int64))
        return item
