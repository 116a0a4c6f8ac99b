"""DICOM files and series through pydicom, as grey float32 frames with their geometry.

One file gives its frames in stored order (one frame: a 2D image; several: cine ultrasound,
enhanced MR). Several single-frame files of one series are sorted along the slice normal and
come with their LPS affine, so that `readers` can reorient them to L, P, S like every volume.
Pixel values pass the modality LUT (RescaleSlope/Intercept: Hounsfield units for CT);
MONOCHROME1 is inverted so that bright means dense; colour (RGB, YBR_*, PALETTE COLOR) becomes
grey by luminance 0.299 R + 0.587 G + 0.114 B, as ultrasound is grey.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut

from ctxrestore.data.image_folder import _as_float32
from ctxrestore.errors import CtxRestoreError

logger = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_MAGIC_OFFSET = 128
_MAGIC = b"DICM"
_LUMINANCE = np.array([0.299, 0.587, 0.114])
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Relative spread of slice gaps beyond which a series is reported as gapped or mixed.
_GAP_TOLERANCE = 0.1
# Cosines (unitless) and positions (mm) closer than these are taken as equal.
_ORIENTATION_TOLERANCE = 1e-3
_POSITION_TOLERANCE = 1e-3
_CM_UNITS = 3  # PhysicalUnitsX/YDirection code for cm in SequenceOfUltrasoundRegions


@dataclass(frozen=True)
class DicomPixels:
    """What one DICOM file or series holds.

    frames: (F, H, W) float32 grey: the frames of one file, or the sorted slices of a series.
    spacing: mm along (frame or slice axis, rows, columns).
    lps_affine: 4x4, voxel index (column, row, slice) to patient LPS mm; only for a series
        with positions, else None (frames then stay in stored order).
    """

    frames: np.ndarray
    spacing: tuple[float, float, float]
    lps_affine: np.ndarray | None
    modality: str | None


def has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            file.seek(_MAGIC_OFFSET)
            return file.read(len(_MAGIC)) == _MAGIC
    except OSError:
        return False


def is_dicom_file(path: Path) -> bool:
    return path.suffix.lower() in DICOM_SUFFIXES or has_dicom_magic(path)


@contextmanager
def _quiet_pydicom(path: Path) -> Iterator[None]:
    """pydicom warns about every odd element; keep that out of the user's console."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        logger.debug("%s: %s", path, warning.message)


def _read_dataset(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    force = path.suffix.lower() in DICOM_SUFFIXES  # some writers omit the 128-byte preamble
    try:
        with _quiet_pydicom(path):
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=force)
    except Exception as error:  # pydicom raises many types for broken files
        raise CtxRestoreError(
            f"{path} cannot be read as DICOM ({type(error).__name__}: {error}); "
            "give a complete DICOM file (.dcm, or any file with 'DICM' at byte 128)"
        ) from None


def read_header(path: Path) -> Dataset:
    """The DICOM header of `path` without its pixel data (fast, for listing)."""
    return _read_dataset(path, stop_before_pixels=True)


def _describe(ds: Dataset) -> str:
    """Why a dataset without pixel data has none, for the error message."""
    name = getattr(ds.get("SOPClassUID"), "name", "")
    if not name and "Rows" not in ds:
        return "it has no DICOM image header (is it a DICOM file at all?)"
    if not name or "Image" in name:
        return "its pixel data element is missing (an incomplete or anonymised-away image?)"
    return f"it is a '{name}' object, not an image"


