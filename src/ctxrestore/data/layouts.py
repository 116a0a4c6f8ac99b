"""Dataset layouts users already have, read and written the same way.

- Classification: one sub-folder per class (`DIR/<class>/<file>`), class order = sorted names
  unless `classes.json` lists them.
- Segmentation: a Medical Segmentation Decathlon / nnU-Net style folder: `dataset.json`,
  `imagesTr/<case>_<channel:04d>.nii.gz` (one file per channel, as BraTS after conversion) and
  `labelsTr/<case>.nii.gz`.
- Classification may also be a CSV of (image, label), paths relative to the CSV.
- Localisation: the segmentation layout plus `boxes.csv`: one row per (image, label) with the
  box in voxel coordinates (first voxel, one past the last, in array axis order) or, with a
  `space` column of LPS / RAS, in world millimetres; present = 0 when the organ is not in view.
- A 4D NIfTI (x, y, z, channels) may stand for a case's channel files in dataset.json.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ctxrestore.data.image_folder import IMAGE_SUFFIXES
from ctxrestore.data.nifti import is_nifti, write_nifti
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write, read_json, write_json

Box = tuple[tuple[int, ...], tuple[int, ...]]
DATASET_FILE = "dataset.json"
BOXES_FILE = "boxes.csv"
CLASSES_FILE = "classes.json"


# ----------------------------------------------------------------------------- images
def write_image(path: Path, image: np.ndarray, spacing: Sequence[float]) -> Path:
    """One channel (*spatial): 8-bit PNG for a 2D image in [0, 1] named *.png, else NIfTI."""
    if path.suffix == ".png":
        if image.ndim != 2:
            raise CtxRestoreError(f"{path}: PNG holds 2D images only, got shape {image.shape}")
        pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        return atomic_write(path, lambda temporary: Image.fromarray(pixels).save(temporary, "PNG"))
    return write_nifti(path, image, spacing)


# ----------------------------------------------------------------------------- classification
def write_class_sample(
    folder: Path, class_name: str, stem: str, image: np.ndarray, spacing: Sequence[float]
) -> Path:
    """image: (1, *spatial); 2D as PNG, 3D as NIfTI, under folder/class_name/."""
    suffix = ".png" if image.ndim == 3 else ".nii.gz"
    return write_image(Path(folder) / class_name / f"{stem}{suffix}", image[0], spacing)


def write_class_names(folder: Path, class_names: Sequence[str]) -> Path:
    """Pin the class order (otherwise sorted folder names), so label indices survive export."""
    return write_json(Path(folder) / CLASSES_FILE, {"classes": list(class_names)})


def read_class_folders(folder: Path | str) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(file, class index)], class names) from one sub-folder per class."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtxRestoreError(f"classification folder {folder} does not exist")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if (folder / CLASSES_FILE).is_file():
        listed = read_json(folder / CLASSES_FILE).get("classes", [])
        unknown = sorted(set(names) - set(listed))
        if unknown:
            raise CtxRestoreError(
                f"{folder / CLASSES_FILE} does not list the class folders {unknown}"
            )
        names = list(listed)
    if not names:
        raise CtxRestoreError(f"{folder} has no class sub-folders (expected {folder}/<class>/...)")
    items = []
    for index, name in enumerate(names):
        files = sorted(
            p
            for p in (folder / name).glob("*")
            if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or is_nifti(p))
        )
        items += [(path, index) for path in files]
    if not items:
        raise CtxRestoreError(f"the class folders of {folder} hold no image files")
    return items, names


def read_class_csv(path: Path | str) -> tuple[list[tuple[Path, int]], list[str]]:
    """([(file, class index)], class names) from a CSV with columns image (or path) and label
    (or class); paths are relative to the CSV's folder. Class order: `classes.json` beside the
    CSV when present, else sorted label names."""
    path = Path(path)
    if not path.is_file():
        raise CtxRestoreError(f"classification CSV {path} does not exist")
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = set(reader.fieldnames or [])
        image_column = next((c for c in ("image", "path", "file") if c in fields), None)
        label_column = next((c for c in ("label", "class") if c in fields), None)
        if image_column is None or label_column is None:
            raise CtxRestoreError(
                f"{path} needs a column image (or path, file) and a column label (or class); "
                f"found {sorted(fields)}"
            )
        rows = [(line, row[image_column], row[label_column]) for line, row in enumerate(reader, 2)]
    if not rows:
        raise CtxRestoreError(f"{path} lists no images")
    names = sorted({label.strip() for _, _, label in rows})
    if (path.parent / CLASSES_FILE).is_file():
        listed = [str(n) for n in read_json(path.parent / CLASSES_FILE).get("classes", [])]
        unknown = sorted(set(names) - set(listed))
        if unknown:
            raise CtxRestoreError(
                f"{path} uses labels {unknown} that {path.parent / CLASSES_FILE} does not list"
            )
        names = listed
    items = []
    for line, image, label in rows:
        if not label.strip() or not image.strip():
            raise CtxRestoreError(f"{path} line {line}: empty image or label")
        file = (path.parent / image.strip()).resolve()
        if not file.exists():
            raise CtxRestoreError(f"{path} line {line}: image {image} does not exist ({file})")
        items.append((file, names.index(label.strip())))
    return items, names


def read_classification(data: Path | str) -> tuple[list[tuple[Path, int]], list[str]]:
    """Class sub-folders, or a CSV of (image, label)."""
    data = Path(data)
    if data.suffix.lower() == ".csv":
        return read_class_csv(data)
    return read_class_folders(data)


# ----------------------------------------------------------------------------- segmentation
@dataclass(frozen=True)
class SegmentationCase:
    name: str
    images: tuple[Path, ...]  # one file per channel
    label: Path | None


@dataclass(frozen=True)
class SegmentationLayout:
    folder: Path
    channel_names: tuple[str, ...]
    labels: dict[int, str]
    cases: tuple[SegmentationCase, ...]


def write_segmentation_case(
    folder: Path,
    case: str,
    image: np.ndarray,
    mask: np.ndarray | None,
    spacing: Sequence[float],
) -> SegmentationCase:
    """image: (C, *spatial) -> imagesTr/<case>_<c>.nii.gz; mask -> labelsTr/<case>.nii.gz."""
    folder = Path(folder)
    images = tuple(
        write_nifti(folder / "imagesTr" / f"{case}_{c:04d}.nii.gz", channel, spacing)
        for c, channel in enumerate(image)
    )
    label = None
    if mask is not None:
        label = write_nifti(folder / "labelsTr" / f"{case}.nii.gz", mask.astype(np.uint8), spacing)
    return SegmentationCase(case, images, label)


def write_dataset_json(
    folder: Path,
    cases: Sequence[SegmentationCase],
    channel_names: Sequence[str],
    labels: dict[int, str],
    **extra: object,
) -> Path:
    """MSD-style dataset.json, with nnU-Net's channel_names / labels / file_ending too."""
    folder = Path(folder)

    def relative(path: Path) -> str:
        return f"./{path.relative_to(folder).as_posix()}"

    data = {
        "channel_names": {str(i): name for i, name in enumerate(channel_names)},
        "labels": {name: value for value, name in sorted(labels.items())},
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "training": [
            {
                "image": [relative(p) for p in case.images],
                **({"label": relative(case.label)} if case.label else {}),
            }
            for case in cases
        ],
        **extra,
    }
    return write_json(folder / DATASET_FILE, data)


