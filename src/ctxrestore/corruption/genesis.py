"""Models Genesis' corruptions (Zhou et al., "Models Genesis", MICCAI 2019 / Medical Image
Analysis 67, 2021): a non-linear intensity transform, local pixel shuffling, and in- or
out-painting, each applied to an image with some probability; the network restores the
original.

Batched: every image of the batch gets its own curve, blocks, boxes and decisions (boolean
masks over the batch), with no loop over images. The defaults follow the authors' public
configuration (MrGiovanni/ModelsGenesis, `config.py`): nonlinear_rate 0.9, local_rate 0.5,
paint_rate 0.9, outpaint_rate 0.8 (so in-painting for 0.2 of the painted images). Their
flip_rate 0.4 is an augmentation of input and target together, not a corruption; it is left
out (ctxrestore never flips: left and right differ in anatomy).

Where this differs from their code, on purpose:
- Local shuffling shuffles non-overlapping blocks of a grid, so the result is a permutation
  of the voxels of each block. Their 10,000 blocks are read from the original and may overlap,
  which duplicates and drops voxels (the second public context-restoration bug in METHOD.md).
- Noise is uniform over each image's own intensity range (theirs: [0, 1], the range of their
  normalised CT), so that z-scored images get noise of their own scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ctxrestore.corruption.inpainting import box_mask, random_integers, sample_box_corners
from ctxrestore.errors import CtxRestoreError

NONLINEAR_RATE = 0.9
LOCAL_RATE = 0.5
PAINT_RATE = 0.9
INPAINT_RATE = 0.2  # = 1 - outpaint_rate 0.8
INVERT_RATE = 0.5  # their curve is decreasing half of the time ("half chance to get flip")
BLOCK_RATE = 0.5  # fraction of grid blocks shuffled (theirs cover most of the image)
MAX_BOXES = 5  # in-painting: up to 5 boxes; out-painting: 1 kept box and up to 4 more
CONTINUE_RATE = 0.95  # each further box is drawn with this probability
CURVE_SAMPLES = 1000  # points on each Bezier curve (theirs: 100,000 for one image)


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() not in (4, 5):
        raise CtxRestoreError(
            f"images must be a batch (B, C, H, W) or (B, C, D, H, W), got "
            f"{getattr(images, 'shape', type(images).__name__)}"
        )
    if not images.is_floating_point():
        raise CtxRestoreError(f"images must be floating point, got {images.dtype}")


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise CtxRestoreError(f"{name} is a probability and must be in [0, 1], got {value}")


def _rand(shape: Sequence[int], generator: torch.Generator, device: torch.device):
    return torch.rand(tuple(shape), generator=generator, device=generator.device).to(device)


def _per_image(flags: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """(B,) bool -> broadcastable to images (B, C, *spatial)."""
    return flags.view(-1, *([1] * (images.dim() - 1)))


def _intensity_range(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's and channel's minimum and maximum, (B, C, 1, ...) each."""
    flat = images.flatten(2)
    shape = (*images.shape[:2], *([1] * (images.dim() - 2)))
    return flat.amin(dim=2).view(shape), flat.amax(dim=2).view(shape)


