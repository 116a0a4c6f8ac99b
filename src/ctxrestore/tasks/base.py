"""What a downstream task is: a network around a (pretrained) encoder, a loss, metrics and
how predictions are decoded. One file per task implements this protocol; the fine-tuning
stage (tasks/training.py) and `predict` only talk to it.

Batches are dicts of tensors, already on the device:
- every task: "image" (B, C, *S) float32, "spacing" (B, D) mm per spatial axis;
- classify: "label" (B,) int64 class index;
- localize: "boxes" (B, O, 2, D) float32 voxel coordinates (first voxel, one past the last,
  per spatial axis), "present" (B, O) float32 1/0 (an organ not in view has present 0 and
  an all-zero box);
- segment: "mask" (B, *S) int64 label values.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ctxrestore.errors import CtxRestoreError


class DownstreamTask(Protocol):
    name: str  # "classify", "localize" or "segment"
    # The evaluate() key that picks the best checkpoint; higher is better.
    metric: str

    def network_spec(self, spatial_dims: int, in_channels: int, encoder: dict) -> dict:
        """`models.model_spec(...)` of this task's network around an encoder built with
        `encoder` (ConvEncoder.config(): stage_channels, convs_per_stage, norm)."""
        ...

    def balanced(self, train_items: Sequence[dict[str, torch.Tensor]]) -> DownstreamTask:
        """A copy whose loss counters the class imbalance of these training items."""
        ...

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        """Augment the batch (tasks.augment, randomness from `generator`) and return the loss."""
        ...

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None: ...

    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        device: torch.device,
    ) -> dict[str, float]:
        """Metrics over all batches (flat "metric/name" keys); includes `self.metric`."""
        ...

    def predict(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Decoded predictions for (B, C, *S) images, in the batch format above."""
        ...

    def to_json(self) -> dict:
        """The task's parameters (class / organ / label names...), to rebuild it for predict."""
        ...


def weights_per_name(
    option: str, weights: Sequence[float], names: Sequence[str], *, per: str, zero_allowed: bool
) -> tuple[float, ...]:
    """`weights` as one finite float per name (>= 0, or > 0 where a zero would silence a
    name), or an error that names the option and the names."""
    values = tuple(float(weight) for weight in weights)
    bound = ">= 0" if zero_allowed else "> 0"
    if len(values) != len(names) or not all(
        math.isfinite(value) and (value > 0 or (zero_allowed and value == 0)) for value in values
    ):
        raise CtxRestoreError(
            f"{option} must be {len(names)} finite values {bound}, one per {per} "
            f"{tuple(names)}; got {weights}"
        )
    return values