def _channel_files(folder: Path, entry: object, channels: int, where: str) -> tuple[Path, ...]:
    """An entry's image: a list of files, or one path/prefix whose _0000.. files exist."""
    if isinstance(entry, list):
        files = tuple((folder / item).resolve() for item in entry)
    elif isinstance(entry, str):
        path = (folder / entry).resolve()
        stem = path.name.removesuffix(".nii.gz").removesuffix(".nii")
        per_channel = tuple(path.with_name(f"{stem}_{c:04d}.nii.gz") for c in range(channels))
        files = per_channel if per_channel[0].exists() else (path,)
    else:
        raise CtxRestoreError(f"{where}: 'image' must be a path or a list of paths")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise CtxRestoreError(f"{where} points to missing files: {missing[:3]}")
    return files


def read_segmentation_layout(folder: Path | str) -> SegmentationLayout:
    """Read dataset.json and check that every file it names exists."""
    folder = Path(folder)
    if folder.is_dir() and not (folder / DATASET_FILE).is_file():
        raise CtxRestoreError(
            f"{folder} has no {DATASET_FILE}: segmentation and localisation data is a Medical "
            f"Segmentation Decathlon / nnU-Net folder ({DATASET_FILE}, imagesTr/, labelsTr/; "
            f"localisation adds {BOXES_FILE}); `ctxrestore phantoms abdomen --out DIR` writes "
            f"an example"
        )
    data = read_json(folder / DATASET_FILE)
    channels = data.get("channel_names") or data.get("modality")
    raw_labels = data.get("labels")
    if not channels or not raw_labels or "training" not in data:
        raise CtxRestoreError(
            f"{folder / DATASET_FILE} needs 'channel_names' (or 'modality'), 'labels' and "
            f"'training'"
        )
    channel_names = tuple(channels[key] for key in sorted(channels, key=int))
    # nnU-Net: {"name": value}; MSD: {"value": "name"}.
    if all(str(key).isdigit() for key in raw_labels):
        labels = {int(value): str(name) for value, name in raw_labels.items()}
    else:
        labels = {int(value): str(name) for name, value in raw_labels.items()}
    cases = []
    for number, entry in enumerate(data["training"]):
        where = f"{folder / DATASET_FILE} training[{number}]"
        if not isinstance(entry, dict) or "image" not in entry:
            raise CtxRestoreError(f"{where} needs an 'image'")
        images = _channel_files(folder, entry["image"], len(channel_names), where)
        # One file may hold every channel (MSD's 4D NIfTI); data.loading checks the count.
        if len(images) not in (1, len(channel_names)):
            raise CtxRestoreError(
                f"{where} has {len(images)} channel files, but dataset.json declares "
                f"{len(channel_names)} channels {channel_names}"
            )
        label = None
        if "label" in entry:
            label = (folder / entry["label"]).resolve()
            if not label.is_file():
                raise CtxRestoreError(f"{where} points to a missing label file {label}")
        name = images[0].name.removesuffix(".nii.gz").removesuffix(".nii").removesuffix("_0000")
        cases.append(SegmentationCase(name, images, label))
    return SegmentationLayout(folder, channel_names, labels, tuple(cases))


