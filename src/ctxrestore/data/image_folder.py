"""A folder of unlabelled images (PNG/JPEG/TIFF/NumPy), the simplest pretraining layout.

`read_image` turns one file into (C, *spatial) float32 and fails with a CtxRestoreError that
names the file for anything it cannot use; `ImageFolderDataset` scales and resizes each image
to a fixed size for batching.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageSequence
from torch.utils.data import Dataset

from ctxrestore.data.intensity import ROBUST_UNIT_RANGE, normalize_intensity
from ctxrestore.errors import CtxRestoreError

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NUMPY_SUFFIXES = (".npy",)
IMAGE_SUFFIXES = PIL_SUFFIXES + NUMPY_SUFFIXES
# A 3D .npy whose first axis is this long or shorter is read as channels, not slices.
MAX_CHANNELS = 8

_NPY_MAGIC = b"\x93NUMPY"
# Decoders raise these for files that are not images, truncated or corrupt.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def find_images(folder: Path | str) -> list[Path]:
    """All image files under `folder` (recursively), sorted by path.

    Accepts the suffixes in IMAGE_SUFFIXES, in any letter case. Raises CtxRestoreError when
    the folder is missing, is not a folder, or holds no image file.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CtxRestoreError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise CtxRestoreError(f"image folder {folder} is not a folder; give a folder of images")
    files = [path for path in folder.rglob("*") if path.is_file()]
    images = sorted(path for path in files if path.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        other = sorted({path.suffix.lower() or path.name for path in files})[:5]
        found = f"found {len(files)} other files ({', '.join(other)})" if files else "it is empty"
        raise CtxRestoreError(
            f"image folder {folder} holds no image files: {found}; "
            f"accepted suffixes: {' '.join(IMAGE_SUFFIXES)}"
        )
    return images


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


def _check_spatial_size(spatial_size: Sequence[int]) -> tuple[int, ...]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in (2, 3) or min(size) < 1:
        raise CtxRestoreError(
            f"spatial_size {tuple(spatial_size)} is not valid; give 2 (H, W) or 3 (D, H, W) "
            "positive sizes"
        )
    return size


class ImageFolderDataset(Dataset):
    """Every image under `folder`, as `{"image": (C, *spatial_size) float32 in [0, 1]}`.

    Files are listed once, here (see `find_images`), and read on access. Each image is scaled
    by `ROBUST_UNIT_RANGE` (data.intensity), then resized to `spatial_size` by plain
    (bi/tri)linear interpolation, without keeping the aspect ratio; 2D downsampling is antialiased.
    `in_channels`, when given, must match every file's channel count.
    """

    def __init__(
        self,
        folder: Path | str,
        *,
        spatial_size: Sequence[int],
        in_channels: int | None = None,
    ) -> None:
        self.spatial_size = _check_spatial_size(spatial_size)
        if in_channels is not None and in_channels < 1:
            raise CtxRestoreError(f"in_channels {in_channels} must be >= 1 (or None: any)")
        self.in_channels = in_channels
        self.files = find_images(folder)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.files[index]
        image = read_image(path)
        spatial_dims = len(self.spatial_size)
        if image.ndim - 1 != spatial_dims:
            raise CtxRestoreError(
                f"{path} is read as shape {image.shape} ({image.ndim - 1} spatial dims), but "
                f"spatial_size {self.spatial_size} asks for {spatial_dims}; give a "
                f"{image.ndim - 1}D spatial_size or convert the file"
            )
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise CtxRestoreError(
                f"{path} has {image.shape[0]} channels but in_channels is {self.in_channels}; "
                "give files with that many channels or change in_channels"
            )
        tensor = torch.from_numpy(normalize_intensity(image, ROBUST_UNIT_RANGE))
        if tuple(tensor.shape[1:]) != self.spatial_size:
            tensor = F.interpolate(
                tensor[None],
                size=self.spatial_size,
                mode="bilinear" if spatial_dims == 2 else "trilinear",
                align_corners=False,
                antialias=spatial_dims == 2,
            )[0].clamp_(0.0, 1.0)
        return {"image": tensor.contiguous()}
