"""In-painting corruption of the context encoder (Pathak et al., "Context Encoders: Feature
Learning by Inpainting", CVPR 2016): drop boxes of the image and ask the network to fill them.

Pathak et al. dropped either the central quarter of the image, several smaller "random
blocks" (possibly overlapping, covering up to 1/4 of the image), or random regions. Here:
the random blocks, as boxes of `patch_size` voxels per axis (the same unit that context
restoration swaps), as many as cover `mask_fraction` = 1/4 of the image if they did not
overlap; they may overlap, so the dropped fraction is at most 1/4.

Boxes are data (corners and sizes per image, drawn from a `torch.Generator`); `box_mask`
turns them into a voxel mask deterministically, for any number of boxes with no loop over
them. Models Genesis' in- and out-painting (`genesis.py`) use the same two functions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ctxrestore.errors import CtxRestoreError

MASK_FRACTION = 0.25  # Pathak et al.: the dropped region covers (up to) 1/4 of the image
FILLS = ("mean", "zero")


def random_integers(
    low: torch.Tensor, high: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Integers uniform in [low, high] (inclusive, elementwise, high >= low), drawn on the
    generator's device and returned on `low`'s device."""
    span = (high - low + 1).to(generator.device, torch.float64)
    fraction = torch.rand(low.shape, generator=generator, device=generator.device,
                          dtype=torch.float64)  # fmt: skip
    offset = (fraction * span).long().clamp_(max=(span - 1).long())
    return low + offset.to(low.device)


def box_mask(
    corners: torch.Tensor,
    sizes: torch.Tensor,
    spatial_shape: Sequence[int],
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, 1, *spatial) bool: True inside any active box.

    corners, sizes: (B, R, D) integers (sizes may broadcast, e.g. (1, 1, D)); box r of image
    b covers [corner, corner + size) along each axis, clipped to the image. active: optional
    (B, R) bool, False boxes are ignored (a per-image number of boxes without a branch).

    All boxes at once, by a D-dimensional difference array: +-1 at the 2^D vertices of every
    box, then a cumulative sum along each axis counts the boxes covering each voxel.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    dims = len(spatial_shape)
    batch, boxes = corners.shape[:2]
    device = corners.device
    shape = torch.tensor(spatial_shape, device=device)
    starts = corners.clamp(min=0)
    starts = torch.minimum(starts, shape)
    ends = torch.maximum(torch.minimum(corners + sizes.to(device), shape), starts)
    if active is None:
        active = torch.ones(batch, boxes, dtype=torch.bool, device=device)

    vertices = torch.tensor(list(itertools.product((0, 1), repeat=dims)), device=device)
    points = torch.where(vertices.bool(), ends[:, :, None], starts[:, :, None])  # (B, R, V, D)
    signs = 1 - 2 * (vertices.sum(dim=1) % 2)  # +1 with an even number of ends, else -1
    weights = (signs * active.to(device)[..., None]).to(torch.int32)  # (B, R, V)
    padded = tuple(s + 1 for s in spatial_shape)
    strides = torch.tensor([math.prod(padded[axis + 1 :]) for axis in range(dims)], device=device)
    flat = (points * strides).sum(dim=-1)
    counts = torch.zeros(batch, math.prod(padded), dtype=torch.int32, device=device)
    counts.scatter_add_(1, flat.reshape(batch, -1), weights.reshape(batch, -1))
    counts = counts.view(batch, *padded)
    for axis in range(1, dims + 1):
        counts = counts.cumsum(dim=axis, dtype=torch.int32)
    inside = counts[(slice(None), *(slice(0, s) for s in spatial_shape))] > 0
    return inside[:, None]