def _noise_like(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Uniform noise over each image's and channel's intensity range."""
    low, high = _intensity_range(images)
    return low + _rand(images.shape, generator, images.device).to(images.dtype) * (high - low)


def bezier_curves(
    batch: int, generator: torch.Generator, samples: int = CURVE_SAMPLES
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random increasing curve from (0, 0) to (1, 1) per image: (x, y), (B, samples) each,
    both sorted. A cubic Bezier curve with two random control points in the unit square;
    sorting x and y separately makes it monotonic (as Models Genesis does)."""
    control = torch.rand(batch, 2, 2, generator=generator, device=generator.device)
    t = torch.linspace(0, 1, samples, device=generator.device)
    basis = torch.stack([3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2], dim=0)  # (2, K)
    curve = torch.einsum("bpa,pk->bak", control, basis) + t**3  # (B, 2, K): P0 = 0, P3 = 1
    curve = curve.clamp(0, 1).sort(dim=2).values
    curve[:, :, 0], curve[:, :, -1] = 0.0, 1.0
    return curve[:, 0].contiguous(), curve[:, 1].contiguous()


def _interpolate(
    values: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Piecewise-linear y(values) per image: values (B, N) in [0, 1], nodes xs and ys (B, K)
    sorted, index (B, N) in [1, K - 1] the segment (xs[index - 1], xs[index]) of each value.
    Clamped into each segment's [y0, y1], so the result is non-decreasing even with rounding,
    and exact at 0 and 1."""
    x0, x1 = xs.gather(1, index - 1), xs.gather(1, index)
    y0, y1 = ys.gather(1, index - 1), ys.gather(1, index)
    weight = torch.where(x1 > x0, (values - x0) / (x1 - x0).clamp(min=1e-12), 1.0).clamp(0, 1)
    mapped = torch.minimum(torch.maximum(y0 + weight * (y1 - y0), y0), y1)
    mapped = torch.where(values >= 1, 1.0, mapped)
    return torch.where(values <= 0, 0.0, mapped)


def _curve_table(xs: torch.Tensor, ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The curves resampled at K evenly spaced x in [0, 1], (B, K) each: then a voxel finds
    its segment by arithmetic instead of a search (3x faster for volumes)."""
    grid = torch.linspace(0, 1, xs.shape[1], device=xs.device).expand_as(xs).contiguous()
    index = torch.searchsorted(xs, grid, right=True).clamp(1, xs.shape[1] - 1)
    return grid, _interpolate(grid, xs, ys, index)


def nonlinear_intensity(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    invert_rate: float = 0.0,
    samples: int = CURVE_SAMPLES,
) -> torch.Tensor:
    """Map intensities through a random monotonic Bezier curve, one curve per image.

    images: (B, C, *spatial). Each channel is mapped into [0, 1] by its own min-max range,
    through the image's curve, and back, so that the range maps onto itself (minimum to
    minimum, maximum to maximum) and the order of intensities is kept. With probability
    `invert_rate` an image's curve is reversed (y -> 1 - y): the order is then reversed and
    the minimum maps to the maximum. Constant channels are left as they are.
    """
    _check_images(images)
    _check_rate("invert_rate", invert_rate)
    batch = images.shape[0]
    curves = bezier_curves(batch, generator, samples)
    grid, table = (nodes.to(images.device) for nodes in _curve_table(*curves))
    invert = _rand((batch,), generator, images.device) < invert_rate
    values = images.float()
    low, high = _intensity_range(values)
    span = high - low
    unit = ((values - low) / span.clamp(min=torch.finfo(torch.float32).tiny)).clamp(0, 1)
    flat = unit.reshape(batch, -1)
    index = (flat * (samples - 1)).long().add_(1).clamp_(1, samples - 1)
    mapped = _interpolate(flat, grid, table, index).view_as(unit)
    mapped = torch.where(_per_image(invert, mapped), 1 - mapped, mapped)
    restored = torch.where(mapped >= 1, high, (low + mapped * span).clamp(max=high))
    return torch.where(span > 0, restored, values).to(images.dtype)


def _grid_axes(dims: int) -> tuple[list[int], list[int]]:
    """Positions of the block-count and within-block axes in (B, C, n0, p0, n1, p1, ...)."""
    return [2 + 2 * axis for axis in range(dims)], [3 + 2 * axis for axis in range(dims)]


def local_pixel_shuffle(
    images: torch.Tensor,
    block_size: int | Sequence[int],
    generator: torch.Generator,
    *,
    block_rate: float = BLOCK_RATE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle the voxels inside random blocks of a grid (Models Genesis' local shuffling).

    The grid of `block_size` blocks starts at a random offset (one per batch); each block of
    each image is shuffled with probability `block_rate`, by its own random permutation that
    moves all channels together. Blocks never overlap, so each is a permutation of itself.

    Returns (shuffled (B, C, *spatial); blocks (B, 1, *spatial) int64: the index of the
    shuffled block each voxel lies in, -1 for voxels left in place).
    """
    _check_images(images)
    _check_rate("block_rate", block_rate)
    spatial_shape = tuple(images.shape[2:])
    dims = len(spatial_shape)
    sizes = (block_size,) * dims if isinstance(block_size, int) else tuple(block_size)
    if len(sizes) != dims or any(p < 1 or p > s for p, s in zip(sizes, spatial_shape)):
        raise CtxRestoreError(
            f"block_size {block_size!r} must be one int or {dims} ints between 1 and the "
            f"image size {spatial_shape}"
        )
    batch, channels = images.shape[:2]
    device = images.device
    remainders = torch.tensor([s % p for s, p in zip(spatial_shape, sizes)])
    offsets = random_integers(torch.zeros_like(remainders), remainders, generator).tolist()
    counts = [(s - o) // p for s, o, p in zip(spatial_shape, offsets, sizes)]
    spans = zip(offsets, counts, sizes)
    region = (slice(None), slice(None), *(slice(o, o + n * p) for o, n, p in spans))
    count_axes, block_axes = _grid_axes(dims)
    split = [size for pair in zip(counts, sizes) for size in pair]
    order = [0, 1, *count_axes, *block_axes]
    inverse_order = [order.index(axis) for axis in range(len(order))]
    blocks_count, block_volume = math.prod(counts), math.prod(sizes)

    def to_blocks(tensor: torch.Tensor) -> torch.Tensor:  # (B, X, *S') -> (B, X, M, P)
        grid = tensor[region].reshape(tensor.shape[0], tensor.shape[1], *split)
        return grid.permute(order).reshape(tensor.shape[0], tensor.shape[1], blocks_count, -1)

    def from_blocks(blocks: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        grid = blocks.reshape(*blocks.shape[:2], *counts, *sizes).permute(inverse_order)
        out[region] = grid.reshape(out[region].shape)
        return out

    chosen = _rand((batch, blocks_count), generator, device) < block_rate
    keys = _rand((batch, blocks_count, block_volume), generator, device)
    permutation = torch.where(
        chosen[..., None], keys.argsort(dim=2), torch.arange(block_volume, device=device)
    )
    shuffled = to_blocks(images).gather(3, permutation[:, None].expand(-1, channels, -1, -1))
    out = from_blocks(shuffled, images.clone(memory_format=torch.contiguous_format))
    index = torch.where(chosen, torch.arange(blocks_count, device=device), -1)
    block_map = torch.full((batch, 1, *spatial_shape), -1, dtype=torch.long, device=device)
    from_blocks(index[:, None, :, None].expand(-1, -1, -1, block_volume), block_map)
    return out, block_map


def _painting_boxes(
    batch: int,
    spatial_shape: tuple[int, ...],
    generator: torch.Generator,
    sides: tuple[torch.Tensor, torch.Tensor],
    first_always: bool,
    max_boxes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Up to `max_boxes` boxes per image with sides in [low, high] per axis, 3 voxels from the
    border where there is room; box k is drawn while each of the first k draws < 0.95."""
    if max_boxes < 1:
        raise CtxRestoreError(f"max_boxes must be >= 1, got {max_boxes}")
    device = generator.device
    low, high = (side.to(device).expand(batch, max_boxes, -1) for side in sides)
    sizes = random_integers(low, high, generator)
    corners = sample_box_corners(sizes, spatial_shape, generator, margin=3)
    drawn = torch.rand(batch, max_boxes, generator=generator, device=device)
    active = (drawn < CONTINUE_RATE).cumprod(dim=1).bool()
    if first_always:
        active[:, 0] = True
    return corners, sizes, active


def in_painting(
    images: torch.Tensor, generator: torch.Generator, *, max_boxes: int = MAX_BOXES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill up to `max_boxes` random boxes per image with uniform noise over the image's
    intensity range (Models Genesis: box sides from 1/6 to 1/3 of the image per axis).

    Returns (painted (B, C, *spatial); mask (B, 1, *spatial) bool, True where painted)."""
    _check_images(images)
    shape = tuple(images.shape[2:])
    sides = (torch.tensor([max(1, s // 6) for s in shape]),
             torch.tensor([max(1, s // 3) for s in shape]))  # fmt: skip
    corners, sizes, active = _painting_boxes(
        images.shape[0], shape, generator, sides, first_always=False, max_boxes=max_boxes
    )
    mask = box_mask(corners.to(images.device), sizes.to(images.device), shape,
                    active.to(images.device))  # fmt: skip
    return torch.where(mask, _noise_like(images, generator), images), mask


def out_painting(
    images: torch.Tensor, generator: torch.Generator, *, max_boxes: int = MAX_BOXES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep one random box (and up to `max_boxes` - 1 more) of each image and fill everything
    else with uniform noise over the image's intensity range (Models Genesis: kept box sides
    from 3/7 to 4/7 of the image per axis).

    Returns (painted (B, C, *spatial); kept (B, 1, *spatial) bool, True where kept)."""
    _check_images(images)
    shape = tuple(images.shape[2:])
    sides = (torch.tensor([max(1, s - 4 * s // 7) for s in shape]),
             torch.tensor([max(1, s - 3 * s // 7) for s in shape]))  # fmt: skip
    corners, sizes, active = _painting_boxes(
        images.shape[0], shape, generator, sides, first_always=True, max_boxes=max_boxes
    )
    kept = box_mask(corners.to(images.device), sizes.to(images.device), shape,
                    active.to(images.device))  # fmt: skip
    return torch.where(kept, images, _noise_like(images, generator)), kept


def models_genesis(
    images: torch.Tensor,
    generator: torch.Generator,
    *,
    block_size: int | Sequence[int] = 4,
    nonlinear_rate: float = NONLINEAR_RATE,
    local_rate: float = LOCAL_RATE,
    paint_rate: float = PAINT_RATE,
    inpaint_rate: float = INPAINT_RATE,
    invert_rate: float = INVERT_RATE,
    block_rate: float = BLOCK_RATE,
) -> torch.Tensor:
    """Models Genesis' corruption of a batch (B, C, *spatial), in the authors' order: local
    shuffling (probability `local_rate`), then the non-linear transform (`nonlinear_rate`),
    then painting (`paint_rate`): in-painting for `inpaint_rate` of the painted images,
    out-painting for the others. Every decision is drawn per image."""
    _check_images(images)
    for name, rate in (("nonlinear_rate", nonlinear_rate), ("local_rate", local_rate),
                       ("paint_rate", paint_rate), ("inpaint_rate", inpaint_rate)):  # fmt: skip
        _check_rate(name, rate)
    rates = torch.tensor([local_rate, nonlinear_rate, paint_rate, inpaint_rate])
    draws = _rand((4, images.shape[0]), generator, images.device)
    local, nonlinear, paint, inpaint = draws < rates.to(images.device)[:, None]
    shuffled, _ = local_pixel_shuffle(images, block_size, generator, block_rate=block_rate)
    corrupted = torch.where(_per_image(local, images), shuffled, images)
    transformed = nonlinear_intensity(corrupted, generator, invert_rate=invert_rate)
    corrupted = torch.where(_per_image(nonlinear, images), transformed, corrupted)
    inside, _ = in_painting(corrupted, generator)
    outside, _ = out_painting(corrupted, generator)
    painted = torch.where(_per_image(inpaint, images), inside, outside)
    return torch.where(_per_image(paint, images), painted, corrupted)
