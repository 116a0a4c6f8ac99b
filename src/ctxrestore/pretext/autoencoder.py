"""Auto-encoder: restore the clean image from itself, the "no context task" control.

Input and target are the same clean image, so the network may learn an identity (through the
U-Net's skips, trivially). It tells how much of a pretext's benefit comes from its corruption
rather than from training on the images at all.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import (
    RESTORATION_LOSSES,
    check_restoration_loss,
    restoration_metrics,
    restoration_summary,
)


@register_pretext("autoencoder")
@dataclass(frozen=True)
class AutoencoderPretext:
    """Nothing to corrupt; restoration_loss: as context restoration's, so that the control
    differs from it only in the corruption."""

    restoration_loss: str = "mse"
    name: str = field(default="autoencoder", init=False)

    def __post_init__(self) -> None:
        check_restoration_loss(self.restoration_loss)

    def network_spec(self, base: dict) -> dict:
        return base

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *spatial) clean -> (the same images as input, and as target)."""
        return images, images

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return RESTORATION_LOSSES[self.restoration_loss](outputs, targets)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """restoration_mse of the reconstruction; identity_mse is 0 (input == target)."""
        return restoration_metrics(inputs, targets, outputs)

    def summary(self, metrics: dict[str, float]) -> str:
        return restoration_summary(metrics)

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        return [("original (= input)", targets), ("reconstructed", outputs)]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params
