"""Context restoration (Chen et al., MedIA 2019): restore images whose patch pairs were swapped.

The network sees the corrupted image and is trained with an L2 loss (the default; see
RESTORATION_LOSSES) to output the ORIGINAL image (using the corrupted one as the target is a
known bug of public reimplementations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from ctxrestore.corruption.sampling import check_placement, normalize_num_swaps
from ctxrestore.corruption.swap import context_restoration, threshold_foreground
from ctxrestore.errors import CtxRestoreError
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import (
    RESTORATION_LOSSES,
    check_restoration_loss,
    restoration_metrics,
    restoration_summary,
)


@register_pretext("context_restoration")
@dataclass(frozen=True)
class ContextRestorationPretext:
    """num_swaps: T (or a (min, max) range per image); patch_size: int or one per axis;
    foreground_threshold: avoid swapping pure-background patches (None: anywhere);
    restoration_loss: a name in RESTORATION_LOSSES (the paper's is mse); placement: "uniform"
    (the paper's) or "poisson_disc" (all 2T patches isolated and spread; see
    `corruption.sampling`)."""

    num_swaps: int | Sequence[int] = 20
    patch_size: int | Sequence[int] = 16
    foreground_threshold: float | None = None
    restoration_loss: str = "mse"
    placement: str = "uniform"
    name: str = "context_restoration"

    def __post_init__(self) -> None:
        normalize_num_swaps(self.num_swaps)
        check_restoration_loss(self.restoration_loss)
        check_placement(self.placement)

    def network_spec(self, base: dict) -> dict:
        return base

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *spatial) clean -> (corrupted input, clean target)."""
        return self.corrupt(images, generator), images

    def corrupt(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        foreground: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """images (B, C, *spatial) with T patch pairs swapped, kept off the background: what
        foreground_threshold calls it in `images`, or where `foreground` (B, *spatial) bool is
        False (augmented views, whose shifted and noised air a threshold calls foreground)."""
        if foreground is None:
            foreground = self.foreground(images)
        return context_restoration(
            images,
            self.num_swaps,
            self.patch_size,
            generator,
            foreground=foreground,
            placement=self.placement,
        )

    def foreground(self, images: torch.Tensor) -> torch.Tensor | None:
        """(B, *spatial) bool: where some channel of `images` exceeds foreground_threshold;
        None without one."""
        return threshold_foreground(images, self.foreground_threshold)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return RESTORATION_LOSSES[self.restoration_loss](outputs, targets)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        return restoration_metrics(inputs, targets, outputs)

    def summary(self, metrics: dict[str, float]) -> str:
        return restoration_summary(metrics)

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        return [("original", targets), ("corrupted", inputs), ("restored", outputs)]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params


def views_as_batch(foreground: torch.Tensor | None) -> torch.Tensor | None:
    """Where the foreground lies in two views of each image, (B, 2, *S) -> (2B, *S): all first
    views, then all second ones, as the views are batched for their swaps; None stays None."""
    return None if foreground is None else torch.cat(foreground.unbind(dim=1))


class ContextRestorationHybrid:
    """What the pretexts that add a contrastive term to context restoration share
    (`context_restoration_contrastive`, `context_restoration_dense`): their own dataclass fields
    num_swaps, patch_size, foreground_threshold, restoration_loss, placement and
    contrastive_weight, and a loss that divides each term by what a network that learned
    nothing scores."""

    def _check_contrastive_weight(self) -> None:
        """contrastive_weight as a float >= 0, or a clear error (call from __post_init__)."""
        weight = self.contrastive_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise CtxRestoreError(
                f"{self.name}: contrastive_weight must be a number, got {weight!r}"
            )
        if not 0 <= weight < math.inf:  # also refuses NaN
            raise CtxRestoreError(
                f"{self.name}: contrastive_weight must be >= 0 and finite, got {weight} "
                "(0: context restoration on augmented views only)"
            )
        object.__setattr__(self, "contrastive_weight", float(weight))

    @cached_property
    def restoration(self) -> ContextRestorationPretext:
        return ContextRestorationPretext(
            num_swaps=self.num_swaps,
            patch_size=self.patch_size,
            foreground_threshold=self.foreground_threshold,
            restoration_loss=self.restoration_loss,
            placement=self.placement,
        )

    def relative_restoration_loss(
        self, restored: torch.Tensor, clean: torch.Tensor, corrupted: torch.Tensor
    ) -> torch.Tensor:
        """The restoration loss divided by that of the corrupted input left as it is: 1 for a
        network that learned nothing, 0 for a perfect restoration."""
        baseline = self.restoration.loss(corrupted, clean).detach().clamp_min(1e-12)
        return self.restoration.loss(restored, clean) / baseline

    @staticmethod
    def views_preview(
        clean: torch.Tensor, corrupted: torch.Tensor, restored: torch.Tensor, second_title: str
    ) -> list[tuple[str, torch.Tensor]]:
        """Preview rows of two views (B, 2C, *S) each: the first clean, corrupted and restored,
        then the second clean under `second_title` (what the contrastive term achieved)."""
        channels = clean.shape[1] // 2
        return [
            ("view 1", clean[:, :channels]),
            ("view 1 corrupted", corrupted[:, :channels]),
            ("view 1 restored", restored[:, :channels]),
            (f"view 2\n{second_title}", clean[:, channels:]),
        ]
