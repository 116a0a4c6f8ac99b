"""Labelled data for fine-tuning: a built-in phantom or a folder in a layout users have, read
into memory in the task's batch format (tasks/base.py) with a case id and a stratum per item.

- classify: class sub-folders (data.layouts.read_class_folders); one case per file.
- segment: an MSD / nnU-Net folder (dataset.json, imagesTr, labelsTr); one case per volume.
- localize: the same folder, with boxes from `boxes.csv` when present, else from the masks;
  organs = the labels other than 0.
A 2D task on 3D volumes trains on their axial slices (array axis 0); the slices of one volume
share its case id, so the splits never put one volume on two sides.

Images are scaled by `intensity` (data.intensity; phantoms use their own) and resized to the
task's spatial size; spacing follows the resizing, boxes are scaled with the image.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import track

from ctxrestore.data.intensity import normalize_intensity
from ctxrestore.data.layouts import (
    BOXES_FILE,
    read_any,
    read_boxes_csv,
    read_class_folders,
    read_segmentation_case,
    read_segmentation_layout,
)
from ctxrestore.data.phantoms import get_phantom, phantom_dataset
from ctxrestore.errors import CtxRestoreError
from ctxrestore.tasks.classify import ClassificationTask
from ctxrestore.tasks.localize import LocalizationTask, boxes_from_masks
from ctxrestore.tasks.segment import SegmentationTask

logger = logging.getLogger(__name__)

DEFAULT_PHANTOMS = {"classify": "ultrasound", "localize": "abdomen", "segment": "brain"}


@dataclass(frozen=True)
class LabelledData:
    """items[i]: one unbatched item in the task's batch format; cases[i] its patient/volume;
    strata[i] what the splits balance (class, or which labels / organs it shows)."""

    task: ClassificationTask | LocalizationTask | SegmentationTask
    items: list[dict[str, torch.Tensor]]
    cases: list[str]
    strata: list[str]
    channel_names: tuple[str, ...]
    spatial_size: tuple[int, ...]
    intensity: dict
    source: str

    @property
    def in_channels(self) -> int:
        return len(self.channel_names)


def _stratum(task, item: dict[str, torch.Tensor]) -> str:
    if isinstance(task, ClassificationTask):
        return task.class_names[int(item["label"])]
    if isinstance(task, LocalizationTask):
        shown = [name for name, p in zip(task.organ_names, item["present"].tolist()) if p]
        return "+".join(shown) or "none"
    values = sorted(int(v) for v in torch.unique(item["mask"]) if v != 0)
    return "+".join(map(str, values)) or "background"


def _localize_items(task: LocalizationTask, values: Sequence[int], items: list[dict]) -> None:
    """Add "boxes"/"present" from each item's mask (in place), then drop the mask."""
    for item in items:
        boxes, present = boxes_from_masks(item.pop("mask")[None], list(values))
        item["boxes"], item["present"] = boxes[0], present[0]


# ----------------------------------------------------------------------------- phantoms
def phantom_data(
    task_name: str, phantom: str, num_images: int, spatial_size: Sequence[int], seed: int
) -> LabelledData:
    """`num_images` samples of a phantom (each its own case), generated now, kept in memory."""
    info = get_phantom(phantom)
    if info.task != task_name:
        raise CtxRestoreError(
            f"phantom '{phantom}' has labels for '{info.task}', not '{task_name}'; the "
            f"{task_name} phantom is '{DEFAULT_PHANTOMS[task_name]}'"
        )
    dataset = phantom_dataset(phantom, num_images, seed=seed, spatial_size=spatial_size)
    items = [dataset[i] for i in track(range(num_images), description=f"phantom {phantom}")]
    if task_name == "classify":
        task = ClassificationTask(tuple(info.class_names))
        for item in items:
            item.pop("mask", None)  # structure masks are not classification labels
    elif task_name == "localize":
        values = [v for v in sorted(info.labels) if v != 0]
        task = LocalizationTask(tuple(info.labels[v] for v in values))
        _localize_items(task, values, items)
    else:
        values = tuple(sorted(info.labels))
        regions = {}
        if phantom == "brain":
            from ctxrestore.data.phantoms.brain import BRATS_REGIONS

            regions = dict(BRATS_REGIONS)
        task = SegmentationTask(values, tuple(info.labels[v] for v in values), regions=regions)
    return LabelledData(
        task=task,
        items=items,
        cases=[f"{phantom}-{i:05d}" for i in range(num_images)],
        strata=[_stratum(task, item) for item in items],
        channel_names=tuple(info.channel_names),
        spatial_size=tuple(spatial_size),
        intensity=dict(info.intensity),
        source=f"phantom:{phantom} (seed {seed}, {num_images} images)",
    )


