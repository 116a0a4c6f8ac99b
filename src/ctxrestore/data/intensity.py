"""Intensity normalisation by modality, described by a plain dict that checkpoints record.

The same dict is applied at pretraining, fine-tuning and prediction, so a network always sees
inputs scaled the way it was trained on. `intensity_for(modality)` gives the dict for CT, MR,
ultrasound and plain images.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from ctxrestore.errors import CtxRestoreError

METHODS = (
    "unit",
    "window",
    "zscore_foreground",
    "robust_unit_range",
    "zscore_robust",
    "unit_range",
)
MODALITIES = ("ct", "mr", "us", "generic")
# Modality-agnostic default for plain image folders: ignores a few outliers (hot pixels,
# text overlays). CT windowing and MR z-scores are the other methods.
ROBUST_UNIT_RANGE = {"method": "robust_unit_range", "percentiles": [0.5, 99.5]}
ZSCORE_ROBUST = {"method": "zscore_robust", "percentiles": [0.5, 99.5]}
UNIT_RANGE = {"method": "unit_range"}
# CT display windows as (low, high) HU = (level - width / 2, level + width / 2).
CT_WINDOWS = {
    "abdomen": (-160.0, 240.0),  # W400 L40
    "soft_tissue": (-160.0, 240.0),  # W400 L40
    "liver": (0.0, 150.0),  # W150 L75 (contrast-enhanced liver)
    "lung": (-1350.0, 150.0),  # W1500 L-600
    "bone": (-450.0, 1050.0),  # W1500 L300
    "brain": (0.0, 80.0),  # W80 L40
}
DEFAULT_CT_WINDOW = "abdomen"


def normalize_intensity(image: np.ndarray, spec: dict) -> np.ndarray:
    """image: (C, *spatial) -> float32 (C, *spatial).

    - unit: already in [0, 1] (clipped).
    - window: CT-style, [low, high] HU -> [0, 1], clipped (spec["window"] = [low, high]).
    - zscore_foreground: MR, per channel (x - mean) / std over voxels != 0; background stays 0.
    - robust_unit_range: per channel, percentiles spec["percentiles"] -> [0, 1], clipped.
    - zscore_robust: MR, per volume and channel. One foreground for all channels: a voxel is
      foreground when any channel is above that channel's minimum (air and skull-stripped
      background hold the minimum; co-registered MR sequences share one brain mask, so a dark
      tissue voxel at one sequence's minimum is still normalised). Within the foreground each
      channel is clipped to its percentiles spec["percentiles"] (default [0.5, 99.5]), then
      z-scored with the clipped values' mean and std (std at least 1e-6); background is 0.
    - unit_range: ultrasound, the stored range -> [0, 1] for the whole image: divided by 255
      when every value lies in [0, 255] (8-bit data, also after linear resampling), kept when
      every value already lies in [0, 1], else divided by the image maximum; clipped to [0, 1].
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
    if method == "zscore_robust":
        return _zscore_robust(image, spec.get("percentiles", (0.5, 99.5)))
    if method == "unit_range":
        return _unit_range(image)
    raise CtxRestoreError(f"unknown intensity normalisation {spec!r}; methods: {METHODS}")


def _zscore_robust(image: np.ndarray, percentiles) -> np.ndarray:
    minima = image.reshape(image.shape[0], -1).min(axis=1)
    foreground = np.zeros(image.shape[1:], dtype=bool)
    for values, minimum in zip(image, minima):
        foreground |= values > minimum
    out = np.zeros_like(image)
    if not foreground.any():
        return out
    for channel, values in enumerate(image):
        selected = values[foreground].astype(np.float64)
        low, high = np.percentile(selected, percentiles)
        clipped = np.clip(selected, low, high)
        std = max(float(clipped.std()), 1e-6)
        out[channel][foreground] = (clipped - clipped.mean()) / std
    return out


def _unit_range(image: np.ndarray) -> np.ndarray:
    low, high = float(image.min()), float(image.max())
    if low >= 0.0 and high <= 1.0:
        return image.copy()
    scale = 255.0 if low >= 0.0 and high <= 255.0 else high
    if scale <= 0.0:  # nothing above 0 in a signed image
        return np.zeros_like(image)
    return np.clip(image / np.float32(scale), 0.0, 1.0)


def intensity_for(modality: str, window: str | tuple[float, float] | None = None) -> dict:
    """The normalisation spec for a modality: "ct" (window: a CT_WINDOWS preset name or
    (low, high) HU; default "abdomen"), "mr" (zscore_robust), "us" (unit_range) or "generic"
    (robust_unit_range). `window` is for CT only."""
    if modality not in MODALITIES:
        raise CtxRestoreError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if modality != "ct":
        if window is not None:
            raise CtxRestoreError(
                f"window {window!r} is for CT only, but modality is {modality!r}; "
                "leave window unset or use modality 'ct'"
            )
        spec = {"mr": ZSCORE_ROBUST, "us": UNIT_RANGE, "generic": ROBUST_UNIT_RANGE}[modality]
        return copy.deepcopy(spec)  # callers may edit their spec; the constants stay
    return {"method": "window", "window": list(ct_window(window))}


def ct_window(window: str | tuple[float, float] | None) -> tuple[float, float]:
    """(low, high) HU for a preset name, a (low, high) pair, or None (the default preset)."""
    if window is None:
        window = DEFAULT_CT_WINDOW
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise CtxRestoreError(
                f"unknown CT window preset {window!r}; presets: {', '.join(CT_WINDOWS)}, "
                "or give (low, high) in HU"
            )
        return CT_WINDOWS[window]
    try:
        low, high = (float(value) for value in window)
    except (TypeError, ValueError):
        raise CtxRestoreError(
            f"CT window {window!r} is not valid; give a preset ({', '.join(CT_WINDOWS)}) "
            "or two numbers (low, high) in HU"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CtxRestoreError(
            f"CT window ({low}, {high}) is not valid; need finite low < high in HU"
        )
    return low, high
