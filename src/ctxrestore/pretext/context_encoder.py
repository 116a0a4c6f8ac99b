"""Context encoder (Pathak et al., "Context Encoders: Feature Learning by Inpainting", CVPR
2016; "CP" in Chen et al. 2019): restore boxes dropped from the image.

Corruption: `corruption.mask_regions`, Pathak's random blocks: boxes of `patch_size` voxels
per axis (the unit context restoration swaps), as many as cover 1/4 of the image if they did
not overlap, filled with each channel's mean over the visible voxels.

Loss: Pathak's reconstruction loss is the L2 error over the dropped region only,
||M * (x - F((1 - M) * x))||^2. The network here outputs the whole image, so the loss is a
weighted MSE: weight 1 inside the holes and `outside_weight` outside them (default 0: exactly
Pathak's loss; a small value, e.g. 0.01, also asks the network to keep the context). Pathak
added an adversarial loss (weights 0.999 reconstruction, 0.001 adversarial); it is left out
here, as Chen et al.'s comparison uses the context encoder as a feature learner.

The targets carry the mask: targets = cat([clean image, mask], dim=1), (B, C + 1, *S).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ctxrestore.corruption.inpainting import FILLS, MASK_FRACTION, mask_regions
from ctxrestore.errors import CtxRestoreError
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import restoration_summary


def split_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C + 1, *S) -> (clean images (B, C, *S), mask (B, 1, *S) bool)."""
    return targets[:, :-1], targets[:, -1:] > 0.5


def weighted_mse(
    outputs: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, outside_weight: float
) -> torch.Tensor:
    """Mean squared error weighted 1 where `mask` (B, 1, *S) is True, `outside_weight` elsewhere;
    0 when all weights are 0."""
    weights = torch.where(mask, 1.0, outside_weight).to(torch.float32)
    error = (outputs.float() - images.float()).square() * weights
    return error.sum() / (weights.sum() * images.shape[1]).clamp(min=1e-12)


@register_pretext("context_encoder")
@dataclass(frozen=True)
class ContextEncoderPretext:
    """patch_size: side of each dropped box (int or one per axis); mask_fraction: the image
    fraction the boxes would cover without overlap; outside_weight: loss weight outside the
    holes (inside: 1); fill: "mean", "zero" or a number."""

    patch_size: int | Sequence[int] = 8
    mask_fraction: float = MASK_FRACTION
    outside_weight: float = 0.0
    fill: str | float = "mean"
    name: str = field(default="context_encoder", init=False)

    def __post_init__(self) -> None:
        if not 0 < self.mask_fraction <= 1:
            raise CtxRestoreError(f"mask_fraction must be in (0, 1], got {self.mask_fraction}")
        if not 0 <= self.outside_weight <= 1:
            raise CtxRestoreError(
                f"outside_weight must be in [0, 1] (inside the holes: 1), got {self.outside_weight}"
            )
        if isinstance(self.fill, str) and self.fill not in FILLS:
            raise CtxRestoreError(f"fill {self.fill!r} is not one of {FILLS} or a number")

    def network_spec(self, base: dict) -> dict:
        return base

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *S) clean -> (masked images, cat([clean, mask], dim=1))."""
        masked, mask = mask_regions(
            images, self.patch_size, generator, mask_fraction=self.mask_fraction, fill=self.fill
        )
        return masked, torch.cat([images, mask.to(images.dtype)], dim=1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        images, mask = split_targets(targets)
        return weighted_mse(outputs, images, mask, self.outside_weight)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """MSE inside the holes of the output, and of the masked input (the fill) left as it
        is; masked_fraction: the fraction of voxels dropped."""
        images, mask = split_targets(targets)
        return {
            "restoration_mse": float(weighted_mse(outputs, images, mask, 0.0)),
            "identity_mse": float(weighted_mse(inputs, images, mask, 0.0)),
            "masked_fraction": float(mask.float().mean()),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return (
            f"Inside the dropped boxes ({100 * metrics['masked_fraction']:.0f}% of the voxels): "
            + restoration_summary(metrics)
        )

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        images, mask = split_targets(targets)
        return [
            ("original", images),
            ("masked", inputs),
            ("output", outputs),
            ("holes filled", torch.where(mask, outputs.to(inputs.dtype), inputs)),
        ]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params
