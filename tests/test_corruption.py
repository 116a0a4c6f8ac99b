"""Context-restoration corruption: plan properties, permutation, determinism, bugs, bad input."""

import numpy as np
import pytest
import torch
from corruption_checks import (
    assert_channels_moved_together,
    assert_is_permutation,
    assert_pairs_isolated,
    distinct_images,
)

from ctxrestore.corruption import (
    SwapPlan,
    apply_permutation,
    apply_swap_plan,
    context_restoration,
    invert_permutation,
    sample_swap_plan,
    swap_permutation,
    undo_swap_plan,
)
from ctxrestore.errors import CtxRestoreError

SHAPES = {2: (24, 20), 3: (12, 10, 14)}
PATCHES = {2: (5, 4), 3: (3, 4, 3)}


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 4])
def test_output_is_a_permutation_given_by_the_returned_index(spatial_dims, channels):
    images = distinct_images(3, channels, SHAPES[spatial_dims])
    corrupted, permutation = context_restoration(
        images, 10, PATCHES[spatial_dims], generator(), return_permutation=True
    )
    assert corrupted.shape == images.shape and corrupted.dtype == images.dtype
    assert not torch.equal(corrupted, images)
    assert_is_permutation(images, corrupted)
    assert torch.equal(apply_permutation(images, permutation), corrupted)
    assert torch.equal(apply_permutation(corrupted, invert_permutation(permutation)), images)
    assert torch.equal(permutation.sort(dim=1).values[0], torch.arange(permutation.shape[1]))
    assert_channels_moved_together(images, corrupted)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pairs_never_overlap_even_for_large_patches(spatial_dims):
    shape = SHAPES[spatial_dims]
    patch = tuple(s // 2 for s in shape)  # as large as is allowed: most random pairs overlap
    plan = sample_swap_plan(shape, 16, 30, patch, generator=generator())
    assert_pairs_isolated(plan.corners_a, plan.corners_b, patch)
    upper = torch.tensor(shape) - torch.tensor(patch)
    for corners in (plan.corners_a, plan.corners_b):
        assert bool((corners >= 0).all()) and bool((corners <= upper).all())


def test_pairs_are_exactly_uniform_over_isolated_pairs():
    shape, patch = (6, 5), (3, 2)
    ranges = [s - p + 1 for s, p in zip(shape, patch)]
    corners = [(y, x) for y in range(ranges[0]) for x in range(ranges[1])]
    isolated = {
        (a, b)
        for a in corners
        for b in corners
        if abs(a[0] - b[0]) >= patch[0] or abs(a[1] - b[1]) >= patch[1]
    }
    plan = sample_swap_plan(shape, 2000, 20, patch, generator=generator(11))
    pairs = torch.cat([plan.corners_a, plan.corners_b], dim=-1).view(-1, 4).tolist()
    counts = {}
    for y0, x0, y1, x1 in pairs:
        counts[((y0, x0), (y1, x1))] = counts.get(((y0, x0), (y1, x1)), 0) + 1
    assert set(counts) == isolated  # every isolated pair occurs, no other pair does
    expected = len(pairs) / len(isolated)
    # 40,000 draws over 216 pairs: ~185 each, standard deviation ~14; allow 5 of them.
    assert all(abs(count - expected) < 5 * expected**0.5 for count in counts.values())


def test_pairs_are_spread_over_the_whole_image():
    plan = sample_swap_plan((64, 64), 32, 20, 8, generator=generator())
    corners = torch.cat([plan.corners_a, plan.corners_b]).view(-1, 2)
    assert corners.min() == 0 and corners.max() == 64 - 8
    # Uniform placement: the mean corner sits near the middle of the valid range.
    assert abs(corners.float().mean().item() - 28) < 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_and_device_are_kept(dtype):
    images = torch.rand(2, 1, 16, 16).to(dtype)
    corrupted = context_restoration(images, 3, 4, generator())
    assert corrupted.dtype == dtype and corrupted.device == images.device
    assert_is_permutation(images, corrupted)


def test_same_seed_same_output_and_different_seeds_differ():
    images = torch.rand(4, 2, 32, 32)
    first = context_restoration(images, 8, 6, generator(7))
    again = context_restoration(images, 8, 6, generator(7))
    other = context_restoration(images, 8, 6, generator(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_golden_plan_for_a_fixed_seed():
    # Pins the sampler: a change here changes every user's pretraining data for a given seed.
    plan = sample_swap_plan((16, 16), 1, 2, 4, generator=generator(0))
    assert plan.corners_a.tolist() == GOLDEN_A and plan.corners_b.tolist() == GOLDEN_B


GOLDEN_A = [[[5, 11], [2, 9]]]
GOLDEN_B = [[[8, 4], [8, 6]]]


def _patches(plan, image, swap):
    """The two patches of swap `swap` of the plan's first image, cut from `image` (C, *spatial)."""
    return [
        image[(slice(None), *(slice(c, c + p) for c, p in zip(corner, plan.patch_size)))]
        for corner in (plan.corners_a[0, swap].tolist(), plan.corners_b[0, swap].tolist())
    ]


def _all_patches_isolated(plan, image: int = 0) -> bool:
    """Whether no two of the active patches of `image` share a voxel (pairs and swaps alike)."""
    active = plan.active[image]
    corners = torch.cat([plan.corners_a[image][active], plan.corners_b[image][active]])
    apart = ((corners[:, None] - corners[None]).abs() >= torch.tensor(plan.patch_size)).any(-1)
    return bool((apart | torch.eye(len(corners), dtype=torch.bool)).all())


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("channels", [1, 3])
def test_poisson_disc_swaps_patches_that_no_other_swap_touches(spatial_dims, channels):
    shape = {2: (40, 36), 3: (16, 18, 14)}[spatial_dims]
    patch = PATCHES[spatial_dims]
    images = distinct_images(4, channels, shape)
    corrupted, permutation = context_restoration(
        images, 6, patch, generator(), placement="poisson_disc", return_permutation=True
    )
    assert_is_permutation(images, corrupted)
    assert_channels_moved_together(images, corrupted)
    assert torch.equal(apply_permutation(images, permutation), corrupted)
    plan = sample_swap_plan(shape, 4, 6, patch, generator=generator(), placement="poisson_disc")
    assert bool(plan.active.all())  # 12 small patches fit easily
    for image in range(4):
        assert _all_patches_isolated(plan, image)
    # No voxel is swapped twice: each patch holds exactly its partner's original content,
    # which uniform placement (whose swaps may overlap) does not promise.
    for swap in range(6):
        original, swapped = _patches(plan, images[0], swap), _patches(plan, corrupted[0], swap)
        assert torch.equal(swapped[0], original[1]) and torch.equal(swapped[1], original[0])
    moved = (corrupted[0] != images[0]).any(dim=0).sum()
    assert int(moved) == 12 * int(np.prod(patch))  # the patches and nothing else


def test_uniform_placement_lets_swaps_overlap_and_poisson_disc_does_not():
    # The difference the option makes, on a crowded image: 20 swaps of 6x6 in 32x32.
    uniform = sample_swap_plan((32, 32), 16, 20, 6, generator=generator(1))
    spread = sample_swap_plan((32, 32), 16, 20, 6, generator=generator(1), placement="poisson_disc")
    assert not any(_all_patches_isolated(uniform, image) for image in range(16))
    assert all(_all_patches_isolated(spread, image) for image in range(16))


def test_poisson_disc_places_fewer_swaps_where_they_do_not_fit():
    # Four 16x16 patches at most fit in 32x32 (exactly on a grid), so at most 2 swaps of 5;
    # and at least 1: the first pair is drawn as a uniform one, so no image is left as it was.
    plan = sample_swap_plan((32, 32), 64, 5, 16, generator=generator(), placement="poisson_disc")
    placed = plan.num_swaps
    assert int(placed.max()) <= 2 and int(placed.min()) >= 1
    assert all(_all_patches_isolated(plan, image) for image in range(64))
    # The placed swaps come first: a range of T leaves out swaps at the end, as uniformly.
    assert torch.equal(plan.active, torch.arange(5)[None] < placed[:, None])
    ranged = sample_swap_plan((64, 64), 32, (2, 6), 4, generator=generator(),
                              placement="poisson_disc")  # fmt: skip
    assert (
        set(ranged.num_swaps.tolist()) <= {2, 3, 4, 5, 6}
        and len(set(ranged.num_swaps.tolist())) > 1
    )


def test_poisson_disc_keeps_to_the_foreground_and_spreads_over_it():
    foreground = torch.zeros(8, 64, 64, dtype=torch.bool)
    foreground[:, 16:48, 8:56] = True
    plan = sample_swap_plan((64, 64), 8, 8, 4, generator=generator(), foreground=foreground,
                            placement="poisson_disc")  # fmt: skip
    assert bool(plan.active.all())
    for corners in (plan.corners_a, plan.corners_b):  # every patch touches the foreground
        assert bool(((corners[..., 0] > 16 - 4) & (corners[..., 0] < 48)).all())
        assert bool(((corners[..., 1] > 8 - 4) & (corners[..., 1] < 56)).all())
    assert all(_all_patches_isolated(plan, image) for image in range(8))


def test_golden_poisson_disc_plan_for_a_fixed_seed():
    plan = sample_swap_plan((16, 16), 1, 2, 4, generator=generator(0), placement="poisson_disc")
    assert plan.corners_a.tolist() == GOLDEN_POISSON_A
    assert plan.corners_b.tolist() == GOLDEN_POISSON_B
    again = sample_swap_plan((16, 16), 1, 2, 4, generator=generator(0), placement="poisson_disc")
    assert torch.equal(again.corners_a, plan.corners_a)


GOLDEN_POISSON_A = [[[5, 11], [0, 0]]]
GOLDEN_POISSON_B = [[[1, 4], [11, 5]]]


def test_swaps_are_sequential_and_undo_in_reverse():
    images = distinct_images(2, 3, (20, 20))
    plan = sample_swap_plan((20, 20), 2, 15, 6, generator=generator(3))
    corrupted = apply_swap_plan(images, plan)
    assert torch.equal(undo_swap_plan(corrupted, plan), images)
    # Applying swap by swap gives the same result as the whole plan.
    step_by_step = images
    for t in range(15):
        one = SwapPlan(
            plan.corners_a[:, t : t + 1],
            plan.corners_b[:, t : t + 1],
            plan.active[:, t : t + 1],
            plan.patch_size,
            plan.spatial_shape,
        )
        step_by_step = apply_swap_plan(step_by_step, one)
    assert torch.equal(step_by_step, corrupted)


def test_a_single_swap_moves_exactly_the_two_patches():
    images = distinct_images(1, 1, (12, 12))
    plan = sample_swap_plan((12, 12), 1, 1, (3, 5), generator=generator(1))
    (ay, ax), (by, bx) = plan.corners_a[0, 0].tolist(), plan.corners_b[0, 0].tolist()
    out = apply_swap_plan(images, plan)
    expected = images.clone()
    expected[..., ay : ay + 3, ax : ax + 5] = images[..., by : by + 3, bx : bx + 5]
    expected[..., by : by + 3, bx : bx + 5] = images[..., ay : ay + 3, ax : ax + 5]
    assert torch.equal(out, expected)


def _swap_by_slices(images: torch.Tensor, plan: SwapPlan) -> torch.Tensor:
    """The plan, image by image and swap by swap, with plain slices: the oracle."""
    out = images.clone()
    for b in range(images.shape[0]):
        for t in range(plan.active.shape[1]):
            if not plan.active[b, t]:
                continue
            a, z = (
                (b, slice(None), *(slice(c, c + n) for c, n in zip(corner, plan.patch_size)))
                for corner in (plan.corners_a[b, t].tolist(), plan.corners_b[b, t].tolist())
            )
            patch_a = out[a].clone()
            out[a] = out[z]
            out[z] = patch_a
    return out


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_batched_swaps_equal_slice_by_slice_swaps_in_every_image_and_channel(spatial_dims):
    shape, patch = SHAPES[spatial_dims], PATCHES[spatial_dims]
    images = distinct_images(3, 2, shape)
    plan = sample_swap_plan(shape, 3, (2, 7), patch, generator=generator(5))
    assert not plan.active.all()  # some images skip their last swaps
    expected = _swap_by_slices(images, plan)
    assert torch.equal(apply_swap_plan(images, plan), expected)
    # Into a buffer that starts inside a larger tensor (a storage offset), and in place there.
    storage = torch.zeros(3, *images.shape)
    assert torch.equal(apply_swap_plan(images, plan, out=storage[1]), expected)
    assert storage[0].eq(0).all() and storage[2].eq(0).all()  # nothing written outside
    storage[1].copy_(images)
    assert torch.equal(apply_swap_plan(storage[1], plan, out=storage[1]), expected)


def test_inactive_swaps_are_the_identity():
    images = torch.rand(3, 1, 16, 16)
    plan = sample_swap_plan((16, 16), 3, 5, 4, generator=generator())
    none = SwapPlan(plan.corners_a, plan.corners_b, torch.zeros_like(plan.active), (4, 4), (16, 16))
    assert torch.equal(apply_swap_plan(images, none), images)


def test_num_swaps_range_is_drawn_per_image():
    plan = sample_swap_plan((32, 32), 64, (2, 9), 4, generator=generator())
    counts = plan.num_swaps
    assert int(counts.min()) >= 2 and int(counts.max()) <= 9
    assert len(set(counts.tolist())) > 3
    # Active swaps come first, so T_b swaps are exactly swaps 0..T_b-1.
    assert torch.equal(plan.active, torch.arange(9)[None] < counts[:, None])


def test_foreground_threshold_avoids_pure_background_patches():
    images = torch.zeros(8, 1, 64, 64)
    images[:, :, 20:44, 20:44] = torch.rand(8, 1, 24, 24) + 0.5  # foreground square
    plan = sample_swap_plan(
        (64, 64), 8, 20, 8, generator=generator(), foreground=(images > 0.1).any(dim=1)
    )
    for corners in (plan.corners_a, plan.corners_b):
        # A patch touches the square iff its corner lies in (20 - 8, 44) on both axes.
        assert bool(((corners > 12) & (corners < 44)).all())
    corrupted = context_restoration(images, 20, 8, generator(), foreground_threshold=0.1)
    assert_is_permutation(images, corrupted)
    # Without the threshold most patches would fall in the background.
    plain = sample_swap_plan((64, 64), 8, 20, 8, generator=generator())
    assert not bool(((plain.corners_a > 12) & (plain.corners_a < 44)).all())
    # The foreground given as a mask swaps exactly as its threshold does, whatever the values.
    lifted = images + 1  # every voxel above the threshold now: only the mask knows the body
    masked = context_restoration(lifted, 20, 8, generator(), foreground=(images > 0.1).any(1))
    torch.testing.assert_close(masked - 1, corrupted)
    with pytest.raises(CtxRestoreError, match="the foreground or a foreground threshold, not"):
        context_restoration(images, 20, 8, foreground_threshold=0.1, foreground=images[:, 0] > 0)


@pytest.mark.parametrize(
    ("shape", "patch", "voxels"),
    [
        ((12, 12), (3, 2), [(1, 1), (9, 10)]),
        ((12, 11), (5, 1), [(4, 0), (11, 10)]),  # 5: not a power of two
        ((8, 9, 10), (2, 3, 4), [(1, 2, 3), (6, 5, 6)]),
        ((9, 8, 12), (3, 1, 7), [(0, 7, 5), (8, 0, 11)]),
    ],
)
def test_foreground_corners_are_exactly_those_whose_patch_touches_it(shape, patch, voxels):
    foreground = torch.zeros(4, *shape, dtype=torch.bool)
    # Two far-apart clusters: every touching corner has isolated partners, and enough of them
    # that no swap falls back to uniform placement.
    for voxel in voxels:
        foreground[(slice(None), *voxel)] = True
    # Brute force: a corner touches when some foreground voxel lies inside its patch.
    ranges = [s - p + 1 for s, p in zip(shape, patch)]
    touching = {corner for corner in np.ndindex(*ranges)
                if any(all(c <= v < c + p for c, v, p in zip(corner, voxel, patch))
                       for voxel in voxels)}  # fmt: skip
    plan = sample_swap_plan(shape, 4, 200, patch, generator=generator(), foreground=foreground)
    drawn = {tuple(c) for c in torch.cat([plan.corners_a, plan.corners_b]).view(-1, len(shape))
             .tolist()}  # fmt: skip
    assert drawn == touching  # none outside, and every touching corner is reachable


def test_an_image_without_foreground_is_corrupted_uniformly_beside_others():
    images = torch.zeros(2, 1, 32, 32)
    images[0, :, 8:24, 8:24] = 1.0
    plan = sample_swap_plan((32, 32), 2, 50, 4, generator=generator(),
                            foreground=(images > 0.5).any(dim=1))  # fmt: skip
    corners = torch.cat([plan.corners_a[1], plan.corners_b[1]])
    assert bool((corners < 5).any()) and bool((corners > 23).any())  # all over the image
    inside = torch.cat([plan.corners_a[0], plan.corners_b[0]])
    assert bool(((inside > 4) & (inside < 24)).all())


def test_foreground_falls_back_to_uniform_when_too_small_for_a_pair():
    images = torch.zeros(2, 1, 32, 32)
    images[0, 0, 0, 0] = 1.0  # a single bright voxel: no isolated pair can touch it twice
    corrupted = context_restoration(images, 5, 4, generator(), foreground_threshold=0.5)
    assert_is_permutation(images, corrupted)


def test_works_on_the_generator_device_and_matches_cpu_plan_on_cpu():
    images = torch.rand(2, 1, 16, 16)
    plan = sample_swap_plan((16, 16), 2, 3, 4, generator=generator(5))
    assert plan.corners_a.device == images.device
    assert torch.equal(
        apply_swap_plan(images, plan), context_restoration(images, 3, 4, generator(5))
    )


def test_permutation_matches_on_large_batches():
    images = torch.rand(16, 1, 64, 64)
    corrupted, permutation = context_restoration(
        images, 20, 16, generator(), return_permutation=True
    )
    assert torch.equal(apply_permutation(images, permutation), corrupted)


def test_swap_permutation_equals_apply_on_index_image():
    plan = sample_swap_plan((8, 8), 2, 4, 2, generator=generator())
    permutation = swap_permutation(plan)
    index_image = torch.arange(64.0).view(1, 1, 8, 8).expand(2, 1, 8, 8)
    assert torch.equal(apply_swap_plan(index_image, plan).flatten(1).long(), permutation)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(images=torch.rand(2, 1, 20, 20), patch_size=11), "does not fit twice"),
        (dict(images=torch.rand(2, 1, 20, 20), patch_size=(4, 4, 4)), "3 entries"),
        (dict(images=torch.rand(2, 1, 20, 20), patch_size=0), ">= 1"),
        (dict(images=torch.rand(2, 1, 20, 20), patch_size=30), "larger than the image"),
        (dict(images=torch.rand(1, 20, 20)), "got shape \\(1, 20, 20\\)"),
        (dict(images=torch.rand(1, 1, 1, 1, 20, 20)), "6 dimensions"),
        (dict(images=torch.randint(0, 9, (1, 1, 20, 20))), "floating point"),
        (dict(images=np.zeros((1, 1, 20, 20), np.float32)), "torch.Tensor"),
        (dict(images=torch.rand(2, 1, 20, 20), num_swaps=0), "T must be >= 1"),
        (dict(images=torch.rand(2, 1, 20, 20), num_swaps=(5, 2)), "min <= max"),
        (dict(images=torch.rand(2, 1, 20, 20), num_swaps=(1, 2, 3)), "pair"),
        (
            dict(images=torch.rand(2, 1, 20, 20), placement="grid"),
            "unknown placement 'grid'; placements: uniform, poisson_disc",
        ),
    ],
)
def test_bad_arguments_raise_value_errors_that_say_what_is_allowed(kwargs, message):
    arguments = dict(num_swaps=3, patch_size=4) | kwargs
    images = arguments.pop("images")
    with pytest.raises(ValueError, match=message):
        context_restoration(images, generator=generator(), **arguments)