def sample_box_corners(
    sizes: torch.Tensor,
    spatial_shape: Sequence[int],
    generator: torch.Generator,
    *,
    margin: int = 0,
) -> torch.Tensor:
    """(B, R, D) corners uniform over the positions where boxes of `sizes` (B, R, D) fit in
    the image, at least `margin` voxels from its border where there is room for that."""
    shape = torch.tensor([int(s) for s in spatial_shape], device=sizes.device)
    room = (shape - sizes).clamp(min=0)
    border = torch.minimum(torch.full_like(room, margin), room // 2)
    return random_integers(border, room - border, generator)


def _box_size(patch_size: int | Sequence[int], spatial_shape: tuple[int, ...]) -> tuple[int, ...]:
    dims = len(spatial_shape)
    sizes = (patch_size,) * dims if isinstance(patch_size, int) else tuple(patch_size)
    if len(sizes) != dims or not all(isinstance(p, int) for p in sizes):
        raise CtxRestoreError(
            f"patch_size {patch_size!r} must be one int or {dims} ints (one per spatial axis "
            f"of images of spatial shape {spatial_shape})"
        )
    if any(p < 1 or p > s for p, s in zip(sizes, spatial_shape)):
        raise CtxRestoreError(
            f"patch_size {sizes} must be between 1 and the image size {spatial_shape} along "
            "every axis"
        )
    return sizes


def fill_values(images: torch.Tensor, mask: torch.Tensor, fill: str | float) -> torch.Tensor:
    """What replaces the masked voxels, broadcastable to images (B, C, *spatial).

    "mean": each image's and channel's mean over its voxels left visible (Pathak et al. filled
    the hole with the mean pixel value); "zero" or a number: that constant."""
    if fill == "mean":
        visible = (~mask).to(images.dtype)
        total = (images * visible).flatten(2).sum(dim=2)
        count = visible.flatten(2).sum(dim=2).clamp(min=1)
        return (total / count).view(*images.shape[:2], *([1] * (images.dim() - 2)))
    if fill == "zero":
        return images.new_zeros(())
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return images.new_full((), float(fill))
    raise CtxRestoreError(f"fill {fill!r} is not one of {FILLS} or a number")


def mask_regions(
    images: torch.Tensor,
    patch_size: int | Sequence[int],
    generator: torch.Generator,
    *,
    num_regions: int | None = None,
    mask_fraction: float = MASK_FRACTION,
    fill: str | float = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop random boxes of every image (the context encoder's random-block corruption).

    Args:
        images: (B, C, *spatial) float, 2D or 3D, on any device.
        patch_size: side of each dropped box, one int or one per spatial axis.
        generator: the only source of randomness.
        num_regions: boxes per image; None: as many as cover `mask_fraction` of the image if
            they did not overlap (at least 1). Boxes may overlap, as Pathak's random blocks.
        fill: "mean" (each channel's mean over the visible voxels), "zero", or a number.

    Returns:
        (masked images, same shape and dtype; mask (B, 1, *spatial) bool, True where dropped).
        Every channel is dropped at the same places.
    """
    if images.dim() not in (4, 5) or not images.is_floating_point():
        raise CtxRestoreError(
            f"images must be a float batch (B, C, H, W) or (B, C, D, H, W), got "
            f"{images.dtype} of shape {tuple(images.shape)}"
        )
    spatial_shape = tuple(images.shape[2:])
    sizes = _box_size(patch_size, spatial_shape)
    if not 0 < mask_fraction <= 1:
        raise CtxRestoreError(f"mask_fraction must be in (0, 1], got {mask_fraction}")
    if num_regions is None:
        num_regions = max(1, round(mask_fraction * math.prod(spatial_shape) / math.prod(sizes)))
    if num_regions < 1:
        raise CtxRestoreError(f"num_regions must be >= 1, got {num_regions}")
    batch = images.shape[0]
    box = torch.tensor(sizes, device=generator.device).expand(batch, num_regions, -1)
    corners = sample_box_corners(box, spatial_shape, generator)
    mask = box_mask(corners.to(images.device), box.to(images.device), spatial_shape)
    masked = torch.where(mask, fill_values(images, mask, fill), images)
    return masked, mask
