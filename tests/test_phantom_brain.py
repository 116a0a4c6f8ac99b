import dataclasses
import time

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from ctxrestore.data.phantoms import brain
from ctxrestore.data.phantoms.brain import (
    BRAIN_CHANNELS,
    BRATS_LABELS,
    BRATS_REGIONS,
    brain_phantom,
)
from ctxrestore.errors import CtxRestoreError

SIZES = {2: (48, 40), 3: (20, 40, 32)}
T1, T1CE, T2, FLAIR = range(4)


def _slices(count, size=(64, 64), seed=0):
    return [brain_phantom(index, seed=seed, spatial_size=size) for index in range(count)]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_depends_only_on_seed_and_index(spatial_dims):
    size = SIZES[spatial_dims]
    first = brain_phantom(3, seed=1, spatial_size=size)
    brain_phantom(4, seed=1, spatial_size=size)  # other draws in between change nothing
    again = brain_phantom(3, seed=1, spatial_size=size)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.spacing == again.spacing
    assert not np.array_equal(first.image, brain_phantom(3, seed=2, spatial_size=size).image)
    assert not np.array_equal(first.image, brain_phantom(4, seed=1, spatial_size=size).image)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_dtypes_and_spacing(spatial_dims):
    size = SIZES[spatial_dims]
    sample = brain_phantom(0, spatial_size=size)
    assert sample.image.shape == (4, *size) and sample.image.dtype == np.float32
    assert sample.mask.shape == size and sample.mask.dtype == np.uint8
    assert sample.channel_names == BRAIN_CHANNELS == ("T1", "T1ce", "T2", "FLAIR")
    assert sample.boxes is None and sample.label is None
    assert len(sample.spacing) == spatial_dims and all(s > 0 for s in sample.spacing)
    # Square pixels in plane; in 3D the slice spacing is drawn per sample.
    assert sample.spacing[-1] == sample.spacing[-2]
    if spatial_dims == 3:
        thicknesses = {brain_phantom(i, spatial_size=size).spacing[0] for i in range(4)}
        assert len(thicknesses) == 4


def test_constants():
    assert BRATS_LABELS == {
        0: "background",
        1: "necrotic_core",
        2: "oedema",
        4: "enhancing_tumour",
    }
    assert set(BRATS_REGIONS["tumour_core"]) <= set(BRATS_REGIONS["whole_tumour"])
    assert set(BRATS_REGIONS["enhancing_tumour"]) <= set(BRATS_REGIONS["tumour_core"])
    assert set(BRATS_REGIONS["whole_tumour"]) == set(BRATS_LABELS) - {0}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_labels_lie_in_a_skull_stripped_brain(spatial_dims):
    for index in range(6):
        sample = brain_phantom(index, spatial_size=SIZES[spatial_dims])
        image, mask = sample.image, sample.mask
        assert set(np.unique(mask)) <= set(BRATS_LABELS)
        brain_support = image[0] > 0
        for channel in image:  # every channel has the same support: the brain
            np.testing.assert_array_equal(channel > 0, brain_support)
        assert np.all(image >= 0.0)
        assert np.all(brain_support[mask > 0])  # the tumour lies inside the brain
        assert 0.1 < brain_support.mean() < 0.8  # a zero background surrounds it
        corners = image[(slice(None), *np.ix_(*[[0, -1]] * spatial_dims))]
        assert np.all(corners == 0.0)


def _neighbours(region):
    """Voxels next to `region` (face neighbours) but not in it."""
    return binary_dilation(region) & ~region


def test_brats_nesting_in_3d():
    """Oedema surrounds the tumour core; the enhancing rim borders the core or the oedema.

    CSF (which oedema spares) and the brain's edge interrupt the oedema, so these hold for
    most of a border, not all of it.
    """
    core_borders, enhancing_borders = [], []
    for index in range(12):
        mask = brain_phantom(index, spatial_size=(32, 48, 48)).mask
        core = (mask == 1) | (mask == 4)
        if core.sum() > 20:
            core_borders.append(np.mean(mask[_neighbours(core)] == 2))
        if (mask == 4).sum() > 20:
            enhancing_borders.append(np.mean(mask[_neighbours(mask == 4)] == 0))
    assert len(core_borders) >= 8 and len(enhancing_borders) >= 4
    assert np.median(core_borders) > 0.85 and min(core_borders) > 0.6
    assert np.median(enhancing_borders) < 0.1 and max(enhancing_borders) < 0.3


def _slice_with_tissue(index, size=(96, 96)):
    """A 2D sample and the model's normal-tissue class at each of its pixels (-1 outside)."""
    rng = np.random.default_rng([0, index])
    head = brain._draw_head(rng)
    world, _, _ = brain._view(rng, head, size)
    points = brain._to_head(head, world)
    radius = brain._brain_radius(head, points)
    inside = radius < 1.0
    tissue = np.full(radius.size, -1)
    depth = 1.0 - radius[inside]
    displaced = brain._displace(head.tumour, points[:, inside])
    tissue[inside] = brain._normal_tissue(head, displaced, depth)
    sample = brain_phantom(index, spatial_size=size)
    np.testing.assert_array_equal(inside.reshape(size), sample.image[0] > 0)
    return sample, tissue.reshape(size)


def _near_tumour(mask, width=6):
    tumour = mask > 0
    return binary_dilation(tumour, iterations=width) & ~tumour