# ----------------------------------------------------------------------------- boxes
def write_boxes_csv(path: Path, rows: Sequence[tuple[str, str, Box | None]], dims: int) -> Path:
    """rows: (image path relative to the CSV, label, box or None for 'not in view')."""
    columns = ["image", "label", "present"]
    columns += [f"start_{a}" for a in range(dims)] + [f"stop_{a}" for a in range(dims)]

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for image, label, box in rows:
                coordinates = [*box[0], *box[1]] if box else [""] * (2 * dims)
                writer.writerow([image, label, int(box is not None), *coordinates])

    return atomic_write(path, write)


@dataclass(frozen=True)
class WorldBox:
    """A box in world millimetres: `start` and `stop` are opposite corners in (x, y, z) order,
    in the `space` convention: "LPS" (DICOM, ITK, 3D Slicer files) or "RAS" (NIfTI)."""

    start: tuple[float, ...]
    stop: tuple[float, ...]
    space: str

    def to_voxels(self, affine: np.ndarray, shape: Sequence[int]) -> Box:
        """The smallest voxel box (array axis order) holding the world box, given a volume's
        voxel (x, y, z) -> RAS affine (readers.Volume.affine) and its (z, y, x) shape."""
        flip = np.array([-1.0, -1.0, 1.0]) if self.space == "LPS" else np.ones(3)
        corners = np.array(
            [[a, b, c] for a in (self.start[0], self.stop[0]) for b in (self.start[1], self.stop[1])
             for c in (self.start[2], self.stop[2])]
        ) * flip  # fmt: skip
        inverse = np.linalg.inv(np.asarray(affine, dtype=float))
        voxels = (inverse[:3, :3] @ corners.T).T + inverse[:3, 3]  # (8, xyz), voxel centres
        low = np.floor(voxels.min(axis=0) + 0.5).astype(int)[::-1]
        high = np.floor(voxels.max(axis=0) + 0.5).astype(int)[::-1] + 1
        limits = np.array(shape[-3:])
        low, high = np.clip(low, 0, limits), np.clip(high, 0, limits)
        return tuple(int(v) for v in low), tuple(int(v) for v in high)


BOX_SPACES = ("voxel", "LPS", "RAS")


def read_boxes_csv(path: Path | str) -> dict[str, dict[str, Box | WorldBox | None]]:
    """{image: {label: box or None}} from a boxes CSV. Boxes are in voxels (array axis order,
    first voxel and one past the last) unless an optional column `space` says LPS or RAS:
    world millimetres, start_0..2 / stop_0..2 = opposite corners in (x, y, z) order."""
    path = Path(path)
    if not path.is_file():
        raise CtxRestoreError(f"box file {path} does not exist")
    boxes: dict[str, dict[str, Box | WorldBox | None]] = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        dims = sum(1 for name in fields if name.startswith("start_"))
        if not {"image", "label", "present"} <= set(fields) or dims not in (2, 3):
            raise CtxRestoreError(
                f"{path} needs columns image, label, present, start_0.. and stop_0.. (2D or 3D)"
            )
        for line, row in enumerate(reader, start=2):
            space = (row.get("space") or "voxel").strip()
            if space not in BOX_SPACES:
                raise CtxRestoreError(
                    f"{path} line {line}: space {space!r} is not one of {', '.join(BOX_SPACES)}"
                )
            try:
                box = None
                if int(row["present"]):
                    if space == "voxel":
                        start = tuple(int(row[f"start_{a}"]) for a in range(dims))
                        stop = tuple(int(row[f"stop_{a}"]) for a in range(dims))
                        box = (start, stop)
                    elif dims != 3:
                        raise CtxRestoreError(
                            f"{path} line {line}: world boxes need 3 coordinates (x, y, z)"
                        )
                    else:
                        box = WorldBox(
                            tuple(float(row[f"start_{a}"]) for a in range(3)),
                            tuple(float(row[f"stop_{a}"]) for a in range(3)),
                            space,
                        )
            except (TypeError, ValueError):
                kind = "integers" if space == "voxel" else "numbers"
                raise CtxRestoreError(f"{path} line {line}: box values must be {kind}") from None
            boxes.setdefault(row["image"], {})[row["label"]] = box
    return boxes
