"""Patch pairs for the relative-position pretext (Doersch, Gupta, Efros, ICCV 2015).

Per image, a 3x3 grid of cells (3x3x3 for volumes) is laid at a random position that fits.
The centre cell's patch (the anchor) and the patch of one of its 8 (26) neighbours, chosen
uniformly, form the pair; the label is the neighbour's index in `neighbour_offsets`.

Cells have side `patch_size + gap`, and each patch sits in the middle of its cell, shifted by
up to `jitter` voxels along every axis independently. Doersch et al. left gaps (half a patch)
and jittered patches (up to 7 of 96 pixels) so that the network cannot solve the task from
trivial cues, such as lines continuing across the patch border, instead of from what the patch
shows. Defaults here: gap = patch_size // 4 and jitter = patch_size // 8 (so gap 4, jitter 2
for 16-voxel patches). `jitter <= gap // 2` is required: every patch then stays inside its own
cell, so the two patches never overlap and are at least `gap - 2 * jitter` voxels apart.

The grid spans 3 * (patch_size + gap) voxels per axis; the images must be at least that large.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch

from ctxrestore.errors import CtxRestoreError

GRID = 3  # cells per axis: the anchor and one neighbour on each side


def neighbour_offsets(spatial_dims: int) -> torch.Tensor:
    """(3**D - 1, D) int64: the cell offset (-1, 0 or 1 per axis) of each label, in raster
    order without the centre; e.g. 2D label 0 is (-1, -1) (up-left), label 4 is (0, 1) (right).
    """
    offsets = [
        offset for offset in itertools.product((-1, 0, 1), repeat=spatial_dims) if any(offset)
    ]
    return torch.tensor(offsets, dtype=torch.long)


def _per_axis(name: str, value: int | Sequence[int], spatial_dims: int) -> tuple[int, ...]:
    if isinstance(value, bool):
        raise CtxRestoreError(f"{name} must be an int or one int per axis, got {value!r}")
    if isinstance(value, int):
        return (value,) * spatial_dims
    values = tuple(value)
    if len(values) != spatial_dims or not all(isinstance(v, int) for v in values):
        raise CtxRestoreError(
            f"{name} {value!r} must be one int or {spatial_dims} ints (one per spatial axis)"
        )
    return values


def resolve_grid(
    patch_size: int | Sequence[int],
    spatial_dims: int,
    gap: int | Sequence[int] | None = None,
    jitter: int | Sequence[int] | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(patch, gap, jitter), one int per axis, with the defaults filled in and checked."""
    patch = _per_axis("patch_size", patch_size, spatial_dims)
    if min(patch) < 1:
        raise CtxRestoreError(f"patch_size {patch_size!r} must be >= 1 along every axis")
    gaps = tuple(p // 4 for p in patch) if gap is None else _per_axis("gap", gap, spatial_dims)
    jitters = (
        tuple(p // 8 for p in patch)
        if jitter is None
        else _per_axis("jitter", jitter, spatial_dims)
    )
    if min(gaps) < 0 or min(jitters) < 0:
        raise CtxRestoreError(f"gap {gap!r} and jitter {jitter!r} must be >= 0")
    if any(j > g // 2 for g, j in zip(gaps, jitters)):
        raise CtxRestoreError(
            f"jitter {jitters} must be <= gap // 2 {tuple(g // 2 for g in gaps)} along every "
            "axis, so that each patch stays inside its cell; lower the jitter or widen the gap"
        )
    return patch, gaps, jitters


def _flat_offsets(patch: Sequence[int], strides: Sequence[int], device) -> torch.Tensor:
    """(prod(patch),) flat offsets of every voxel of a patch from its corner, in raster order."""
    offsets = torch.zeros((), dtype=torch.long, device=device)
    for axis, (size, stride) in enumerate(zip(patch, strides)):
        view = [1] * len(patch)
        view[axis] = size
        offsets = offsets + (torch.arange(size, device=device) * stride).view(view)
    return offsets.reshape(-1)


def sample_patch_pairs(
    images: torch.Tensor,
    patch_size: int | Sequence[int],
    generator: torch.Generator,
    *,
    gap: int | Sequence[int] | None = None,
    jitter: int | Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one (anchor, neighbour) patch pair per image (Doersch et al. 2015).

    Args:
        images: (B, C, H, W) or (B, C, D, H, W), any dtype, on any device.
        patch_size: patch side, one int or one per spatial axis.
        generator: the only source of randomness (drawn on its device).
        gap: voxels between neighbouring cells' patches (default patch_size // 4).
        jitter: largest shift of a patch from its cell's middle (default patch_size // 8);
            at most gap // 2.

    Returns:
        pairs: (B, 2 * C, *patch): the anchor's C channels, then the neighbour's, all channels
            of a patch from the same voxels.
        labels: (B,) int64, the neighbour's index in `neighbour_offsets(D)`.
    """
    if images.ndim not in (4, 5):
        raise CtxRestoreError(
            f"images must be (B, C, H, W) or (B, C, D, H, W), got shape {tuple(images.shape)}"
        )
    batch, channels, *shape = images.shape
    dims = len(shape)
    patch, gaps, jitters = resolve_grid(patch_size, dims, gap, jitter)
    cells = [p + g for p, g in zip(patch, gaps)]
    extent = [GRID * c for c in cells]
    if any(e > s for e, s in zip(extent, shape)):
        raise CtxRestoreError(
            f"a {'x'.join(['3'] * dims)} grid of cells of side patch_size {patch} + gap {gaps} "
            f"needs images of at least {tuple(extent)} voxels, got spatial shape {tuple(shape)}; "
            "use a smaller patch_size or gap, or larger images"
        )
    device = generator.device
    origins = torch.stack(
        [
            torch.randint(0, s - e + 1, (batch,), generator=generator, device=device)
            for s, e in zip(shape, extent)
        ],
        dim=1,
    )  # (B, D): the grid's first voxel
    labels = torch.randint(0, GRID**dims - 1, (batch,), generator=generator, device=device)
    anchor_cell = torch.ones(batch, dims, dtype=torch.long, device=device)
    neighbour_cell = anchor_cell + neighbour_offsets(dims).to(device)[labels]
    cell_side = torch.tensor(cells, device=device)
    cell_corners = torch.stack([anchor_cell, neighbour_cell], 1) * cell_side  # (B, 2, D)
    # Each patch: the middle of its cell, shifted by a jitter uniform in [-jitter, jitter].
    low = torch.tensor([g // 2 - j for g, j in zip(gaps, jitters)], device=device)
    span = torch.tensor([2 * j + 1 for j in jitters], device=device)
    draw = torch.rand(batch, 2, dims, generator=generator, device=device, dtype=torch.float64)
    shifts = torch.minimum((draw * span).long(), span - 1)
    corners = origins[:, None] + cell_corners + low + shifts  # (B, 2, D): anchor, neighbour

    strides = [math.prod(shape[axis + 1 :]) for axis in range(dims)]
    corner_flat = (corners * torch.tensor(strides, device=device)).sum(-1)  # (B, 2)
    index = corner_flat[..., None] + _flat_offsets(patch, strides, device)  # (B, 2, P)
    index = index.to(images.device).view(batch, 1, -1).expand(-1, channels, -1)
    patches = images.reshape(batch, channels, -1).gather(2, index)  # (B, C, 2P)
    patches = patches.view(batch, channels, 2, *patch).transpose(1, 2)
    return patches.reshape(batch, 2 * channels, *patch), labels.to(images.device)
