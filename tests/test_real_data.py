"""Real files through every command: an MSD folder written here with nibabel (per-channel and
4D files, an oblique-free but non-trivial affine), DICOM series from pydicom's test data, a
classification CSV; the cache; small datasets; and bad input, each a clear one-line error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.bench.benchmark import BenchmarkOptions
from ctxrestore.cli import app
from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.readers import read_volume
from ctxrestore.data.unlabelled import UnlabelledDataset
from ctxrestore.errors import CtxRestoreError
from ctxrestore.tasks.datasets import FolderOptions, boxes_only, folder_data

runner = CliRunner()
TINY = dict(image_size=16, width=4, batch_size=4, max_steps=2, warmup_steps=1, log_every=1,
            device="cpu")  # fmt: skip
PYDICOM_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
# Voxel (i, j, k) -> RAS mm: axes towards R, A, S (as many scanners store), not at the origin.
AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 10.0], [0, 0, 3.0, 5.0], [0, 0, 0, 1]])
SHAPE_XYZ = (20, 24, 10)


def _case_arrays(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(2 channels (x, y, z), label (x, y, z)): a head-like ellipsoid with a 2-part lesion."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE_XYZ), indexing="ij")
    head = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2 < 1
    centre = rng.uniform(-0.3, 0.3, 3)
    distance = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    label = np.where(head & (distance < 0.35), 1, 0) + np.where(head & (distance < 0.18), 1, 0)
    channels = [
        np.where(head, 400 + 300 * (label == 1) + 600 * (label == 2), 0)
        + rng.normal(0, 20, SHAPE_XYZ) * head
        for _ in range(2)
    ]
    return np.stack(channels, axis=-1).astype(np.float32), label.astype(np.uint8)


def write_msd_folder(folder: Path, cases: int = 5) -> Path:
    """An MSD folder: odd cases as one file per channel, even cases as one 4D file."""
    entries = []
    for index in range(cases):
        image, label = _case_arrays(index)
        name = f"case{index:02d}"
        (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
        (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
        if index % 2:
            images = []
            for channel in range(2):
                path = folder / "imagesTr" / f"{name}_{channel:04d}.nii.gz"
                nib.save(nib.Nifti1Image(image[..., channel], AFFINE), path)
                images.append(f"./imagesTr/{path.name}")
        else:
            nib.save(nib.Nifti1Image(image, AFFINE), folder / "imagesTr" / f"{name}.nii.gz")
            images = f"./imagesTr/{name}.nii.gz"
        nib.save(nib.Nifti1Image(label, AFFINE), folder / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": images, "label": f"./labelsTr/{name}.nii.gz"})
    dataset = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "oedema": 1, "core": 2},
        "numTraining": cases,
        "training": entries,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset))
    return folder


@pytest.fixture
def msd(tmp_path) -> Path:
    return write_msd_folder(tmp_path / "msd")


def _fails_cleanly(arguments: list[str], *names: str) -> str:
    """Run the CLI; it must exit 2 with one error line naming `names`, and no traceback."""
    result = runner.invoke(app, [str(a) for a in arguments])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for name in names:
        assert name in result.output.replace("\n", ""), (name, result.output)
    return result.output


# ----------------------------------------------------------------------------- end to end
def test_pretrain_finetune_predict_on_an_msd_folder(msd, tmp_path):
    pre = tmp_path / "pre"
    ctxrestore.pretrain(
        msd, out=pre, modality="mr", target_spacing="3", patch_size=4, num_swaps=4, **TINY
    )
    spec = json.loads((pre / "spec.json").read_text())
    recorded = {"modality": "mr", "window": None, "target_spacing": [3.0, 3.0, 3.0]}
    assert spec["preprocessing"] == recorded and spec["in_channels"] == 2
    assert spec["channel_names"] == ["T1", "T2"]  # as dataset.json declares them

    run = tmp_path / "seg"
    ctxrestore.finetune("segment", msd, init=str(pre), out=run, **TINY)
    spec = json.loads((run / "spec.json").read_text())
    assert spec["preprocessing"] == recorded  # inherited from the pretraining run
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test"]["global_dice/mean"] <= 1.0

    predictions = tmp_path / "predictions"
    result = ctxrestore.predict(run, msd, out=predictions)
    assert result.count == 5
    for index in range(5):
        name = f"case{index:02d}"
        written = nib.load(predictions / f"{name}.nii.gz")
        label = read_volume(msd / "labelsTr" / f"{name}.nii.gz")
        # On the input's own grid and position (resampling to 3 mm undone), so it overlays.
        assert np.allclose(written.affine, label.affine)
        assert written.shape == label.array.shape[1:][::-1]
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1, 2}


@pytest.mark.parametrize(
    ("names", "modality", "hint"),
    [
        ({"0": "CT"}, "generic", "--modality ct gives HU windows"),
        ({"0": "T1", "1": "FLAIR"}, "generic", "--modality mr gives a robust z-score"),
        ({"0": "CT"}, "ct", None),  # asked for: nothing to say
        ({"0": "T1", "1": "CT"}, "generic", None),  # mixed: no guess
        ({"0": "channel_0"}, "generic", None),
    ],
)
def test_a_dataset_json_that_names_its_modality_hints_the_option(
    tmp_path, monkeypatch, caplog, names, modality, hint
):
    folder = write_msd_folder(tmp_path / "msd", cases=2)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["channel_names"] = names
    if len(names) == 1:  # one channel: keep the per-channel files of case01 only
        dataset["training"] = [
            {**entry, "image": entry["image"][:1]} for entry in dataset["training"] if
            isinstance(entry["image"], list)
        ]  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(dataset))
    window = "abdomen" if modality == "ct" else None
    options = FolderOptions(Preprocessing(modality, window), ArrayCache(None))
    for read in (
        lambda: folder_data("segment", folder, (16, 16), options),
        lambda: UnlabelledDataset(folder, preprocessing=options.preprocessing,
                                  spatial_size=(16, 16), cache=ArrayCache(None)),
    ):  # fmt: skip
        monkeypatch.setattr("ctxrestore.data.loading._HINTED", set())
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            read()
        hints = [r.message for r in caplog.records if "scaled generically" in r.message]
        if hint is None:
            assert hints == []
        else:
            assert len(hints) == 1 and hint in hints[0] and str(folder / "dataset.json") in hints[0]


def test_a_second_read_decodes_nothing(msd, tmp_path, monkeypatch):
    options = FolderOptions(Preprocessing("mr"), ArrayCache(tmp_path / "cache"))
    first = folder_data("segment", msd, (16, 16), options)

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached case was decoded again")

    monkeypatch.setattr("ctxrestore.data.loading.read_volume", no_decoding)
    second = folder_data("segment", msd, (16, 16), options)
    assert options.cache.hits == 5 and options.cache.misses == 5
    assert len(first.items) == len(second.items)
    assert all(
        (a["image"] == b["image"]).all() and (a["mask"] == b["mask"]).all()
        for a, b in zip(first.items, second.items)
    )


def test_pretraining_reads_dicom_series_and_multiframe_files(tmp_path):
    folder = tmp_path / "dicom"
    shutil.copytree(PYDICOM_FILES / "dicomdirtests" / "98892001" / "CT5N", folder / "ct")
    pydicom_data = Path(pytest.importorskip("data_store").__file__).parent / "data"
    shutil.copy(pydicom_data / "emri_small.dcm", folder / "cine.dcm")  # 10 frames, 64x64
    (folder / "notes.txt").write_text("not an image")
    dataset = UnlabelledDataset(
        folder,
        preprocessing=Preprocessing("generic"),
        spatial_size=(16, 16),
        cache=ArrayCache(None),
    )
    # The 5-slice CT series is one volume, the multi-frame file another.
    assert len(dataset.cases) == 2 and 0 < len(dataset) <= 5 + 10
    shapes = sorted(case.image.shape for case in dataset.cases)
    assert shapes == [(1, 5, 16, 16), (1, 10, 64, 64)]
    image = dataset[0]["image"]
    assert image.shape == (1, 16, 16) and image.min() >= 0 and image.max() <= 1
    out = tmp_path / "pre"
    ctxrestore.pretrain(folder, out=out, modality="generic", patch_size=4, num_swaps=4, **TINY)
    assert (out / "model.safetensors").is_file()


def test_classification_from_a_csv(tmp_path):
    folder = tmp_path / "csv"
    rows = ["image,label"]
    rng = np.random.default_rng(0)
    for index in range(24):
        label = ("bright", "dark")[index % 2]
        pixels = (
            rng.integers(150, 255, (20, 20)) if label == "bright" else rng.integers(0, 90, (20, 20))
        )
        path = folder / "images" / f"{index:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path)
        rows.append(f"images/{path.name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    ctxrestore.finetune("classify", folder / "labels.csv", out=run, modality="us", **TINY)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["split"]["train"]["cases"] + metrics["split"]["val"]["cases"] > 10
    assert json.loads((run / "spec.json").read_text())["task"]["class_names"] == ["bright", "dark"]


@pytest.mark.parametrize(("cases", "split"), [(3, (1, 1, 1)), (2, (1, 0, 1))])
def test_two_or_three_volumes_still_run(tmp_path, cases, split, caplog):
    data = write_msd_folder(tmp_path / "small", cases=cases)
    run = tmp_path / "run"
    ctxrestore.finetune("segment", data, out=run, **TINY)
    metrics = json.loads((run / "metrics.json").read_text())
    assert tuple(metrics["split"][name]["cases"] for name in ("train", "val", "test")) == split
    assert ("no validation split" in caplog.text) == (cases == 2)
    assert "global_dice/mean" in metrics["test"]


# ----------------------------------------------------------------------------- bad input
def _label(msd: Path, case: str = "case01") -> Path:
    return msd / "labelsTr" / f"{case}.nii.gz"


def test_labels_outside_the_declared_classes(msd, tmp_path):
    image = nib.load(_label(msd))
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, image.affine), _label(msd))
    output = _fails_cleanly(["finetune", "segment", msd, "--out", tmp_path / "r"], "case01", "[7]")
    assert "--skip-bad" in output


def test_image_and_label_on_different_grids(msd, tmp_path):
    image = nib.load(_label(msd))
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(data[:-2], image.affine), _label(msd))
    _fails_cleanly(["finetune", "segment", msd, "--out", tmp_path / "a"], "case01", "shape")
    shifted = image.affine.copy()
    shifted[0, 3] += 10
    nib.save(nib.Nifti1Image(data, shifted), _label(msd))
    _fails_cleanly(["finetune", "segment", msd, "--out", tmp_path / "b"], "case01", "affine")


def test_nan_voxels_and_truncated_files(msd, tmp_path):
    path = msd / "imagesTr" / "case01_0000.nii.gz"
    image = nib.load(path)
    data = np.asarray(image.dataobj).copy()
    data[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), path)
    _fails_cleanly(["finetune", "segment", msd, "--out", tmp_path / "a"], "case01_0000", "NaN")
    whole = (msd / "imagesTr" / "case00.nii.gz").read_bytes()
    (msd / "imagesTr" / "case00.nii.gz").write_bytes(whole[: len(whole) // 2])
    _fails_cleanly(["pretrain", msd, "--out", tmp_path / "b"], "case00.nii.gz")


def test_skip_bad_skips_and_counts(msd, tmp_path):
    (msd / "imagesTr" / "case02.nii.gz").write_text("not a NIfTI file")
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["finetune", "segment", str(msd), "--out", str(run), "--skip-bad",
              *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["skipped_files"] == "skipped 1 of 5 cases (--skip-bad)"
    assert "case02" in result.output


def test_dataset_json_pointing_to_missing_files(msd, tmp_path):
    (msd / "labelsTr" / "case03.nii.gz").unlink()
    _fails_cleanly(["finetune", "segment", msd, "--out", tmp_path / "r"], "case03.nii.gz")


def test_empty_folders_and_2d_where_3d_is_expected(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails_cleanly(["pretrain", empty, "--out", tmp_path / "a"], "empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(flat / "slice.png")
    _fails_cleanly(
        ["pretrain", flat, "--out", tmp_path / "b", "--spatial-dims", "3", "--image-size", "16"],
        "slice.png",
        "2D",
    )


def test_a_fraction_that_leaves_a_class_without_examples(tmp_path):
    folder = tmp_path / "classes"
    for name, count in (("common", 30), ("rare", 2)):
        for index in range(count):
            path = folder / name / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((16, 16), 40 * index % 255, np.uint8)).save(path)
    _fails_cleanly(
        ["finetune", "classify", folder, "--out", tmp_path / "r", "--fraction", "1",
         "--image-size", "16"],
        "'rare'",
        "no training example",
    )  # fmt: skip


def test_errors_name_the_file_in_python_too(msd):
    (msd / "imagesTr" / "case04.nii.gz").write_bytes(b"\x00" * 10)
    with pytest.raises(CtxRestoreError, match="case04"):
        folder_data("segment", msd, (16, 16), FolderOptions(Preprocessing(), ArrayCache(None)))


def _world_boxes_csv(msd: Path) -> None:
    """boxes.csv in LPS millimetres, from the label files (the way a user's tool exports)."""
    rows = ["image,label,present,start_0,start_1,start_2,stop_0,stop_1,stop_2,space"]
    dataset = json.loads((msd / "dataset.json").read_text())
    for entry in dataset["training"]:
        label = np.asarray(nib.load(msd / entry["label"]).dataobj)
        image = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        for value, name in ((1, "oedema"), (2, "core")):
            voxels = np.argwhere(label == value)
            if not len(voxels):
                rows.append(f"{image},{name},0,,,,,,,LPS")
                continue
            corners = [AFFINE @ [*voxels.min(0), 1], AFFINE @ [*voxels.max(0), 1]]
            lps = [corner[:3] * [-1, -1, 1] for corner in corners]
            rows.append(f"{image},{name},1,{','.join(map(str, lps[0]))},"
                        f"{','.join(map(str, lps[1]))},LPS")  # fmt: skip
    (msd / "boxes.csv").write_text("\n".join(rows) + "\n")


def test_world_boxes_land_where_the_masks_are(msd):
    options = FolderOptions(Preprocessing("mr", target_spacing=(3.0, 3.0, 3.0)), ArrayCache(None))
    from_masks = {
        size: folder_data("localize", msd, size, options) for size in [(16,) * 3, (16,) * 2]
    }
    _world_boxes_csv(msd)
    for size, expected in from_masks.items():
        listed = folder_data("localize", msd, size, options)
        assert len(listed.items) == len(expected.items)
        for got, want in zip(listed.items, expected.items):
            assert torch.equal(got["present"], want["present"])
            if len(size) == 3:  # whole volumes: the same boxes (2D slices crop them tighter)
                # within a network voxel: masks are resampled and resized on whole voxels
                assert torch.allclose(got["boxes"], want["boxes"], atol=1.0)
                assert (got["boxes"] - want["boxes"]).abs().mean() < 0.5
            # every case has a mask: kept beside the listed boxes, for the U-Net box heads
            assert torch.equal(got["mask"], want["mask"])
        assert listed.task.organ_values == expected.task.organ_values == (1, 2)


def test_localisation_from_a_boxes_csv_alone(msd, tmp_path):
    """No dataset.json, no masks: images and their world boxes in one CSV."""
    _world_boxes_csv(msd)
    rows = (msd / "boxes.csv").read_text().splitlines()
    single = [row for row in rows[1:] if row.startswith("./imagesTr/case0") and "_0000" in row]
    assert single  # the per-channel cases: one channel each
    table = tmp_path / "boxes.csv"
    prefix = f"{msd.as_posix()}/"
    table.write_text("\n".join([rows[0], *(prefix + row[2:] for row in single)]) + "\n")
    run = tmp_path / "run"
    ctxrestore.finetune("localize", table, out=run, modality="mr", **TINY)
    spec = json.loads((run / "spec.json").read_text())
    assert spec["task"]["organ_names"] == ["core", "oedema"]
    assert "iou/mean" in json.loads((run / "metrics.json").read_text())["test"]
    ctxrestore.pretrain(table, out=tmp_path / "pre", patch_size=4, num_swaps=4, **TINY)
    # Boxes alone cannot train a head that learns the organs' label map; a benchmark says so
    # before it pretrains, for a boxes CSV and for a folder with a boxes.csv and a case
    # without a mask.
    with pytest.raises(CtxRestoreError, match=r"boxes only.*use --box-head mask"):
        ctxrestore.finetune("localize", table, out=tmp_path / "seg", modality="mr",
                            box_head="segment", **TINY)  # fmt: skip
    dataset = json.loads((msd / "dataset.json").read_text())
    unmasked = tmp_path / "unmasked"
    shutil.copytree(msd, unmasked)
    del dataset["training"][1]["label"]
    (unmasked / "dataset.json").write_text(json.dumps(dataset))
    for data in (table, unmasked):
        with pytest.raises(CtxRestoreError, match=rf"{data.name}: .*gives boxes only"):
            BenchmarkOptions(task="localize", data=data, box_head="segment", out=tmp_path / "b")
    # a folder whose cases all have masks trains it, beside its boxes.csv
    assert not boxes_only(msd) and not boxes_only(None) and not boxes_only(run)
    BenchmarkOptions(task="localize", data=msd, box_head="segment", out=tmp_path / "b")
    ctxrestore.finetune("localize", msd, out=tmp_path / "seg", modality="mr",
                        box_head="segment", **TINY)  # fmt: skip
    spec = json.loads((tmp_path / "seg" / "spec.json").read_text())
    assert spec["task"]["box_head"] == "segment"


def test_benchmark_on_files(msd, tmp_path):
    """The benchmark pretrains on the MSD folder's images and fine-tunes on its labels."""
    result = ctxrestore.benchmark(
        msd, task="segment", out=tmp_path / "bench", methods="random,context_restoration",
        fractions="2", seeds=1, modality="mr", image_size=16, width=4, pretrain_steps=2,
        pretrain_batch_size=4, batch_size=4, max_steps=2, patch_size=4, num_swaps=4,
        device="cpu",
    )  # fmt: skip
    assert result.runs == 2 and result.trained == 2
    spec = json.loads(
        (tmp_path / "bench" / "pretrain" / "context_restoration" / "spec.json").read_text()
    )
    assert spec["preprocessing"]["modality"] == "mr" and spec["in_channels"] == 2
