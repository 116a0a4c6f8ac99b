import numpy as np
import pytest
import torch
from PIL import Image

from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.image_folder import read_image
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.unlabelled import UnlabelledDataset
from ctxrestore.errors import CtxRestoreError


def _ramp(height=12, width=16):
    return np.arange(height * width, dtype=np.float64).reshape(height, width)


def test_reads_grey_rgb_and_16_bit_png(tmp_path):
    grey = (_ramp() % 256).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.PNG")
    deep = (_ramp() * 300).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")

    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), grey[None])
    rgb = read_image(tmp_path / "rgb.PNG")
    assert rgb.shape == (1, 12, 16) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb[0], grey, atol=1)
    assert read_image(tmp_path / "deep.png").max() == deep.max() > 255


def test_reads_npy_layouts(tmp_path):
    np.save(tmp_path / "plane.npy", _ramp().astype(np.int16))
    np.save(tmp_path / "channels.npy", np.ones((4, 12, 16), np.float64))
    np.save(tmp_path / "volume.npy", np.ones((9, 12, 16), np.float32))
    np.save(tmp_path / "multi_volume.npy", np.ones((2, 9, 12, 16), np.float32))
    assert read_image(tmp_path / "plane.npy").shape == (1, 12, 16)
    assert read_image(tmp_path / "channels.npy").shape == (4, 12, 16)
    assert read_image(tmp_path / "volume.npy").shape == (1, 9, 12, 16)
    assert read_image(tmp_path / "multi_volume.npy").shape == (2, 9, 12, 16)
    assert read_image(tmp_path / "plane.npy").dtype == np.float32


def _dataset(folder, spatial_size, in_channels=None):
    return UnlabelledDataset(
        folder, preprocessing=Preprocessing(), spatial_size=spatial_size,
        cache=ArrayCache(None), in_channels=in_channels,
    )  # fmt: skip


@pytest.mark.parametrize(("spatial_size", "in_channels"), [((8, 10), None), ((20, 24), 1)])
def test_dataset_scales_and_resizes(tmp_path, spatial_size, in_channels):
    Image.fromarray((_ramp() * 300).astype(np.uint16)).save(tmp_path / "deep.png")
    np.save(tmp_path / "plane.npy", _ramp() - 1000.0)
    dataset = _dataset(tmp_path, spatial_size, in_channels)
    assert len(dataset) == 2
    for index in range(2):
        image = dataset[index]["image"]
        assert image.dtype == torch.float32 and image.shape == (1, *spatial_size)
        assert image.min() >= 0.0 and image.max() <= 1.0
        assert image.max() - image.min() > 0.9


def test_dataset_3d_patches_cover_the_volume(tmp_path):
    np.save(tmp_path / "volume.npy", np.random.default_rng(0).random((2, 10, 12, 14)))
    dataset = _dataset(tmp_path, (8, 8, 8))
    assert len(dataset) == 2 * 2 * 2  # ceil(10/8) * ceil(12/8) * ceil(14/8) patches
    assert all(dataset[i]["image"].shape == (2, 8, 8, 8) for i in range(len(dataset)))


def test_dataset_rejects_wrong_channels_and_dims(tmp_path):
    np.save(tmp_path / "channels.npy", np.ones((3, 12, 16)))
    with pytest.raises(CtxRestoreError, match=r"channels\.npy has 3 channels.*in_channels is 1"):
        _dataset(tmp_path, (8, 8), in_channels=1)
    with pytest.raises(CtxRestoreError, match=r"channels\.npy is 2D.*3D network"):
        _dataset(tmp_path, (8, 8, 8))


def _write_bad_file(tmp_path, kind):
    if kind == "text.png":
        (tmp_path / kind).write_text("this is not a picture")
    elif kind == "truncated.png":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)).save(
            tmp_path / "full.png"
        )
        data = (tmp_path / "full.png").read_bytes()
        (tmp_path / kind).write_bytes(data[: len(data) // 2])
    elif kind == "nan.npy":
        np.save(tmp_path / kind, np.array([[1.0, np.nan], [0.0, 2.0]]))
    elif kind == "object.npy":
        np.save(tmp_path / kind, np.array([[{"a": 1}, None]], dtype=object), allow_pickle=True)
    elif kind == "text.npy":
        (tmp_path / kind).write_text("not numpy")
    elif kind == "five_dims.npy":
        np.save(tmp_path / kind, np.ones((1, 1, 2, 2, 2)))
    return tmp_path / kind


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("text.png", "could not be read as an image"),
        ("truncated.png", "could not be read as an image"),
        ("nan.npy", "1 NaN values"),
        ("object.npy", "NumPy array"),
        ("text.npy", "not a NumPy"),
        ("five_dims.npy", r"shape \(1, 1, 2, 2, 2\)"),
    ],
)
def test_bad_files_raise_with_the_file_name(tmp_path, kind, problem):
    path = _write_bad_file(tmp_path, kind)
    with pytest.raises(CtxRestoreError, match=problem) as caught:
        read_image(path)
    assert kind in str(caught.value)


def test_empty_and_missing_folders_raise(tmp_path):
    with pytest.raises(CtxRestoreError, match="holds no readable image") as caught:
        _dataset(tmp_path, (8, 8))
    assert str(tmp_path) in str(caught.value)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(CtxRestoreError, match=r"found 1 other files \(\.txt"):
        _dataset(tmp_path, (8, 8))
    with pytest.raises(CtxRestoreError, match=r"missing.*does not exist"):
        _dataset(tmp_path / "missing", (8, 8))
