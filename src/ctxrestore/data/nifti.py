"""NIfTI in and out through nibabel, with one array convention for the whole package.

Arrays are indexed (z, y, x) for volumes and (y, x) for images: y grows towards the patient's
posterior, x towards the patient's left (radiological display: patient left on image right),
z towards superior. On disk that is axis code ('L', 'P', 'S'), as DICOM and ITK use. Reading
reorients any file to that code first, so files from other tools land the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write

NIFTI_SUFFIXES = (".nii", ".nii.gz")
CANONICAL_CODES = ("L", "P", "S")


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def write_nifti(
    path: Path | str,
    array: np.ndarray,
    spacing: Sequence[float],
    affine: np.ndarray | None = None,
) -> Path:
    """Write a (z, y, x) volume or (y, x) image with voxel `spacing` in mm (same axis order).

    `affine`: voxel (x, y, z) -> world RAS of the array (readers.Volume.affine), so that the
    file overlays the image it came from; default: at the origin, axes towards L, P, S."""
    array = np.asarray(array)
    if array.ndim not in (2, 3) or len(spacing) != array.ndim:
        raise CtxRestoreError(
            f"write_nifti {path}: need a (y, x) or (z, y, x) array with one spacing per axis, "
            f"got shape {array.shape} and spacing {tuple(spacing)}"
        )
    on_disk = array.T  # (x, y[, z])
    zooms = tuple(float(s) for s in spacing)[::-1]
    signs = (-1.0, -1.0, 1.0)[: array.ndim]  # x -> L, y -> P, z -> S in RAS+ world
    if affine is None:
        affine = np.eye(4)
        for axis, (zoom, sign) in enumerate(zip(zooms, signs)):
            affine[axis, axis] = sign * zoom
    image = nib.Nifti1Image(np.ascontiguousarray(on_disk), affine)
    image.header.set_xyzt_units("mm")
    suffix = ".nii.gz" if str(path).endswith(".gz") else ".nii"
    return atomic_write(path, lambda temporary: nib.save(image, str(temporary)), suffix)


def read_nifti(path: Path | str) -> tuple[np.ndarray, tuple[float, ...]]:
    """(array in (z, y, x) or (y, x) order, spacing in mm per axis), reoriented to L, P, S."""
    path = Path(path)
    try:
        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
    except (ImageFileError, OSError, EOFError, ValueError) as error:
        raise CtxRestoreError(f"{path} cannot be read as NIfTI: {error}") from None
    if data.ndim == 2:
        flipped = data
        for axis, sign in enumerate(np.sign(np.diag(image.affine)[:2])):
            if sign > 0:  # stored R/A: flip to L/P
                flipped = np.flip(flipped, axis)
        zooms = image.header.get_zooms()[:2]
        return np.ascontiguousarray(flipped.T), tuple(round(float(z), 6) for z in zooms[::-1])
    if data.ndim != 3:
        raise CtxRestoreError(
            f"{path} has {data.ndim} dimensions (shape {data.shape}); expected a 2D image or "
            f"a 3D volume (one file per channel)"
        )
    transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(CANONICAL_CODES))
    reoriented = image.as_reoriented(transform)
    zooms = reoriented.header.get_zooms()[:3]
    array = np.asanyarray(reoriented.dataobj).transpose(2, 1, 0)
    return np.ascontiguousarray(array), tuple(round(float(z), 6) for z in zooms[::-1])
