"""`ctxrestore predict RUN IMAGES --out DIR`: a fine-tuned run applied to new images.

Inputs: one image file, a folder of images (PNG/JPEG/TIFF/NPY/NIfTI), or an MSD / nnU-Net
folder (dataset.json; its cases, one file per channel). Each image is scaled as the run's
training images were (spec "intensity"), resized to the run's image size, predicted, and the
prediction is mapped back to the input's own voxel grid:
- classify: predictions.csv (file, class, one probability per class);
- localize: boxes.csv (the localisation layout: file, label, present, box in voxels of the
  input, plus the presence probability and the slice for volumes seen by a 2D network);
- segment: one label map per input, NIfTI for NIfTI inputs, PNG (label values as grey
  levels) for 2D images.
A 2D network reads volumes slice by slice along array axis 0. predictions.png shows a few
inputs with their predictions.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctxrestore.data.image_folder import IMAGE_SUFFIXES
from ctxrestore.data.intensity import normalize_intensity
from ctxrestore.data.layouts import DATASET_FILE, read_segmentation_layout, write_image
from ctxrestore.data.loading import BadFiles, for_dims, stack_channels
from ctxrestore.data.nifti import is_nifti, write_nifti
from ctxrestore.data.preprocess import Preprocessing, preprocess
from ctxrestore.data.readers import ImageSource, Volume, find_sources, read_volume
from ctxrestore.engine.checkpoint import WEIGHTS_FILE, load_checkpoint
from ctxrestore.engine.distributed import resolve_device
from ctxrestore.engine.loop import BEST_DIR
from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_labelled_gallery
from ctxrestore.files import atomic_write
from ctxrestore.models import build_model
from ctxrestore.tasks.registry import task_from_json

GALLERY_IMAGES = 12


@dataclass(frozen=True)
class PredictInput:
    name: str  # output file stem
    sources: tuple[ImageSource | Path, ...]  # one per channel file, or one holding them all
    source: Path  # what the CSV rows name


@dataclass(frozen=True)
class PredictResult:
    out: Path
    count: int
    files: tuple[Path, ...]
    skipped: str | None = None  # how many inputs --skip-bad left out


def load_run(run: Path, device: torch.device):
    """(model on device, task, spec) of a fine-tuning run: its best weights when it has them."""
    run = Path(run)
    folder = run / BEST_DIR if (run / BEST_DIR / WEIGHTS_FILE).is_file() else run
    state, spec = load_checkpoint(folder)
    if "task" not in spec:
        raise CtxRestoreError(
            f"{run} is not a fine-tuning run (its spec.json has no 'task'); predict needs the "
            "folder that `ctxrestore finetune` wrote"
        )
    model = build_model(spec["model"])
    model.load_state_dict(state)
    return model.to(device).eval(), task_from_json(spec["task"]), spec


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", *IMAGE_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem if path.suffix.lower() in (".nrrd", ".mha", ".mhd", ".dcm") else name


def find_inputs(images: Path, in_channels: int) -> list[PredictInput]:
    """The images to predict (a file, an MSD folder, or any folder read recursively, DICOM
    series included), with their channel files grouped."""
    images = Path(images)
    if images.is_file():
        return [PredictInput(_stem(images), (images,), images)]
    if not images.is_dir():
        raise CtxRestoreError(f"{images}: no such file or folder to predict")
    if (images / DATASET_FILE).is_file():
        layout = read_segmentation_layout(images)
        return [PredictInput(c.name, tuple(c.images), c.images[0]) for c in layout.cases]
    sources = find_sources(images)
    if in_channels > 1 and all(len(s.files) == 1 and is_nifti(s.path) for s in sources):
        return _channel_groups([s.path for s in sources], in_channels)
    return [
        PredictInput(source.name.replace("/", "_"), (source,), source.path) for source in sources
    ]


def _channel_groups(files: list[Path], in_channels: int) -> list[PredictInput]:
    """nnU-Net naming: CASE_0000.nii.gz .. CASE_{C-1:04d}.nii.gz make one input."""
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        stem = _stem(path)
        case, _, channel = stem.rpartition("_")
        if not case or not channel.isdigit():
            raise CtxRestoreError(
                f"{path}: the network takes {in_channels} channels; name the files of a case "
                f"CASE_0000.nii.gz .. CASE_{in_channels - 1:04d}.nii.gz"
            )
        groups.setdefault(case, {})[int(channel)] = path
    inputs = []
    for case, channels in sorted(groups.items()):
        if sorted(channels) != list(range(in_channels)):
            raise CtxRestoreError(
                f"case {case}: found channel files {sorted(channels)}, the network needs "
                f"0..{in_channels - 1}"
            )
        files_in_order = tuple(channels[c] for c in range(in_channels))
        inputs.append(PredictInput(case, files_in_order, files_in_order[0]))
    return inputs


@dataclass(frozen=True)
class PreparedInput:
    """An input read and preprocessed as the run's training data was. `volume`: as read (its
    grid is where outputs go); `image`: after resampling and normalisation."""

    volume: Volume
    image: np.ndarray


def prepare_input(item: PredictInput, spec: dict) -> PreparedInput:
    volume = stack_channels([read_volume(source) for source in item.sources], item.name)
    if volume.array.shape[0] != spec["in_channels"]:
        raise CtxRestoreError(
            f"{item.source} has {volume.array.shape[0]} channel(s); the run was trained on "
            f"{spec['in_channels']} {spec['channel_names']}"
        )
    if "preprocessing" not in spec:  # trained on a phantom: its intensity scaling only
        return PreparedInput(volume, normalize_intensity(volume.array, spec["intensity"]))
    preprocessing = for_dims(Preprocessing.from_json(spec["preprocessing"]), volume, item.name)
    image, _, _ = preprocess(volume.array, volume.spacing, preprocessing)
    return PreparedInput(volume, image)


def _planes(image: np.ndarray, spatial_dims: int, slice_axis: int, source) -> torch.Tensor:
    """(N, C, *S): the image itself (N = 1), or the slices of a volume for a 2D network."""
    tensor = torch.from_numpy(np.array(image, dtype=np.float32))
    dims = tensor.ndim - 1
    if dims == spatial_dims:
        return tensor[None]
    if dims == 3 and spatial_dims == 2:
        return tensor.movedim(1 + slice_axis, 0)
    raise CtxRestoreError(f"{source} has {dims} spatial dims; the run's network is {spatial_dims}D")


@torch.no_grad()
def _predict_planes(model, task, planes: torch.Tensor, size, device, batch_size: int) -> dict:
    """Predictions for every plane, at the network's size; segmentation probabilities are
    resampled back to the planes' own size."""
    outputs: dict[str, list[torch.Tensor]] = {}
    original = tuple(planes.shape[2:])
    mode = "bilinear" if len(size) == 2 else "trilinear"
    for start in range(0, planes.shape[0], batch_size):
        chunk = planes[start : start + batch_size].to(device)
        if tuple(chunk.shape[2:]) != tuple(size):
            chunk = F.interpolate(chunk, size=size, mode=mode, align_corners=False)
        result = task.predict(model, chunk)
        if task.name == "segment":
            probabilities = F.interpolate(
                result["probabilities"], size=original, mode=mode, align_corners=False
            )
            values = torch.tensor(task.label_values, device=probabilities.device)
            result = {"mask": values[probabilities.argmax(dim=1)]}
        for key, value in result.items():
            outputs.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in outputs.items()}


