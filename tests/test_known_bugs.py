"""The four bugs of public reimplementations (METHOD.md), each caught by a check written for it.

Each test runs the check on a faithful copy of the buggy code (it must fail) and on ctxrestore
(it must pass), so a regression to any of these bugs fails the suite.
"""

import numpy as np
import pytest
import torch
from corruption_checks import (
    assert_is_permutation,
    assert_pairs_isolated,
    assert_target_is_original,
    distinct_images,
)

from ctxrestore.corruption import context_restoration, sample_swap_plan
from ctxrestore.pretext import create_pretext

SHAPE, PATCH, SWAPS = (16, 16), (6, 6), 12


def buggy_identical_only_sampler(rng, batch):
    """Bug 1: the overlap check only rejects identical corners (as TorchIO's RandomSwap)."""
    corners_a = torch.zeros(batch, SWAPS, 2, dtype=torch.long)
    corners_b = torch.zeros_like(corners_a)
    for b in range(batch):
        for t in range(SWAPS):
            while True:
                a = rng.integers(0, 16 - 6 + 1, 2)
                c = rng.integers(0, 16 - 6 + 1, 2)
                if not np.array_equal(a, c):
                    break
            corners_a[b, t], corners_b[b, t] = torch.from_numpy(a), torch.from_numpy(c)
    return corners_a, corners_b


def buggy_swap(image, plan, *, read_from_original=False, tuple_swap_on_views=False):
    """Bugs 2 and 3, on one numpy image (C, H, W) and a plan of one image."""
    out = image.copy()
    for (ay, ax), (by, bx) in zip(plan.corners_a[0].tolist(), plan.corners_b[0].tolist()):
        region_a = (slice(None), slice(ay, ay + 6), slice(ax, ax + 6))
        region_b = (slice(None), slice(by, by + 6), slice(bx, bx + 6))
        if read_from_original:  # bug 2: both patches copied from the original image
            out[region_a], out[region_b] = image[region_b], image[region_a]
        elif tuple_swap_on_views:  # bug 3: `a, b = b, a` on views duplicates content
            view_a, view_b = out[region_a], out[region_b]
            view_a[...], view_b[...] = view_b, view_a
        else:
            out[region_a], out[region_b] = out[region_b].copy(), out[region_a].copy()
    return out


def test_bug1_partial_overlap_is_caught():
    corners_a, corners_b = buggy_identical_only_sampler(np.random.default_rng(0), 8)
    with pytest.raises(AssertionError, match="overlap"):
        assert_pairs_isolated(corners_a, corners_b, PATCH)
    plan = sample_swap_plan(SHAPE, 8, SWAPS, PATCH, generator=torch.Generator().manual_seed(0))
    assert_pairs_isolated(plan.corners_a, plan.corners_b, PATCH)


@pytest.mark.parametrize("bug", ["read_from_original", "tuple_swap_on_views"])
def test_bugs_2_and_3_duplicated_content_is_caught(bug):
    images = distinct_images(1, 2, SHAPE)
    plan = sample_swap_plan(SHAPE, 1, SWAPS, PATCH, generator=torch.Generator().manual_seed(1))
    correct = torch.from_numpy(buggy_swap(images[0].numpy(), plan))[None]
    assert_is_permutation(images, correct)  # the reference loop itself is right
    broken = torch.from_numpy(buggy_swap(images[0].numpy(), plan, **{bug: True}))[None]
    with pytest.raises(AssertionError, match="not a permutation"):
        assert_is_permutation(images, broken)
    ours = context_restoration(images, SWAPS, PATCH, torch.Generator().manual_seed(1))
    assert torch.equal(ours, correct)


def test_bug4_corrupted_target_is_caught():
    images = torch.rand(4, 1, 32, 32)
    generator = torch.Generator().manual_seed(0)
    corrupted = context_restoration(images, 5, 4, generator)
    with pytest.raises(AssertionError, match="target is not the original"):
        assert_target_is_original(images, corrupted, corrupted)  # the bug: target = input
    pretext = create_pretext("context_restoration", num_swaps=5, patch_size=4)
    inputs, targets = pretext.make_batch(images, torch.Generator().manual_seed(0))
    assert_target_is_original(images, inputs, targets)
