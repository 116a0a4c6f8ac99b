"""Unlabelled images for pretraining, from any layout the labelled commands read: a folder of
images, volumes and DICOM series (recursively, so class sub-folders too), a classification CSV,
or an MSD / nnU-Net folder (its training cases' images; labels are never read).

Every case is preprocessed once (data.loading, cached on disk). A 2D network then sees the
slices along `slice_axis` that hold foreground (air slices are skipped); a 3D network sees
patches of `spatial_size` centred on foreground voxels, at fixed seeded positions, enough to
cover each volume about once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.layouts import DATASET_FILE, read_class_csv, read_segmentation_layout
from ctxrestore.data.loading import BadFiles, PreparedCase, hint_declared_modality, load_case
from ctxrestore.data.preprocess import (
    MIN_FOREGROUND,
    Preprocessing,
    crop_or_pad,
    sample_patch_corners,
    slice_indices,
    take_slice,
)
from ctxrestore.data.readers import ImageSource, find_sources
from ctxrestore.errors import CtxRestoreError
from ctxrestore.progress import track

Case = tuple[str, tuple[ImageSource | Path, ...]]


def unlabelled_cases(data: Path | str) -> tuple[list[Case], tuple[str, ...] | None]:
    """(name, one source per channel file) for every case of any layout (module docstring),
    and the channel names the layout declares (an MSD / nnU-Net dataset.json), else None."""
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        items, _ = read_class_csv(data)  # a classification or boxes CSV: each image once
        paths = dict.fromkeys(path for path, _ in items)
        return [(path.name, (path,)) for path in paths], None
    if data.is_dir() and (data / DATASET_FILE).is_file():
        layout = read_segmentation_layout(data)
        cases = [(case.name, tuple(case.images)) for case in layout.cases]
        return cases, layout.channel_names
    return [(source.name, (source,)) for source in find_sources(data)], None


class UnlabelledDataset(Dataset):
    """`{"image": (C, *spatial_size) float32}` items; see the module docstring."""

    def __init__(
        self,
        data: Path | str,
        *,
        preprocessing: Preprocessing,
        spatial_size: Sequence[int],
        cache: ArrayCache,
        slice_axis: int = 0,
        in_channels: int | None = None,
        skip_bad: bool = False,
        seed: int = 0,
    ) -> None:
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if slice_axis not in (0, 1, 2):
            raise CtxRestoreError(f"slice_axis must be 0, 1 or 2 (z, y, x), got {slice_axis}")
        self.slice_axis = slice_axis
        self._minimum: dict[int, float] = {}
        # channel_names: what each channel holds, where the layout says so.
        cases, self.channel_names = unlabelled_cases(data)
        if self.channel_names is not None:
            hint_declared_modality(
                preprocessing, self.channel_names, str(Path(data) / DATASET_FILE)
            )
        bad = BadFiles(skip_bad)
        self.cases: list[PreparedCase] = []
        for name, sources in track(cases, description=f"preprocessing {Path(data).name}"):
            case = bad.attempt(name, self._load, name, sources, preprocessing, cache, in_channels)
            if case is not None:
                self.cases.append(case)
        self.skipped = bad.summary(len(cases), "images")
        if not self.cases:
            raise CtxRestoreError(f"no usable image in {data}: every file was skipped as bad")
        channels = {case.image.shape[0] for case in self.cases}
        if len(channels) > 1:
            counts = {
                c: next(k.source for k in self.cases if k.image.shape[0] == c) for c in channels
            }
            raise CtxRestoreError(
                f"the images in {data} differ in channel count: {counts}; give every image the "
                "same channels (or --in-channels to pick)"
            )
        self.in_channels = channels.pop()
        rng = np.random.default_rng(seed)
        self.items = [
            item for index, case in enumerate(self.cases) for item in self._items(index, case, rng)
        ]
        if not self.items:
            raise CtxRestoreError(
                f"no slice of {data} holds foreground (at least {MIN_FOREGROUND:.0%} of its "
                "voxels above the background); check the intensity preprocessing (--modality)"
            )

    def _load(self, name, sources, preprocessing, cache, in_channels) -> PreparedCase:
        case = load_case(name, sources, preprocessing, cache)
        dims = case.image.ndim - 1
        wanted = len(self.spatial_size)
        if dims < wanted:
            raise CtxRestoreError(
                f"{case.source} is {dims}D (shape {case.image.shape[1:]}), but a {wanted}D "
                "network needs volumes; use --spatial-dims 2 or give volumes"
            )
        if in_channels is not None and case.image.shape[0] != in_channels:
            raise CtxRestoreError(
                f"{case.source} has {case.image.shape[0]} channels but in_channels is {in_channels}"
            )
        return case

    def _items(self, index: int, case: PreparedCase, rng: np.random.Generator) -> list[tuple]:
        dims = case.image.ndim - 1
        if len(self.spatial_size) == 2:
            if dims == 2:
                return [(index, None)]
            chosen = slice_indices(case.foreground, self.slice_axis)
            return [(index, s) for s in chosen]
        shape = case.image.shape[1:]
        count = math.prod(math.ceil(n / p) for n, p in zip(shape, self.spatial_size))
        corners = sample_patch_corners(case.foreground, self.spatial_size, rng, count)
        return [(index, corner) for corner in corners]

    def _background(self, case_index: int) -> float:
        """A case's lowest value, to pad patches with: found once (a scan of the volume)."""
        if case_index not in self._minimum:
            self._minimum[case_index] = float(self.cases[case_index].image.min())
        return self._minimum[case_index]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        case_index, where = self.items[index]
        case = self.cases[case_index]
        if len(self.spatial_size) == 3:
            # crop_or_pad and take_slice return fresh arrays: no second copy off the memmap.
            patch = crop_or_pad(case.image, where, self.spatial_size, self._background(case_index))
            return {"image": torch.from_numpy(patch)}
        if where is None:
            plane = np.array(case.image)  # a 2D image: copied off the memmap
        else:
            plane = take_slice(case.image, self.slice_axis, where)
        tensor = torch.from_numpy(plane)
        if tuple(tensor.shape[1:]) != self.spatial_size:
            tensor = F.interpolate(
                tensor[None], size=self.spatial_size, mode="bilinear", align_corners=False,
                antialias=True,
            )[0]  # fmt: skip
        return {"image": tensor.contiguous()}
