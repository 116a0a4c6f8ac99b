"""Every medical image format the package reads, as one `Volume` in one orientation.

`read_volume` reads NIfTI (nibabel), NRRD/MetaImage (SimpleITK), DICOM files and series
(pydicom, see `data.dicom`) and PNG/JPEG/TIFF/NumPy (`data.image_folder`). Arrays are
(C, *spatial) float32 with spatial axes (z, y, x) for volumes and (y, x) for images, and every
volume is reoriented to axis code ('L', 'P', 'S') as `data.nifti` does: x grows towards the
patient's left, y towards posterior, z towards superior. `find_sources` lists what a folder
holds, grouping the slice files of each DICOM series into one source.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.orientations import (
    apply_orientation,
    axcodes2ornt,
    inv_ornt_aff,
    io_orientation,
    ornt_transform,
)

from ctxrestore.data.dicom import (
    DICOM_SUFFIXES,
    is_dicom_file,
    read_dicom_file,
    read_dicom_series,
    read_header,
)
from ctxrestore.data.image_folder import IMAGE_SUFFIXES, _as_float32, read_image
from ctxrestore.data.nifti import CANONICAL_CODES, NIFTI_SUFFIXES
from ctxrestore.errors import CtxRestoreError

logger = logging.getLogger(__name__)

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
ACCEPTED_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES + DICOM_SUFFIXES + IMAGE_SUFFIXES
# Files that sit beside images in datasets and are skipped without a word.
KNOWN_OTHER_SUFFIXES = (".json", ".csv", ".txt", ".md")
_ACCEPTED = f"{' '.join(ACCEPTED_SUFFIXES)}, or DICOM files without suffix"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Volume:
    """One image or volume: `array` (C, *spatial) float32, all finite; `spacing` in mm per
    spatial axis, in array order; `modality` the DICOM Modality when the file says."""

    array: np.ndarray
    spacing: tuple[float, ...]
    modality: str | None
    source: str
    # Voxel (x, y, z) -> world RAS mm of the array transposed to (x, y, z), as NIfTI stores
    # it: predictions written with it overlay the input in any viewer; labels are checked
    # against it. Files without a position get `default_affine(spacing)`.
    affine: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.affine is None:
            object.__setattr__(self, "affine", default_affine(self.spacing))


@dataclass(frozen=True)
class ImageSource:
    """One thing that reads as one image/volume: a file, or the slice files of one DICOM series.

    `files` are every file read (sorted by name); `name` is short and unique within a listing:
    the path relative to the listed folder (posix, without suffix), with the series UID tail
    added where a folder holds several series.
    """

    path: Path
    files: tuple[Path, ...]
    name: str


def _suffix(path: Path) -> str:
    """The accepted suffix `path` ends with (".nii.gz" counts as one), in lower case, or ""."""
    lower = path.name.lower()
    return next(
        (s for s in sorted(ACCEPTED_SUFFIXES, key=len, reverse=True) if lower.endswith(s)), ""
    )


def is_readable_file(path: Path) -> bool:
    """Whether the suffix or the DICOM magic ('DICM' at byte 128) says `path` can be tried."""
    path = Path(path)
    return bool(_suffix(path)) or (path.is_file() and is_dicom_file(path))


def default_affine(spacing: Sequence[float]) -> np.ndarray:
    """The affine of an array at the origin, axes towards L, P, S (as data.nifti writes)."""
    xyz = list(spacing)[::-1] + [1.0] * (3 - len(spacing))
    return np.diag([-xyz[0], -xyz[1], xyz[2], 1.0])


def to_lps(
    data: np.ndarray, ras_affine: np.ndarray, zooms: Sequence[float]
) -> tuple[np.ndarray, tuple[float, ...], np.ndarray]:
    """Reorient `data` (i, j, k, *rest), indexed as `ras_affine`'s voxel axes, to axis code
    ('L', 'P', 'S'): returns (x, y, z, *rest), `zooms` permuted to (x, y, z), and the RAS
    affine of the reoriented voxels."""
    transform = ornt_transform(io_orientation(ras_affine), axcodes2ornt(CANONICAL_CODES))
    reoriented = apply_orientation(data, transform)
    spacing = [0.0, 0.0, 0.0]
    for axis, (target, _flip) in enumerate(transform):
        spacing[int(target)] = float(zooms[axis])
    affine = ras_affine @ inv_ornt_aff(transform, data.shape[:3])
    return reoriented, tuple(spacing), affine


def _spatial_first_to_channels_first(array: np.ndarray) -> np.ndarray:
    """(x, y, z, C) or (x, y, z) -> (C, z, y, x); (x, y) -> (1, y, x)."""
    if array.ndim == 2:
        return array.T[None]
    if array.ndim == 3:
        return array.transpose(2, 1, 0)[None]
    return array.transpose(3, 2, 1, 0)


def _rounded(spacing: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(abs(float(s)), 6) for s in spacing)


def _read_nifti(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except Exception as error:  # nibabel, gzip and numpy raise many types for broken files
        raise CtxRestoreError(
            f"{path} cannot be read as NIfTI ({type(error).__name__}: {error}); give a complete "
            ".nii or .nii.gz file"
        ) from None
    zooms = image.header.get_zooms()
    if data.ndim == 5 and data.shape[3] == 1:  # NIfTI keeps vector components on axis 5
        data = data[:, :, :, 0]
    if data.ndim == 2:  # as data.nifti: stored R/A axes are flipped to L/P
        for axis, sign in enumerate(np.sign(np.diag(image.affine)[:2])):
            if sign > 0:
                data = np.flip(data, axis)
        return _spatial_first_to_channels_first(data), _rounded(zooms[1::-1]), None
    if data.ndim not in (3, 4):
        raise CtxRestoreError(
            f"{path} has shape {data.shape}; expected (x, y) image, (x, y, z) volume or "
            "(x, y, z, channels) multi-modal volume"
        )
    data, spacing, affine = to_lps(data, image.affine, zooms[:3])
    return _spatial_first_to_channels_first(data), _rounded(spacing[::-1]), affine


def _read_itk(path: Path) -> tuple[np.ndarray, tuple[float, ...], np.ndarray | None]:
    try:
        image = sitk.ReadImage(str(path))
        dimension = image.GetDimension()
        if dimension == 3:
            image = sitk.DICOMOrient(image, "".join(CANONICAL_CODES))
        array = sitk.GetArrayFromImage(image)  # (z, y, x[, components]) or (y, x[, ...])
    except Exception as error:  # SimpleITK raises RuntimeError with ITK's whole trace
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise CtxRestoreError(
            f"{path} cannot be read by SimpleITK ({first_line}); give a complete NRRD "
            "(.nrrd/.nhdr) or MetaImage (.mha/.mhd) file with its data"
        ) from None
    if dimension not in (2, 3):
        raise CtxRestoreError(
            f"{path} has {dimension} dimensions; expected a 2D image or 3D volume "
            "(channels as vector pixels)"
        )
    spacing = image.GetSpacing()[::-1]
    channels = image.GetNumberOfComponentsPerPixel()
    array = np.moveaxis(array, -1, 0) if channels > 1 else array[None]
    if dimension == 2:  # flip axes stored towards R/A, as for 2D NIfTI
        direction = np.array(image.GetDirection()).reshape(2, 2)
        for axis, sign in zip((2, 1), np.sign(np.diag(direction))):
            if sign < 0:
                array = np.flip(array, axis)
    affine = None
    if dimension == 3:  # after DICOMOrient the axes run to L, P, S: origin and spacing suffice
        lps = np.eye(4)
        lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) * np.array(image.GetSpacing())
        lps[:3, 3] = image.GetOrigin()
        affine = _LPS_TO_RAS @ lps
    return np.ascontiguousarray(array), _rounded(spacing), affine


def _read_dicom(
    source: ImageSource,
) -> tuple[np.ndarray, tuple[float, ...], str | None, np.ndarray | None]:
    if len(source.files) > 1:
        pixels = read_dicom_series(source.files, source.path)
    else:
        pixels = read_dicom_file(source.files[0])
    frames, spacing = pixels.frames, pixels.spacing
    if pixels.lps_affine is not None:
        on_disk = frames.transpose(2, 1, 0)  # (column i, row j, slice k), the affine's order
        oriented, xyz, affine = to_lps(on_disk, _LPS_TO_RAS @ pixels.lps_affine, spacing[::-1])
        return (
            _spatial_first_to_channels_first(oriented), _rounded(xyz[::-1]), pixels.modality,
            affine,
        )  # fmt: skip
    if frames.shape[0] == 1 and len(source.files) == 1:
        return frames, _rounded(spacing[1:]), pixels.modality, None
    return frames[None], _rounded(spacing), pixels.modality, None


def _as_source(source: ImageSource | Path | str) -> ImageSource:
    if isinstance(source, ImageSource):
        if not source.files:
            raise CtxRestoreError(f"image source {source.path} lists no files")
        return source
    path = Path(source)
    if path.is_dir():
        sources = find_sources(path)
        if len(sources) > 1:
            names = ", ".join(s.name for s in sources[:5])
            raise CtxRestoreError(
                f"{path} holds {len(sources)} images or series ({names}, ...); give one file "
                "or one series folder, or list them with find_sources"
            )
        return sources[0]
    if not path.exists():
        raise CtxRestoreError(f"image file {path} does not exist")
    return ImageSource(path, (path,), path.name)


def read_volume(source: ImageSource | Path | str) -> Volume:
    """Read a file, a DICOM series (an `ImageSource` from `find_sources`, or its folder) as a
    `Volume`: (C, *spatial) float32 in (z, y, x) / (y, x), reoriented to L, P, S.

    NIfTI: 2D -> (1, y, x), 3D -> (1, z, y, x), 4D (x, y, z, C) -> (C, z, y, x).
    NRRD/MetaImage: vector pixels become channels. DICOM: one frame -> (1, H, W); several
    frames (cine, enhanced MR) -> (1, frames, H, W); a series -> (1, z, y, x).
    PNG/JPEG/TIFF/NumPy: as `read_image`, spacing 1. Raises CtxRestoreError naming the file
    for anything unreadable, truncated, without pixels, empty or with NaN/Inf values.
    """
    source = _as_source(source)
    path = source.files[0]
    suffix = _suffix(path)
    modality, affine = None, None
    if len(source.files) == 1 and not path.is_file():
        raise CtxRestoreError(f"image file {path} does not exist or is not a file")
    if len(source.files) > 1 or suffix in DICOM_SUFFIXES or (not suffix and is_dicom_file(path)):
        array, spacing, modality, affine = _read_dicom(source)
    elif suffix in NIFTI_SUFFIXES:
        array, spacing, affine = _read_nifti(path)
    elif suffix in ITK_SUFFIXES:
        array, spacing, affine = _read_itk(path)
    elif suffix in IMAGE_SUFFIXES:
        array = read_image(path)
        spacing = (1.0,) * (array.ndim - 1)
    else:
        raise CtxRestoreError(
            f"{path} is not an image format read here (suffix {suffix or path.suffix or 'none'}"
            f", no DICOM header); accepted: {_ACCEPTED}"
        )
    array = _as_float32(array, path if len(source.files) == 1 else source.path)
    return Volume(array, tuple(spacing), modality, str(source.path), affine)


def _series_names(base: str, uids: list[str]) -> dict[str, str]:
    """Names for several series in one folder: `base` plus the shortest unique UID tail."""
    for parts in range(1, 64):
        tails = {uid: ".".join(uid.split(".")[-parts:]) for uid in uids}
        if len(set(tails.values())) == len(uids):
            break
    prefix = "" if base == "." else f"{base}/"
    return {uid: f"{prefix}series-{tail}" for uid, tail in tails.items()}


def _name(path: Path, folder: Path) -> str:
    relative = path.relative_to(folder).as_posix()
    suffix = _suffix(path)
    return relative[: len(relative) - len(suffix)] if suffix else relative


def _dicom_sources(files: list[Path], folder: Path, skipped: list[Path]) -> list[ImageSource]:
    """Group DICOM `files` by (parent folder, SeriesInstanceUID); multi-frame files alone."""
    series: dict[tuple[Path, str], list[Path]] = {}
    sources = []
    for path in files:
        try:
            header = read_header(path)
        except CtxRestoreError:  # read_volume will say what is wrong with it
            sources.append(ImageSource(path, (path,), _name(path, folder)))
            continue
        if "Rows" not in header:  # DICOMDIR, structured report, RT plan: no image
            skipped.append(path)
            continue
        uid = str(header.get("SeriesInstanceUID") or "")
        if int(header.get("NumberOfFrames") or 1) > 1 or not uid:
            sources.append(ImageSource(path, (path,), _name(path, folder)))
        else:
            series.setdefault((path.parent, uid), []).append(path)
    for parent in sorted({parent for parent, _ in series}):
        uids = sorted(uid for other, uid in series if other == parent)
        base = parent.relative_to(folder).as_posix()
        names = _series_names(base, uids) if len(uids) > 1 else {uids[0]: base}
        for uid in uids:
            slices = tuple(sorted(series[parent, uid]))
            if len(slices) == 1:
                sources.append(ImageSource(slices[0], slices, _name(slices[0], folder)))
            else:
                name = folder.name if names[uid] == "." else names[uid]
                sources.append(ImageSource(parent, slices, name))
    return sources


def _unique_names(sources: list[ImageSource], folder: Path) -> list[ImageSource]:
    """A series folder `a/b` and a file `a/b.nii.gz` would share a name: keep the suffix."""
    counts: dict[str, int] = {}
    for source in sources:
        counts[source.name] = counts.get(source.name, 0) + 1
    return [
        ImageSource(s.path, s.files, s.path.relative_to(folder).as_posix())
        if counts[s.name] > 1 and s.path.is_file()
        else s
        for s in sources
    ]


def find_sources(folder: Path | str) -> list[ImageSource]:
    """Every readable image under `folder` (recursively), sorted by path.

    NIfTI, NRRD/MetaImage, PNG/JPEG/TIFF/NumPy files are a source each; DICOM files (by
    suffix or 'DICM' magic) are grouped per folder and SeriesInstanceUID, a multi-frame file
    being a source alone. Hidden files and .json/.csv/.txt/.md are skipped. Raises
    CtxRestoreError when the folder is missing, is a file, or holds no readable image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise CtxRestoreError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise CtxRestoreError(f"image folder {folder} is not a folder; give a folder of images")
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    sources, dicom, skipped = [], [], []
    for path in files:
        suffix = _suffix(path)
        if suffix and suffix not in DICOM_SUFFIXES:
            sources.append(ImageSource(path, (path,), _name(path, folder)))
        elif suffix or is_dicom_file(path):
            dicom.append(path)
        else:
            skipped.append(path)
    sources += _dicom_sources(dicom, folder, skipped)
    if not sources:
        unknown = [p for p in skipped if p.suffix.lower() not in KNOWN_OTHER_SUFFIXES]
        kinds = sorted({p.suffix.lower() or p.name for p in skipped})[:6]
        found = (
            f"found {len(skipped)} other files ({', '.join(kinds)}; {len(unknown)} of unknown type)"
            if skipped
            else "it is empty"
        )
        raise CtxRestoreError(
            f"image folder {folder} holds no readable image: {found}; accepted: {_ACCEPTED}"
        )
    sources = _unique_names(sources, folder)
    return sorted(sources, key=lambda s: (s.path, s.name))
