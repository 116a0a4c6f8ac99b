"""Batched augmentation: seeded, shape-keeping, image / mask / boxes moving together."""

import math

import pytest
import torch

from ctxrestore.errors import CtxRestoreError
from ctxrestore.tasks.augment import Augmentation, AugmentationPlan, apply_augmentation

NEUTRAL_INTENSITY = dict(contrast=(1.0, 1.0), brightness=0.0, noise_std=0.0)
IDENTITY = Augmentation(
    rotation_degrees=0.0, scale=(1.0, 1.0), translation=0.0, **NEUTRAL_INTENSITY
)
SPATIAL_ONLY = Augmentation(
    rotation_degrees=30.0, scale=(0.8, 1.25), translation=0.15, probability=1.0, **NEUTRAL_INTENSITY
)
SHAPES = {2: (24, 20), 3: (12, 16, 14)}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blocks_batch(spatial_dims: int, channels: int = 1, batch_size: int = 4) -> dict:
    """Images with two bright boxes (labels 2 and 5) on a dark background, their masks, boxes.

    Organ 2 lies in the first half of axis 0, organ 5 in the second, so they never overlap.
    """
    shape = SHAPES[spatial_dims]
    half = shape[0] // 2
    image = torch.zeros(batch_size, channels, *shape)
    mask = torch.zeros(batch_size, *shape, dtype=torch.long)
    boxes = torch.zeros(batch_size, 2, 2, spatial_dims)
    for b in range(batch_size):
        for organ, label in enumerate((2, 5)):
            low = [2 + (b + 3 * organ + axis) % (size // 2) for axis, size in enumerate(shape)]
            high = [start + 3 + (b + organ) % 4 for start in low]
            low[0] = organ * half + 1 + b % 3
            high[0] = low[0] + 2 + (b + organ) % 2
            region = (b, *(slice(lo, hi) for lo, hi in zip(low, high)))
            mask[region] = label
            boxes[b, organ] = torch.tensor([low, high], dtype=torch.float32)
    image[:] = (mask > 0)[:, None].float() * torch.arange(1.0, channels + 1).view(
        -1, *[1] * len(shape)
    )
    return {
        "image": image,
        "mask": mask,
        "boxes": boxes,
        "present": torch.ones(batch_size, 2),
        "spacing": torch.ones(batch_size, spatial_dims),
        "label": torch.arange(batch_size),
    }


def without_boxes(batch: dict) -> dict:
    return {key: value for key, value in batch.items() if key not in ("boxes", "present")}


def mask_box(mask: torch.Tensor, label: int) -> torch.Tensor | None:
    """(2, D) voxel-edge box of `label` in one mask (*spatial), None when absent."""
    voxels = (mask == label).nonzero()
    if len(voxels) == 0:
        return None
    return torch.stack([voxels.min(dim=0).values, voxels.max(dim=0).values + 1]).float()


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 4])
def test_same_seed_same_output_other_seed_differs(spatial_dims, channels):
    batch = without_boxes(blocks_batch(spatial_dims, channels))
    augment = Augmentation(probability=1.0)
    first = augment(batch, generator(0))
    again = augment(batch, generator(0))
    other = augment(batch, generator(1))
    for key in ("image", "mask"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["image"], other["image"])
    assert not torch.equal(first["mask"], other["mask"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("with_boxes", [False, True])
def test_shapes_dtypes_devices_are_kept_and_the_input_is_untouched(
    spatial_dims, channels, with_boxes
):
    batch = blocks_batch(spatial_dims, channels)
    if not with_boxes:
        batch = without_boxes(batch)
    copies = {key: value.clone() for key, value in batch.items()}
    augmented = Augmentation()(batch, generator(3))
    assert augmented is not batch
    assert set(augmented) == set(batch)
    for key, value in batch.items():
        assert augmented[key].shape == value.shape
        assert augmented[key].dtype == value.dtype
        assert augmented[key].device == value.device
        assert torch.equal(value, copies[key])  # the input batch is not modified
    assert augmented["label"] is batch["label"]  # other keys pass through
    assert augmented["spacing"] is batch["spacing"]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_mask_keeps_its_labels_and_moves_with_the_image(spatial_dims):
    batch = without_boxes(blocks_batch(spatial_dims, batch_size=8))
    for augment in (SPATIAL_ONLY, Augmentation(probability=1.0, rotation_degrees=30.0)):
        augmented = augment(batch, generator(5))
        assert set(augmented["mask"].unique().tolist()) <= {0, 2, 5}
        assert not torch.equal(augmented["mask"], batch["mask"])
        image, inside = augmented["image"][:, 0], augmented["mask"] > 0
        # bright voxels are the labelled ones: only a rim of blended edge voxels differs
        assert image[inside].mean() > 0.7
        assert image[~inside].mean().abs() < 0.1
        disagree = ((image > 0.5) != inside).float().mean()
        assert disagree < 0.05


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_moved_boxes_match_the_boxes_of_the_moved_masks(spatial_dims, seed):
    batch = blocks_batch(spatial_dims, batch_size=8)
    augment = Augmentation(rotation_degrees=45.0, scale=(0.6, 1.6), translation=0.3, probability=1)
    augmented = augment(batch, generator(seed))
    assert not torch.equal(augmented["boxes"], batch["boxes"])
    for b in range(8):
        for organ, label in enumerate((2, 5)):
            box = augmented["boxes"][b, organ]
            from_mask = mask_box(augmented["mask"][b], label)
            if augmented["present"][b, organ] == 0:
                assert from_mask is None
                assert torch.equal(box, torch.zeros_like(box))
            elif from_mask is None:  # in view by less than a voxel centre
                assert ((box[1] - box[0]) < 1).any()
            else:
                # mask edges sit at voxel centres: at most half a voxel from the exact box
                assert (box - from_mask).abs().max() <= 0.5 + 1e-3, (box, from_mask)


def test_a_box_that_leaves_the_image_is_marked_absent_and_others_are_clipped():
    batch = blocks_batch(2, batch_size=1)  # boxes near the start of each axis
    plan = AugmentationPlan(
        angle=torch.zeros(1),
        zoom=torch.ones(1),
        shift=torch.tensor([[-0.5, 0.0]]),  # 12 voxels towards the start of axis 0
        moved=torch.ones(1, dtype=torch.bool),
        contrast=torch.ones(1, 1),
        brightness=torch.zeros(1, 1),
        noise=None,
    )
    original = batch["boxes"][0]
    augmented = apply_augmentation(batch, plan)
    for organ, label in enumerate((2, 5)):
        low, high = original[organ, :, 0].tolist()
        box = augmented["boxes"][0, organ]
        if high - 12 <= 0:
            assert augmented["present"][0, organ] == 0
            assert torch.equal(box, torch.zeros(2, 2))
            assert mask_box(augmented["mask"][0], label) is None
        else:
            assert augmented["present"][0, organ] == 1
            assert box[:, 0].tolist() == [max(low - 12, 0), high - 12]
            assert box[:, 1].tolist() == original[organ, :, 1].tolist()
    assert augmented["present"][0].tolist() == [0.0, 1.0]  # this layout has one of each


def test_batches_with_boxes_are_never_rotated():
    augment = Augmentation(rotation_degrees=90.0, probability=1.0)
    for spatial_dims in (2, 3):
        batch = blocks_batch(spatial_dims, batch_size=16)
        assert torch.equal(augment.plan(batch, generator(0)).angle, torch.zeros(16))
        assert (augment.plan(without_boxes(batch), generator(0)).angle != 0).all()
    rotating = augment.plan(without_boxes(batch), generator(0))
    with pytest.raises(CtxRestoreError, match="cannot move boxes exactly"):
        apply_augmentation(batch, rotating)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 4])
