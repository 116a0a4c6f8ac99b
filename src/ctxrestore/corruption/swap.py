"""Context restoration's corruption: swap pairs of isolated patches, T times per image.

Chen et al., "Self-supervised learning for medical image analysis using image context
restoration", Medical Image Analysis 58 (2019), Sec. 3.1: pick two non-overlapping patches,
swap their contents, repeat T times; later swaps act on the result of earlier ones. The
corrupted image is a permutation of the original's pixels, so its intensity distribution is
unchanged and only the spatial context is wrong.

`sampling.sample_swap_plan` draws where to swap from an explicit `torch.Generator`;
`apply_swap_plan` here is deterministic. The same apply function run on an image of voxel
indices gives the pixel permutation, so there is one mechanism for both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ctxrestore.corruption.sampling import SwapPlan, sample_swap_plan
from ctxrestore.errors import CtxRestoreError


def _row_starts(corners: torch.Tensor, plan: SwapPlan, channels: int) -> torch.Tensor:
    """(..., B, T, C * R) offsets into the flattened (B, C, *spatial) batch of the first voxel of
    every row of every patch; a row is a patch's run of patch_size[-1] voxels along the last
    axis (contiguous in memory), and R = prod(patch_size[:-1]) rows make a patch."""
    shape = plan.spatial_shape
    voxels = math.prod(shape)
    strides = [math.prod(shape[axis + 1 :]) for axis in range(len(shape))]
    device = corners.device
    # Offsets of each row's first voxel from the patch corner, then of each channel.
    offsets = torch.zeros((), dtype=torch.long, device=device)
    for axis, (size, stride) in enumerate(zip(plan.patch_size[:-1], strides[:-1])):
        view = [1] * (len(shape) - 1)
        view[axis] = size
        offsets = offsets + (torch.arange(size, device=device) * stride).view(view)
    channel_offsets = torch.arange(channels, device=device) * voxels
    offsets = (channel_offsets[:, None] + offsets.reshape(1, -1)).reshape(-1)  # (C * R,)
    batch = corners.shape[-3]
    image_offsets = torch.arange(batch, device=device) * (channels * voxels)
    corner_flat = (corners * torch.tensor(strides, device=device)).sum(dim=-1)  # (..., B, T)
    return (corner_flat + image_offsets[:, None])[..., None] + offsets


def _swap_rows(plan: SwapPlan, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, B * 2 * C * R) row starts: step t writes rows `targets[t]` of the flattened batch
    from its rows `sources[t]`, all images and channels at once.

    Both patches of a pair move in one indexed copy ([a|b] <- [b|a]); this is safe because
    the two patches of a pair never overlap.
    """
    # An inactive swap exchanges patch a with itself: a no-op without a branch per image.
    corners_b = torch.where(plan.active[..., None], plan.corners_b, plan.corners_a)
    rows_a, rows_b = _row_starts(torch.stack([plan.corners_a, corners_b]), plan, channels)
    steps = plan.active.shape[1]
    sources = torch.cat([rows_b, rows_a], -1).transpose(0, 1).reshape(steps, -1)
    targets = torch.cat([rows_a, rows_b], -1).transpose(0, 1).reshape(steps, -1)
    return sources, targets


