"""Checks for the one property context restoration rests on, shared by tests and mutants.

Each check raises AssertionError with a reason; tests run them on the real implementation and
on deliberately buggy ones (the public reimplementation bugs in METHOD.md) to show they bite.
"""

import torch


def assert_pairs_isolated(corners_a, corners_b, patch_size):
    """No pair of swapped patches shares a voxel. corners: (B, T, D)."""
    patch = torch.as_tensor(patch_size)
    separated = ((corners_a - corners_b).abs() >= patch).any(dim=-1)
    assert bool(separated.all()), f"{int((~separated).sum())} swapped pairs overlap"


def assert_is_permutation(original, corrupted):
    """Every image of the batch holds exactly the same voxel values (per channel)."""
    flat_o = original.flatten(2).sort(dim=-1).values
    flat_c = corrupted.flatten(2).sort(dim=-1).values
    assert torch.equal(flat_o, flat_c), "corrupted image is not a permutation of the original"


def assert_channels_moved_together(original, corrupted):
    """Channel c of each voxel comes from the same source voxel as channel 0."""
    channels = original.shape[1]
    flat_o = original.flatten(2)
    flat_c = corrupted.flatten(2)
    # Channel 0 values are distinct, so they identify the source voxel of every output voxel.
    source = (flat_c[:, 0, :, None] == flat_o[:, 0, None, :]).float().argmax(dim=-1)
    expected = flat_o.gather(2, source[:, None].expand(-1, channels, -1))
    assert torch.equal(expected, flat_c), "channels were not swapped at the same locations"


def assert_target_is_original(images, inputs, targets):
    """The restoration target is the clean image and the input is the corrupted one."""
    assert torch.equal(targets, images), "the target is not the original image"
    assert not torch.equal(inputs, images), "the input was not corrupted"


def distinct_images(batch, channels, spatial, seed=0):
    """Float images whose voxels are all distinct within each channel (exact permutation tests)."""
    generator = torch.Generator().manual_seed(seed)
    count = 1
    for s in spatial:
        count *= s
    values = torch.stack(
        [torch.randperm(count, generator=generator) for _ in range(batch * channels)]
    )
    return values.view(batch, channels, *spatial).float() / count