def test_identity_settings_return_the_batch_exactly(spatial_dims, channels):
    batch = blocks_batch(spatial_dims, channels)
    batch["image"] = batch["image"] + torch.randn(batch["image"].shape, generator=generator(9))
    for augment in (IDENTITY, Augmentation(probability=0.0, **NEUTRAL_INTENSITY)):
        augmented = augment(batch, generator(2))
        for key, value in batch.items():
            assert torch.equal(augmented[key], value), key


def test_probability_zero_leaves_the_geometry_and_changes_only_intensity():
    batch = blocks_batch(2)
    augmented = Augmentation(probability=0.0)(batch, generator(4))
    for key in ("mask", "boxes", "present"):
        assert torch.equal(augmented[key], batch[key])
    assert not torch.equal(augmented["image"], batch["image"])


def test_probability_is_per_image():
    batch = without_boxes(blocks_batch(2, batch_size=64))
    plan = Augmentation(probability=0.5).plan(batch, generator(0))
    assert 16 < int(plan.moved.sum()) < 48
    augmented = apply_augmentation(batch, plan)
    still = ~plan.moved
    assert torch.equal(augmented["mask"][still], batch["mask"][still])


def test_brightness_and_noise_are_in_units_of_the_channel_std():
    batch = without_boxes(blocks_batch(2, channels=2, batch_size=8))
    std = batch["image"].std(dim=(2, 3), correction=0, keepdim=True)
    bright = Augmentation(probability=0.0, contrast=(1.0, 1.0), brightness=0.5, noise_std=0.0)
    offset = bright(batch, generator(1))["image"] - batch["image"]
    per_channel = offset.amax(dim=(2, 3), keepdim=True)
    assert torch.allclose(offset, per_channel.expand_as(offset), atol=1e-6)  # one offset each
    assert (per_channel.abs() <= 0.5 * std + 1e-6).all()
    noisy = Augmentation(probability=0.0, contrast=(1.0, 1.0), brightness=0.0, noise_std=0.2)
    noise = (noisy(batch, generator(1))["image"] - batch["image"]) / std
    assert noise.std().item() == pytest.approx(0.2, rel=0.1)


