import numpy as np
import pytest

from ctxrestore.data.intensity import (
    CT_WINDOWS,
    MODALITIES,
    ROBUST_UNIT_RANGE,
    intensity_for,
    normalize_intensity,
)
from ctxrestore.errors import CtxRestoreError


def test_window_maps_low_high_to_unit_and_clips():
    image = np.array([[[-1000.0, -160.0, 40.0, 240.0, 3000.0]]])
    out = normalize_intensity(image, {"method": "window", "window": [-160, 240]})
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5, 1.0, 1.0]]])


def test_zscore_robust_clips_outlier_and_zeroes_background():
    # Background (the minimum, 0) around five foreground values with an outlier at 100.
    image = np.zeros((1, 3, 4), np.float32)
    image[0, 1, :] = [1.0, 2.0, 3.0, 4.0]
    image[0, 2, 0] = 100.0
    out = normalize_intensity(image, {"method": "zscore_robust", "percentiles": [0, 75]})
    # 75th percentile of [1, 2, 3, 4, 100] is 4: clipped [1, 2, 3, 4, 4], mean 2.8, var 1.36.
    std = np.sqrt(1.36)
    np.testing.assert_allclose(out[0, 1], (np.array([1, 2, 3, 4]) - 2.8) / std, rtol=1e-5)
    np.testing.assert_allclose(out[0, 2, 0], (4 - 2.8) / std, rtol=1e-5)
    foreground = image[0] > 0
    assert np.all(out[0][~foreground] == 0.0)
    assert abs(out[0][foreground].mean()) < 1e-6
    assert out[0][foreground].std() == pytest.approx(1.0, abs=1e-5)


def test_zscore_robust_default_percentiles_remove_an_outlier():
    generator = np.random.default_rng(0)
    image = np.zeros((1, 20, 20, 20), np.float32)
    image[0, 5:15, 5:15, 5:15] = generator.normal(300.0, 20.0, (10, 10, 10))
    image[0, 10, 10, 10] = 1e6
    out = normalize_intensity(image, {"method": "zscore_robust"})
    foreground = image[0] > 0
    assert out[0].max() < 5.0  # without clipping the outlier would be ~31 std away
    assert abs(out[0][foreground].mean()) < 1e-5
    assert out[0][foreground].std() == pytest.approx(1.0, abs=1e-4)
    assert np.all(out[0][~foreground] == 0.0)


def test_zscore_robust_foreground_is_shared_by_channels():
    # Voxel (0, 1) is at channel 0's minimum but inside channel 1's foreground: normalised.
    image = np.array([[[0.0, 0.0, 5.0, 7.0]], [[0.0, 2.0, 4.0, 6.0]]], np.float32)
    out = normalize_intensity(image, {"method": "zscore_robust", "percentiles": [0, 100]})
    assert np.all(out[:, 0, 0] == 0.0)
    values = np.array([0.0, 5.0, 7.0])
    np.testing.assert_allclose(out[0, 0, 1:], (values - values.mean()) / values.std(), rtol=1e-5)
    values = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(out[1, 0, 1:], (values - values.mean()) / values.std(), rtol=1e-5)


def test_zscore_robust_constant_image_is_zero():
    out = normalize_intensity(np.full((2, 4, 4), 7.0), {"method": "zscore_robust"})
    assert np.all(out == 0.0)


def test_unit_range_divides_8_bit_data_by_255():
    image = np.array([[[0.0, 51.0, 102.0, 200.0]]])
    out = normalize_intensity(image, {"method": "unit_range"})
    np.testing.assert_allclose(out, [[[0.0, 0.2, 0.4, 200 / 255]]], rtol=1e-6)


def test_unit_range_divides_larger_ranges_by_the_maximum():
    image = np.array([[[-10.0, 0.0, 500.0, 1000.0]]])
    out = normalize_intensity(image, {"method": "unit_range"})
    np.testing.assert_allclose(out, [[[0.0, 0.0, 0.5, 1.0]]])


def test_unit_range_keeps_data_already_in_unit_range():
    image = np.array([[[0.0, 0.25, 1.0]]])
    np.testing.assert_allclose(normalize_intensity(image, {"method": "unit_range"}), image)


def test_ct_presets_follow_width_and_level():
    width_level = {
        "abdomen": (400, 40),
        "soft_tissue": (400, 40),
        "liver": (150, 75),
        "lung": (1500, -600),
        "bone": (1500, 300),
        "brain": (80, 40),
    }
    assert set(CT_WINDOWS) == set(width_level)
    for name, (width, level) in width_level.items():
        assert CT_WINDOWS[name] == (level - width / 2, level + width / 2)
        assert intensity_for("ct", name) == {"method": "window", "window": list(CT_WINDOWS[name])}


def test_intensity_for_each_modality():
    assert intensity_for("ct") == {"method": "window", "window": [-160.0, 240.0]}
    assert intensity_for("ct", (-100, 100)) == {"method": "window", "window": [-100.0, 100.0]}
    assert intensity_for("mr")["method"] == "zscore_robust"
    assert intensity_for("us") == {"method": "unit_range"}
    assert intensity_for("generic") == ROBUST_UNIT_RANGE
    image = np.linspace(-200.0, 400.0, 24).reshape(1, 4, 6)
    for modality in MODALITIES:
        out = normalize_intensity(image, intensity_for(modality))
        assert out.shape == image.shape and out.dtype == np.float32


def test_intensity_for_returns_a_copy():
    spec = intensity_for("generic")
    spec["percentiles"][0] = 10.0
    assert ROBUST_UNIT_RANGE["percentiles"] == [0.5, 99.5]


@pytest.mark.parametrize(
    ("modality", "window", "message"),
    [
        ("xray", None, "unknown modality 'xray'; valid: ct, mr, us, generic"),
        ("ct", "lungs", "unknown CT window preset 'lungs'; presets: abdomen"),
        ("ct", (100, -100), r"CT window \(100.0, -100.0\) is not valid"),
        ("ct", (1, 2, 3), "CT window .* is not valid"),
        ("ct", ("a", "b"), "CT window .* is not valid"),
        ("mr", "brain", "window 'brain' is for CT only"),
    ],
)
def test_bad_names_raise(modality, window, message):
    with pytest.raises(CtxRestoreError, match=message):
        intensity_for(modality, window)


def test_unknown_method_raises():
    with pytest.raises(CtxRestoreError, match="methods:"):
        normalize_intensity(np.zeros((1, 2, 2)), {"method": "zscore_fancy"})
