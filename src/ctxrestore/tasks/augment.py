"""Random augmentation of whole batches for fine-tuning, on the batch's device.

Spatial: in-plane rotation (about the last two spatial axes), isotropic zoom and translation,
as one batched affine_grid + grid_sample for all images, 2D (B, C, H, W) or 3D (B, C, D, H, W).
Intensity: per image-channel contrast factor, brightness offset and Gaussian noise, the last
two in units of that channel's standard deviation, so they mean the same for CT in [0, 1] and
z-scored MR.

Sampling and applying are separate (STYLE.md): `Augmentation.plan` draws every random number
from the caller's generator, `apply_augmentation` is deterministic. One plan moves the image,
its mask and its boxes together.

Batch keys (tasks/base.py): "image" is resampled bilinearly, "mask" by nearest neighbour (label
values are never blended), "boxes"/"present" are mapped by the same transform; every other key
("label", "spacing"...) passes through. Outside the image both image and mask read 0: every
intensity normalisation in data/intensity.py maps the background to 0, so what moves into view
looks like background, and label 0 is the background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ctxrestore.errors import CtxRestoreError


@dataclass(frozen=True)
class AugmentationPlan:
    """What happens to each of the B images of a batch.

    angle: (B,) radians, rotation in the plane of the last two spatial axes.
    zoom: (B,) content magnification (> 1 enlarges).
    shift: (B, D) content shift along each spatial axis, in fractions of the axis' extent.
    moved: (B,) bool, images whose spatial transform is not the identity; the others keep their
        exact values (resampling with an identity grid is exact only up to rounding).
    contrast: (B, C) intensity factor; brightness: (B, C) offset in channel standard deviations.
    noise: (B, C, *spatial) Gaussian noise in channel standard deviations, or None.
    """

    angle: torch.Tensor
    zoom: torch.Tensor
    shift: torch.Tensor
    moved: torch.Tensor
    contrast: torch.Tensor
    brightness: torch.Tensor
    noise: torch.Tensor | None


@dataclass(frozen=True)
class Augmentation:
    """Random rotation, zoom, translation, contrast, brightness and noise (see module docstring).

    rotation_degrees: in-plane rotation drawn in [-r, r], about the last two spatial axes only
        (through-plane rotation would mix slices of very different spacing).
    scale: zoom factor range; translation: shift range per axis, as a fraction of its extent.
    contrast: factor range; brightness, noise_std: in channel standard deviations.
    probability: chance, per image, that the spatial part is applied; intensity is always.

    There is deliberately no flip: a left-right flip swaps laterality (the left kidney becomes
    the right one in CT), which breaks labels that name a side and images whose anatomy is not
    symmetric. Batches that carry "boxes" are never rotated: a rotated box is not an
    axis-aligned box, so only zoom and translation apply and the boxes stay exact.
    """

    rotation_degrees: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    translation: float = 0.05
    contrast: tuple[float, float] = (0.85, 1.15)
    brightness: float = 0.1
    noise_std: float = 0.03
    probability: float = 0.8

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _range("scale", self.scale, minimum=0.0, exclusive=True))
        object.__setattr__(self, "contrast", _range("contrast", self.contrast, minimum=0.0))
        limits = {
            "rotation_degrees": (self.rotation_degrees, 180.0),
            "translation": (self.translation, 1.0),
            "brightness": (self.brightness, math.inf),
            "noise_std": (self.noise_std, math.inf),
            "probability": (self.probability, 1.0),
        }
        for name, (value, maximum) in limits.items():
            if not 0 <= value <= maximum:  # also refuses NaN
                raise CtxRestoreError(f"augmentation {name} must be in [0, {maximum}], got {value}")

    def __call__(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """A new, augmented batch; the input batch is left as it is."""
        return apply_augmentation(batch, self.plan(batch, generator))

    def plan(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> AugmentationPlan:
        """Draw the random parameters for `batch`, all from `generator` (on the batch's device).

        The same numbers are drawn whatever the settings (noise last, and only when
        noise_std > 0), so changing one range does not reshuffle the others.
        """
        image = _checked_image(batch)
        device = image.device
        if generator.device.type != device.type:
            raise CtxRestoreError(
                f"the augmentation generator is on {generator.device} but the batch is on "
                f"{device}; create it with torch.Generator(device=...) on the batch's device"
            )
        batch_size, channels = image.shape[:2]
        spatial_dims = image.ndim - 2

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            draws = torch.rand(shape, generator=generator, device=device)
            return low + (high - low) * draws

        applied = torch.rand(batch_size, generator=generator, device=device) < self.probability
        rotation = 0.0 if "boxes" in batch else self.rotation_degrees
        angle = uniform(-rotation, rotation, batch_size) * (math.pi / 180)
        zoom = uniform(*self.scale, batch_size)
        shift = uniform(-self.translation, self.translation, batch_size, spatial_dims)
        contrast = uniform(*self.contrast, batch_size, channels)
        brightness = uniform(-self.brightness, self.brightness, batch_size, channels)
        noise = None
        if self.noise_std > 0:
            noise = self.noise_std * torch.randn(
                image.shape, generator=generator, device=device, dtype=torch.float32
            )

        angle = torch.where(applied, angle, 0.0)
        zoom = torch.where(applied, zoom, 1.0)
        shift = torch.where(applied[:, None], shift, 0.0)
        moved = (angle != 0) | (zoom != 1) | (shift != 0).any(dim=1)
        return AugmentationPlan(angle, zoom, shift, moved, contrast, brightness, noise)


def apply_augmentation(
    batch: dict[str, torch.Tensor], plan: AugmentationPlan
) -> dict[str, torch.Tensor]:
    """Apply `plan` to the image, mask and boxes of `batch` (a new dict; no randomness).

    Works under autocast, which it switches off inside: resampling runs in float32 (or the
    image's wider dtype) and every tensor keeps its dtype and device.
    """
    image = _checked_image(batch)
    spatial_shape = tuple(image.shape[2:])
    augmented = dict(batch)
    # affine_grid multiplies matrices, which autocast would run in bf16: a grid off by a
    # fraction of a voxel, and boxes that no longer match the mask.
    with torch.autocast(image.device.type, enabled=False):
        if bool(plan.moved.any()):
            grid = sampling_grid(plan, spatial_shape, batch.get("spacing"))
            augmented["image"] = _resample(image, grid, plan.moved, "bilinear")
            if "mask" in batch:
                mask = batch["mask"]
                augmented["mask"] = _resample(mask[:, None], grid, plan.moved, "nearest")[:, 0]
            if "boxes" in batch:
                augmented["boxes"], augmented["present"] = move_boxes(
                    batch["boxes"], batch["present"], plan, spatial_shape
                )
        augmented["image"] = _adjust_intensity(augmented["image"], image, plan)
    return augmented


def sampling_grid(
    plan: AugmentationPlan,
    spatial_shape: tuple[int, ...],
    spacing: torch.Tensor | None = None,
) -> torch.Tensor:
    """affine_grid of the plan: (B, *spatial, D), where each output voxel reads the input."""
    theta = sampling_theta(plan, spatial_shape, spacing)
    size = (len(theta), 1, *spatial_shape)
    return F.affine_grid(theta, list(size), align_corners=False)


def sampling_theta(
    plan: AugmentationPlan,
    spatial_shape: tuple[int, ...],
    spacing: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plan's affine map (B, D, D + 1) from an output voxel's normalised coordinates to
    the input position it reads, in affine_grid's order (x, y(, z): the last axis first).

    The content map is out = zoom * R(in) + 2 * shift in grid_sample's normalised coordinates
    (-1 and 1 at the outer voxel edges, align_corners=False). R rotates in millimetres, using
    `spacing` (B, D) when given, so that a rotation does not shear anisotropic voxels or
    non-square images.
    """
    batch_size, spatial_dims = plan.shift.shape
    device = plan.shift.device
    extent = torch.tensor(spatial_shape, dtype=torch.float32, device=device).expand(
        batch_size, spatial_dims
    )
    if spacing is not None:
        extent = extent * spacing.to(device=device, dtype=torch.float32)
    cos, sin = torch.cos(plan.angle), torch.sin(plan.angle)
    # The inverse map: in = R^T (out - shift) / zoom, with R^T rotating by -angle.
    inverse = torch.eye(spatial_dims, device=device).repeat(batch_size, 1, 1)
    inverse[:, -2, -2], inverse[:, -2, -1] = cos, sin
    inverse[:, -1, -2], inverse[:, -1, -1] = -sin, cos
    # In normalised coordinates R becomes diag(1/extent) R diag(extent); the diagonal of that
    # ratio is exactly 1, so an unrotated map stays exactly axis-aligned.
    inverse = inverse * (extent[:, None, :] / extent[:, :, None]) / plan.zoom[:, None, None]
    offset = -(inverse @ (2 * plan.shift)[:, :, None])
    # affine_grid orders coordinates x, y(, z): the last tensor axis first.
    return torch.cat([inverse.flip(1, 2), offset.flip(1)], dim=2)


def move_boxes(
    boxes: torch.Tensor,
    present: torch.Tensor,
    plan: AugmentationPlan,
    spatial_shape: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (B, O, 2, D) voxel-edge boxes by the plan's zoom and shift, clipped to the image.

    An organ whose box leaves the image entirely gets present 0 and an all-zero box.
    """
    if bool((plan.angle[plan.moved] != 0).any()):
        raise CtxRestoreError(
            "a plan with rotation cannot move boxes exactly; plan batches with boxes through "
            "Augmentation.plan, which leaves them unrotated"
        )
    extent = torch.tensor(spatial_shape, dtype=torch.float32, device=boxes.device)
    zoom = plan.zoom[:, None, None, None]
    shift = plan.shift[:, None, None, :] * extent
    moved = zoom * (boxes.float() - extent / 2) + extent / 2 + shift
    moved = torch.minimum(moved.clamp(min=0), extent)
    visible = (moved[:, :, 1] > moved[:, :, 0]).all(dim=-1) & (present > 0)
    moved = torch.where(visible[..., None, None], moved, 0.0)
    keep = ~plan.moved
    new_boxes = torch.where(keep[:, None, None, None], boxes, moved.to(boxes.dtype))
    new_present = torch.where(keep[:, None], present, visible.to(present.dtype))
    return new_boxes, new_present


def _resample(
    values: torch.Tensor, grid: torch.Tensor, moved: torch.Tensor, mode: str
) -> torch.Tensor:
    """values (B, C, *spatial) read at `grid`; images that did not move keep their values."""
    compute_dtype = torch.promote_types(values.dtype, torch.float32)  # float32 for masks
    resampled = F.grid_sample(
        values.to(compute_dtype),
        grid.to(compute_dtype),
        mode=mode,
        padding_mode="zeros",
        align_corners=False,
    )
    if not values.dtype.is_floating_point:
        resampled = resampled.round()
    keep = moved.view(-1, *([1] * (values.ndim - 1)))
    return torch.where(keep, resampled.to(values.dtype), values)


def _adjust_intensity(
    image: torch.Tensor, reference: torch.Tensor, plan: AugmentationPlan
) -> torch.Tensor:
    """contrast * image + (brightness + noise) * std, with the std of each channel of the
    un-augmented image. Written as a product and sums, not about the mean, so that contrast 1
    and zero offsets return the image bit for bit."""
    compute_dtype = torch.promote_types(image.dtype, torch.float32)
    spatial_axes = tuple(range(2, image.ndim))
    std = reference.to(compute_dtype).std(dim=spatial_axes, correction=0, keepdim=True)
    extra = (1,) * len(spatial_axes)
    contrast = plan.contrast.to(compute_dtype).view(*plan.contrast.shape, *extra)
    brightness = plan.brightness.to(compute_dtype).view(*plan.brightness.shape, *extra)
    adjusted = contrast * image.to(compute_dtype) + brightness * std
    if plan.noise is not None:
        adjusted = adjusted + plan.noise.to(compute_dtype) * std
    return adjusted.to(image.dtype)


def _checked_image(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "image" not in batch:
        raise CtxRestoreError(f"augmentation needs an 'image' in the batch, got {sorted(batch)}")
    image = batch["image"]
    if image.ndim not in (4, 5):
        raise CtxRestoreError(
            f"augmentation takes images (B, C, H, W) or (B, C, D, H, W), got shape "
            f"{tuple(image.shape)}"
        )
    if "boxes" in batch and "present" not in batch:
        raise CtxRestoreError("a batch with 'boxes' needs 'present' (B, O) as well")
    return image


def _range(
    name: str, bounds: tuple[float, float], minimum: float, exclusive: bool = False
) -> tuple[float, float]:
    """(low, high) as floats, checked: minimum <= low <= high (minimum < low when exclusive)."""
    try:
        low, high = (float(bound) for bound in bounds)
    except (TypeError, ValueError):
        raise CtxRestoreError(f"augmentation {name} must be (low, high), got {bounds!r}") from None
    too_low = low <= minimum if exclusive else low < minimum
    if too_low or not low <= high:  # also refuses NaN
        limit = f"> {minimum}" if exclusive else f">= {minimum}"
        raise CtxRestoreError(
            f"augmentation {name} must be (low, high) with low {limit} and low <= high, "
            f"got {bounds!r}"
        )
    return low, high