# ----------------------------------------------------------------------------- folders
def resize_item(
    image: np.ndarray,
    spacing: Sequence[float] | None,
    spatial_size: Sequence[int],
    mask: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(image (C, *size), spacing (D,), mask (*size) or None, scale (D,) new/old per axis)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    old = torch.tensor(tensor.shape[1:], dtype=torch.float32)
    size = tuple(int(s) for s in spatial_size)
    scale = torch.tensor(size, dtype=torch.float32) / old
    spacing_tensor = torch.ones(len(size)) if spacing is None else torch.tensor(spacing)
    spacing_tensor = (spacing_tensor.float() / scale).float()
    mask_tensor = None if mask is None else torch.from_numpy(np.asarray(mask, dtype=np.int64))
    if tuple(tensor.shape[1:]) != size:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        tensor = F.interpolate(
            tensor[None], size=size, mode=mode, align_corners=False, antialias=len(size) == 2
        )[0]
        if mask_tensor is not None:
            mask_tensor = F.interpolate(mask_tensor[None, None].float(), size=size, mode="nearest")
            mask_tensor = mask_tensor[0, 0].long()
    return tensor.contiguous(), spacing_tensor, mask_tensor, scale


def _check_dims(path: Path, array: np.ndarray, spatial_dims: int, allow_slicing: bool) -> None:
    dims = array.ndim - 1
    if dims == spatial_dims or (allow_slicing and dims == 3 and spatial_dims == 2):
        return
    raise CtxRestoreError(
        f"{path} is read as shape {array.shape} ({dims} spatial dims), but the task is "
        f"{spatial_dims}D; use --spatial-dims {dims} or convert the file"
    )


def _slices(image: np.ndarray, mask, spacing, spatial_dims: int):
    """The image itself, or its axial slices when a 2D task reads a volume."""
    if image.ndim - 1 == spatial_dims:
        yield image, mask, spacing
        return
    for z in range(image.shape[1]):
        yield (
            image[:, z],
            None if mask is None else mask[z],
            None if spacing is None else tuple(spacing[1:]),
        )


def _classify_folder(folder: Path, spatial_size, intensity) -> LabelledData:
    files, class_names = read_class_folders(folder)
    task = ClassificationTask(tuple(class_names))
    items, cases, channels = [], [], set()
    for path, label in track(files, description=f"reading {folder.name}"):
        image, spacing = read_any(path)
        _check_dims(path, image, len(spatial_size), allow_slicing=False)
        channels.add(image.shape[0])
        tensor, spacing_tensor, _, _ = resize_item(
            normalize_intensity(image, intensity), spacing, spatial_size
        )
        items.append({"image": tensor, "spacing": spacing_tensor, "label": torch.tensor(label)})
        cases.append(path.relative_to(folder).with_suffix("").as_posix())
    return _folder_data(task, items, cases, channels, None, spatial_size, intensity, folder)


def _segmentation_folder(task_name: str, folder: Path, spatial_size, intensity) -> LabelledData:
    layout = read_segmentation_layout(folder)
    values = tuple(sorted(layout.labels))
    boxes_csv = folder / BOXES_FILE
    if task_name == "segment":
        task = SegmentationTask(values, tuple(layout.labels[v] for v in values))
    else:
        organ_values = [v for v in values if v != 0]
        task = LocalizationTask(tuple(layout.labels[v] for v in organ_values))
    listed = read_boxes_csv(boxes_csv) if task_name == "localize" and boxes_csv.is_file() else {}
    items, cases = [], []
    for case in track(layout.cases, description=f"reading {folder.name}"):
        image, mask, spacing = read_segmentation_case(case)
        _check_dims(case.images[0], image, len(spatial_size), allow_slicing=True)
        if mask is None and not listed:
            raise CtxRestoreError(
                f"case {case.name} in {folder / 'dataset.json'} has no 'label': {task_name} "
                "needs a mask per case" + (" or a boxes.csv" if task_name == "localize" else "")
            )
        image = normalize_intensity(image, intensity)
        for plane, plane_mask, plane_spacing in _slices(image, mask, spacing, len(spatial_size)):
            tensor, spacing_tensor, mask_tensor, scale = resize_item(
                plane, plane_spacing, spatial_size, plane_mask
            )
            item = {"image": tensor, "spacing": spacing_tensor}
            if task_name == "segment":
                item["mask"] = mask_tensor
            elif listed:
                item.update(_listed_boxes(listed, case, task, scale))
            else:
                boxes, present = boxes_from_masks(mask_tensor[None], organ_values)
                item["boxes"], item["present"] = boxes[0], present[0]
            items.append(item)
            cases.append(case.name)
    return _folder_data(
        task, items, cases, {len(layout.channel_names)}, layout.channel_names,
        spatial_size, intensity, folder,
    )  # fmt: skip


def _listed_boxes(listed: dict, case, task: LocalizationTask, scale: torch.Tensor) -> dict:
    """boxes.csv rows of a case's first channel file (its path relative to the folder)."""
    key = next((k for k in listed if Path(k).name == case.images[0].name), None)
    if key is None:
        raise CtxRestoreError(f"{BOXES_FILE} has no rows for {case.images[0].name}")
    dims = scale.numel()
    boxes = torch.zeros(len(task.organ_names), 2, dims)
    present = torch.zeros(len(task.organ_names))
    for index, organ in enumerate(task.organ_names):
        box = listed[key].get(organ)
        if box is not None:
            boxes[index] = torch.tensor(box, dtype=torch.float32) * scale
            present[index] = 1.0
    return {"boxes": boxes, "present": present}


def _folder_data(task, items, cases, channels, channel_names, spatial_size, intensity, folder):
    if len(channels) != 1:
        raise CtxRestoreError(
            f"the images in {folder} differ in channel count {sorted(channels)}; give every "
            "image the same channels"
        )
    count = channels.pop()
    names = tuple(channel_names or (f"channel_{c}" for c in range(count)))
    return LabelledData(
        task=task,
        items=items,
        cases=cases,
        strata=[_stratum(task, item) for item in items],
        channel_names=names,
        spatial_size=tuple(spatial_size),
        intensity=dict(intensity),
        source=str(folder),
    )


def folder_data(
    task_name: str, folder: Path | str, spatial_size: Sequence[int], intensity: dict
) -> LabelledData:
    folder = Path(folder)
    if not folder.is_dir():
        raise CtxRestoreError(f"data folder {folder} does not exist")
    if task_name == "classify":
        return _classify_folder(folder, spatial_size, intensity)
    return _segmentation_folder(task_name, folder, spatial_size, intensity)
