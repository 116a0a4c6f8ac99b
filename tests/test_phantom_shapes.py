import numpy as np
import pytest
import torch

from ctxrestore.data.phantoms import (
    PHANTOMS,
    list_phantoms,
    phantom_dataset,
)
from ctxrestore.data.phantoms.shapes import shapes_phantom
from ctxrestore.errors import CtxRestoreError

SIZES = {2: (32, 24), 3: (16, 20, 12)}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_shape_dtype_and_range(spatial_dims, in_channels):
    size = SIZES[spatial_dims]
    image = shapes_phantom(0, spatial_size=size, in_channels=in_channels)
    assert image.shape == (in_channels, *size)
    assert image.dtype == np.float32
    assert image.min() >= 0.0 and image.max() <= 1.0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_depends_only_on_seed_and_index(spatial_dims):
    size = SIZES[spatial_dims]

    def draw(index, seed):
        return shapes_phantom(index, seed=seed, spatial_size=size, in_channels=2)

    first = draw(5, seed=3)
    draw(6, seed=3)  # other draws in between change nothing
    np.testing.assert_array_equal(first, draw(5, seed=3))
    assert not np.array_equal(first, draw(5, seed=4))
    assert not np.array_equal(first, draw(6, seed=3))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_background_surrounds_the_body(spatial_dims):
    for index in range(10):
        image = shapes_phantom(index, spatial_size=SIZES[spatial_dims])
        for axis in range(1, image.ndim):
            border = np.take(image, [0, -1], axis=axis)
            assert np.all(border == 0.0)
        body_fraction = (image > 0).mean()
        assert 0.1 < body_fraction < 0.8


def test_channels_share_anatomy_but_differ_in_contrast():
    image = shapes_phantom(2, spatial_size=(48, 48), in_channels=4)
    support = image[0] > 0
    for channel in image[1:]:
        np.testing.assert_array_equal(channel > 0, support)
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.abs(image[a] - image[b])[support].mean() > 0.02


def test_body_has_several_tissues():
    image = shapes_phantom(0, spatial_size=(64, 64))[0]
    inside = image[image > 0]
    # Organs differ from the body by >= 0.15 (times the bias field): a wide spread of values.
    assert np.percentile(inside, 95) - np.percentile(inside, 5) > 0.1


def test_dataset_items_and_registry():
    dataset = phantom_dataset("shapes", 3, seed=1, spatial_size=(16, 16, 16), in_channels=2)
    assert len(dataset) == 3
    item = dataset[2]
    assert item["image"].dtype == torch.float32
    assert item["image"].shape == (2, 16, 16, 16)
    expected = shapes_phantom(2, seed=1, spatial_size=(16, 16, 16), in_channels=2)
    np.testing.assert_array_equal(item["image"].numpy(), expected)
    with pytest.raises(IndexError):
        dataset[3]
    assert "shapes" in list_phantoms()
    assert PHANTOMS["shapes"].task == "pretrain"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"spatial_size": (32,)}, "spatial_size"),
        ({"spatial_size": (2, 32)}, "too small"),
        ({"in_channels": 0}, "in_channels"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(CtxRestoreError, match=message):
        shapes_phantom(0, **options)