def run_prediction(
    run: Path,
    images: Path,
    out: Path,
    *,
    device: str = "auto",
    batch_size: int = 16,
    skip_bad: bool = False,
) -> PredictResult:
    """Predict every input with a fine-tuned run; see the module docstring for the outputs."""
    if batch_size < 1:
        raise CtxRestoreError(f"batch_size must be >= 1, got {batch_size}")
    torch_device = resolve_device(device)
    model, task, spec = load_run(Path(run), torch_device)
    inputs = find_inputs(Path(images), spec["in_channels"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = tuple(spec["image_size"])
    rows: list[list] = []
    files: list[Path] = []
    panels: list[dict] = []
    slice_axis = spec.get("slice_axis", 0)
    bad = BadFiles(skip_bad)
    for item in inputs:
        prepared = bad.attempt(item.name, prepare_input, item, spec)
        if prepared is None:
            continue
        planes = _planes(prepared.image, spec["spatial_dims"], slice_axis, item.source)
        outputs = _predict_planes(model, task, planes, size, torch_device, batch_size)
        # Network pixels -> voxels of the file's own grid (resampling undone).
        original = list(prepared.volume.array.shape[1:])
        if len(original) > spec["spatial_dims"]:  # a volume seen slice by slice
            del original[slice_axis]
        scale = torch.tensor(size, dtype=torch.float32) / torch.tensor(original)
        files += _write_outputs(out, task, item, prepared, outputs, scale, slice_axis, rows)
        if len(panels) < GALLERY_IMAGES:
            panels.append(_panel(task, item.name, planes, outputs, scale))
    skipped = bad.summary(len(inputs), "inputs")
    if task.name == "classify":
        files.append(_write_csv(out / "predictions.csv", ["file", "class", *[
            f"p_{name}" for name in task.class_names]], rows))  # fmt: skip
    if task.name == "localize":
        dims = spec["spatial_dims"]
        columns = ["image", "label", "present", *[f"start_{a}" for a in range(dims)],
                   *[f"stop_{a}" for a in range(dims)], "probability", "slice"]  # fmt: skip
        files.append(_write_csv(out / "boxes.csv", columns, rows))
    if panels:
        files.append(save_labelled_gallery(out / "predictions.png", panels, columns=4))
    return PredictResult(out, len(inputs) - len(bad.skipped), tuple(files), skipped)


def _write_csv(path: Path, columns: list[str], rows: list[list]) -> Path:
    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            writer.writerows(rows)

    return atomic_write(path, write)


def _write_outputs(
    out: Path, task, item: PredictInput, prepared: PreparedInput, outputs: dict, scale,
    slice_axis: int, rows,
) -> list[Path]:  # fmt: skip
    if task.name == "classify":
        for plane, probabilities in enumerate(outputs["probabilities"]):
            name = (
                item.source.name if len(outputs["probabilities"]) == 1 else f"{item.name}#{plane}"
            )
            label = task.class_names[int(probabilities.argmax())]
            rows.append([name, label, *(f"{p:.5f}" for p in probabilities.tolist())])
        return []
    if task.name == "localize":
        volume_of_slices = len(outputs["boxes"]) > 1
        planes = zip(outputs["boxes"], outputs["presence"], outputs["present"])
        for plane, (boxes, presence, presents) in enumerate(planes):
            for organ, box, probability, present in zip(
                task.organ_names, boxes, presence.tolist(), presents.int().tolist()
            ):
                voxels = (box / scale).round().int().flatten().tolist()
                coordinates = voxels if present else [""] * len(voxels)
                slice_index = plane if volume_of_slices else ""
                rows.append([item.source.name, organ, present, *coordinates,
                             f"{probability:.5f}", slice_index])  # fmt: skip
        return []
    mask = outputs["mask"]
    # A volume seen slice by slice stacks back along its slice axis.
    mask = mask[0] if mask.shape[0] == 1 else mask.movedim(0, slice_axis)
    volume = prepared.volume
    if tuple(mask.shape) != volume.array.shape[1:]:  # resampled: back to the file's grid
        grid = volume.array.shape[1:]
        mask = F.interpolate(mask[None, None].float(), size=grid, mode="nearest")[0, 0].long()
    array = mask.numpy().astype(np.uint8 if mask.max() < 256 else np.int16)
    if array.ndim == 3 or is_nifti(item.source):
        return [write_nifti(out / f"{item.name}.nii.gz", array, volume.spacing, volume.affine)]
    return [_write_label_png(out / f"{item.name}.png", array)]


def _write_label_png(path: Path, array: np.ndarray) -> Path:
    """Label values as 8-bit grey levels (write_image expects [0, 1])."""
    return write_image(path, array.astype(np.float32) / 255.0, (1.0, 1.0))


def _panel(task, name: str, planes: torch.Tensor, outputs: dict, scale) -> dict:
    """A gallery panel: the middle plane, with the prediction drawn over it."""
    index = planes.shape[0] // 2
    image = planes[index, 0]
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    low, high = float(image.min()), float(image.max())
    panel = {"image": ((image - low) / max(high - low, 1e-6)).numpy(), "title": name}
    if task.name == "classify":
        probabilities = outputs["probabilities"][index]
        label = int(probabilities.argmax())
        panel["title"] = f"{name}: {task.class_names[label]} ({float(probabilities[label]):.2f})"
    elif task.name == "localize":
        boxes = []
        for organ, (box, present) in enumerate(
            zip(outputs["boxes"][index], outputs["present"][index])
        ):
            if present and box.shape[-1] == 2:
                first, last = (box / scale).tolist()
                boxes.append((organ + 1, (tuple(first), tuple(last))))
        panel["boxes"] = boxes
    else:
        mask = outputs["mask"][index]
        if mask.ndim == 3:
            mask = mask[mask.shape[0] // 2]
        panel["mask"] = mask.numpy()
    return panel
