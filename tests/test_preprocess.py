import numpy as np
import pytest

from ctxrestore.data.intensity import CT_WINDOWS
from ctxrestore.data.preprocess import (
    MODALITIES,
    Preprocessing,
    crop_or_pad,
    foreground_mask,
    preprocess,
    resample,
    sample_patch_corners,
    slice_indices,
    take_slice,
)
from ctxrestore.errors import CtxRestoreError


def _ramp(shape, axis):
    """Values equal to the voxel index along `axis`."""
    index = np.arange(shape[axis], dtype=np.float32)
    view = [-1 if a == axis else 1 for a in range(len(shape))]
    return np.broadcast_to(index.reshape(view), shape)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_resample_halves_a_ramp(spatial_dims, in_channels):
    shape = (8,) * spatial_dims
    image = np.stack([_ramp(shape, 0) + 10 * c for c in range(in_channels)])
    out, spacing = resample(image, (1.0,) * spatial_dims, (2.0,) * spatial_dims)
    assert out.shape == (in_channels,) + (4,) * spatial_dims and out.dtype == np.float32
    assert spacing == (2.0,) * spatial_dims
    # Each output voxel centre lies between two input centres: their mean, 0.5, 2.5, ...
    expected = np.array([0.5, 2.5, 4.5, 6.5], np.float32)
    for channel in range(in_channels):
        profile = out[(channel, slice(None)) + (0,) * (spatial_dims - 1)]
        np.testing.assert_allclose(profile, expected + 10 * channel, atol=1e-5)


def test_resample_doubles_a_ramp_on_one_axis():
    image = _ramp((3, 4, 5), 2)[None]
    out, spacing = resample(image, (1.0, 1.0, 2.0), (1.0, 1.0, 1.0))
    assert out.shape == (1, 3, 4, 10) and spacing == (1.0, 1.0, 1.0)
    # Centre of output voxel i sits at input coordinate (i + 0.5) / 2 - 0.5, clamped at the ends.
    expected = np.clip((np.arange(10) + 0.5) / 2 - 0.5, 0, 4)
    np.testing.assert_allclose(out[0, 1, 2], expected, atol=1e-5)
    np.testing.assert_allclose(out[0, 0], out[0, 2])  # unchanged along untouched axes


def test_resample_keeps_the_physical_extent():
    image = np.zeros((1, 7, 11, 13), np.float32)
    spacing = (2.5, 0.7, 0.9)
    out, new_spacing = resample(image, spacing, (1.0, 1.0, 1.0))
    assert out.shape == (1, 18, 8, 12)  # round(17.5) = 18 (halves round up), 7.7, 11.7
    extent = np.array(out.shape[1:]) * np.array(new_spacing)
    np.testing.assert_allclose(extent, np.array(image.shape[1:]) * np.array(spacing))


def test_resample_same_size_is_a_copy_with_the_same_spacing():
    image = np.arange(12, dtype=np.int16).reshape(1, 3, 4)
    out, spacing = resample(image, (1.0, 1.0), (1.1, 0.9))
    assert out.dtype == np.float32 and spacing == (1.0, 1.0)
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize("target", [(0.5, 0.5, 0.5), (2.0, 2.0, 2.0), (0.7, 1.3, 1.9)])
def test_resample_labels_keep_values_and_small_structures(target):
    label = np.zeros((12, 12, 12), np.uint8)
    label[2:10, 2:10, 2:10] = 1
    label[5:7, 5:7, 5:7] = 7
    out, _ = resample(label, (1.0, 1.0, 1.0), target, label=True)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 1, 7}
    new_voxel = np.prod(np.array(label.shape) / np.array(out.shape))
    volume_of_7 = np.count_nonzero(out == 7) * new_voxel
    assert volume_of_7 == pytest.approx(8, rel=0.75)


def test_resample_labels_2d_nearest_is_exact_for_integer_factors():
    label = np.arange(16, dtype=np.int64).reshape(4, 4)
    out, spacing = resample(label, (1.0, 1.0), (0.5, 0.5), label=True)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(label, 2, axis=0), 2, axis=1))
    assert spacing == (0.5, 0.5)


@pytest.mark.parametrize(
    ("shape", "spacing", "target", "message"),
    [
        ((1, 4, 4, 4), (1, 1, 1), (1, 1), "need one spacing per spatial axis"),
        ((1, 4, 4), (1, 1), (1, 1, 1), "need one spacing per spatial axis"),
        ((1, 4, 4), (1, 1), (1, -1), "target_spacing .* is not valid"),
        ((1, 4, 4), (1, 0), (1, 1), "spacing .* is not valid"),
    ],
)
def test_resample_rejects_bad_spacings(shape, spacing, target, message):
    with pytest.raises(CtxRestoreError, match=message):
        resample(np.zeros(shape, np.float32), spacing, target)