def _group_item(ds: Dataset, sequence: str, frame: int | None = None) -> Dataset | None:
    """First item of a functional-group `sequence` (enhanced multi-frame), per-frame first."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        groups.append(per_frame[frame] if frame < len(per_frame) else None)
    if "SharedFunctionalGroupsSequence" in ds:
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if group is not None and group.get(sequence):
            return group.get(sequence)[0]
    return None


def _rescale_source(ds: Dataset, frame: int) -> Dataset:
    """Where the modality LUT or rescale of `frame` lives: the top level, or (enhanced
    multi-frame files) a functional group; the dataset itself when there is none."""
    if "ModalityLUTSequence" in ds or "RescaleSlope" in ds:
        return ds
    return _group_item(ds, "PixelValueTransformationSequence", frame) or ds


def _modality_lut(frames: np.ndarray, ds: Dataset) -> np.ndarray:
    """(F, H, W) stored values to float64 modality values (Hounsfield units for CT)."""
    values = [apply_modality_lut(frame, _rescale_source(ds, i)) for i, frame in enumerate(frames)]
    return np.stack(values).astype(np.float64)


def _invert_monochrome1(values: np.ndarray, ds: Dataset) -> np.ndarray:
    # Invert over the range the stored bits allow (mapped by the modality LUT), not the file's
    # own min/max, so that every slice of a series is inverted the same way.
    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    ends = apply_modality_lut(np.array([low, high], dtype=np.int64), _rescale_source(ds, 0))
    return float(np.min(ends)) + float(np.max(ends)) - values


def _grey_pixels(ds: Dataset, path: Path) -> np.ndarray:
    """(F, H, W) float32: modality LUT applied, MONOCHROME1 inverted, colour to luminance."""
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        raise CtxRestoreError(
            f"{path} holds no pixel data: {_describe(ds)}; give DICOM image files "
            "(CT, MR, US, CR/DX, ...) and leave out structured reports, RT plans and DICOMDIRs"
        )
    syntax = getattr(ds.get("file_meta", Dataset()).get("TransferSyntaxUID"), "name", "unknown")
    try:
        with _quiet_pydicom(path):
            pixels = ds.pixel_array  # pydicom 3 returns RGB for YBR_* by default
    except Exception as error:  # truncated data, missing decoder, bad group 0028 values
        raise CtxRestoreError(
            f"{path} pixel data cannot be decoded (transfer syntax {syntax}; "
            f"{type(error).__name__}: {error}); give an uncompressed or decodable DICOM file "
            "(compressed syntaxes need pylibjpeg or gdcm installed)"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    num_frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if photometric == "PALETTE COLOR":
        pixels, samples = apply_color_lut(pixels, ds), 3
    if samples > 1:  # (..., H, W, 3) RGB
        values = pixels[..., :3].astype(np.float64) @ _LUMINANCE
    else:
        values = _modality_lut(pixels.reshape(num_frames, *pixels.shape[-2:]), ds)
        if photometric == "MONOCHROME1":
            values = _invert_monochrome1(values, ds)
    values = values.reshape(num_frames, *values.shape[-2:])
    return _as_float32(values, path)


def _positive(values: object, count: int) -> tuple[float, ...] | None:
    """`count` positive floats from a DICOM multi-value, or None when absent or invalid."""
    try:
        numbers = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(numbers) < count or not all(np.isfinite(n) and n > 0 for n in numbers[:count]):
        return None
    return numbers[:count]


def _pixel_spacing(ds: Dataset) -> tuple[float, float]:
    """(row, column) spacing in mm: PixelSpacing, ImagerPixelSpacing, US regions, else 1."""
    measures = _group_item(ds, "PixelMeasuresSequence") or Dataset()
    for values in (
        ds.get("PixelSpacing"),
        measures.get("PixelSpacing"),
        ds.get("ImagerPixelSpacing"),
    ):
        spacing = _positive(values, 2)
        if spacing:
            return (spacing[0], spacing[1])
    for region in ds.get("SequenceOfUltrasoundRegions") or ():
        units = (region.get("PhysicalUnitsYDirection"), region.get("PhysicalUnitsXDirection"))
        deltas = (region.get("PhysicalDeltaY"), region.get("PhysicalDeltaX"))
        spacing = _positive([abs(float(d)) if d is not None else None for d in deltas], 2)
        if units == (_CM_UNITS, _CM_UNITS) and spacing:
            return (spacing[0] * 10.0, spacing[1] * 10.0)
    return (1.0, 1.0)


def _frame_spacing(ds: Dataset) -> float:
    measures = _group_item(ds, "PixelMeasuresSequence") or Dataset()
    for values in (
        ds.get("SpacingBetweenSlices"),
        measures.get("SpacingBetweenSlices"),
        ds.get("SliceThickness"),
        measures.get("SliceThickness"),
    ):
        spacing = _positive([values] if values is not None else None, 1)
        if spacing:
            return spacing[0]
    return 1.0


def _modality(ds: Dataset) -> str | None:
    return str(ds.get("Modality") or "").strip().upper() or None


def read_dicom_file(path: Path) -> DicomPixels:
    """One DICOM file, single- or multi-frame; frames stay in stored order."""
    ds = _read_dataset(path)
    frames = _grey_pixels(ds, path)
    spacing = (_frame_spacing(ds), *_pixel_spacing(ds))
    return DicomPixels(frames, spacing, None, _modality(ds))  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Slice:
    path: Path
    ds: Dataset
    orientation: np.ndarray | None  # (6,) row then column direction cosines
    position: np.ndarray | None  # (3,) mm, LPS


def _vector(values: object, count: int) -> np.ndarray | None:
    try:
        vector = np.array([float(v) for v in values], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return vector if vector.shape == (count,) and np.isfinite(vector).all() else None


def _mixed(folder: Path, what: str, slices: Sequence[_Slice], values: list) -> CtxRestoreError:
    groups: dict[str, list[str]] = {}
    for s, value in zip(slices, values):
        groups.setdefault(str(value), []).append(s.path.name)
    detail = "; ".join(
        f"{v} in {len(names)} file(s), e.g. {names[0]}" for v, names in list(groups.items())[:3]
    )
    detail += f"; and {len(groups) - 3} more" if len(groups) > 3 else ""
    return CtxRestoreError(
        f"DICOM series in {folder} mixes {what}: {detail}; a series must be one stack of "
        "parallel slices of one size; move the other files to their own folders"
    )


def _check_consistent(slices: Sequence[_Slice], folder: Path) -> None:
    checks = {
        "image sizes (Rows, Columns)": [(s.ds.get("Rows"), s.ds.get("Columns")) for s in slices],
        "series (SeriesInstanceUID)": [s.ds.get("SeriesInstanceUID") for s in slices],
    }
    for what, values in checks.items():
        if len({str(v) for v in values}) > 1:
            raise _mixed(folder, what, slices, values)
    oriented = [s.orientation for s in slices if s.orientation is not None]
    if any(not np.allclose(o, oriented[0], atol=_ORIENTATION_TOLERANCE) for o in oriented):
        values = [
            None if s.orientation is None else np.round(s.orientation, 4).tolist() for s in slices
        ]
        raise _mixed(folder, "orientations (ImageOrientationPatient)", slices, values)


def _sort_slices(slices: list[_Slice], folder: Path) -> tuple[list[_Slice], float | None]:
    """Slices in order along the normal, and the median gap (None without positions)."""
    if any(s.position is None or s.orientation is None for s in slices):
        logger.warning(
            "DICOM series in %s lacks ImagePositionPatient/ImageOrientationPatient in some "
            "files; slices are ordered by InstanceNumber and the slice spacing is taken from "
            "the header, so the volume may be out of order or mis-scaled",
            folder,
        )
        return sorted(slices, key=lambda s: (int(s.ds.get("InstanceNumber") or 0), s.path)), None
    orientation = slices[0].orientation
    normal = np.cross(orientation[:3], orientation[3:])  # type: ignore[index]
    keys = np.array([float(normal @ s.position) for s in slices])  # type: ignore[operator]
    order = np.argsort(keys, kind="stable")
    ordered, keys = [slices[i] for i in order], keys[order]
    gaps = np.diff(keys)
    duplicate = np.flatnonzero(gaps < _POSITION_TOLERANCE)
    if duplicate.size:
        first, second = ordered[duplicate[0]].path.name, ordered[duplicate[0] + 1].path.name
        raise CtxRestoreError(
            f"DICOM series in {folder} has {duplicate.size} duplicate slice position(s): "
            f"{first} and {second} are both at {keys[duplicate[0]]:.3f} mm along the normal; "
            "remove repeated files or split mixed series (e.g. several echoes) into folders"
        )
    spacing = float(np.median(gaps))
    if gaps.max() - gaps.min() > _GAP_TOLERANCE * spacing:
        logger.warning(
            "DICOM series in %s has uneven slice gaps (%.3g to %.3g mm, median %.3g mm used): "
            "slices may be missing or series mixed; slices are stacked as if evenly spaced",
            folder,
            gaps.min(),
            gaps.max(),
            spacing,
        )
    return ordered, spacing


def _lps_affine(first: _Slice, spacing: tuple[float, float, float]) -> np.ndarray:
    slice_spacing, row_spacing, column_spacing = spacing
    row_cosine, column_cosine = first.orientation[:3], first.orientation[3:]  # type: ignore[index]
    normal = np.cross(row_cosine, column_cosine)
    affine = np.eye(4)
    # Index (column i, row j, slice k): i moves along the row cosine by the column spacing.
    affine[:3, 0] = row_cosine * column_spacing
    affine[:3, 1] = column_cosine * row_spacing
    affine[:3, 2] = normal * slice_spacing
    affine[:3, 3] = first.position  # type: ignore[assignment]
    return affine


def read_dicom_series(files: Sequence[Path], folder: Path) -> DicomPixels:
    """Single-frame `files` of one series as sorted slices with their LPS affine.

    Raises CtxRestoreError naming `folder` for mixed sizes, orientations, series or duplicate
    positions; logs a warning for uneven gaps or missing positions.
    """
    slices = []
    for path in files:
        ds = _read_dataset(path)
        orientation = _vector(ds.get("ImageOrientationPatient"), 6)
        slices.append(_Slice(path, ds, orientation, _vector(ds.get("ImagePositionPatient"), 3)))
    _check_consistent(slices, folder)
    multi_frame = [s.path.name for s in slices if int(s.ds.get("NumberOfFrames") or 1) > 1]
    if multi_frame:
        raise CtxRestoreError(
            f"DICOM series in {folder} holds multi-frame files ({', '.join(multi_frame[:3])}); "
            "read each multi-frame file on its own"
        )
    ordered, slice_spacing = _sort_slices(slices, folder)
    first = ordered[0]
    spacing = (slice_spacing or _frame_spacing(first.ds), *_pixel_spacing(first.ds))
    frames = np.concatenate([_grey_pixels(s.ds, s.path) for s in ordered])
    affine = None if slice_spacing is None else _lps_affine(first, spacing)  # type: ignore[arg-type]
    return DicomPixels(frames, spacing, affine, _modality(first.ds))  # type: ignore[arg-type]
