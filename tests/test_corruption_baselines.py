"""The baselines' corruptions (context encoder, Models Genesis), their pretexts, and each
baseline end to end: pretrain on the brain phantom, then fine-tune segmentation from it."""

import itertools
import json

import pytest
import torch
from corruption_checks import assert_channels_moved_together, assert_is_permutation

import ctxrestore
from ctxrestore.corruption import (
    box_mask,
    in_painting,
    local_pixel_shuffle,
    mask_regions,
    models_genesis,
    nonlinear_intensity,
    out_painting,
)
from ctxrestore.errors import CtxRestoreError
from ctxrestore.pretext import create_pretext

SHAPES = {2: (32, 28), 3: (12, 16, 14)}
CHANNELS = [1, 4]


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def images_for(spatial_dims, channels, batch=3, seed=0):
    """Uniform noise: no two voxels are equal, so every replaced voxel really changes."""
    return torch.rand(batch, channels, *SHAPES[spatial_dims], generator=generator(seed))


def expand(mask, images):
    return mask.expand_as(images)


def bounding_box_volume(mask):
    """(S...) bool -> volume of the smallest box around the True voxels."""
    volume = 1
    for axis in range(mask.dim()):
        others = [a for a in range(mask.dim()) if a != axis]
        present = mask.any(dim=others) if others else mask
        where = present.nonzero().flatten()
        volume *= int(where.max() - where.min() + 1)
    return volume


# ---- context encoder: mask_regions and box_mask ----------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", CHANNELS)
def test_mask_regions_drops_about_a_quarter_and_nothing_else(spatial_dims, channels):
    images = images_for(spatial_dims, channels, batch=6)
    masked, mask = mask_regions(images, 4, generator())
    assert masked.shape == images.shape and masked.dtype == images.dtype
    assert mask.shape == (6, 1, *SHAPES[spatial_dims]) and mask.dtype == torch.bool
    fraction = mask.flatten(1).float().mean(dim=1)
    # Boxes of 1/4 of the image in all, which may overlap: at most 1/4, and not much less.
    assert bool((fraction <= 0.25).all()) and bool((fraction >= 0.12).all()), fraction
    assert bool((masked != images)[expand(mask, images)].all())
    assert torch.equal(masked[~expand(mask, images)], images[~expand(mask, images)])
    again, again_mask = mask_regions(images, 4, generator())
    assert torch.equal(again, masked) and torch.equal(again_mask, mask)
    _, other = mask_regions(images, 4, generator(1))
    assert not torch.equal(other, mask)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mask_regions_boxes_fills_and_errors(spatial_dims):
    images = images_for(spatial_dims, 2)
    _, mask = mask_regions(images, 3, generator(), num_regions=1)
    for one in mask[:, 0]:
        assert int(one.sum()) == 3**spatial_dims == bounding_box_volume(one)
    zeroed, mask = mask_regions(images, 4, generator(), fill="zero")
    assert bool((zeroed[expand(mask, images)] == 0).all())
    filled, mask = mask_regions(images, 4, generator(), fill="mean")
    visible = ~expand(mask, images)
    means = (images * visible).flatten(2).sum(2) / visible.flatten(2).sum(2)
    inside = filled.flatten(2)[:, :, mask.flatten(1)[0]]  # image 0's holes, every channel
    assert torch.allclose(inside[0], means[0][:, None].expand_as(inside[0]))
    with pytest.raises(CtxRestoreError, match=r"patch_size .* must be between 1 and"):
        mask_regions(images, 40, generator())
    with pytest.raises(CtxRestoreError, match=r"fill 'median' is not one of"):
        mask_regions(images, 4, generator(), fill="median")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_box_mask_matches_drawing_each_box(spatial_dims):
    shape = SHAPES[spatial_dims]
    g = generator(3)
    corners = torch.randint(-3, max(shape), (4, 6, spatial_dims), generator=g)
    sizes = torch.randint(0, 9, (4, 6, spatial_dims), generator=g)
    active = torch.rand(4, 6, generator=g) < 0.7
    expected = torch.zeros(4, 1, *shape, dtype=torch.bool)
    for b, r in itertools.product(range(4), range(6)):
        if active[b, r]:
            box = tuple(
                slice(max(int(c), 0), max(int(c + s), 0))
                for c, s in zip(corners[b, r], sizes[b, r])
            )
            expected[(b, 0, *box)] = True
    assert torch.equal(box_mask(corners, sizes, shape, active), expected)


