"""A simple procedural phantom: a body ellipse(oid) with a few inner "organs", for pretraining.

Stands in for the task-specific phantoms (ultrasound, abdomen, brain) until they exist. Each
image is drawn from `np.random.default_rng([seed, index])`, so it depends on (seed, index) only:
not on the order of reads, the worker that reads it or the other images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ctxrestore.data.phantoms.base import PhantomSample
from ctxrestore.errors import CtxRestoreError

_MIN_ORGANS, _MAX_ORGANS = 3, 6
_MIN_SIZE = 4


def _check_options(
    index: int, seed: int, spatial_size: Sequence[int], in_channels: int
) -> tuple[int, ...]:
    size = tuple(int(s) for s in spatial_size)
    if len(size) not in (2, 3):
        raise CtxRestoreError(
            f"shapes phantom: spatial_size {tuple(spatial_size)} has {len(size)} axes; "
            "give 2 (H, W) or 3 (D, H, W)"
        )
    if min(size) < _MIN_SIZE:
        raise CtxRestoreError(
            f"shapes phantom: spatial_size {size} is too small; every axis must be >= {_MIN_SIZE}"
        )
    if in_channels < 1:
        raise CtxRestoreError(f"shapes phantom: in_channels {in_channels} must be >= 1")
    if index < 0 or seed < 0:
        raise CtxRestoreError(f"shapes phantom: index {index} and seed {seed} must both be >= 0")
    return size


def _grid(size: tuple[int, ...]) -> list[np.ndarray]:
    """Open grid of coordinates in [-1, 1]: one array per axis, broadcastable to `size`."""
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in size]
    return np.meshgrid(*axes, indexing="ij", sparse=True)


def _random_rotations(rng: np.random.Generator, count: int, spatial_dims: int) -> np.ndarray:
    """`count` uniformly random orthogonal matrices (QR of Gaussian matrices, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((count, spatial_dims, spatial_dims)))
    return q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]


def _ellipsoid(
    grid: list[np.ndarray], center: np.ndarray, semi_axes: np.ndarray, rotation: np.ndarray
) -> np.ndarray:
    """Boolean mask of the points x with (x - c)^T A (x - c) <= 1, A = R diag(1/a^2) R^T.

    The quadratic form is summed term by term over the open grid, so the only full-size
    arrays are the running sum and one product: memory stays small for 3D volumes.
    """
    form = (rotation / semi_axes**2) @ rotation.T
    offsets = [axis - np.float32(c) for axis, c in zip(grid, center, strict=True)]
    total = np.zeros(np.broadcast_shapes(*(axis.shape for axis in grid)), dtype=np.float32)
    for i, offset_i in enumerate(offsets):
        total += np.float32(form[i, i]) * offset_i * offset_i
        for j in range(i + 1, len(offsets)):
            total += np.float32(2.0 * form[i, j]) * offset_i * offsets[j]
    return total <= 1.0


def _tissue_labels(rng: np.random.Generator, grid: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Label map: 0 background, 1 body, 2.. organs (later organs drawn over earlier ones)."""
    spatial_dims = len(grid)
    num_organs = int(rng.integers(_MIN_ORGANS, _MAX_ORGANS + 1))
    rotations = _random_rotations(rng, num_organs + 1, spatial_dims)
    # Semi-axes <= 0.85 and a centre within 0.05 of the middle keep the body off the border,
    # so the image always has background around it.
    body_axes = rng.uniform(0.6, 0.85, spatial_dims)
    body_center = rng.uniform(-0.05, 0.05, spatial_dims)
    # Organ centres lie inside the inner 60% of the body, drawn in the body's own frame.
    directions = rng.standard_normal((num_organs, spatial_dims))
    directions *= rng.uniform(0.0, 0.6, (num_organs, 1)) / np.linalg.norm(
        directions, axis=1, keepdims=True
    )
    organ_centers = body_center + (directions * body_axes) @ rotations[0].T
    organ_axes = rng.uniform(0.08, 0.3, (num_organs, spatial_dims))

    body = _ellipsoid(grid, body_center, body_axes, rotations[0])
    labels = body.astype(np.int64)
    for organ in range(num_organs):
        mask = _ellipsoid(grid, organ_centers[organ], organ_axes[organ], rotations[organ + 1])
        labels[mask & body] = organ + 2
    return labels, num_organs + 2


def _contrast(rng: np.random.Generator, num_labels: int) -> np.ndarray:
    """Intensity of every label in one channel: background 0, organs away from the body's."""
    body = rng.uniform(0.35, 0.75)
    offsets = rng.choice([-1.0, 1.0], num_labels - 2) * rng.uniform(0.15, 0.45, num_labels - 2)
    organs = np.clip(body + offsets, 0.2, 1.0)
    return np.concatenate([[0.0, body], organs]).astype(np.float32)


def _bias_field(rng: np.random.Generator, grid: list[np.ndarray]) -> np.ndarray:
    """A smooth multiplicative field: 1 + a linear and a quadratic term per axis, within +-15%."""
    spatial_dims = len(grid)
    linear = rng.uniform(-0.075, 0.075, spatial_dims) / spatial_dims
    quadratic = rng.uniform(-0.075, 0.075, spatial_dims) / spatial_dims
    field = np.float32(1.0)
    for axis, a, b in zip(grid, linear, quadratic, strict=True):
        field = field + np.float32(a) * axis + np.float32(b) * axis * axis
    return field


def shapes_phantom(
    index: int,
    *,
    seed: int = 0,
    spatial_size: Sequence[int] = (64, 64),
    in_channels: int = 1,
) -> np.ndarray:
    """One phantom image: (in_channels, *spatial_size) float32, values in [0, 1].

    A body ellipse (ellipsoid in 3D) on a zero background, with 3 to 6 inner ellipses of
    other intensities at a random pose and scale. Each channel is the same anatomy with its
    own contrast (intensity per tissue), its own smooth bias field and its own Gaussian noise,
    as co-registered MR sequences are. Noise is added inside the body only, so the background
    stays exactly 0 and every channel has the same support (the body). Coordinates are scaled
    to [-1, 1] along each axis, so the anatomy stretches with a non-square `spatial_size`.
    The result depends only on (seed, index).
    """
    size = _check_options(index, seed, spatial_size, in_channels)
    rng = np.random.default_rng([seed, index])
    grid = _grid(size)
    labels, num_labels = _tissue_labels(rng, grid)
    body = labels > 0
    image = np.empty((in_channels, *size), dtype=np.float32)
    for channel in range(in_channels):
        values = _contrast(rng, num_labels)[labels] * _bias_field(rng, grid)
        values += rng.standard_normal(size, dtype=np.float32) * np.float32(rng.uniform(0.01, 0.04))
        # Tissue is >= 0.2 * 0.85 before noise of sigma <= 0.04: the floor at 0.01 touches only
        # rare noise tails, and keeps the body > 0 so that it is told apart from background.
        image[channel] = np.where(body, np.clip(values, 0.01, 1.0), 0.0)
    return image


def shapes_sample(
    index: int,
    *,
    seed: int = 0,
    spatial_size: Sequence[int] = (64, 64),
    in_channels: int = 1,
) -> PhantomSample:
    """`shapes_phantom` as a PhantomSample (unlabelled; 1 mm voxels), for the registry."""
    image = shapes_phantom(index, seed=seed, spatial_size=spatial_size, in_channels=in_channels)
    names = tuple(f"contrast_{channel}" for channel in range(in_channels))
    return PhantomSample(image=image, spacing=(1.0,) * (image.ndim - 1), channel_names=names)
