"""Labelled data for fine-tuning: a built-in phantom or files in a layout users have, read
into memory in the task's batch format (tasks/base.py) with a case id and a stratum per item.

- classify: class sub-folders or a CSV of (image, label) (data.layouts); one case per file.
- segment: an MSD / nnU-Net folder (dataset.json, imagesTr, labelsTr); one case per volume.
- localize: the same folder, with boxes from `boxes.csv` when present, else from the masks;
  organs = the labels other than 0; the masks are kept when every case has one (the U-Net box
  heads learn them). Or a boxes CSV alone (its images relative to it).
Files are read, checked (label grid and values), resampled and normalised by data.loading
(cached on disk); with `skip_bad`, a bad case is skipped with a warning instead of stopping.
A 2D task on 3D volumes trains on their slices along `slice_axis` (air slices without labels
left out); the slices of one volume share its case id, so the splits never put one volume on
two sides. Items are resized to the task's spatial size; spacing follows the resizing, boxes
are scaled with the image.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.layouts import (
    BOXES_FILE,
    DATASET_FILE,
    SegmentationLayout,
    WorldBox,
    read_boxes_csv,
    read_classification,
    read_segmentation_layout,
)
from ctxrestore.data.loading import (
    BadFiles,
    PreparedCase,
    check_label_values,
    hint_declared_modality,
    load_case,
)
from ctxrestore.data.phantoms import get_phantom, phantom_dataset
from ctxrestore.data.preprocess import Preprocessing, slice_indices, take_slice
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.transfer import GENERIC_CHANNEL
from ctxrestore.progress import track
from ctxrestore.tasks.classify import ClassificationTask
from ctxrestore.tasks.localize import LocalizationTask, boxes_from_masks
from ctxrestore.tasks.segment import SegmentationTask

logger = logging.getLogger(__name__)

DEFAULT_PHANTOMS = {"classify": "ultrasound", "localize": "abdomen", "segment": "brain"}


@dataclass(frozen=True)
class FolderOptions:
    """How files become items: preprocessing, cache, slicing of volumes, bad files."""

    preprocessing: Preprocessing
    cache: ArrayCache
    slice_axis: int = 0
    skip_bad: bool = False


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
    preprocessing: dict | None = None  # files only (data.preprocess.Preprocessing JSON)
    skipped: str | None = None  # how many bad files --skip-bad left out

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


def _localize_items(values: Sequence[int], items: list[dict]) -> None:
    """Add "boxes"/"present" from each item's mask (in place); the mask stays for the mask
    box head (tasks/localize.py), which learns the organs themselves."""
    for item in items:
        boxes, present = boxes_from_masks(item["mask"][None], list(values))
        item["boxes"], item["present"] = boxes[0], present[0]


# ----------------------------------------------------------------------------- phantoms
# A benchmark fine-tunes dozens of runs on the same labelled cohort in one process: generate it
# once. Runs only read the items (batches are collated copies), so sharing them is safe.
@functools.lru_cache(maxsize=2)
def phantom_data(
    task_name: str, phantom: str, num_images: int, spatial_size: tuple[int, ...], seed: int
) -> LabelledData:
    """`num_images` samples of a phantom (each its own case), generated once, kept in memory."""
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
        task = LocalizationTask(tuple(info.labels[v] for v in values), organ_values=values)
        _localize_items(values, items)
    else:
        values = tuple(sorted(info.labels))
        task = SegmentationTask(
            values, tuple(info.labels[v] for v in values), regions=dict(info.regions)
        )
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
    tensor = torch.from_numpy(np.array(image, dtype=np.float32))  # a copy, off the memmap
    old = torch.tensor(tensor.shape[1:], dtype=torch.float32)
    size = tuple(int(s) for s in spatial_size)
    scale = torch.tensor(size, dtype=torch.float32) / old
    spacing_tensor = torch.ones(len(size)) if spacing is None else torch.tensor(spacing)
    spacing_tensor = (spacing_tensor.float() / scale).float()
    mask_tensor = None if mask is None else torch.from_numpy(np.array(mask, dtype=np.int64))
    if tuple(tensor.shape[1:]) != size:
        mode = "bilinear" if len(size) == 2 else "trilinear"
        tensor = F.interpolate(
            tensor[None], size=size, mode=mode, align_corners=False, antialias=len(size) == 2
        )[0]
        if mask_tensor is not None:
            mask_tensor = F.interpolate(mask_tensor[None, None].float(), size=size, mode="nearest")
            mask_tensor = mask_tensor[0, 0].long()
    return tensor.contiguous(), spacing_tensor, mask_tensor, scale


def _check_dims(case: PreparedCase, spatial_dims: int, allow_slicing: bool) -> None:
    dims = case.image.ndim - 1
    if dims == spatial_dims or (allow_slicing and dims == 3 and spatial_dims == 2):
        return
    raise CtxRestoreError(
        f"{case.source} is read as shape {case.image.shape} ({dims} spatial dims), but the "
        f"task is {spatial_dims}D; use --spatial-dims {dims} or convert the file"
    )


def _planes(case: PreparedCase, spatial_dims: int, slice_axis: int):
    """(slice index or None, image, mask, spacing) of the case itself, or of its slices along
    `slice_axis` when a 2D task reads a volume (air slices without any label are left out)."""
    if case.image.ndim - 1 == spatial_dims:
        yield None, case.image, case.label, case.spacing
        return
    kept = set(slice_indices(case.foreground, slice_axis))
    if case.label is not None:
        labelled = np.moveaxis(case.label, slice_axis, 0).reshape(case.label.shape[slice_axis], -1)
        kept |= set(np.flatnonzero(labelled.any(axis=1)).tolist())
    spacing = tuple(s for axis, s in enumerate(case.spacing) if axis != slice_axis)
    for index in sorted(kept):
        mask = None if case.label is None else take_slice(case.label[None], slice_axis, index)[0]
        yield index, take_slice(case.image, slice_axis, index), mask, spacing


class _Reader:
    """What every folder reader shares: preprocessing, cache, bad-file policy, slicing."""

    def __init__(self, options: FolderOptions, spatial_size: Sequence[int]) -> None:
        self.options = options
        self.spatial_size = tuple(spatial_size)
        self.bad = BadFiles(options.skip_bad)

    def load(
        self, name: str, images, label=None, *, allow_slicing: bool, channels=None, labels=None
    ):
        def read() -> PreparedCase:
            case = load_case(name, images, self.options.preprocessing, self.options.cache, label)
            _check_dims(case, len(self.spatial_size), allow_slicing)
            if channels is not None and case.image.shape[0] != channels:
                raise CtxRestoreError(
                    f"{case.source} has {case.image.shape[0]} channel(s) but dataset.json "
                    f"declares {channels}"
                )
            if labels is not None and case.label is not None:
                check_label_values(case.label, labels, str(label))
            return case

        return self.bad.attempt(name, read)


def _classify_folder(data: Path, spatial_size, options: FolderOptions) -> LabelledData:
    files, class_names = read_classification(data)
    task = ClassificationTask(tuple(class_names))
    reader = _Reader(options, spatial_size)
    root = data.parent if data.is_file() else data
    items, cases, channels = [], [], set()
    for path, label in track(files, description=f"reading {data.name}"):
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        case = reader.load(name, [path], allow_slicing=False)
        if case is None:
            continue
        channels.add(case.image.shape[0])
        tensor, spacing_tensor, _, _ = resize_item(case.image, case.spacing, spatial_size)
        items.append({"image": tensor, "spacing": spacing_tensor, "label": torch.tensor(label)})
        cases.append(name)
    skipped = reader.bad.summary(len(files), "images")
    return _folder_data(task, items, cases, channels, None, spatial_size, options, data, skipped)


def _segmentation_folder(task_name: str, folder: Path, spatial_size, options) -> LabelledData:
    layout = read_segmentation_layout(folder)
    hint_declared_modality(options.preprocessing, layout.channel_names, str(folder / DATASET_FILE))
    values = tuple(sorted(layout.labels))
    boxes_csv = folder / BOXES_FILE
    if task_name == "segment":
        task = SegmentationTask(values, tuple(layout.labels[v] for v in values))
    else:
        organ_values = [v for v in values if v != 0]
    listed = read_boxes_csv(boxes_csv) if task_name == "localize" and boxes_csv.is_file() else {}
    # The organ masks are read when every case has one, also beside a boxes.csv (its boxes
    # are then the targets and the masks train the U-Net box heads).
    masked = _every_case_masked(layout)
    if task_name == "localize":
        task = LocalizationTask(
            tuple(layout.labels[v] for v in organ_values),
            organ_values=tuple(organ_values) if masked else None,
        )
    reader = _Reader(options, spatial_size)
    items, cases = [], []
    for case in track(layout.cases, description=f"reading {folder.name}"):
        if case.label is None and not listed:
            raise CtxRestoreError(
                f"case {case.name} in {folder / 'dataset.json'} has no 'label': {task_name} "
                "needs a mask per case" + (" or a boxes.csv" if task_name == "localize" else "")
            )
        prepared = reader.load(
            case.name, case.images, case.label, allow_slicing=True,
            channels=len(layout.channel_names), labels=values,
        )  # fmt: skip
        if prepared is None:
            continue
        case_boxes = _case_boxes(listed, case, prepared, task) if listed else None
        for index, plane, plane_mask, plane_spacing in _planes(
            prepared, len(spatial_size), options.slice_axis
        ):
            tensor, spacing_tensor, mask_tensor, scale = resize_item(
                plane, plane_spacing, spatial_size, plane_mask
            )
            item = {"image": tensor, "spacing": spacing_tensor}
            if masked:
                item["mask"] = mask_tensor
            if case_boxes is not None:
                item.update(_plane_boxes(*case_boxes, index, options.slice_axis, scale))
            elif task_name == "localize":
                boxes, present = boxes_from_masks(mask_tensor[None], organ_values)
                item["boxes"], item["present"] = boxes[0], present[0]
            items.append(item)
            cases.append(case.name)
    skipped = reader.bad.summary(len(layout.cases), "cases")
    return _folder_data(
        task, items, cases, {len(layout.channel_names)}, layout.channel_names,
        spatial_size, options, folder, skipped,
    )  # fmt: skip


def _case_boxes(listed: dict, case, prepared: PreparedCase, task: LocalizationTask):
    """The boxes.csv rows of an MSD case, keyed by its first channel file's name."""
    key = next((k for k in listed if Path(k).name == case.images[0].name), None)
    if key is None:
        raise CtxRestoreError(f"{BOXES_FILE} has no rows for {case.images[0].name}")
    return _listed_boxes(listed[key], key, prepared, task)


