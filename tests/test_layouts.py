"""NIfTI convention and the dataset layouts: what is written reads back unchanged."""

import nibabel as nib
import numpy as np
import pytest

from ctxrestore.data.layouts import (
    read_boxes_csv,
    read_class_folders,
    read_segmentation_layout,
    write_boxes_csv,
    write_class_names,
    write_class_sample,
    write_dataset_json,
    write_segmentation_case,
)
from ctxrestore.data.nifti import read_nifti, write_nifti
from ctxrestore.data.readers import read_volume
from ctxrestore.errors import CtxRestoreError


@pytest.mark.parametrize("shape", [(6, 7), (5, 6, 7)])
def test_nifti_round_trip_and_orientation(tmp_path, shape):
    array = np.random.default_rng(0).random(shape).astype(np.float32)
    spacing = (3.0, 0.75, 0.5)[-len(shape) :]
    write_nifti(tmp_path / "a.nii.gz", array, spacing)
    back, back_spacing = read_nifti(tmp_path / "a.nii.gz")
    assert np.array_equal(back, array) and back_spacing == pytest.approx(spacing)
    if len(shape) == 3:
        image = nib.load(tmp_path / "a.nii.gz")
        assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
        # The same anatomy stored as RAS by another tool reads back identically.
        nib.save(nib.as_closest_canonical(image), tmp_path / "ras.nii.gz")
        assert np.array_equal(read_nifti(tmp_path / "ras.nii.gz")[0], array)


def read_case(case):
    """(image (C, *spatial), mask, spacing) as the files hold them."""
    channels = [read_volume(path) for path in case.images]
    mask = read_volume(case.label).array[0].astype(np.int64)
    return np.concatenate([c.array for c in channels]), mask, channels[0].spacing


def test_unreadable_nifti_names_the_file(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(CtxRestoreError, match=r"bad\.nii\.gz cannot be read as NIfTI"):
        read_nifti(tmp_path / "bad.nii.gz")


def test_class_folders_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    images = {}
    for index, class_name in enumerate(["zeta", "alpha", "zeta", "mid"]):
        image = rng.random((1, 8, 9)).astype(np.float32)
        path = write_class_sample(tmp_path, class_name, f"s{index}", image, (1.0, 1.0))
        images[path] = (class_name, image)
    write_class_names(tmp_path, ["zeta", "alpha", "mid"])
    items, names = read_class_folders(tmp_path)
    assert names == ["zeta", "alpha", "mid"]  # the pinned order, not the sorted one
    assert len(items) == 4
    for path, index in items:
        class_name, image = images[path]
        assert names[index] == class_name
    volume = rng.random((1, 4, 8, 9)).astype(np.float32)
    path = write_class_sample(tmp_path, "alpha", "v", volume, (2.0, 1.0, 1.0))
    assert path.name == "v.nii.gz" and np.array_equal(read_nifti(path)[0], volume[0])


def test_segmentation_layout_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    cases, originals = [], {}
    for index in range(3):
        image = rng.random((4, 5, 6, 7)).astype(np.float32)
        mask = rng.integers(0, 3, (5, 6, 7)).astype(np.uint8)
        case = write_segmentation_case(tmp_path, f"case_{index:04d}", image, mask, (2, 1, 1))
        cases.append(case)
        originals[case.name] = (image, mask)
    write_dataset_json(tmp_path, cases, ["T1", "T1ce", "T2", "FLAIR"], {0: "bg", 1: "a", 2: "b"})
    layout = read_segmentation_layout(tmp_path)
    assert layout.channel_names == ("T1", "T1ce", "T2", "FLAIR")
    assert layout.labels == {0: "bg", 1: "a", 2: "b"}
    for case in layout.cases:
        image, mask, spacing = read_case(case)
        assert np.array_equal(image, originals[case.name][0])
        assert np.array_equal(mask, originals[case.name][1])
        assert spacing == (2, 1, 1)


def test_dataset_json_pointing_to_missing_files_is_refused(tmp_path):
    case = write_segmentation_case(
        tmp_path, "c", np.zeros((1, 4, 4), np.float32), np.zeros((4, 4)), (1, 1)
    )
    write_dataset_json(tmp_path, [case], ["CT"], {0: "bg"})
    case.label.unlink()
    with pytest.raises(CtxRestoreError, match="missing label file"):
        read_segmentation_layout(tmp_path)


def test_boxes_round_trip_with_absent_organs(tmp_path):
    rows = [("a.nii.gz", "liver", ((1, 2), (5, 9))), ("a.nii.gz", "spleen", None)]
    write_boxes_csv(tmp_path / "boxes.csv", rows, dims=2)
    assert read_boxes_csv(tmp_path / "boxes.csv") == {
        "a.nii.gz": {"liver": ((1, 2), (5, 9)), "spleen": None}
    }


def test_a_folder_without_dataset_json_is_told_what_layout_is_expected(tmp_path):
    (tmp_path / "scan.png").write_bytes(b"")
    with pytest.raises(CtxRestoreError, match=r"has no dataset\.json: .*imagesTr/, labelsTr/"):
        read_segmentation_layout(tmp_path)