def apply_swap_plan(
    images: torch.Tensor, plan: SwapPlan, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Swap the plan's patch pairs in order; deterministic, any dtype, all channels at once.

    images: (B, C, *spatial). Returns a new contiguous tensor, or writes into `out` (a
    contiguous tensor of the same shape; `out=images` swaps in place). Reusing a buffer saves
    the allocation, which on CPU costs more than the swaps for large volumes. Only the T swaps
    are looped over; each is one row gather and one row scatter over the whole batch.
    """
    batch, channels = images.shape[:2]
    if tuple(images.shape[2:]) != plan.spatial_shape or plan.active.shape[0] != batch:
        raise CtxRestoreError(
            f"swap plan is for {plan.active.shape[0]} images of spatial shape "
            f"{plan.spatial_shape}, got a batch of shape {tuple(images.shape)}"
        )
    if out is None:
        out = torch.empty_like(images, memory_format=torch.contiguous_format)
    elif out.shape != images.shape or out.dtype != images.dtype or not out.is_contiguous():
        raise CtxRestoreError(
            f"out must be a contiguous {images.dtype} tensor of shape {tuple(images.shape)}, "
            f"got {out.dtype} {tuple(out.shape)} (contiguous: {out.is_contiguous()})"
        )
    if out is not images:
        out.copy_(images)
    sources, targets = _swap_rows(plan.to(images.device), channels)
    # Every run of `run` consecutive values of the batch, as the rows of one (overlapping)
    # view: a patch row is then one index, and its voxels move as one contiguous copy, 3x
    # faster than indexing voxel by voxel (README, corruption benchmark). The rows written in
    # one step never share memory (the pair's patches do not overlap), so the overlap of the
    # view is never written through twice.
    run = plan.patch_size[-1]
    flat = out.view(-1)
    rows = flat.as_strided((flat.numel() - run + 1, run), (1, 1))
    for step in range(sources.shape[0]):
        rows.index_copy_(0, targets[step], rows.index_select(0, sources[step]))
    return out


def undo_swap_plan(images: torch.Tensor, plan: SwapPlan) -> torch.Tensor:
    """Inverse of `apply_swap_plan`: the same swaps, in reverse order."""
    reverse = SwapPlan(
        plan.corners_a.flip(1),
        plan.corners_b.flip(1),
        plan.active.flip(1),
        plan.patch_size,
        plan.spatial_shape,
    )
    return apply_swap_plan(images, reverse)


def swap_permutation(plan: SwapPlan, device: torch.device | str | None = None) -> torch.Tensor:
    """(B, N) int64 with corrupted.flatten(2)[b, :, i] == original.flatten(2)[b, :, perm[b, i]].

    N = prod(spatial_shape). Computed by swapping an image of voxel indices.
    """
    device = plan.corners_a.device if device is None else device
    batch = plan.active.shape[0]
    count = math.prod(plan.spatial_shape)
    index_image = torch.arange(count, device=device).view(1, 1, *plan.spatial_shape)
    return apply_swap_plan(index_image.expand(batch, 1, *plan.spatial_shape), plan).flatten(1)


def apply_permutation(images: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """images: (B, C, *spatial), permutation: (B, N) -> images gathered voxel-wise."""
    batch, channels = images.shape[:2]
    flat = images.reshape(batch, channels, -1)
    index = permutation.to(images.device)[:, None, :].expand(-1, channels, -1)
    return flat.gather(2, index).view_as(images)


def invert_permutation(permutation: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, N) inverse, so that apply_permutation(corrupted, inverse) restores."""
    inverse = torch.empty_like(permutation)
    positions = torch.arange(permutation.shape[1], device=permutation.device)
    inverse.scatter_(1, permutation, positions.expand_as(permutation))
    return inverse


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise CtxRestoreError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() not in (4, 5):
        raise CtxRestoreError(
            f"images must be a batch (B, C, H, W) or (B, C, D, H, W), got shape "
            f"{tuple(images.shape)} with {images.dim()} dimensions"
        )
    if not images.is_floating_point():
        raise CtxRestoreError(
            f"images must be floating point (float16/bfloat16/float32/float64), got {images.dtype}"
        )


def threshold_foreground(
    images: torch.Tensor, foreground_threshold: float | None
) -> torch.Tensor | None:
    """(B, C, *spatial) -> (B, *spatial) bool, where some channel exceeds the threshold; None
    without one."""
    if foreground_threshold is None:
        return None
    return (images > foreground_threshold).any(dim=1)


def context_restoration(
    images: torch.Tensor,
    num_swaps: int | Sequence[int],
    patch_size: int | Sequence[int],
    generator: torch.Generator | None = None,
    *,
    foreground_threshold: float | None = None,
    foreground: torch.Tensor | None = None,
    placement: str = "uniform",
    return_permutation: bool = False,
    out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Corrupt a batch by swapping isolated patch pairs (Chen et al. 2019).

    Args:
        images: (B, C, H, W) or (B, C, D, H, W) float, on any device.
        num_swaps: T swaps per image, or a (min, max) range drawn per image.
        patch_size: patch length, one int or one per spatial axis.
        generator: source of all randomness; the plan is sampled on its device. None uses
            torch's default CPU generator, so `torch.manual_seed` makes runs reproducible.
        foreground_threshold: if given, a voxel is foreground when any channel exceeds it, and
            patches lying wholly in the background are avoided.
        foreground: instead of a threshold, the foreground itself, (B, *spatial) bool: for
            images whose intensities were shifted and noised (augmented views), where any
            threshold would call the air foreground.
        placement: "uniform" (the paper's: each pair isolated, swaps independent) or
            "poisson_disc" (all 2T patches isolated and spread; fewer swaps where they do not
            fit); see `sampling`.
        return_permutation: also return the (B, N) voxel permutation (see `swap_permutation`).
        out: optional contiguous buffer of the same shape and dtype to write into; `images`
            itself swaps in place.

    Returns:
        The corrupted batch, same shape, dtype and device; and the permutation if asked.
    """
    _check_images(images)
    if generator is None:
        generator = torch.default_generator
    if foreground is not None and foreground_threshold is not None:
        raise CtxRestoreError("give the foreground or a foreground threshold, not both")
    if foreground_threshold is not None:
        foreground = threshold_foreground(images, foreground_threshold)
    plan = sample_swap_plan(
        images.shape[2:],
        images.shape[0],
        num_swaps,
        patch_size,
        generator=generator,
        foreground=foreground,
        placement=placement,
    )
    corrupted = apply_swap_plan(images, plan, out=out)
    if return_permutation:
        return corrupted, swap_permutation(plan, device=images.device)
    return corrupted