def _listed_boxes(rows: dict, key: str, prepared: PreparedCase, task: LocalizationTask):
    """(boxes (O, 2, D), present (O,)) from one image's box rows ({organ: box or None}), in
    voxels of the preprocessed grid: world boxes mapped through the file's affine, then scaled
    by the resampling. An organ without a row is absent."""
    shape = prepared.image.shape[1:]
    to_grid = torch.tensor(shape, dtype=torch.float32) / torch.tensor(prepared.original_shape)
    boxes = torch.zeros(len(task.organ_names), 2, len(shape))
    present = torch.zeros(len(task.organ_names))
    for index, organ in enumerate(task.organ_names):
        box = rows.get(organ)
        if isinstance(box, WorldBox):
            if len(shape) != 3:
                raise CtxRestoreError(f"a world-coordinate box for the 2D image {key}")
            box = box.to_voxels(prepared.affine, prepared.original_shape)
        if box is not None:
            if len(box[0]) != len(shape):
                raise CtxRestoreError(
                    f"{BOXES_FILE}: the box of {organ} in {key} has {len(box[0])} coordinates, "
                    f"the image {len(shape)} axes"
                )
            boxes[index] = torch.tensor(box, dtype=torch.float32) * to_grid
            present[index] = 1.0
    return boxes, present