@pytest.mark.parametrize("modality", MODALITIES)
def test_preprocess_each_modality(modality):
    generator = np.random.default_rng(1)
    image = np.zeros((1, 6, 8, 8), np.float32)
    image[0, 1:5, 2:6, 2:6] = generator.uniform(10.0, 200.0, (4, 4, 4))
    label = (image[0] > 0).astype(np.uint8)
    prep = Preprocessing(modality=modality, target_spacing=(2.0, 1.0, 1.0))
    out, spacing, out_label = preprocess(image, (1.0, 1.0, 1.0), prep, label)
    assert out.shape == (1, 3, 8, 8) and out.dtype == np.float32
    assert out_label.shape == (3, 8, 8) and spacing == (2.0, 1.0, 1.0)
    assert set(np.unique(out_label)) <= {0, 1}
    if modality == "mr":
        assert abs(out[0][out[0] != 0].mean()) < 1e-5
    else:
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_preprocess_without_target_spacing_only_normalises():
    image = np.full((1, 4, 5), 40.0, np.float32)
    out, spacing, label = preprocess(image, (0.8, 0.8), Preprocessing(modality="ct"))
    np.testing.assert_allclose(out, 0.5)  # the middle of the abdomen window
    assert spacing == (0.8, 0.8) and label is None


def test_preprocess_rejects_a_label_of_another_shape():
    with pytest.raises(CtxRestoreError, match="label shape"):
        preprocess(np.zeros((1, 4, 5)), (1, 1), Preprocessing(), np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize(
    "prep",
    [
        Preprocessing(),
        Preprocessing(modality="ct", window="lung", target_spacing=(1.5, 0.8, 0.8)),
        Preprocessing(modality="ct", window=(-100.0, 300.0)),
        Preprocessing(modality="mr", target_spacing=(1.0, 1.0)),
        Preprocessing(modality="us"),
    ],
)
def test_preprocessing_json_round_trip(prep):
    data = prep.to_json()
    assert set(data) == {"modality", "window", "target_spacing"}
    restored = Preprocessing.from_json(data)
    assert restored == prep and restored.key() == prep.key()
    assert len(prep.key()) == 16 and int(prep.key(), 16) >= 0


def test_preprocessing_key_is_stable_and_distinguishes():
    default_window = Preprocessing(modality="ct", window="abdomen")
    assert Preprocessing(modality="ct").key() == default_window.key()
    assert Preprocessing(target_spacing=[1, 1]) == Preprocessing(target_spacing=(1.0, 1.0))
    keys = {
        Preprocessing().key(),
        Preprocessing(modality="ct").key(),
        Preprocessing(modality="ct", window="bone").key(),
        Preprocessing(modality="ct", window=CT_WINDOWS["bone"]).key(),
        Preprocessing(target_spacing=(1.0, 1.0)).key(),
        Preprocessing(target_spacing=(1.0, 2.0)).key(),
    }
    assert len(keys) == 6


def test_preprocessing_intensity_follows_modality():
    assert Preprocessing(modality="ct", window="brain").intensity["window"] == [0.0, 80.0]
    assert Preprocessing(modality="mr").intensity["method"] == "zscore_robust"
    assert Preprocessing(modality="us").intensity["method"] == "unit_range"
    assert Preprocessing().intensity["method"] == "robust_unit_range"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(modality="pet"), "unknown modality 'pet'; valid: ct, mr, us, generic"),
        (dict(modality="mr", window="brain"), "is for CT only"),
        (dict(modality="ct", window="chest"), "unknown CT window preset 'chest'"),
        (dict(target_spacing=(1.0, 0.0)), "target_spacing .* is not valid"),
        (dict(target_spacing=(1.0,)), "target_spacing .* is not valid"),
        (dict(target_spacing="fine"), "target_spacing .* is not valid"),
    ],
)
def test_preprocessing_validation(arguments, message):
    with pytest.raises(CtxRestoreError, match=message):
        Preprocessing(**arguments)


def test_preprocessing_from_json_rejects_unknown_keys():
    with pytest.raises(CtxRestoreError, match=r"unknown keys \['spacing'\]"):
        Preprocessing.from_json({"modality": "ct", "spacing": [1, 1, 1]})


def _body_volume():
    """(1, 10, 12, 12) windowed CT: air (0) in the first two and the last slice."""
    image = np.zeros((1, 10, 12, 12), np.float32)
    image[0, 2:9, 3:9, 2:10] = 0.5
    image[0, 4:6, 5:7, 5:7] = 0.9
    image[0, 0] = np.random.default_rng(0).uniform(0.0, 0.02, (12, 12))  # noise in the air
    return image


