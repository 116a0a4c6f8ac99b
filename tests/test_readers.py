"""read_volume and find_sources on real DICOM test files (pydicom, pydicom-data) and on files
written here with nibabel, SimpleITK and pydicom: values, orientation, spacing and errors."""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image
from pydicom.pixels import apply_color_lut, apply_modality_lut

from ctxrestore.data.nifti import read_nifti
from ctxrestore.data.readers import (
    ImageSource,
    Volume,
    find_sources,
    is_readable_file,
    read_volume,
)
from ctxrestore.errors import CtxRestoreError

PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
SERIES_FOLDERS = PYDICOM_FILES / "dicomdirtests"
LUMINANCE = np.array([0.299, 0.587, 0.114])


def pydicom_data_file(name: str) -> Path:
    """A file of the pydicom-data package (module data_store), without any download."""
    data_store = pytest.importorskip("data_store")
    path = Path(data_store.__file__).parent / "data" / name
    if not path.is_file():
        pytest.skip(f"{name} is not installed with pydicom-data")
    return path


def pydicom_file(name: str) -> Path:
    path = PYDICOM_FILES / name
    if not path.exists():
        pytest.skip(f"{name} is not among pydicom's test files")
    return path


def dataset(path: Path) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


# --- single DICOM files -----------------------------------------------------------------------


def test_ct_small_is_in_hounsfield_units():
    path = pydicom_file("CT_small.dcm")
    ds = dataset(path)
    volume = read_volume(path)
    expected = apply_modality_lut(ds.pixel_array, ds)
    assert isinstance(volume, Volume)
    assert volume.array.shape == (1, 128, 128) and volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array[0], expected)
    assert volume.array.min() < 0  # rescale intercept applied: air is negative HU
    assert volume.spacing == (0.661468, 0.661468)
    assert volume.modality == "CT" and volume.source == str(path)


def test_mr_small():
    path = pydicom_file("MR_small.dcm")
    volume = read_volume(str(path))
    np.testing.assert_array_equal(volume.array[0], dataset(path).pixel_array)
    assert volume.array.shape == (1, 64, 64)
    assert volume.spacing == (0.3125, 0.3125) and volume.modality == "MR"


def test_multi_frame_mr_is_a_volume_of_frames():
    path = pydicom_data_file("emri_small.dcm")
    volume = read_volume(path)
    assert volume.array.shape == (1, 10, 64, 64)
    np.testing.assert_array_equal(volume.array[0], dataset(path).pixel_array)
    assert len(volume.spacing) == 3 and volume.spacing[0] == 1.2  # SpacingBetweenSlices
    assert volume.modality == "MR"


def test_rgb_ultrasound_becomes_grey_by_luminance():
    path = pydicom_data_file("US1_UNCR.dcm")
    rgb = dataset(path).pixel_array
    volume = read_volume(path)
    assert volume.array.shape == (1, 480, 640) and volume.modality == "US"
    np.testing.assert_allclose(volume.array[0], rgb @ LUMINANCE, rtol=1e-6, atol=1e-4)


def test_palette_ultrasound_frames_and_region_calibration():
    path = pydicom_data_file("OBXXXX1A_2frame.dcm")
    ds = dataset(path)
    volume = read_volume(path)
    assert volume.array.shape == (1, 2, 600, 800) and volume.modality == "US"
    np.testing.assert_allclose(
        volume.array[0], apply_color_lut(ds.pixel_array, ds) @ LUMINANCE, rtol=1e-6
    )
    region = ds.SequenceOfUltrasoundRegions[0]  # PhysicalDeltaX/Y in cm
    assert volume.spacing[1:] == pytest.approx(
        (10 * region.PhysicalDeltaY, 10 * region.PhysicalDeltaX)
    )


def test_monochrome1_is_inverted_so_bright_means_dense():
    path = pydicom_data_file("RG1_UNCR.dcm")
    raw = dataset(path).pixel_array.astype(np.float64)
    volume = read_volume(path)
    assert volume.modality == "CR" and volume.array.shape == (1, *raw.shape)
    image = volume.array[0]
    assert image.flat[raw.argmax()] == image.min() and image.flat[raw.argmin()] == image.max()
    total = image + raw  # a strict inversion: out = constant - raw
    assert total.min() == total.max()
    assert volume.spacing == (1.0, 1.0)  # PixelSpacing 0\0 in this file is no spacing


