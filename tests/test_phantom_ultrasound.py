import time

import numpy as np
import pytest
import torch

from ctxrestore.data.phantoms.base import PhantomDataset
from ctxrestore.data.phantoms.ultrasound import (
    ULTRASOUND_CLASSES,
    ULTRASOUND_STRUCTURES,
    ultrasound_phantom,
)
from ctxrestore.errors import CtxRestoreError

SIZES = {2: (64, 64), 3: (5, 48, 64)}
NUM_CLASSES = len(ULTRASOUND_CLASSES)
# Structures every sample of a standard plane shows (by mask id), at least in part.
KEYS = {
    "head": ("skull", "midline", "cavum"),
    "abdomen": ("stomach", "umbilical_vein", "vertebra"),
    "femur": ("femur",),
    "spine": ("vertebra", "spinal_canal"),
    "heart_4ch": ("heart", "heart_chamber", "vertebra"),
    "three_vessel": ("vessel", "vertebra"),
    "kidneys": ("kidney", "renal_pelvis", "vertebra"),
    "lips": ("lip", "mouth", "nostril"),
}


def fan_mask(fan: dict, shape: tuple[int, int]) -> np.ndarray:
    """The sector from the geometry in meta, recomputed independently of the phantom."""
    rows, cols = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    dy, dx = rows - fan["apex_row"], cols - fan["apex_col"]
    radius, angle = np.hypot(dy, dx), np.arctan2(dx, dy)
    inside = (radius >= fan["min_radius"]) & (radius <= fan["max_radius"])
    return inside & (np.abs(angle) <= fan["half_angle"])


def test_classes_and_structures():
    assert ULTRASOUND_CLASSES[0] == "background"
    assert len(ULTRASOUND_CLASSES) >= 7
    assert len(set(ULTRASOUND_CLASSES)) == NUM_CLASSES
    assert set(KEYS) == set(ULTRASOUND_CLASSES[1:])
    ids = sorted(ULTRASOUND_STRUCTURES.values())
    assert ids == list(range(1, len(ids) + 1))  # 0 is left for maternal tissue
    assert max(ids) < 256  # stored as uint8


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shape_dtype_range_and_fields(spatial_dims):
    size = SIZES[spatial_dims]
    sample = ultrasound_phantom(3, seed=1, spatial_size=size)
    assert sample.image.shape == (1, *size)
    assert sample.image.dtype == np.float32
    assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    assert sample.channel_names == ("ultrasound",)
    assert sample.label == 3 and sample.meta["class_name"] == ULTRASOUND_CLASSES[3]
    assert sample.mask.shape == size and sample.mask.dtype == np.uint8
    assert set(np.unique(sample.mask)) <= {0, *ULTRASOUND_STRUCTURES.values()}
    assert len(sample.spacing) == spatial_dims
    assert all(0.1 < s < 3.0 for s in sample.spacing)
    if spatial_dims == 3:
        assert 0.5 <= sample.spacing[0] <= 2.0
        assert sample.meta["slice_spacing"] == sample.spacing[0]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_depends_only_on_seed_and_index(spatial_dims):
    size = SIZES[spatial_dims]
    first = ultrasound_phantom(7, seed=2, spatial_size=size)
    ultrasound_phantom(8, seed=2, spatial_size=size)  # other draws in between change nothing
    again = ultrasound_phantom(7, seed=2, spatial_size=size)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.spacing == again.spacing
    assert not np.array_equal(first.image, ultrasound_phantom(7, seed=3, spatial_size=size).image)
    assert not np.array_equal(first.image, ultrasound_phantom(16, seed=2, spatial_size=size).image)


@pytest.mark.parametrize("size", [(64, 64), (96, 64), (48, 80)])
def test_zero_outside_the_fan(size):
    fractions = []
    for index in range(NUM_CLASSES):
        sample = ultrasound_phantom(index, seed=4, spatial_size=size)
        inside = fan_mask(sample.meta["fan"], size)
        assert np.all(sample.image[0][~inside] == 0.0)
        assert np.all(sample.mask[~inside] == 0)
        assert (sample.image[0][inside] > 0).mean() > 0.5  # the fan is mostly echo, not void
        fractions.append(inside.mean())
    assert min(fractions) > 0.3 and max(fractions) < 0.9


def test_classes_are_exactly_balanced_over_any_contiguous_range():
    for start in (0, 5, 1234):
        labels = [
            ultrasound_phantom(i, spatial_size=(32, 32)).label
            for i in range(start, start + 3 * NUM_CLASSES)
        ]
        assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [3] * NUM_CLASSES


@pytest.mark.parametrize("label", range(1, NUM_CLASSES))
def test_standard_planes_show_their_key_structures(label):
    for index in range(label, label + 4 * NUM_CLASSES, NUM_CLASSES):
        sample = ultrasound_phantom(index, seed=5, spatial_size=(96, 96))
        present = set(np.unique(sample.mask).tolist())
        for name in KEYS[ULTRASOUND_CLASSES[label]]:
            assert ULTRASOUND_STRUCTURES[name] in present, (index, name)


