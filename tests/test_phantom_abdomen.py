import dataclasses
import time

import numpy as np
import pytest

from ctxrestore.data.phantoms import get_phantom
from ctxrestore.data.phantoms.abdomen import (
    _MASK_OF_TISSUE,
    ABDOMEN_LABELS,
    ABDOMEN_ORGANS,
    AbdomenView,
    abdomen_phantom,
    render_anatomy,
    sample_anatomy,
    sample_view,
)
from ctxrestore.data.phantoms.base import mask_box
from ctxrestore.errors import CtxRestoreError

SIZES = {2: (48, 40), 3: (16, 40, 48)}
IDS = {name: organ_id for organ_id, name in ABDOMEN_LABELS.items()}


@pytest.fixture(scope="module")
def slices():
    """120 axial slices (2D samples) of 64 x 64: one per body."""
    return [abdomen_phantom(index, seed=7, spatial_size=(64, 64)) for index in range(120)]


def _centroid_column(mask: np.ndarray) -> float:
    return float(np.nonzero(mask)[-1].mean())


def test_labels_and_organs():
    assert set(ABDOMEN_ORGANS) <= set(ABDOMEN_LABELS.values())
    assert {"liver", "spleen", "kidney_left", "kidney_right"} <= set(ABDOMEN_ORGANS)
    assert 0 not in ABDOMEN_LABELS


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_dtypes_and_spacing(spatial_dims):
    size = SIZES[spatial_dims]
    sample = abdomen_phantom(3, spatial_size=size)
    assert sample.image.shape == (1, *size) and sample.image.dtype == np.float32
    assert sample.mask.shape == size and sample.mask.dtype == np.uint8
    assert sample.channel_names == ("CT",)
    assert set(np.unique(sample.mask)) <= {0, *ABDOMEN_LABELS}
    assert set(sample.boxes) == set(ABDOMEN_ORGANS)
    assert len(sample.spacing) == spatial_dims
    assert sample.spacing[-1] == sample.spacing[-2] > 0  # square pixels, in mm
    if spatial_dims == 3:
        assert 1.5 <= sample.spacing[0] <= 5.0
        assert np.all(np.diff(sample.meta["z_mm"]) > 0)  # axis 0 runs from the feet up
    assert sample.image.min() >= -1024 and sample.image.max() <= 3071
    assert sample.image[(0,) * sample.image.ndim] < -900  # air in the corner


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_depends_only_on_seed_and_index(spatial_dims):
    size = SIZES[spatial_dims]
    first = abdomen_phantom(5, seed=3, spatial_size=size)
    abdomen_phantom(6, seed=3, spatial_size=size)  # other draws in between change nothing
    again = abdomen_phantom(5, seed=3, spatial_size=size)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert first.boxes == again.boxes and first.spacing == again.spacing
    assert not np.array_equal(first.image, abdomen_phantom(5, seed=4, spatial_size=size).image)
    assert not np.array_equal(first.image, abdomen_phantom(6, seed=3, spatial_size=size).image)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masks_lie_inside_the_body_and_boxes_enclose_them(spatial_dims):
    for index in range(8):
        sample = abdomen_phantom(index, seed=1, spatial_size=SIZES[spatial_dims])
        assert np.all(sample.image[0][sample.mask > 0] > -500)
        for name in ABDOMEN_ORGANS:
            organ = sample.mask == IDS[name]
            assert sample.boxes[name] == mask_box(organ)
            assert (sample.boxes[name] is None) == (not organ.any())


def test_organs_are_absent_from_some_slices_and_present_in_most(slices):
    present = {
        name: np.array([s.boxes[name] is not None for s in slices]) for name in ABDOMEN_ORGANS
    }
    for name in ("liver", "spleen", "kidney_left", "kidney_right"):
        assert 0.2 < present[name].mean() < 0.85, (name, present[name].mean())
    assert present["aorta"].mean() > 0.9
    solid = np.column_stack([present[n] for n in ("liver", "spleen", "kidney_left")])
    assert solid.any(axis=1).mean() > 0.8
    # At the liver dome there is no kidney, and below the liver tip there is no liver.
    assert np.any(present["liver"] & ~present["kidney_right"] & ~present["kidney_left"])
    assert np.any(~present["liver"] & present["kidney_left"])