def test_ybr_jpeg_cine_ultrasound():
    path = pydicom_file("examples_ybr_color.dcm")
    ds = dataset(path)
    try:
        rgb = ds.pixel_array  # RGB: pydicom 3 converts YBR by default
    except Exception as error:
        pytest.skip(f"no JPEG decoder for examples_ybr_color.dcm: {error}")
    volume = read_volume(path)
    assert volume.array.shape == (1, 30, 240, 320) and volume.modality == "US"
    np.testing.assert_allclose(volume.array[0], rgb @ LUMINANCE, rtol=1e-5, atol=1e-3)


def test_reading_is_quiet(capfd):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_volume(pydicom_file("CT_small.dcm"))
        with pytest.raises(CtxRestoreError):
            read_volume(pydicom_file("MR_truncated.dcm"))
    assert not caught
    captured = capfd.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err


# --- DICOM series -----------------------------------------------------------------------------


def position_key(path: Path) -> float:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    orientation = np.array(ds.ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    return float(normal @ np.array(ds.ImagePositionPatient, dtype=float))


def per_file_slices_in_position_order(folder: Path) -> np.ndarray:
    files = sorted(folder.iterdir(), key=position_key)
    return np.stack([read_volume(path).array[0] for path in files])


def test_real_ct_series_with_descending_positions():
    folder = SERIES_FOLDERS / "98892001" / "CT5N"  # 5 axial slices, z from 8.76 down to -1.24
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests are not installed")
    volume = read_volume(folder)
    assert volume.array.shape == (1, 5, 16, 16) and volume.modality == "CT"
    assert volume.spacing == (2.5, 0.488281, 0.488281)
    np.testing.assert_array_equal(volume.array[0], per_file_slices_in_position_order(folder))


def test_real_ct_series_with_a_gap_warns(caplog):
    folder = SERIES_FOLDERS / "77654033" / "CT2"  # z = -99.48, 103.02, 104.27, 105.52
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests are not installed")
    (source,) = find_sources(folder)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(source)
    assert volume.array.shape == (1, 4, 16, 16)
    assert volume.spacing == (1.25, 0.488281, 0.488281)  # the median gap
    np.testing.assert_array_equal(volume.array[0], per_file_slices_in_position_order(folder))
    assert any(
        "uneven slice gaps" in r.message and str(folder) in r.message for r in caplog.records
    )


def test_real_radial_mr_series_is_refused():
    # MR700 holds 7 radial slices (the row cosine turns around the column axis): they share a
    # SeriesInstanceUID but are no stack, so assembling them would make a false volume.
    folder = SERIES_FOLDERS / "98892003" / "MR700"
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests are not installed")
    (source,) = find_sources(folder)
    assert len(source.files) == 7
    with pytest.raises(CtxRestoreError, match="orientations") as error:
        read_volume(source)
    assert str(folder) in str(error.value)


def slice_pattern(index: int) -> np.ndarray:
    """A 128x128 int16 pattern unique to slice `index` and asymmetric in x and y."""
    y, x = np.mgrid[:128, :128]
    return (index * 1000 + 3 * y + x).astype(np.int16)


def write_series(
    folder: Path,
    heights: list[float],
    *,
    flip_x: bool = False,
    names: list[str] | None = None,
    spacing: float = 0.5,
) -> Path:
    """CT_small copies, one per height (z in mm); slice content depends only on the height's
    rank, so every series of the same heights shows the same patient. `flip_x` stores rows
    running towards patient right (ImageOrientationPatient -1\\0\\0\\0\\1\\0)."""
    template = dataset(pydicom_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    ranks = {height: rank for rank, height in enumerate(sorted(heights))}
    names = names or [f"slice{i:03d}.dcm" for i in range(len(heights))]
    for number, (height, name) in enumerate(zip(heights, names)):
        ds = template.copy()
        pattern = slice_pattern(ranks[height])
        x0 = -100.0
        if flip_x:
            pattern, x0 = pattern[:, ::-1], x0 + 127 * spacing
        ds.PixelSpacing = [spacing, spacing]
        ds.ImageOrientationPatient = [-1 if flip_x else 1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [x0, -100.0, height]
        ds.InstanceNumber = number + 1
        ds.PixelData = np.ascontiguousarray(pattern).tobytes()
        ds.save_as(folder / name)
    return folder


def expected_series(num_slices: int) -> np.ndarray:
    ds = dataset(pydicom_file("CT_small.dcm"))
    slices = [
        slice_pattern(rank) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for rank in range(num_slices)
    ]
    return np.stack(slices)[None].astype(np.float32)


@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
@pytest.mark.parametrize("flip_x", [False, True])
def test_written_series_lands_in_lps_position_order(tmp_path, order, flip_x):
    heights = [10.0 + 2.0 * i for i in range(5)]
    if order == "descending":
        heights = heights[::-1]
    names = [f"slice{i:03d}.dcm" for i in range(5)]
    if order == "shuffled":
        names = [names[i] for i in (3, 0, 4, 1, 2)]
    folder = write_series(tmp_path / "series", heights, flip_x=flip_x, names=names)
    (source,) = find_sources(folder)
    assert source.path == folder and len(source.files) == 5
    volume = read_volume(source)
    assert volume.spacing == (2.0, 0.5, 0.5) and volume.modality == "CT"
    np.testing.assert_array_equal(volume.array, expected_series(5))


def test_series_without_positions_falls_back_to_instance_number(tmp_path, caplog):
    folder = write_series(tmp_path / "series", [4.0, 0.0, 2.0])
    for path in folder.iterdir():
        ds = dataset(path)
        del ds.ImagePositionPatient
        ds.save_as(path)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(folder)
    assert "InstanceNumber" in caplog.text and str(folder) in caplog.text
    expected = expected_series(3)[:, [2, 0, 1]]  # file order, the heights' ranks
    np.testing.assert_array_equal(volume.array, expected)


def test_series_gap_is_a_warning(tmp_path, caplog):
    folder = write_series(tmp_path / "gap", [0.0, 2.0, 4.0, 10.0, 12.0])
    with caplog.at_level(logging.WARNING):
        volume = read_volume(folder)
    assert volume.spacing[0] == 2.0
    assert "uneven slice gaps" in caplog.text and str(folder) in caplog.text


def test_series_with_duplicate_position_is_refused(tmp_path):
    folder = write_series(tmp_path / "duplicate", [0.0, 2.0, 2.0, 4.0])
    with pytest.raises(CtxRestoreError, match="duplicate slice position") as error:
        read_volume(folder)
    assert str(folder) in str(error.value)


def test_series_with_different_sizes_is_refused(tmp_path):
    folder = write_series(tmp_path / "sizes", [0.0, 2.0, 4.0])
    path = sorted(folder.iterdir())[1]
    ds = dataset(path)
    ds.Rows = 64
    ds.PixelData = np.zeros((64, 128), np.int16).tobytes()
    ds.save_as(path)
    with pytest.raises(CtxRestoreError, match="image sizes") as error:
        read_volume(folder)
    assert str(folder) in str(error.value) and "slice001.dcm" in str(error.value)


# --- orientation and spacing of NIfTI, NRRD and MetaImage ---------------------------------------


def ras_volume() -> tuple[np.ndarray, np.ndarray]:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)  # (x, y, z) on disk
    return data, np.diag([2.0, 3.0, 4.0, 1.0])


def test_nifti_is_reoriented_to_lps_whatever_the_affine(tmp_path):
    data, affine = ras_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ras.nii.gz")
    # The same voxels stored as (k, flipped i, j): world positions are unchanged.
    permuted = np.ascontiguousarray(data[::-1].transpose(2, 0, 1))
    other = np.eye(4)
    other[:3, 0], other[:3, 1], other[:3, 2] = affine[:3, 2], -affine[:3, 0], affine[:3, 1]
    other[:3, 3] = affine[:3, 3] + affine[:3, 0] * (data.shape[0] - 1)
    nib.save(nib.Nifti1Image(permuted, other), tmp_path / "permuted.nii")

    ras, moved = read_volume(tmp_path / "ras.nii.gz"), read_volume(tmp_path / "permuted.nii")
    expected = data[::-1, ::-1, :].transpose(2, 1, 0)[None]  # R->L, A->P, then (z, y, x)
    np.testing.assert_array_equal(ras.array, expected)
    np.testing.assert_array_equal(moved.array, expected)
    assert ras.spacing == moved.spacing == (4.0, 3.0, 2.0)
    assert ras.modality is None and ras.source == str(tmp_path / "ras.nii.gz")
    np.testing.assert_array_equal(ras.array[0], read_nifti(tmp_path / "ras.nii.gz")[0])


@pytest.mark.parametrize(
    ("suffix", "flip_axis", "direction"),
    [(".nrrd", 2, (-1, 0, 0, 0, 1, 0, 0, 0, 1)), (".mha", 0, (1, 0, 0, 0, 1, 0, 0, 0, -1))],
)
def test_simpleitk_files_land_like_nifti(tmp_path, suffix, flip_axis, direction):
    data, affine = ras_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "reference.nii.gz")
    reference = read_volume(tmp_path / "reference.nii.gz")
    stored = np.ascontiguousarray(np.flip(reference.array[0], flip_axis))  # (z, y, x)
    image = sitk.GetImageFromArray(stored)
    image.SetSpacing(reference.spacing[::-1])
    image.SetDirection(direction)
    sitk.WriteImage(image, str(tmp_path / f"volume{suffix}"))
    volume = read_volume(tmp_path / f"volume{suffix}")
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing == reference.spacing == (4.0, 3.0, 2.0)


def test_simpleitk_vector_pixels_are_channels(tmp_path):
    channels = np.random.default_rng(0).random((3, 4, 5, 2)).astype(np.float32)  # (z, y, x, C)
    sitk.WriteImage(sitk.GetImageFromArray(channels, isVector=True), str(tmp_path / "v.nrrd"))
    volume = read_volume(tmp_path / "v.nrrd")
    np.testing.assert_array_equal(volume.array, np.moveaxis(channels, -1, 0))
    image = sitk.GetImageFromArray(channels[0, ..., 0])  # 2D (y, x)
    image.SetSpacing((0.5, 0.25))
    sitk.WriteImage(image, str(tmp_path / "image.mha"))
    flat = read_volume(tmp_path / "image.mha")
    assert flat.array.shape == (1, 4, 5) and flat.spacing == (0.25, 0.5)


def test_four_dimensional_nifti_gives_channels(tmp_path):
    data, affine = ras_volume()
    modalities = np.stack([data, 2 * data, -data], axis=-1)  # (x, y, z, C), BraTS style
    nib.save(nib.Nifti1Image(modalities, affine), tmp_path / "brats.nii.gz")
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "t1.nii.gz")
    volume, single = read_volume(tmp_path / "brats.nii.gz"), read_volume(tmp_path / "t1.nii.gz")
    assert volume.array.shape == (3, 6, 5, 4) and volume.spacing == (4.0, 3.0, 2.0)
    np.testing.assert_array_equal(
        volume.array, single.array[0] * np.array([1, 2, -1])[:, None, None, None]
    )


