"""Intensity normalisation by modality, described by a plain dict that checkpoints record.

The same dict is applied at pretraining, fine-tuning and prediction, so a network always sees
inputs scaled the way it was trained on.
"""

from __future__ import annotations

import numpy as np

from ctxrestore.errors import CtxRestoreError

METHODS = ("unit", "window", "zscore_foreground", "robust_unit_range")
# Modality-agnostic default for plain image folders: ignores a few outliers (hot pixels,
# text overlays). CT windowing and MR z-scores are the other methods.
ROBUST_UNIT_RANGE = {"method": "robust_unit_range", "percentiles": [0.5, 99.5]}


def normalize_intensity(image: np.ndarray, spec: dict) -> np.ndarray:
    """image: (C, *spatial) -> float32 (C, *spatial).

    - unit: already in [0, 1] (clipped).
    - window: CT-style, [low, high] HU -> [0, 1], clipped (spec["window"] = [low, high]).
    - zscore_foreground: MR, per channel (x - mean) / std over voxels != 0; background stays 0.
    - robust_unit_range: per channel, percentiles spec["percentiles"] -> [0, 1], clipped.
    """
    method = spec.get("method")
    image = np.asarray(image, dtype=np.float32)
    if method == "unit":
        return np.clip(image, 0.0, 1.0)
    if method == "window":
        low, high = spec["window"]
        return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if method == "zscore_foreground":
        out = np.zeros_like(image)
        for channel, values in enumerate(image):
            foreground = values != 0
            if foreground.any():
                selected = values[foreground]
                std = max(float(selected.std()), 1e-6)
                out[channel][foreground] = (selected - selected.mean()) / std
        return out
    if method == "robust_unit_range":
        flat = image.reshape(image.shape[0], -1)
        low, high = np.percentile(flat, spec.get("percentiles", (0.5, 99.5)), axis=1)
        width = (high - low).astype(np.float32)
        scale = np.divide(1.0, width, out=np.zeros_like(width), where=width > 0)
        shape = (-1,) + (1,) * (image.ndim - 1)
        scaled = (image - low.reshape(shape).astype(np.float32)) * scale.reshape(shape)
        return np.clip(scaled, 0.0, 1.0)  # a constant channel becomes 0
    raise CtxRestoreError(f"unknown intensity normalisation {spec!r}; methods: {METHODS}")