def test_error_type_is_the_projects_own():
    with pytest.raises(CtxRestoreError):
        context_restoration(torch.rand(1, 1, 8, 8), 1, 5, generator())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_out_buffer_and_in_place_match_the_new_tensor(spatial_dims):
    images = torch.rand(2, 3, *SHAPES[spatial_dims])
    expected = context_restoration(images, 6, PATCHES[spatial_dims], generator(4))
    buffer = torch.empty_like(images)
    result = context_restoration(images, 6, PATCHES[spatial_dims], generator(4), out=buffer)
    assert result is buffer and torch.equal(buffer, expected)
    in_place = images.clone()
    context_restoration(in_place, 6, PATCHES[spatial_dims], generator(4), out=in_place)
    assert torch.equal(in_place, expected)


def test_channels_last_input_gives_the_same_result():
    images = torch.rand(4, 3, 16, 16)
    expected = context_restoration(images, 5, 4, generator(2))
    strided = images.contiguous(memory_format=torch.channels_last)
    assert torch.equal(context_restoration(strided, 5, 4, generator(2)), expected)


def test_bad_out_buffer_is_refused():
    images = torch.rand(2, 1, 16, 16)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        context_restoration(images, 2, 4, generator(), out=torch.empty(2, 1, 16, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_on_a_gpu_the_corruption_is_the_permutation_it_returns(spatial_dims):
    images = distinct_images(3, 4, SHAPES[spatial_dims]).cuda()

    def corrupt(batch):
        cuda_generator = torch.Generator(device="cuda").manual_seed(0)
        return context_restoration(
            batch, 10, PATCHES[spatial_dims], cuda_generator, return_permutation=True
        )

    corrupted, permutation = corrupt(images)
    assert corrupted.device == images.device and corrupted.dtype == images.dtype
    assert torch.equal(apply_permutation(images, permutation), corrupted)
    assert not torch.equal(corrupted, images)
    assert_channels_moved_together(images.cpu(), corrupted.cpu())
    assert torch.equal(corrupt(images)[0], corrupted)  # same seed, same output
    in_bf16, _ = corrupt(images.to(torch.bfloat16))  # the plan does not depend on the dtype
    assert in_bf16.dtype == torch.bfloat16
    assert torch.equal(in_bf16, corrupted.to(torch.bfloat16))