def test_context_encoder_loss_counts_only_the_holes():
    pretext = create_pretext("context_encoder", patch_size=4)
    images = torch.rand(2, 3, 32, 32)
    inputs, targets = pretext.make_batch(images, generator())
    assert targets.shape == (2, 4, 32, 32)  # the clean image and the mask
    assert torch.equal(targets[:, :3], images)
    mask = targets[:, 3:] > 0.5
    wrong_outside = torch.where(mask, images, images + 1)
    assert pretext.loss(wrong_outside, targets) == 0
    assert pretext.loss(torch.where(mask, images + 1, images), targets) == pytest.approx(1.0)
    assert pretext.loss(inputs, targets) > 0
    context = create_pretext("context_encoder", patch_size=4, outside_weight=0.01)
    inside, outside = float(mask.sum()), float((~mask).sum())  # a weighted mean:
    expected = 0.01 * outside / (inside + 0.01 * outside)
    assert float(context.loss(wrong_outside, targets)) == pytest.approx(expected, rel=1e-5)
    metrics = pretext.evaluate(inputs, targets, wrong_outside)
    assert metrics["restoration_mse"] == 0 and metrics["identity_mse"] > 0
    assert metrics["masked_fraction"] == pytest.approx(float(mask.float().mean()))
    assert "dropped boxes" in pretext.summary(metrics)
    with pytest.raises(CtxRestoreError, match="outside_weight must be in"):
        create_pretext("context_encoder", outside_weight=2.0)


# ---- Models Genesis ------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", CHANNELS)
def test_local_shuffle_permutes_within_each_block_only(spatial_dims, channels):
    images = images_for(spatial_dims, channels)
    shuffled, blocks = local_pixel_shuffle(images, 4, generator(), block_rate=0.5)
    assert blocks.shape == (3, 1, *SHAPES[spatial_dims]) and blocks.dtype == torch.long
    outside = ~expand(blocks >= 0, images)
    assert torch.equal(shuffled[outside], images[outside])
    assert 0.2 < float((blocks >= 0).float().mean()) < 0.8
    for b in range(len(images)):
        for block in blocks[b].unique().tolist():
            if block < 0:
                continue
            inside = (blocks[b, 0] == block).flatten()
            assert int(inside.sum()) == 4**spatial_dims
            before = images[b].flatten(1)[:, inside].sort(dim=1).values
            after = shuffled[b].flatten(1)[:, inside].sort(dim=1).values
            assert torch.equal(before, after), (b, block)
    assert not torch.equal(shuffled, images)
    assert_is_permutation(images, shuffled)
    assert_channels_moved_together(images, shuffled)
    again, again_blocks = local_pixel_shuffle(images, 4, generator(), block_rate=0.5)
    assert torch.equal(again, shuffled) and torch.equal(again_blocks, blocks)
    unchanged, none = local_pixel_shuffle(images, 4, generator(), block_rate=0.0)
    assert torch.equal(unchanged, images) and bool((none < 0).all())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", CHANNELS)
def test_bezier_transform_is_monotonic_and_keeps_the_range(spatial_dims, channels):
    images = images_for(spatial_dims, channels, batch=8) * 6 - 2  # z-score-like range
    flat = images.flatten(2)
    order = flat.argsort(dim=2)
    for invert_rate, monotonic in ((0.0, "increasing"), (1.0, "decreasing")):
        mapped = nonlinear_intensity(images, generator(), invert_rate=invert_rate)
        assert mapped.shape == images.shape and mapped.dtype == images.dtype
        steps = mapped.flatten(2).gather(2, order).diff(dim=2)
        assert bool((steps >= 0).all() if monotonic == "increasing" else (steps <= 0).all())
        low, high = flat.amin(2), flat.amax(2)
        ends = (low, high) if monotonic == "increasing" else (high, low)
        assert torch.equal(mapped.flatten(2).amin(2), low)
        assert torch.equal(mapped.flatten(2).amax(2), high)
        assert torch.equal(mapped.flatten(2).gather(2, order[..., :1])[..., 0], ends[0])
        assert torch.equal(mapped.flatten(2).gather(2, order[..., -1:])[..., 0], ends[1])
        assert float((mapped - images).abs().mean()) > 1e-3  # the curves are not identities
    again = nonlinear_intensity(images, generator(), invert_rate=1.0)
    assert torch.equal(again, mapped)
    constant = torch.full((2, channels, *SHAPES[spatial_dims]), 0.3)
    assert torch.equal(nonlinear_intensity(constant, generator()), constant)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", CHANNELS)