def _plane_boxes(boxes, present, index: int | None, axis: int, scale: torch.Tensor) -> dict:
    """The case's boxes for one item: all of them, or for slice `index` along `axis` the
    organs whose box spans it, without that axis; scaled by the resizing."""
    if index is not None:
        spans = (boxes[:, 0, axis] <= index + 0.5) & (boxes[:, 1, axis] > index + 0.5)
        present = present * spans.float()
        keep = [a for a in range(boxes.shape[-1]) if a != axis]
        boxes = boxes[..., keep] * present[:, None, None]
    return {"boxes": boxes * scale, "present": present}


def _boxes_file_data(path: Path, spatial_size, options: FolderOptions) -> LabelledData:
    """Localisation from a boxes CSV alone: its images (paths relative to it), their boxes;
    organs = every label the file names, in sorted order."""
    listed = read_boxes_csv(path)
    organs = sorted({organ for rows in listed.values() for organ in rows})
    if not organs:
        raise CtxRestoreError(f"{path} lists no boxes")
    task = LocalizationTask(tuple(organs))
    reader = _Reader(options, spatial_size)
    items, cases, channels = [], [], set()
    for key in track(sorted(listed), description=f"reading {path.name}"):
        prepared = reader.load(key, [(path.parent / key).resolve()], allow_slicing=True)
        if prepared is None:
            continue
        channels.add(prepared.image.shape[0])
        boxes, present = _listed_boxes(listed[key], key, prepared, task)
        for index, plane, _, plane_spacing in _planes(
            prepared, len(spatial_size), options.slice_axis
        ):
            tensor, spacing_tensor, _, scale = resize_item(plane, plane_spacing, spatial_size)
            item = {"image": tensor, "spacing": spacing_tensor}
            item.update(_plane_boxes(boxes, present, index, options.slice_axis, scale))
            items.append(item)
            cases.append(key)
    skipped = reader.bad.summary(len(listed), "images")
    return _folder_data(task, items, cases, channels, None, spatial_size, options, path, skipped)


