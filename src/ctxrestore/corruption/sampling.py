"""Where to swap: draw T pairs of isolated (non-overlapping) patches per image.

The sampler only decides corners; `swap.apply_swap_plan` applies them deterministically.

Two placements (PLACEMENTS):
- "uniform" (the paper's): each pair is drawn exactly uniformly over all isolated pairs, with
  no rejection loop: corner a is drawn with weight equal to its number of isolated partners,
  then b uniformly among those partners. This stays exact for patches up to half the image,
  where almost every random pair would overlap. Patches of different swaps may overlap.
- "poisson_disc" (Dominic et al. 2023, who found it best for context restoration with 32x32
  patches): all 2T patches are isolated from each other, drawn by dart throwing (random
  sequential addition, the simplest Poisson-disc sampler: a random corner is kept when its
  patch overlaps none kept so far), then paired in the order drawn. The swaps spread over the
  image and no voxel is swapped twice. The first pair is drawn as a uniform one, so every
  image is swapped at least once; when 2T patches do not fit (the kept ones jam the image),
  the swaps that could not be placed are left out (`SwapPlan.active`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ctxrestore.errors import CtxRestoreError

PLACEMENTS = ("uniform", "poisson_disc")
# Poisson-disc placement: candidate corners drawn per patch wanted. Where 2T patches do not
# fit, 4 times as many place 1-9% more swaps (32x32 at 128 px, T=5: 3.6 against 3.3; 8x8 at
# 64 px, T=20: 17.4 against 16.4) at 1.5-4 times the cost (batches of 64, one CPU thread).
DARTS_PER_PATCH = 16

# Foreground-aware placement: rejection rounds of CANDIDATES pairs drawn among foreground
# patches; a swap still unplaced after MAX_ROUNDS (tiny foreground) is placed uniformly.
CANDIDATES = 16
MAX_ROUNDS = 4


@dataclass(frozen=True)
class SwapPlan:
    """Where each of T swaps of each of B images happens.

    corners_a, corners_b: (B, T, D) int64, the first voxel of each patch along each spatial axis.
    active: (B, T) bool; swap t of image b is applied when True (lets T vary per image).
    """

    corners_a: torch.Tensor
    corners_b: torch.Tensor
    active: torch.Tensor
    patch_size: tuple[int, ...]
    spatial_shape: tuple[int, ...]

    @property
    def num_swaps(self) -> torch.Tensor:
        """(B,) number of swaps applied to each image."""
        return self.active.sum(dim=1)

    def to(self, device: torch.device | str) -> SwapPlan:
        return SwapPlan(
            self.corners_a.to(device),
            self.corners_b.to(device),
            self.active.to(device),
            self.patch_size,
            self.spatial_shape,
        )


def normalize_patch_size(
    patch_size: int | Sequence[int], spatial_shape: Sequence[int]
) -> tuple[int, ...]:
    """One patch length per spatial axis; checks that two isolated patches fit."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    dims = len(spatial_shape)
    if isinstance(patch_size, int):
        sizes = (patch_size,) * dims
    else:
        sizes = tuple(int(p) for p in patch_size)
        if len(sizes) != dims:
            raise CtxRestoreError(
                f"patch_size {tuple(patch_size)} has {len(sizes)} entries but the images have "
                f"{dims} spatial axes {spatial_shape}; give one int or {dims} ints"
            )
    if any(p < 1 for p in sizes):
        raise CtxRestoreError(f"patch_size {sizes} must be >= 1 along every axis")
    if any(p > s for p, s in zip(sizes, spatial_shape)):
        raise CtxRestoreError(
            f"patch_size {sizes} is larger than the image {spatial_shape} along some axis"
        )
    if not any(2 * p <= s for p, s in zip(sizes, spatial_shape)):
        largest = tuple(s // 2 for s in spatial_shape)
        raise CtxRestoreError(
            f"patch_size {sizes} does not fit twice without overlap in images of spatial shape "
            f"{spatial_shape}: at least one axis needs size >= 2 * patch; use a patch_size "
            f"with some axis <= {largest} or larger images"
        )
    return sizes


def normalize_num_swaps(num_swaps: int | Sequence[int]) -> tuple[int, int]:
    """(lowest, highest) T; an int means a fixed T."""
    if isinstance(num_swaps, bool):
        raise CtxRestoreError(
            f"num_swaps must be an int >= 1 or a (min, max) pair, got {num_swaps}"
        )
    if isinstance(num_swaps, int):
        low = high = num_swaps
    else:
        values = tuple(num_swaps)
        if len(values) != 2 or not all(isinstance(v, int) for v in values):
            raise CtxRestoreError(
                f"num_swaps must be an int >= 1 or a (min, max) pair of ints, got {num_swaps!r}"
            )
        low, high = values
    if low < 1 or high < low:
        raise CtxRestoreError(
            f"num_swaps {num_swaps!r} is not allowed: T must be >= 1 (and min <= max for a range)"
        )
    return low, high


def _uniform_below(upper: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Integers uniform in [0, upper) elementwise, for a tensor of upper bounds (all >= 1)."""
    fraction = torch.rand(
        upper.shape, generator=generator, device=upper.device, dtype=torch.float64
    )
    return (fraction * upper).long().clamp_(max=upper - 1)


def _unravel(flat: torch.Tensor, ranges: Sequence[int]) -> torch.Tensor:
    axes = []
    for r in reversed(ranges):
        axes.append(flat % r)
        flat = flat // r
    return torch.stack(axes[::-1], dim=-1)


def _overlap_box(corners: torch.Tensor, patch: torch.Tensor, ranges: torch.Tensor):
    """Per axis, the corners whose patch overlaps the patch at `corners`: [low, low + length)."""
    low = (corners - patch + 1).clamp(min=0)
    high = torch.minimum(corners + patch - 1, ranges - 1)
    return low, high - low + 1


@functools.lru_cache(maxsize=8)
def _partner_table(
    ranges: tuple[int, ...], sizes: tuple[int, ...], device: str
) -> tuple[torch.Tensor, int]:
    """Cumulative count of isolated partners over all corners (flat order), and its total.

    Corner a's partners: all corners minus the box of corners whose patch overlaps a's; the
    box is separable, so the table is an outer product. Cached: it depends only on shapes,
    and building it for 3D volumes costs more than the rest of the corruption.
    """
    overlap = torch.ones((), dtype=torch.long, device=device)
    for axis, (r, p) in enumerate(zip(ranges, sizes)):
        positions = torch.arange(r, device=device)
        bounds = torch.tensor(p, device=device), torch.tensor(r, device=device)
        _, length = _overlap_box(positions, *bounds)
        view = [1] * len(ranges)
        view[axis] = r
        overlap = overlap * length.view(view)
    cumulative = (math.prod(ranges) - overlap.reshape(-1)).cumsum(0)
    return cumulative, int(cumulative[-1])


def _sample_isolated_pairs(
    count: int, ranges: tuple[int, ...], sizes: tuple[int, ...], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` ordered pairs (a, b), (count, D) each, uniform over all isolated pairs."""
    device = generator.device
    patch = torch.tensor(sizes, device=device)
    ranges_t = torch.tensor(ranges, device=device)
    cumulative, total = _partner_table(ranges, sizes, str(device))
    draw = torch.randint(0, total, (count,), generator=generator, device=device)
    a = _unravel(torch.searchsorted(cumulative, draw, right=True), ranges)

    # b uniform outside a's overlap box. The outside splits into disjoint parts, one per axis
    # d: inside the box on axes before d, outside it on axis d, anywhere on later axes.
    low, length = _overlap_box(a, patch, ranges_t)
    part_sizes = []
    for d in range(len(ranges)):
        inside = length[:, :d].prod(dim=1)
        outside = ranges_t[d] - length[:, d]
        anywhere = math.prod(ranges[d + 1 :])
        part_sizes.append(inside * outside * anywhere)
    part_sizes = torch.stack(part_sizes, dim=1)
    cumulative_parts = part_sizes.cumsum(dim=1)
    pick = _uniform_below(cumulative_parts[:, -1], generator)
    part = (pick[:, None] >= cumulative_parts).sum(dim=1, keepdim=True)

    axes = torch.arange(len(ranges), device=device)[None]
    in_box = low + _uniform_below(length, generator)
    outside = _uniform_below((ranges_t - length).clamp(min=1), generator)
    outside = outside + length * (outside >= low)  # skip over the box
    anywhere = _uniform_below(ranges_t.expand_as(a), generator)
    b = torch.where(axes < part, in_box, torch.where(axes == part, outside, anywhere))
    return a, b


def _any_in_window(mask: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """out[i] = any(mask[i : i + size]) along `axis` (length L - size + 1), for bool masks.

    Doubling: after the step of width w each entry covers [i, i + 2w); two overlapping
    windows of the largest power of two <= size then cover [i, i + size). A few bytewise ORs
    instead of cumulative sums, which torch runs several times slower along an inner axis.
    """
    width = 1
    while 2 * width <= size:
        length = mask.shape[axis] - width
        mask = mask.narrow(axis, 0, length) | mask.narrow(axis, width, length)
        width *= 2
    if width < size:
        length = mask.shape[axis] - (size - width)
        mask = mask.narrow(axis, 0, length) | mask.narrow(axis, size - width, length)
    return mask


def _foreground_counts(foreground: torch.Tensor, patch_size: tuple[int, ...]) -> torch.Tensor:
    """(B, M) int32 running count, over all valid corners in flat order, of the corners whose
    patch touches the foreground: the inverse CDF of the draw.

    Images with no foreground patch at all count every corner, so they are still corrupted.
    """
    touches = foreground.bool()
    for axis, size in enumerate(patch_size, start=1):
        touches = _any_in_window(touches, axis, size)
    # int32: exact up to 2**31 corners, beyond any volume a batch holds.
    counts = touches.flatten(1).cumsum(dim=1, dtype=torch.int32)
    corners = counts.shape[1]
    counts[counts[:, -1] == 0] = torch.arange(1, corners + 1, dtype=counts.dtype,
                                              device=counts.device)  # fmt: skip
    return counts


def _draw_weighted(counts: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """(B, count) flat corner indices drawn per image uniformly among the corners that
    `counts` (running counts, B x M) marks: the k-th marked corner, k uniform below the total."""
    totals = counts[:, -1:].to(torch.float64)
    targets = torch.rand(
        counts.shape[0], count, generator=generator, device=counts.device, dtype=torch.float64
    )
    ranks = (targets * totals).to(torch.int32)  # floor: the running counts are integers
    flat = torch.searchsorted(counts, ranks, right=True)
    return flat.clamp_(max=counts.shape[1] - 1)


def _place_in_foreground(
    counts: torch.Tensor,
    shape: tuple[int, int],
    ranges: tuple[int, ...],
    patch: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rejection rounds among foreground patches; returns (a, b, placed) of shape (B, T, ...)."""
    batch, swaps = shape
    corners_a = torch.zeros(batch, swaps, len(ranges), dtype=torch.long, device=patch.device)
    corners_b = torch.zeros_like(corners_a)
    placed = torch.zeros(batch, swaps, dtype=torch.bool, device=patch.device)
    for _ in range(MAX_ROUNDS):
        draws = [
            _unravel(_draw_weighted(counts, swaps * CANDIDATES, generator), ranges).view(
                batch, swaps, CANDIDATES, -1
            )
            for _ in range(2)
        ]
        isolated = ((draws[0] - draws[1]).abs() >= patch).any(dim=-1)  # (B, T, K)
        first = isolated.to(torch.uint8).argmax(dim=2)[..., None, None]
        found = isolated.any(dim=2) & ~placed
        for corners, drawn in zip((corners_a, corners_b), draws):
            chosen = drawn.gather(2, first.expand(-1, -1, 1, len(ranges))).squeeze(2)
            corners[found] = chosen[found]
        placed |= found
        if bool(placed.all()):
            break
    return corners_a, corners_b, placed


def check_placement(placement: str) -> str:
    if placement not in PLACEMENTS:
        raise CtxRestoreError(
            f"unknown placement '{placement}'; placements: {', '.join(PLACEMENTS)}"
        )
    return placement


def _place_poisson_disc(
    first: tuple[torch.Tensor, torch.Tensor],
    swaps: int,
    ranges: tuple[int, ...],
    patch: torch.Tensor,
    generator: torch.Generator,
    counts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dart throwing: 2T mutually isolated patches per image, paired in the order kept,
    starting from the isolated pair `first` ((B, D) each), so that every image has at least
    one swap (large patches jam the image after one dart). Darts are uniform over all corners,
    or over those `counts` marks (the foreground). Returns (a, b, placed) of shape (B, T, ...).
    """
    batch = first[0].shape[0]
    wanted = 2 * swaps
    darts = DARTS_PER_PATCH * wanted
    if counts is None:
        flat = torch.randint(
            0, math.prod(ranges), (batch, darts), generator=generator, device=patch.device
        )
    else:
        flat = _draw_weighted(counts, darts, generator)
    candidates = _unravel(flat, ranges).to(torch.int32)  # (B, darts, D); int32: faster
    reach = patch.to(torch.int32)
    kept = torch.zeros(batch, wanted, len(ranges), dtype=torch.int32, device=patch.device)
    kept[:, 0], kept[:, 1] = first
    count = torch.full((batch,), 2, dtype=torch.long, device=patch.device)
    rows = torch.arange(batch, device=patch.device)

    def overlapping(corner: torch.Tensor) -> torch.Tensor:
        return ((candidates - corner[:, None].to(torch.int32)).abs_() < reach).all(dim=-1)

    # One round per patch, not per dart: the first dart still alive is the next one a
    # sequential throw keeps; then every dart overlapping it dies.
    alive = ~(overlapping(first[0]) | overlapping(first[1]))
    for _ in range(wanted - 2):
        keep = alive.any(dim=1)
        if not bool(keep.any()):
            break
        dart = candidates[rows, alive.to(torch.uint8).argmax(dim=1)]  # (B, D)
        kept[rows[keep], count[keep]] = dart[keep]
        count += keep
        alive &= ~(overlapping(dart) & keep[:, None])
    placed = torch.arange(swaps, device=patch.device)[None] < (count // 2)[:, None]
    kept = kept.long()  # corners are int64 everywhere else
    return kept[:, 0::2], kept[:, 1::2], placed


def sample_swap_plan(
    spatial_shape: Sequence[int],
    batch_size: int,
    num_swaps: int | Sequence[int],
    patch_size: int | Sequence[int],
    *,
    generator: torch.Generator,
    foreground: torch.Tensor | None = None,
    placement: str = "uniform",
) -> SwapPlan:
    """Draw T pairs of isolated patches per image (Chen et al. 2019, Sec. 3.1).

    Args:
        spatial_shape: (H, W) or (D, H, W).
        batch_size: B.
        num_swaps: T, or a (min, max) range from which T is drawn per image (inclusive).
        patch_size: one int, or one per spatial axis.
        generator: the only source of randomness; the plan is created on its device.
        foreground: optional (B, *spatial) bool. Both patches are drawn among those touching
            the foreground, so that swaps of pure background (air, outside an ultrasound fan)
            are avoided; a swap that cannot be placed so (tiny foreground) is placed uniformly.
        placement: "uniform" or "poisson_disc" (see the module's docstring).

    With uniform placement, patches of different swaps may overlap each other: each swap acts
    on the previous result, so the composition is still a permutation.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    sizes = normalize_patch_size(patch_size, spatial_shape)
    low, high = normalize_num_swaps(num_swaps)
    check_placement(placement)
    device = generator.device
    ranges = tuple(s - p + 1 for s, p in zip(spatial_shape, sizes))
    patch = torch.tensor(sizes, device=device)
    counts = None
    if foreground is not None:
        if tuple(foreground.shape) != (batch_size, *spatial_shape):
            raise CtxRestoreError(
                f"foreground mask has shape {tuple(foreground.shape)}, expected "
                f"{(batch_size, *spatial_shape)}"
            )
        counts = _foreground_counts(foreground.to(device), sizes)

    # Uniform placement draws all T pairs so; Poisson-disc only its first, then throws darts.
    pairs = high if placement == "uniform" else 1
    corners_a, corners_b = (
        corners.view(batch_size, pairs, len(sizes))
        for corners in _sample_isolated_pairs(batch_size * pairs, ranges, sizes, generator)
    )
    if counts is not None:
        fg_a, fg_b, in_foreground = _place_in_foreground(
            counts, (batch_size, pairs), ranges, patch, generator
        )
        corners_a = torch.where(in_foreground[..., None], fg_a, corners_a)
        corners_b = torch.where(in_foreground[..., None], fg_b, corners_b)
    placed = torch.ones(batch_size, high, dtype=torch.bool, device=device)
    if placement == "poisson_disc":
        corners_a, corners_b, placed = _place_poisson_disc(
            (corners_a[:, 0], corners_b[:, 0]), high, ranges, patch, generator, counts
        )

    if low == high:
        active = placed
    else:
        drawn = torch.randint(low, high + 1, (batch_size,), generator=generator, device=device)
        active = placed & (torch.arange(high, device=device)[None, :] < drawn[:, None])
    return SwapPlan(corners_a, corners_b, active, sizes, spatial_shape)