def test_painting_replaces_exactly_the_boxes(spatial_dims, channels):
    images = images_for(spatial_dims, channels, batch=8)
    painted, holes = in_painting(images, generator())
    assert holes.shape == (8, 1, *SHAPES[spatial_dims])
    assert torch.equal(painted[~expand(holes, images)], images[~expand(holes, images)])
    assert bool((painted != images)[expand(holes, images)].all())
    assert 0 < float(holes.float().mean()) < 0.5
    kept_images, kept = out_painting(images, generator())
    assert torch.equal(kept_images[expand(kept, images)], images[expand(kept, images)])
    assert bool((kept_images != images)[~expand(kept, images)].all())
    low, high = images.flatten(2).amin(2), images.flatten(2).amax(2)  # noise in the image range
    assert bool((kept_images.flatten(2).amin(2) >= low).all())
    assert bool((kept_images.flatten(2).amax(2) <= high).all())
    # One kept box: a box of 3/7 to 4/7 of the image per axis, and nothing else.
    _, one = out_painting(images, generator(), max_boxes=1)
    shape = torch.tensor(SHAPES[spatial_dims], dtype=torch.float)
    for image in one[:, 0]:
        assert int(image.sum()) == bounding_box_volume(image)
        sides = torch.tensor([int(image.any(dim=[a for a in range(spatial_dims) if a != axis])
                                  .sum()) for axis in range(spatial_dims)])  # fmt: skip
        assert bool((sides >= shape * 3 / 7 - 1).all() and (sides <= shape * 4 / 7 + 1).all())
    for function in (in_painting, out_painting):
        first, second = function(images, generator()), function(images, generator())
        assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", CHANNELS)
def test_models_genesis_decisions_per_image(spatial_dims, channels):
    images = images_for(spatial_dims, channels, batch=6)
    corrupted = models_genesis(images, generator())
    assert corrupted.shape == images.shape and corrupted.dtype == images.dtype
    assert torch.equal(corrupted, models_genesis(images, generator()))
    assert not torch.equal(corrupted, models_genesis(images, generator(1)))
    changed = (corrupted != images).flatten(1).any(dim=1)
    assert bool(changed.all())  # with 6 images, all of them (P(untouched) = 0.005 each)
    none = dict(nonlinear_rate=0.0, local_rate=0.0, paint_rate=0.0)
    assert torch.equal(models_genesis(images, generator(), **none), images)
    only_shuffle = models_genesis(images, generator(), **{**none, "local_rate": 1.0})
    assert not torch.equal(only_shuffle, images)
    assert_is_permutation(images, only_shuffle)
    only_curve = models_genesis(
        images, generator(), **{**none, "nonlinear_rate": 1.0}, invert_rate=0.0
    )
    order = images.flatten(2).argsort(dim=2)
    assert bool((only_curve.flatten(2).gather(2, order).diff(dim=2) >= 0).all())
    with pytest.raises(CtxRestoreError, match=r"paint_rate is a probability"):
        models_genesis(images, generator(), paint_rate=1.5)
    with pytest.raises(CtxRestoreError, match=r"paint_rate is a probability"):
        create_pretext("models_genesis", paint_rate=1.5)


# ---- each baseline end to end --------------------------------------------------------------

METRICS = {
    "autoencoder": {"restoration_mse", "identity_mse"},
    "context_encoder": {"restoration_mse", "identity_mse", "masked_fraction"},
    "models_genesis": {"restoration_mse", "identity_mse"},
}


@pytest.mark.parametrize("method", sorted(METRICS))
def test_pretrain_then_finetune_segmentation(tmp_path, method):
    run = tmp_path / "pretrain"
    ctxrestore.pretrain(
        out=run, method=method, phantom="brain", num_images=32, image_size=32, width=4,
        batch_size=8, max_steps=2, patch_size=4, warmup_steps=1, device="cpu",
    )  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert METRICS[method] <= set(metrics) and metrics["steps"] == 2
    assert isinstance(metrics["summary"], str) and metrics["summary"]
    spec = json.loads((run / "spec.json").read_text())
    assert spec["pretext"]["name"] == method
    assert (run / "report.md").is_file()

    out = tmp_path / "finetune"
    ctxrestore.finetune(
        "segment", out=out, init=str(run), num_images=40, image_size=32, max_steps=2,
        batch_size=8, device="cpu", phantom=None,
    )  # fmt: skip
    transfer = json.loads((out / "metrics.json").read_text())["transfer"]
    assert {"encoder", "decoder"} <= set(transfer["transferred"])
    assert "encoder" not in transfer["random"]