def test_foreground_mask_and_slice_indices_skip_air():
    foreground = foreground_mask(_body_volume())
    assert foreground.shape == (10, 12, 12) and foreground.dtype == bool
    assert slice_indices(foreground, axis=0) == list(range(2, 9))
    assert slice_indices(foreground, axis=1) == list(range(3, 9))
    assert slice_indices(foreground, axis=2) == list(range(2, 10))
    assert slice_indices(foreground, axis=0, min_fraction=0.5) == []
    with pytest.raises(CtxRestoreError, match="slice axis 3 does not exist"):
        slice_indices(foreground, axis=3)


def test_foreground_mask_of_z_scored_mr_is_the_nonzero_voxels():
    image = np.zeros((2, 6, 6), np.float32)
    image[:, 1:5, 1:5] = 100.0 + np.arange(16, dtype=np.float32).reshape(4, 4)
    normalised = preprocess(image, (1, 1), Preprocessing(modality="mr"))[0]
    np.testing.assert_array_equal(foreground_mask(normalised), image[0] > 0)


def test_foreground_mask_is_any_channel():
    image = np.zeros((2, 4, 4), np.float32)
    image[0, 0, 0] = 1.0
    image[1, 3, 3] = 1.0
    assert np.argwhere(foreground_mask(image)).tolist() == [[0, 0], [3, 3]]


def test_take_slice_along_each_axis():
    image = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(take_slice(image, 0, 1), image[:, 1])
    np.testing.assert_array_equal(take_slice(image, 1, 2), image[:, :, 2])
    np.testing.assert_array_equal(take_slice(image, 2, 4), image[:, :, :, 4])
    assert take_slice(image, 2, 4).shape == (2, 3, 4)
    with pytest.raises(CtxRestoreError, match=r"use 0\.\.3"):
        take_slice(image, 1, 4)
    with pytest.raises(CtxRestoreError, match="slice axis 3"):
        take_slice(image, 3, 0)


@pytest.mark.parametrize("patch_size", [(4, 4, 4), (3, 5, 2), (10, 12, 12)])
def test_sampled_patches_always_contain_foreground(patch_size):
    foreground = np.zeros((10, 12, 12), bool)
    foreground[7, 1, 10] = True
    foreground[2:4, 8:10, 1:3] = True
    for seed in range(200):
        corner = sample_patch_corners(foreground, patch_size, np.random.default_rng(seed), 1)[0]
        assert all(0 <= c <= s - p for c, s, p in zip(corner, foreground.shape, patch_size))
        patch = crop_or_pad(foreground[None], corner, patch_size)
        assert patch.any()


def test_sampling_draws_every_foreground_voxel_and_is_deterministic():
    foreground = np.zeros((6, 6), bool)
    foreground[0, 0] = foreground[5, 5] = foreground[2, 4] = True
    corners = {
        sample_patch_corners(foreground, (2, 2), np.random.default_rng(s), 1)[0] for s in range(60)
    }
    assert corners == {(0, 0), (4, 4), (1, 3)}
    first = sample_patch_corners(foreground, (2, 2), np.random.default_rng(5), 1)[0]
    assert first == sample_patch_corners(foreground, (2, 2), np.random.default_rng(5), 1)[0]
    # Many corners in one call are the draws one call per corner makes with that generator.
    many = sample_patch_corners(foreground, (2, 2), np.random.default_rng(5), 30)
    rng = np.random.default_rng(5)
    assert many == [sample_patch_corners(foreground, (2, 2), rng, 1)[0] for _ in range(30)]
    assert many[0] == first and set(many) == {(0, 0), (4, 4), (1, 3)}


def test_sampling_small_volumes_and_empty_masks():
    foreground = np.zeros((3, 20), bool)
    foreground[1, 15] = True
    corner = sample_patch_corners(foreground, (8, 8), np.random.default_rng(0), 1)[0]
    assert corner == (0, 11)  # centred: 15 - 8 // 2
    empty = np.zeros((5, 9), bool)
    corners = {
        sample_patch_corners(empty, (4, 4), np.random.default_rng(s), 1)[0] for s in range(100)
    }
    assert corners == {(y, x) for y in range(2) for x in range(6)}
    with pytest.raises(CtxRestoreError, match="patch_size"):
        sample_patch_corners(empty, (4, 4, 4), np.random.default_rng(0), 1)[0]


def test_crop_or_pad_crops_and_pads():
    image = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    np.testing.assert_array_equal(crop_or_pad(image, (1, 2), (2, 3)), image[:, 1:3, 2:5])
    padded = crop_or_pad(image, (0, 0), (6, 5), pad_value=-1.0)
    assert padded.shape == (2, 6, 5) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded[:, :4], image)
    assert np.all(padded[:, 4:] == -1.0)
    label = np.ones((4, 5), np.uint8)
    assert crop_or_pad(label, (2, 0), (4, 7)).tolist() == [[1] * 5 + [0] * 2] * 2 + [[0] * 7] * 2
    with pytest.raises(CtxRestoreError, match="patch_size"):
        crop_or_pad(image, (0, 0), (0, 3))