def test_a_2d_sample_is_a_plane_of_the_3d_body():
    """The 2D generator's mask is the model rendered on its plane, and the same plane inside a
    3D volume of the same body and pose has the same labels, voxel for voxel."""
    for index in range(6):
        sample = abdomen_phantom(index, seed=2, spatial_size=(64, 64))
        rng = np.random.default_rng([2, index])
        anatomy = sample_anatomy(rng)
        view = sample_view(rng, anatomy, (64, 64))
        tissue, _, _ = render_anatomy(anatomy, view)
        np.testing.assert_array_equal(_MASK_OF_TISSUE[tissue[0]], sample.mask)
        # A volume of 9 planes 2.5 mm apart around that plane, with the same in-plane pose.
        heights = view.z[0] + 2.5 * np.arange(-4, 5, dtype=np.float32)
        volume_view = dataclasses.replace(view, z=heights, slice_spacing=2.5)
        volume, _, _ = render_anatomy(anatomy, volume_view)
        np.testing.assert_array_equal(_MASK_OF_TISSUE[volume[4]], sample.mask)
        for k in (0, 8):  # and every plane of the volume is that plane rendered alone
            alone, _, _ = render_anatomy(anatomy, dataclasses.replace(view, z=heights[k : k + 1]))
            np.testing.assert_array_equal(alone[0], volume[k])


def test_a_3d_sample_is_its_plan_rendered():
    sample = abdomen_phantom(4, seed=2, spatial_size=(16, 32, 32))
    rng = np.random.default_rng([2, 4])
    anatomy = sample_anatomy(rng)
    view = sample_view(rng, anatomy, (16, 32, 32))
    tissue, _, _ = render_anatomy(anatomy, view)
    np.testing.assert_array_equal(_MASK_OF_TISSUE[tissue], sample.mask)
    assert sample.spacing == (view.slice_spacing, view.pixel_spacing, view.pixel_spacing)


@pytest.mark.parametrize("size", [(96, 96), (12, 48, 48)])
def test_evaluating_near_each_organ_only_changes_nothing(size, monkeypatch):
    """The renderer evaluates a blob only in the window around it: same tissues as everywhere."""
    plans = []
    for index in range(6):
        rng = np.random.default_rng([9, index])
        anatomy = sample_anatomy(rng)
        plans.append((anatomy, sample_view(rng, anatomy, size)))
    windowed = [render_anatomy(*plan)[0] for plan in plans]
    everywhere = (slice(None),) * 3
    monkeypatch.setattr(AbdomenView, "window", lambda *args, **kwargs: everywhere)
    for plan, tissue in zip(plans, windowed):
        np.testing.assert_array_equal(render_anatomy(*plan)[0], tissue)


def test_3d_volumes_have_the_liver_above_the_kidneys():
    above = []
    for index in range(10):
        sample = abdomen_phantom(index, seed=3, spatial_size=(48, 32, 32))
        levels = {
            name: np.nonzero(sample.mask == IDS[name])[0].mean()
            for name in ("liver", "kidney_right")
            if sample.boxes[name] is not None
        }
        if len(levels) == 2:
            above.append(levels["liver"] > levels["kidney_right"])
    assert len(above) >= 3 and all(above)


def test_laterality_is_radiological(slices):
    """The patient's left (spleen, left kidney) is on the image right; never flipped."""
    checked = 0
    for sample in slices:
        body = _centroid_column(sample.image[0] > -500)
        column = {
            name: _centroid_column(sample.mask == IDS[name])
            for name in ABDOMEN_ORGANS
            if sample.boxes[name] is not None
        }
        if "spleen" in column:
            assert column["spleen"] > body
            checked += 1
        if "kidney_right" in column:
            assert column["kidney_right"] < body
            checked += 1
        if "kidney_left" in column and "kidney_right" in column:
            assert column["kidney_left"] > column["kidney_right"]
        if "liver" in column and "spleen" in column:
            assert column["liver"] < column["spleen"]
    assert checked > 60


