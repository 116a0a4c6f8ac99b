import pytest
import torch
from PIL import Image

from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_image_grid, save_loss_curve


def _assert_png(path):
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        assert image.width > 10 and image.height > 10
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


@pytest.mark.parametrize("spatial_size", [(16, 12), (6, 16, 12)])
def test_image_grid(tmp_path, spatial_size):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, *spatial_size, generator=generator)
    rows = [("original", images), ("restored", images[:2] * 2.0)]
    path = save_image_grid(tmp_path / "new" / "grid.png", rows, max_images=2)
    _assert_png(path)
    save_image_grid(path, rows)  # overwrite in place
    _assert_png(path)


def test_image_grid_rejects_a_wrong_shape(tmp_path):
    with pytest.raises(CtxRestoreError, match=r"'flat'.*shape"):
        save_image_grid(tmp_path / "grid.png", [("flat", torch.zeros(2, 16, 16))])


def test_loss_curve(tmp_path):
    path = save_loss_curve(tmp_path / "plots" / "loss.png", [0, 10, 20], [1.0, 0.1, 0.05])
    _assert_png(path)
    save_loss_curve(path, [0, 1], [0.0, -1.0], title="non-positive: linear axis")
    _assert_png(path)
    with pytest.raises(CtxRestoreError, match="2 steps but 3 losses"):
        save_loss_curve(path, [0, 1], [1.0, 2.0, 3.0])
