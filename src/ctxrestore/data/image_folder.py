"""Plain image files (PNG/JPEG/TIFF/NumPy): `read_image` turns one into (C, *spatial) float32
and fails with a CtxRestoreError that names the file for anything it cannot use. Medical
formats and folders: data.readers, which uses this for these files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence

from ctxrestore.errors import CtxRestoreError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NUMPY_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = PIL_SUFFIXES + NUMPY_SUFFIXES
# A 3D .npy whose first axis is this long or shorter is read as channels, not slices.
MAX_CHANNELS = 8

_NPY_MAGIC = b"\x93NUMPY"
# Decoders raise these for files that are not images, truncated or corrupt.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _as_float32(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise CtxRestoreError(
            f"{path} holds an array of dtype {array.dtype}; "
            "use a real numeric dtype (bool, int, uint or float)"
        )
    if array.size == 0:
        raise CtxRestoreError(f"{path} holds an empty array of shape {array.shape}")
    with np.errstate(over="ignore"):  # values beyond float32 become inf, reported below
        array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array)
    if not finite.all():
        num_nan = int(np.isnan(array).sum())
        num_inf = array.size - int(finite.sum()) - num_nan
        problems = [f"{num_nan} NaN values"] if num_nan else []
        problems += [f"{num_inf} infinite values (or beyond float32 range)"] if num_inf else []
        raise CtxRestoreError(
            f"{path} contains {' and '.join(problems)}; every value must be finite"
        )
    return array


def _read_npy(path: Path) -> np.ndarray:
    try:
        with path.open("rb") as file:
            is_npy = file.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        # Without the header check, numpy reports any other file as "pickled data".
        array = np.load(path, allow_pickle=False) if is_npy else None
    except _DECODE_ERRORS as error:
        raise CtxRestoreError(f"{path} could not be read as a NumPy array: {error}") from None
    if not isinstance(array, np.ndarray):
        raise CtxRestoreError(f"{path} is not a NumPy .npy file (it lacks the .npy header)")
    array = _as_float32(array, path)
    if array.ndim == 2:
        return array[None]
    if array.ndim == 3:
        return array if array.shape[0] <= MAX_CHANNELS else array[None]
    if array.ndim == 4:
        return array
    raise CtxRestoreError(
        f"{path} holds an array of shape {array.shape}; use (H, W), (C, H, W) with "
        f"C <= {MAX_CHANNELS}, (D, H, W) or (C, D, H, W)"
    )


def _grey_frame(frame: Image.Image) -> np.ndarray:
    # 16-bit, 32-bit integer and float grey frames keep their values; everything else
    # (colour, palette, bilevel, grey with alpha) becomes 8-bit grey, as ultrasound is grey.
    if frame.mode.startswith(("I", "F")):
        return np.asarray(frame)
    return np.asarray(frame.convert("L"))


def _read_pil(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            frames = [_grey_frame(frame) for frame in ImageSequence.Iterator(image)]
    except _DECODE_ERRORS as error:
        raise CtxRestoreError(f"{path} could not be read as an image: {error}") from None
    if len({frame.shape for frame in frames}) > 1:
        raise CtxRestoreError(
            f"{path} has {len(frames)} pages of different sizes; a multi-page file is read as "
            "a volume and needs pages of one size"
        )
    # A multi-page file (a TIFF stack) is a (D, H, W) volume.
    array = frames[0] if len(frames) == 1 else np.stack(frames)
    return _as_float32(array, path)[None]


def read_image(path: Path | str) -> np.ndarray:
    """One image file as (C, *spatial) float32, intensities unchanged.

    PNG/JPEG/TIFF are read as grey (C = 1; colour is converted to grey; 16-bit is kept), and
    a multi-page TIFF as a (1, D, H, W) volume. A .npy array of shape (H, W) gives (1, H, W);
    (C, H, W) is taken as channels when C <= 8, else as a (D, H, W) volume giving
    (1, D, H, W); (C, D, H, W) is kept. Raises CtxRestoreError naming the file for an
    unreadable or truncated file, a non-numeric dtype, NaN/Inf values or another shape.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise CtxRestoreError(
            f"{path} has suffix {suffix or '(none)'}; accepted: {' '.join(IMAGE_SUFFIXES)}"
        )
    if not path.is_file():
        raise CtxRestoreError(f"image file {path} does not exist")
    return _read_npy(path) if suffix in NUMPY_SUFFIXES else _read_pil(path)