def _histogram_overlap(a: np.ndarray, b: np.ndarray) -> float:
    bins = np.linspace(-100, 200, 61)
    p, _ = np.histogram(a, bins)
    q, _ = np.histogram(b, bins)
    return float(np.minimum(p / p.sum(), q / q.sum()).sum())


def test_organs_are_not_separable_by_intensity(slices):
    """Within one image, liver and spleen (and spleen and kidney) HU overlap strongly."""
    overlaps = []
    for sample in slices:
        image, mask = sample.image[0], sample.mask
        liver, spleen = image[mask == IDS["liver"]], image[mask == IDS["spleen"]]
        kidney = image[mask == IDS["kidney_left"]]
        if liver.size > 30 and spleen.size > 30:
            overlaps.append(_histogram_overlap(liver, spleen))
        if spleen.size > 30 and kidney.size > 30:
            overlaps.append(_histogram_overlap(spleen, kidney))
    assert len(overlaps) > 10
    assert np.median(overlaps) > 0.5


def _kidney_overlaps(samples) -> list[float]:
    """Histogram overlap of a kidney with the liver or the spleen in the same image."""
    overlaps = []
    for sample in samples:
        image, mask = sample.image[0], sample.mask
        for organ, kidney in (("liver", "kidney_right"), ("spleen", "kidney_left")):
            a, b = image[mask == IDS[organ]], image[mask == IDS[kidney]]
            if a.size > 30 and b.size > 30:
                overlaps.append(_histogram_overlap(a, b))
    assert len(overlaps) > 10
    return overlaps


def test_portal_venous_phase_is_the_same_body_with_enhancing_organs(slices):
    """abdomen_contrast changes tissue HU only: the same masks, boxes and air; the kidneys,
    which share HU with liver and spleen unenhanced, are told apart by intensity."""
    enhanced = [
        get_phantom("abdomen_contrast").generator(index, seed=7, spatial_size=(64, 64))
        for index in range(len(slices))
    ]
    for plain, contrast in zip(slices, enhanced, strict=True):
        np.testing.assert_array_equal(plain.mask, contrast.mask)
        assert plain.boxes == contrast.boxes and plain.spacing == contrast.spacing
        assert contrast.meta["phase"] == "portal_venous"
        outside = plain.image[0] < -990  # air: no tissue to enhance
        np.testing.assert_array_equal(plain.image[0][outside], contrast.image[0][outside])
        for organ in ("liver", "spleen", "kidney_left", "aorta"):
            inside = plain.mask == IDS[organ]
            if inside.sum() > 30:
                lift = np.median(contrast.image[0][inside] - plain.image[0][inside])
                assert lift > 25, (organ, lift)
    assert np.median(_kidney_overlaps(slices)) > 0.3
    assert np.median(_kidney_overlaps(enhanced)) < 0.1


def test_unknown_contrast_phase_raises():
    with pytest.raises(CtxRestoreError, match="contrast phase 'arterial'"):
        abdomen_phantom(0, phase="arterial")


@pytest.mark.parametrize(
    "spatial_size, match",
    [((64,), "axes"), ((4, 64, 64, 64), "axes"), ((8, 64), "too small")],
)
def test_bad_spatial_size_raises(spatial_size, match):
    with pytest.raises(CtxRestoreError, match=match):
        abdomen_phantom(0, spatial_size=spatial_size)


def test_negative_index_raises():
    with pytest.raises(CtxRestoreError, match="index -1"):
        abdomen_phantom(-1)


def test_fast_enough():
    start = time.perf_counter()
    for index in range(50):
        abdomen_phantom(index, spatial_size=(128, 128))
    assert time.perf_counter() - start < 3.0
