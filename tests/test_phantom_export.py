"""`ctxrestore phantoms`: each phantom written in its task's layout reads back unchanged."""

import numpy as np
import pytest
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.cli import app
from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.layouts import (
    read_boxes_csv,
    read_class_folders,
    read_segmentation_layout,
)
from ctxrestore.data.phantoms import get_phantom
from ctxrestore.data.phantoms.export import export_phantom
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.readers import read_volume
from ctxrestore.errors import CtxRestoreError
from ctxrestore.tasks.datasets import FolderOptions, boxes_only, folder_data

SIZE = 64


def samples(name, count, dims=2):
    info = get_phantom(name)
    return [info.generator(i, seed=3, spatial_size=(SIZE,) * dims) for i in range(count)]


def read_case(case):
    """(image (C, *spatial), mask, spacing) as the files hold them."""
    channels = [read_volume(path) for path in case.images]
    mask = read_volume(case.label).array[0].astype(np.int64)
    return np.concatenate([c.array for c in channels]), mask, channels[0].spacing


def test_ultrasound_class_folders_read_back(tmp_path):
    export_phantom("ultrasound", tmp_path / "us", count=10, image_size=SIZE, seed=3)
    items, names = read_class_folders(tmp_path / "us")
    assert names == list(get_phantom("ultrasound").class_names)
    expected = {f"ultrasound_{i:05d}.png": s for i, s in enumerate(samples("ultrasound", 10))}
    assert len(items) == 10
    for path, label in items:
        sample = expected[path.name]
        assert label == sample.label
        image = read_volume(path).array
        assert np.array_equal(image[0], np.round(np.clip(sample.image[0], 0, 1) * 255))


@pytest.mark.parametrize(
    ("name", "dims"), [("brain", 2), ("abdomen", 2), ("abdomen_contrast", 2), ("brain", 3)]
)
def test_segmentation_layouts_read_back_unchanged(tmp_path, name, dims):
    count = 6 if dims == 2 else 2
    out = export_phantom(
        name,
        tmp_path / name,
        count=count,
        spatial_dims=dims,
        image_size=SIZE if dims == 2 else 32,
        seed=3,
    )
    info = get_phantom(name)
    layout = read_segmentation_layout(out)
    assert layout.channel_names == info.channel_names
    assert layout.labels == info.labels
    generated = [
        info.generator(i, seed=3, spatial_size=((SIZE,) if dims == 2 else (32,)) * dims)
        for i in range(count)
    ]
    for case, sample in zip(layout.cases, generated):
        image, mask, spacing = read_case(case)
        assert np.array_equal(image, sample.image.astype(np.float32))
        assert np.array_equal(mask, sample.mask)
        assert spacing == pytest.approx(sample.spacing, rel=1e-6)


def test_abdomen_boxes_read_back(tmp_path):
    out = export_phantom("abdomen", tmp_path / "ab", count=8, image_size=SIZE, seed=3)
    boxes = read_boxes_csv(out / "boxes.csv")
    for index, sample in enumerate(samples("abdomen", 8)):
        assert boxes[f"imagesTr/abdomen_{index:05d}_0000.nii.gz"] == sample.boxes
    # its masks are read beside its boxes.csv: `--box-head segment` trains on the folder
    assert not boxes_only(out)
    options = FolderOptions(Preprocessing("ct"), ArrayCache(None))
    data = folder_data("localize", out, (SIZE, SIZE), options)
    for item, sample in zip(data.items, samples("abdomen", 8)):
        assert np.array_equal(item["mask"].numpy(), sample.mask)


def test_cli_writes_gallery_and_refuses_a_used_folder(tmp_path):
    runner = CliRunner()
    arguments = [
        "phantoms",
        "brain",
        "--out",
        str(tmp_path / "b"),
        "--n",
        "3",
        "--image-size",
        "48",
    ]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "gallery.png").stat().st_size > 1000
    result = runner.invoke(app, arguments)
    assert result.exit_code == 2 and "is not empty" in result.output
    with pytest.raises(CtxRestoreError, match="unknown phantom 'lung'"):
        export_phantom("lung", tmp_path / "x", count=1)


def test_pretrain_on_a_multichannel_phantom(tmp_path, tiny_pretrain):
    result = ctxrestore.pretrain(out=tmp_path / "run", phantom="brain", **tiny_pretrain)
    model = ctxrestore.load_pretrained(tmp_path / "run")
    assert model.encoder.in_channels == 4 and result.steps == 4
    with pytest.raises(CtxRestoreError, match="has 4 channel"):
        ctxrestore.pretrain(out=tmp_path / "r2", phantom="brain", in_channels=1, **tiny_pretrain)
