"""Write a phantom to disk in the layout real data of its task uses, so one loader reads both.

- classify (ultrasound): class sub-folders, PNG (2D) or NIfTI (3D), plus classes.json.
- segment (brain): dataset.json + imagesTr/<case>_<channel>.nii.gz + labelsTr/<case>.nii.gz.
- localize (abdomen): the segmentation layout (organ masks) plus boxes.csv.
- pretrain (shapes): a flat folder of unlabelled images.
Raw values are written (HU for CT); `phantom.json` records provenance and the intensity
normalisation a network should apply.
"""

from __future__ import annotations

from pathlib import Path

import ctxrestore
from ctxrestore.data.layouts import (
    BOXES_FILE,
    write_boxes_csv,
    write_class_names,
    write_class_sample,
    write_dataset_json,
    write_image,
    write_segmentation_case,
)
from ctxrestore.data.phantoms.registry import get_phantom
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import write_json
from ctxrestore.progress import track

PROVENANCE_FILE = "phantom.json"


def export_phantom(
    name: str,
    out: Path,
    *,
    count: int,
    spatial_dims: int = 2,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Generate `count` samples of phantom `name` into `out`; returns `out`."""
    info = get_phantom(name)
    if count < 1:
        raise CtxRestoreError(f"phantoms: --n must be >= 1, got {count}")
    if spatial_dims not in (2, 3):
        raise CtxRestoreError(f"phantoms: --dims must be 2 or 3, got {spatial_dims}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CtxRestoreError(f"{out} is not empty; choose a new folder for the phantom data")
    spatial_size = (image_size,) * spatial_dims
    cases, boxes = [], []
    for index in track(range(count), f"writing {name} phantoms", transient=True):
        sample = info.generator(index, seed=seed, spatial_size=spatial_size)
        stem = f"{name}_{index:05d}"
        if info.task == "classify":
            write_class_sample(
                out, info.class_names[sample.label], stem, sample.image, sample.spacing
            )
        elif info.task in ("segment", "localize"):
            case = write_segmentation_case(out, stem, sample.image, sample.mask, sample.spacing)
            cases.append(case)
            if info.task == "localize":
                image = case.images[0].relative_to(out).as_posix()
                boxes += [(image, organ, sample.boxes[organ]) for organ in info.organs]
        else:
            suffix = ".png" if spatial_dims == 2 and sample.image.shape[0] == 1 else ".nii.gz"
            write_image(out / f"{stem}{suffix}", sample.image[0], sample.spacing)
    if info.task == "classify":
        write_class_names(out, info.class_names)
    if cases:
        write_dataset_json(out, cases, info.channel_names, info.labels, name=f"phantom:{name}")
    if boxes:
        write_boxes_csv(out / BOXES_FILE, boxes, spatial_dims)
    write_json(
        out / PROVENANCE_FILE,
        {
            "phantom": name,
            "task": info.task,
            "count": count,
            "spatial_dims": spatial_dims,
            "image_size": image_size,
            "seed": seed,
            "intensity": info.intensity,
            "ctxrestore_version": ctxrestore.__version__,
        },
    )
    return out