def test_background_is_a_broken_or_loose_view():
    for index in range(0, 10 * NUM_CLASSES, NUM_CLASSES):
        sample = ultrasound_phantom(index, seed=6, spatial_size=(64, 64))
        assert sample.label == 0
        for part in sample.meta["parts"]:
            assert part.startswith("broken ") or " of " in part


def test_middle_slice_of_a_sweep_is_the_2d_sample():
    for index in range(NUM_CLASSES):
        sweep = ultrasound_phantom(index, seed=7, spatial_size=(7, 64, 64))
        plane = ultrasound_phantom(index, seed=7, spatial_size=(64, 64))
        assert sweep.label == plane.label
        assert sweep.spacing[1:] == plane.spacing
        np.testing.assert_array_equal(sweep.image[:, 3], plane.image)
        np.testing.assert_array_equal(sweep.mask[3], plane.mask)
        # Every slice: the same fan. Neighbouring slices: similar structures, new speckle.
        outside = ~fan_mask(sweep.meta["fan"], (64, 64))
        assert np.all(sweep.image[0][:, outside] == 0)
        middle, neighbour = sweep.mask[3], sweep.mask[4]
        ids = set(np.unique(middle).tolist())
        assert len(ids & set(np.unique(neighbour).tolist())) >= len(ids) // 2
        assert not np.array_equal(sweep.image[0, 3], sweep.image[0, 4])


def test_global_brightness_and_size_do_not_reveal_the_class():
    features, labels = [], []
    for index in range(30 * NUM_CLASSES):
        sample = ultrasound_phantom(index, seed=8, spatial_size=(32, 32))
        inside = fan_mask(sample.meta["fan"], (32, 32))
        brightness, fan_area = sample.image[0][inside].mean(), inside.mean()
        features.append((brightness, sample.meta["anatomy_scale"], fan_area))
        labels.append(sample.label)
    features, labels = np.array(features), np.array(labels)
    for feature in features.T:
        # Every class's median lies in the interquartile range of all samples together.
        low, high = np.percentile(feature, [25, 75])
        medians = [np.median(feature[labels == label]) for label in range(NUM_CLASSES)]
        assert low < min(medians) and max(medians) < high, medians
    # A nearest-class-mean classifier on these statistics stays near chance (1 / 9).
    features = (features - features.mean(axis=0)) / features.std(axis=0)
    train = np.arange(len(labels)) % 2 == 0
    centres = np.stack([features[train & (labels == k)].mean(axis=0) for k in range(NUM_CLASSES)])
    distances = ((features[~train, None] - centres) ** 2).sum(axis=-1)
    accuracy = (distances.argmin(axis=1) == labels[~train]).mean()
    assert accuracy < 2 / NUM_CLASSES


@pytest.mark.parametrize(
    ("spatial_size", "match"),
    [
        ((64,), "has 1 axes"),
        ((2, 3, 64, 64), "has 4 axes"),
        ((16, 64), "must be >= 32"),
        ((4, 64, 20), "must be >= 32"),
        ((0, 64, 64), "too small"),
    ],
)
def test_bad_spatial_size_raises(spatial_size, match):
    with pytest.raises(CtxRestoreError, match=match):
        ultrasound_phantom(0, spatial_size=spatial_size)


def test_negative_index_or_seed_raises():
    with pytest.raises(CtxRestoreError, match="must both be >= 0"):
        ultrasound_phantom(-1)
    with pytest.raises(CtxRestoreError, match="must both be >= 0"):
        ultrasound_phantom(0, seed=-2)


def test_phantom_dataset_items():
    dataset = PhantomDataset(ultrasound_phantom, 4, seed=1, spatial_size=(32, 48))
    item = dataset[2]
    assert item["image"].shape == (1, 32, 48) and item["image"].dtype == torch.float32
    assert item["label"].item() == 2
    assert item["mask"].shape == (32, 48)


def test_fast_enough():
    ultrasound_phantom(0)  # warm-up: imports, caches
    start = time.perf_counter()
    for index in range(50):
        ultrasound_phantom(index)
    assert time.perf_counter() - start < 3.0


def test_the_structures_export_writes_each_sample_with_its_structure_mask(tmp_path):
    """benchmarks/ultrasound_structures.py: the oracle's data, read back as a segmentation
    dataset (image and mask as the generator drew them, every structure named)."""
    import importlib.util
    import json
    from pathlib import Path

    from ctxrestore.data.nifti import read_nifti

    script = Path(__file__).parents[1] / "benchmarks" / "ultrasound_structures.py"
    spec = importlib.util.spec_from_file_location("ultrasound_structures", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.write_structures(tmp_path / "us", count=3, image_size=32, seed=7)
    dataset = json.loads((out / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, **ULTRASOUND_STRUCTURES}
    assert dataset["numTraining"] == 3
    for index, case in enumerate(dataset["training"]):
        sample = ultrasound_phantom(index, seed=7, spatial_size=(32, 32))
        image = read_nifti(out / case["image"][0])[0].squeeze()
        mask = read_nifti(out / case["label"])[0].squeeze()
        np.testing.assert_allclose(image, sample.image[0], atol=1e-6)
        np.testing.assert_array_equal(mask, sample.mask)
        assert set(np.unique(mask)) > {0}  # structures, not only background
    with pytest.raises(CtxRestoreError, match="not empty"):
        module.write_structures(out, count=1, image_size=32, seed=7)