def _folder_data(
    task, items, cases, channels, channel_names, spatial_size, options, data, skipped
) -> LabelledData:
    if not items:
        raise CtxRestoreError(f"no usable labelled image in {data}: every file was skipped")
    if len(channels) != 1:
        raise CtxRestoreError(
            f"the images in {data} differ in channel count {sorted(channels)}; give every "
            "image the same channels"
        )
    count = channels.pop()
    names = tuple(channel_names or (f"{GENERIC_CHANNEL}{c}" for c in range(count)))
    return LabelledData(
        task=task,
        items=items,
        cases=cases,
        strata=[_stratum(task, item) for item in items],
        channel_names=names,
        spatial_size=tuple(spatial_size),
        intensity=options.preprocessing.intensity,
        source=str(data),
        preprocessing=options.preprocessing.to_json(),
        skipped=skipped,
    )


def boxes_only(data: Path | str | None) -> bool:
    """Whether localisation data gives boxes and no label maps: a boxes CSV, or a folder with
    a boxes.csv and a case without a mask. A phantom (None) has masks."""
    if data is None:
        return False
    data = Path(data)
    if _is_boxes_table(data):
        return True
    if not (data / BOXES_FILE).is_file():
        return False
    return not _every_case_masked(read_segmentation_layout(data))


def _every_case_masked(layout: SegmentationLayout) -> bool:
    """Whether every case of a segmentation layout has a mask (then a localisation folder's
    masks are read, also beside a boxes.csv)."""
    return all(case.label is not None for case in layout.cases)


def _is_boxes_table(data: Path) -> bool:
    """A boxes CSV given as the data itself (images and their boxes, no folder layout)."""
    return data.is_file() and data.suffix.lower() == ".csv"


def folder_data(
    task_name: str, data: Path | str, spatial_size: Sequence[int], options: FolderOptions
) -> LabelledData:
    """A task's labelled data from files (see the module docstring)."""
    data = Path(data)
    if not data.exists():
        raise CtxRestoreError(f"data {data} does not exist")
    if task_name == "classify":
        return _classify_folder(data, spatial_size, options)
    if task_name == "localize" and _is_boxes_table(data):
        return _boxes_file_data(data, spatial_size, options)
    if not data.is_dir():
        raise CtxRestoreError(
            f"{task_name} data {data} must be a folder with a dataset.json"
            + (" or a boxes CSV" if task_name == "localize" else "")
        )
    return _segmentation_folder(task_name, data, spatial_size, options)