def test_rotation_is_in_millimetres_for_anisotropic_voxels():
    # 16 x 32 voxels of 2 x 1 mm: a square field of view. A centred square of 16 x 16 mm (8 x 16
    # voxels) turned by 90 degrees covers the same voxels; without the spacing it would not.
    image = torch.zeros(1, 1, 16, 32)
    image[..., 4:12, 8:24] = 1.0
    plan = AugmentationPlan(
        angle=torch.tensor([math.pi / 2]),
        zoom=torch.ones(1),
        shift=torch.zeros(1, 2),
        moved=torch.ones(1, dtype=torch.bool),
        contrast=torch.ones(1, 1),
        brightness=torch.zeros(1, 1),
        noise=None,
    )
    turned = apply_augmentation({"image": image, "spacing": torch.tensor([[2.0, 1.0]])}, plan)
    # only the blended edge columns differ: 1 mm columns sample 2 mm rows
    assert (turned["image"] - image).abs().mean() < 0.02
    assert turned["image"].sum() == pytest.approx(image.sum().item())
    unscaled = apply_augmentation({"image": image}, plan)
    assert (unscaled["image"] - image).abs().mean() > 0.2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_works_under_bf16_autocast(spatial_dims):
    batch = blocks_batch(spatial_dims)
    plain = Augmentation()(batch, generator(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = Augmentation()(batch, generator(0))
    for key, value in batch.items():
        assert autocast[key].dtype == value.dtype
    assert torch.allclose(autocast["image"], plain["image"], atol=1e-5)
    assert torch.equal(autocast["mask"], plain["mask"])
    bf16 = dict(batch, image=batch["image"].bfloat16())
    assert Augmentation()(bf16, generator(0))["image"].dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_gpu_with_a_gpu_generator():
    batch = {key: value.cuda() for key, value in blocks_batch(3).items()}
    cuda_generator = torch.Generator(device="cuda").manual_seed(0)
    augmented = Augmentation()(batch, cuda_generator)
    assert all(value.is_cuda for value in augmented.values())
    with pytest.raises(CtxRestoreError, match="generator is on cpu but the batch is on cuda"):
        Augmentation()(batch, generator(0))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(rotation_degrees=-1.0), r"rotation_degrees must be in \[0, 180.0\]"),
        (dict(translation=1.5), r"translation must be in \[0, 1.0\]"),
        (dict(probability=1.2), r"probability must be in \[0, 1.0\]"),
        (dict(noise_std=float("nan")), "noise_std must be in"),
        (dict(brightness=-0.1), "brightness must be in"),
        (dict(scale=(0.0, 1.1)), r"scale must be \(low, high\) with low > 0.0"),
        (dict(scale=(1.2, 0.9)), "low <= high, got"),
        (dict(contrast=(-0.1, 1.0)), "contrast must be .* low >= 0.0"),
        (dict(contrast=1.0), r"contrast must be \(low, high\), got 1.0"),
    ],
)
def test_bad_settings_are_refused(options, message):
    with pytest.raises(CtxRestoreError, match=message):
        Augmentation(**options)


def test_bad_batches_are_refused():
    with pytest.raises(CtxRestoreError, match="needs an 'image'"):
        IDENTITY({"mask": torch.zeros(1, 4, 4)}, generator(0))
    with pytest.raises(CtxRestoreError, match=r"got shape \(4, 4\)"):
        IDENTITY({"image": torch.zeros(4, 4)}, generator(0))
    with pytest.raises(CtxRestoreError, match="needs 'present'"):
        IDENTITY({"image": torch.zeros(1, 1, 4, 4), "boxes": torch.zeros(1, 1, 2, 2)}, generator(0))