def test_two_dimensional_nifti(tmp_path):
    data = np.arange(20, dtype=np.int16).reshape(4, 5)  # (x, y)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 3.0, 1.0, 1.0])), tmp_path / "slice.nii")
    volume = read_volume(tmp_path / "slice.nii")
    assert volume.array.shape == (1, 5, 4) and volume.spacing == (3.0, 2.0)
    np.testing.assert_array_equal(volume.array[0], read_nifti(tmp_path / "slice.nii")[0])


def test_png_and_numpy_go_through_read_image(tmp_path):
    Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4)).save(tmp_path / "a.png")
    np.save(tmp_path / "b.npy", np.ones((2, 3, 4, 5), np.float32))
    png, npy = read_volume(tmp_path / "a.png"), read_volume(tmp_path / "b.npy")
    assert png.array.shape == (1, 3, 4) and png.spacing == (1.0, 1.0) and png.modality is None
    assert npy.array.shape == (2, 3, 4, 5) and npy.spacing == (1.0, 1.0, 1.0)


# --- listing folders --------------------------------------------------------------------------


def test_find_sources_groups_series_and_sorts(tmp_path):
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "nested" / "deeper" / "x.png")
    data, affine = ras_volume()
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "nested" / "vol.nii.gz")
    write_series(tmp_path / "ct", [0.0, 1.0, 2.0], names=["1.2.3.10", "1.2.3.8", "1.2.3.9"])
    shutil.copy(pydicom_data_file("emri_small.dcm"), tmp_path / "ct" / "cine.dcm")
    (tmp_path / "README.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "notes.bin").write_bytes(b"neither")

    sources = find_sources(tmp_path)
    assert [s.name for s in sources] == ["ct", "ct/cine", "nested/deeper/x", "nested/vol"]
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    series = sources[0]
    assert isinstance(series, ImageSource) and series.path == tmp_path / "ct"
    assert [p.name for p in series.files] == ["1.2.3.10", "1.2.3.8", "1.2.3.9"]
    assert read_volume(series).array.shape == (1, 3, 128, 128)
    assert read_volume(sources[1]).array.shape == (1, 10, 64, 64)
    assert is_readable_file(tmp_path / "ct" / "1.2.3.8")  # no suffix: the DICM magic
    assert not is_readable_file(tmp_path / "notes.bin")


def test_find_sources_names_several_series_in_one_folder():
    folder = SERIES_FOLDERS / "98892003" / "MR2"  # three series, all SeriesNumber 2
    if not folder.is_dir():
        pytest.skip("pydicom's dicomdirtests are not installed")
    sources = find_sources(folder)
    assert sorted(len(s.files) for s in sources) == [1, 3, 3]
    assert len({s.name for s in sources}) == 3
    assert all(s.name.startswith("series-") for s in sources if len(s.files) > 1)


def test_find_sources_skips_dicomdir_and_reports_an_empty_folder(tmp_path):
    shutil.copy(SERIES_FOLDERS / "DICOMDIR", tmp_path / "DICOMDIR")
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(CtxRestoreError, match="holds no readable image") as error:
        find_sources(tmp_path)
    assert str(tmp_path) in str(error.value) and "DICOMDIR" in str(error.value)


@pytest.mark.parametrize("kind", ["empty", "missing", "file"])
def test_find_sources_bad_folders(tmp_path, kind):
    folder = tmp_path / "data"
    if kind == "empty":
        folder.mkdir()
    elif kind == "file":
        folder.write_text("x")
    with pytest.raises(CtxRestoreError) as error:
        find_sources(folder)
    assert str(folder) in str(error.value)


# --- bad files --------------------------------------------------------------------------------


def bad_text_nifti(tmp_path: Path) -> Path:
    path = tmp_path / "text.nii.gz"
    path.write_text("this is not a NIfTI file\n")
    return path


def bad_truncated_nifti(tmp_path: Path) -> Path:
    _, affine = ras_volume()
    whole = tmp_path / "whole.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)), affine), whole)
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return path


def bad_nan_nifti(tmp_path: Path) -> Path:
    data, affine = ras_volume()
    data[0, 0, :3] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def bad_truncated_dicom(tmp_path: Path) -> Path:
    return pydicom_file("MR_truncated.dcm")


def bad_cut_dicom(tmp_path: Path) -> Path:
    whole = pydicom_file("CT_small.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def bad_dicom_without_pixels(tmp_path: Path) -> Path:
    ds = dataset(pydicom_file("CT_small.dcm"))
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path)
    return path


def bad_text_dicom(tmp_path: Path) -> Path:
    path = tmp_path / "text.dcm"
    path.write_text("this is not DICOM\n" * 20)
    return path


def bad_nrrd(tmp_path: Path) -> Path:
    path = tmp_path / "broken.nrrd"
    path.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nencoding: raw\n\n")
    return path


def bad_unknown_suffix(tmp_path: Path) -> Path:
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"\x00" * 200)
    return path


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (bad_text_nifti, "cannot be read as NIfTI"),
        (bad_truncated_nifti, "cannot be read as NIfTI"),
        (bad_nan_nifti, "3 NaN values"),
        (bad_truncated_dicom, "pixel data cannot be decoded"),
        (bad_cut_dicom, "DICOM"),
        (bad_dicom_without_pixels, "holds no pixel data"),
        (bad_text_dicom, "no pixel data"),
        (bad_nrrd, "SimpleITK"),
        (bad_unknown_suffix, "accepted"),
    ],
)
def test_bad_files_raise_errors_naming_the_file(tmp_path, capfd, make, words):
    path = make(tmp_path)
    with pytest.raises(CtxRestoreError) as error:
        read_volume(path)
    message = str(error.value)
    assert path.name in message and words in message
    chained = error.value.__context__ is not None and not error.value.__suppress_context__
    assert error.value.__cause__ is None and not chained  # no library traceback attached
    assert "Traceback" not in capfd.readouterr().err


def test_missing_file(tmp_path):
    with pytest.raises(CtxRestoreError, match="does not exist"):
        read_volume(tmp_path / "absent.nii.gz")
