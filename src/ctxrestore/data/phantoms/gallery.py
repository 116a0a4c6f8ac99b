"""A picture of a phantom's samples with their labels, for the docs and the demo report."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctxrestore.data.intensity import normalize_intensity
from ctxrestore.data.phantoms.base import PhantomSample
from ctxrestore.data.phantoms.registry import get_phantom
from ctxrestore.figures import save_labelled_gallery


def _display(sample: PhantomSample, intensity: dict) -> np.ndarray:
    """(H, W) in [0, 1]: the first channel, middle slice of a volume, scaled for viewing."""
    image = normalize_intensity(sample.image, intensity)[0]
    if image.ndim == 3:
        image = image[image.shape[0] // 2]
    if intensity["method"] == "zscore_foreground":  # z-scores: show mean +- 3 SD
        image = np.where(image != 0, np.clip((image + 3) / 6, 0, 1), 0)
    return image


def _middle(array: np.ndarray | None) -> np.ndarray | None:
    return array[array.shape[0] // 2] if array is not None and array.ndim == 3 else array


def phantom_gallery(
    name: str,
    path: Path | str,
    *,
    count: int = 12,
    spatial_dims: int = 2,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Save `count` samples of phantom `name` as a labelled PNG grid (3D: middle slices)."""
    info = get_phantom(name)
    panels = []
    for index in range(count):
        sample = info.generator(index, seed=seed, spatial_size=(image_size,) * spatial_dims)
        panel = {"image": _display(sample, info.intensity), "title": f"{name} #{index}"}
        if info.class_names:  # the label is the class: show the plain image under its name
            panel["title"] = info.class_names[sample.label]
        else:
            panel["mask"] = _middle(sample.mask)
        if sample.boxes:
            values = {organ: value for value, organ in info.labels.items()}
            boxes = []
            for organ, box in sample.boxes.items():
                if box is None:
                    continue
                if spatial_dims == 3:  # the box's footprint on the middle slice, if it cuts it
                    middle = sample.image.shape[1] // 2
                    if not box[0][0] <= middle < box[1][0]:
                        continue
                    box = (box[0][1:], box[1][1:])
                boxes.append((values[organ], box))
            panel["boxes"] = boxes
        panels.append(panel)
    label_names = info.labels if info.labels else None
    return save_labelled_gallery(path, panels, label_names=label_names)