def test_channels_differ_in_contrast():
    """Oedema brighter than nearby white matter in T2 and FLAIR but darker in T1; the
    enhancing rim brighter than the necrosis in T1ce, and by far more than in T1 (with bias
    and noise: in most samples, not all)."""
    oedema_checks, enhancing_checks = [], []
    for index in range(60):
        sample, tissue = _slice_with_tissue(index)
        image, mask = sample.image, sample.mask
        white = _near_tumour(mask) & (tissue == brain._WM)
        if (mask == 2).sum() > 50 and white.sum() > 50:
            oedema, normal = np.median(image[:, mask == 2], 1), np.median(image[:, white], 1)
            oedema_checks.append(
                (oedema[T2] > normal[T2], oedema[FLAIR] > normal[FLAIR], oedema[T1] < normal[T1])
            )
        if (mask == 4).sum() > 20 and (mask == 1).sum() > 20:
            enhancing, necrosis = (
                np.median(image[:, mask == 4], 1),
                np.median(image[:, mask == 1], 1),
            )
            enhancing_checks.append(
                (
                    enhancing[T1CE] > necrosis[T1CE],
                    enhancing[T1CE] / enhancing[T1] > 1.2 * necrosis[T1CE] / necrosis[T1],
                )
            )
    assert len(oedema_checks) >= 20 and len(enhancing_checks) >= 5
    assert np.mean(oedema_checks, axis=0).min() >= 0.9
    assert np.mean(enhancing_checks, axis=0).min() >= 0.8


def test_oedema_overlaps_normal_tissue_in_single_channels():
    """No single channel separates oedema from normal brain: in T1 most oedema values lie
    within the central 90% of the grey matter's in the same slice (and in FLAIR, where
    oedema is brightest, still some do)."""
    t1_fractions, flair_fractions = [], []
    for index in range(40):
        sample, tissue = _slice_with_tissue(index)
        oedema, grey = sample.mask == 2, (tissue == brain._GM) & (sample.mask == 0)
        if oedema.sum() > 50:
            for channel, fractions in ((T1, t1_fractions), (FLAIR, flair_fractions)):
                low, high = np.percentile(sample.image[channel][grey], [5, 95])
                values = sample.image[channel][oedema]
                fractions.append(np.mean((values > low) & (values < high)))
    assert len(t1_fractions) >= 15
    assert np.median(t1_fractions) > 0.6
    assert np.median(flair_fractions) > 0.05


def test_most_slices_show_a_tumour_and_some_do_not():
    samples = _slices(100, size=(32, 32))
    with_tumour = np.mean([(s.mask > 0).any() for s in samples])
    assert 0.6 < with_tumour < 0.97
    grades = [s.meta["grade"] for s in samples]
    assert 0.5 < grades.count("HGG") / len(grades) < 0.9
    for sample in samples:  # low-grade gliomas do not enhance
        if sample.meta["grade"] == "LGG":
            assert not (sample.mask == 4).any()
    assert any(s.meta["grade"] == "HGG" and not s.meta["necrosis"] for s in samples)


def test_a_slice_is_the_volume_cut_by_a_plane():
    """The head model evaluated on one plane equals the volume's slice at that level.

    Noise and partial-volume blur are switched off (they are per view); what is left is the
    deterministic model: labels and intensities must agree voxel for voxel (float32 rounding
    may flip a rare voxel on a threshold).
    """
    size = (24, 48, 48)
    for index in range(3):
        rng = np.random.default_rng([0, index])
        head = brain._draw_head(rng)
        head = dataclasses.replace(head, noise=0.0, blur_mm=0.0)
        world, _, levels = brain._view(rng, head, size)
        volume, volume_mask = brain._render(head, world, size, [0.0] * 3, rng)
        plane_world = world.reshape(3, *size)[:, size[0] // 2].reshape(3, -1)
        plane, plane_mask = brain._render(head, plane_world, size[1:], [0.0] * 2, rng)
        assert np.all(plane_world[2] == levels[size[0] // 2])
        assert np.mean(plane_mask == volume_mask[size[0] // 2]) > 0.999
        close = np.isclose(plane, volume[:, size[0] // 2], rtol=1e-4, atol=1e-6)
        assert close.mean() > 0.999


def test_two_and_three_dimensional_samples_share_the_head():
    for index in range(4):
        flat = brain_phantom(index, spatial_size=(32, 32))
        volume = brain_phantom(index, spatial_size=(16, 32, 32))
        for key in ("grade", "necrosis", "enhancing"):
            assert flat.meta[key] == volume.meta[key]
        assert len(flat.meta["levels_mm"]) == 1 and len(volume.meta["levels_mm"]) == 16


@pytest.mark.parametrize(
    "spatial_size, message",
    [((64,), "1 axes"), ((8, 8), "too small"), ((16, 16, 16, 16), "4 axes")],
)
def test_bad_spatial_size_raises(spatial_size, message):
    with pytest.raises(CtxRestoreError, match=message):
        brain_phantom(0, spatial_size=spatial_size)


def test_negative_index_raises():
    with pytest.raises(CtxRestoreError, match="index -1"):
        brain_phantom(-1)


def test_slices_are_fast():
    brain_phantom(0)  # warm up
    start = time.perf_counter()
    for index in range(50):
        brain_phantom(index, spatial_size=(128, 128))
    assert time.perf_counter() - start < 3.0
