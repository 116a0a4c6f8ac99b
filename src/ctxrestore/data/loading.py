"""From files to preprocessed arrays, once: read (readers), check, preprocess (preprocess),
keep on disk (cache), and skip bad files when the user asked for it.

A *case* is what one training item or volume comes from: one source per channel (an MSD case
with `_0000`..`_0003` files), or one source holding every channel (a 4D NIfTI, a PNG, a DICOM
series), plus an optional label file. `load_case` returns it preprocessed, with its foreground
mask; the second call with the same files and preprocessing reads memory-mapped arrays from
the cache and decodes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from ctxrestore.data.cache import ArrayCache, file_fingerprint
from ctxrestore.data.preprocess import Preprocessing, foreground_mask, preprocess
from ctxrestore.data.readers import ImageSource, Volume, read_volume
from ctxrestore.errors import CtxRestoreError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# Voxel grids of an image and its label may differ by rounding in the header, no more (mm).
GRID_TOLERANCE = 1e-3


@dataclass(frozen=True)
class PreparedCase:
    """A case after preprocessing. image: (C, *spatial) float32; label: (*spatial) int64 or
    None; foreground: (*spatial) bool; spacing: mm per axis after resampling."""

    name: str
    image: np.ndarray
    label: np.ndarray | None
    foreground: np.ndarray
    spacing: tuple[float, ...]
    modality: str | None
    source: str
    affine: np.ndarray  # of the file's grid (readers.Volume.affine), before resampling
    original_shape: tuple[int, ...]  # the file's spatial shape, before resampling


class BadFiles:
    """Without --skip-bad the first bad file stops the run with its error; with it, the file
    is skipped with a warning, and `summary()` says how many were."""

    def __init__(self, skip: bool) -> None:
        self.skip = skip
        self.skipped: list[tuple[str, str]] = []

    def attempt(self, name: str, read: Callable[..., T], *args: object) -> T | None:
        """read(*args), or None after a warning when it raised and bad files are skipped."""
        try:
            return read(*args)
        except CtxRestoreError as error:
            if not self.skip:
                raise CtxRestoreError(f"{error} (--skip-bad skips such files)") from None
            logger.warning("skipping %s: %s", name, error)
            self.skipped.append((name, str(error)))
            return None

    def summary(self, total: int, what: str) -> str | None:
        if not self.skipped:
            return None
        text = f"skipped {len(self.skipped)} of {total} {what} (--skip-bad)"
        logger.warning(text)
        return text


def stack_channels(volumes: Sequence[Volume], name: str) -> Volume:
    """One volume from one source per channel, which must share their grid."""
    if len(volumes) == 1:
        return volumes[0]
    first = volumes[0]
    for volume in volumes[1:]:
        if volume.array.shape[1:] != first.array.shape[1:]:
            raise CtxRestoreError(
                f"case {name}: channel file {volume.source} has shape {volume.array.shape[1:]} "
                f"but {first.source} has {first.array.shape[1:]}"
            )
        if not np.allclose(volume.spacing, first.spacing, atol=GRID_TOLERANCE):
            raise CtxRestoreError(
                f"case {name}: channel file {volume.source} has spacing {volume.spacing} but "
                f"{first.source} has {first.spacing}; resample the channels to one grid"
            )
    array = np.concatenate([volume.array for volume in volumes])
    return Volume(array, first.spacing, first.modality, first.source, first.affine)


def check_label_grid(image: Volume, label: Volume) -> None:
    """Same shape, spacing and position: a label on another grid would teach the wrong voxels."""
    if label.array.shape[0] != 1:
        raise CtxRestoreError(f"{label.source} has {label.array.shape[0]} channels; a label has 1")
    if label.array.shape[1:] != image.array.shape[1:]:
        raise CtxRestoreError(
            f"{label.source} has shape {label.array.shape[1:]} but its image {image.source} "
            f"has {image.array.shape[1:]}"
        )
    if not np.allclose(label.affine, image.affine, atol=GRID_TOLERANCE):
        raise CtxRestoreError(
            f"{label.source} and its image {image.source} have the same shape but different "
            f"voxel-to-world affines (label {np.round(label.affine, 3).tolist()}, image "
            f"{np.round(image.affine, 3).tolist()}); resample the label onto the image grid"
        )


def _label_values(label: np.ndarray, source: str) -> np.ndarray:
    if not np.all(np.isclose(label, np.round(label))):
        raise CtxRestoreError(f"{source} holds non-integer label values; a label map holds ints")
    return np.round(label).astype(np.int64)


def check_label_values(label: np.ndarray, allowed: Sequence[int], source: str) -> None:
    found = np.unique(label)
    unknown = sorted(set(found.tolist()) - set(int(v) for v in allowed))
    if unknown:
        raise CtxRestoreError(
            f"{source} holds label values {unknown} that are not among the declared labels "
            f"{sorted(int(v) for v in allowed)}"
        )


_HINTED: set[str] = set()
_MODALITY_OPTIONS = {"CT": "ct", "MR": "mr", "US": "us"}
# Channel names of MSD / nnU-Net dataset.json files that say which modality the images are.
_DECLARED_MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR", "T1": "MR", "T1W": "MR",
                        "T1GD": "MR", "T2": "MR", "T2W": "MR", "FLAIR": "MR", "ADC": "MR",
                        "US": "US"}  # fmt: skip


def hint_declared_modality(
    preprocessing: Preprocessing, channel_names: Sequence[str], source: str
) -> None:
    """Once per modality: a dataset.json whose channels say CT / MR / US (e.g. "CT",
    "FLAIR"), read with generic scaling. The scaling matters: abdomen organs were segmented
    7 Dice points better with --modality ct (docs/experiments.md, 18)."""
    declared = {_DECLARED_MODALITIES.get(str(name).strip().upper()) for name in channel_names}
    if len(declared) == 1 and None not in declared:  # mixed or unknown names: no guess
        _hint_modality(preprocessing, declared.pop(), source)


def _hint_modality(preprocessing: Preprocessing, modality: str | None, source: str) -> None:
    """Once per modality: images that say they are CT / MR / US, read with generic scaling."""
    option = _MODALITY_OPTIONS.get(modality or "")
    if preprocessing.modality != "generic" or option is None or modality in _HINTED:
        return
    _HINTED.add(modality)
    logger.warning(
        "%s says its modality is %s, but it is scaled generically (percentiles to [0, 1]); "
        "--modality %s gives %s",
        source, modality, option,
        {"ct": "HU windows", "mr": "a robust z-score", "us": "[0, 1] scaling"}[option],
    )  # fmt: skip


def for_dims(preprocessing: Preprocessing, volume: Volume, name: str) -> Preprocessing:
    """A 3-axis target spacing applies to 2D images by its last two values (y, x)."""
    target = preprocessing.target_spacing
    dims = volume.array.ndim - 1
    if target is None or len(target) == dims:
        return preprocessing
    if len(target) < dims:
        raise CtxRestoreError(
            f"target spacing {target} has {len(target)} values but {volume.source} (case "
            f"{name}) is {dims}D; give one value or {dims}"
        )
    return replace(preprocessing, target_spacing=target[-dims:])


def load_case(
    name: str,
    images: Sequence[ImageSource | Path],
    preprocessing: Preprocessing,
    cache: ArrayCache,
    label: Path | None = None,
) -> PreparedCase:
    """Read, check and preprocess one case (see the module docstring)."""
    sources = [
        source
        if isinstance(source, ImageSource)
        else ImageSource(Path(source), (Path(source),), name)
        for source in images
    ]
    files = [file for source in sources for file in source.files] + ([label] if label else [])

    def create() -> tuple[dict[str, np.ndarray], dict]:
        volume = stack_channels([read_volume(source) for source in sources], name)
        mask = None
        if label is not None:
            label_volume = read_volume(label)
            check_label_grid(volume, label_volume)
            mask = _label_values(label_volume.array[0], str(label))
        image, spacing, mask = preprocess(
            volume.array, volume.spacing, for_dims(preprocessing, volume, name), mask
        )
        arrays = {"image": image.astype(np.float32), "foreground": foreground_mask(image)}
        if mask is not None:
            arrays["label"] = mask.astype(np.int64)
        meta = {
            "spacing": list(spacing),
            "modality": volume.modality,
            "source": volume.source,
            "affine": np.asarray(volume.affine).tolist(),
            "original_shape": list(volume.array.shape[1:]),
        }
        return arrays, meta

    arrays, meta = cache.get(
        {"files": file_fingerprint(files), "preprocessing": preprocessing.to_json()}, create
    )
    _hint_modality(preprocessing, meta["modality"], meta["source"])
    return PreparedCase(
        name=name,
        image=arrays["image"],
        label=arrays.get("label"),
        foreground=arrays["foreground"],
        spacing=tuple(float(s) for s in meta["spacing"]),
        modality=meta["modality"],
        source=str(meta["source"]),
        affine=np.asarray(meta["affine"], dtype=float),
        original_shape=tuple(int(n) for n in meta["original_shape"]),
    )


def _numbers(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in str(text).split(","))
    except ValueError:
        raise CtxRestoreError(f"{name} {text!r} is not a comma-separated list of numbers") from None


def preprocessing_from_options(
    modality: str, window: str | None, target_spacing: str | None
) -> Preprocessing:
    """The command line's --modality, --window ('abdomen' or 'low,high' in HU) and
    --target-spacing ('1.5' for every axis, or one value per axis: 'z,y,x' / 'y,x')."""
    parsed_window: str | tuple[float, ...] | None = window
    if window is not None and not window.replace("_", "").isalpha():
        parsed_window = _numbers(window, "window")
    spacing = None
    if target_spacing is not None:
        spacing = _numbers(target_spacing, "target_spacing")
        if len(spacing) == 1:  # every axis; 2D images use the last two (see load_case)
            spacing = spacing * 3
    return Preprocessing(modality=modality, window=parsed_window, target_spacing=spacing)


@dataclass(frozen=True, kw_only=True)
class FileOptions:
    """How files are read: the options every command that reads files shares (pretrain,
    finetune, benchmark, ablate configs inherit them). modality None: the --init run's when
    fine-tuning, else generic."""

    modality: str | None = None
    window: str | None = None
    target_spacing: str | None = None
    slice_axis: int = 0
    cache: bool = True
    cache_dir: Path | None = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        if self.cache_dir is not None:  # Python callers may pass a string
            object.__setattr__(self, "cache_dir", Path(self.cache_dir))
        self.preprocessing  # noqa: B018 (validates --modality, --window, --target-spacing)
        if self.slice_axis not in (0, 1, 2):
            raise CtxRestoreError(f"slice_axis must be 0, 1 or 2 (z, y, x), got {self.slice_axis}")

    @property
    def preprocessing(self) -> Preprocessing:
        return preprocessing_from_options(
            self.modality or "generic", self.window, self.target_spacing
        )

    @property
    def file_options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(FileOptions)}

    def array_cache(self) -> ArrayCache:
        """--cache/--no-cache and --cache-dir (default: data.cache.default_cache_dir())."""
        from ctxrestore.data.cache import default_cache_dir

        return ArrayCache((self.cache_dir or default_cache_dir()) if self.cache else None)
