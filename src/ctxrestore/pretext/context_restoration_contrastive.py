"""Context restoration with a contrastive term: restore swapped patches AND tell images apart.

Beyond Chen et al. 2019, and opt-in in `benchmark`. Context restoration alone teaches an
encoder where the body and its boundaries are, not which structure it is looking at; a
classifier needs the latter (docs/experiments.md 27: SimCLR's instance discrimination gave
classification what restoration did not). Here one network does both on the same batch:

- each image is augmented twice, as SimCLR's views (`ContrastivePretext.augmentation`);
- both views are corrupted by patch swaps (`context_restoration`) and restored by the
  chosen --network, its loss against the clean views; the foreground threshold is read in
  the image and its foreground moved into each view, since the views' shifted and noised air
  lies above any threshold;
- the encoder's pooled deepest features of the CLEAN views are projected
  (`models.contrastive.RestorationContrastiveNetwork`), and NT-Xent asks each view to find its
  partner among the 2B - 1 others. On the corrupted views instead, the contrastive term
  transferred no better than restoration alone, at any weight (docs/experiments.md 28).

The two losses have unrelated scales (an MSE of ~0.02 against a cross entropy of ~4), so each
is divided by what a network that learned nothing scores: restoration by the loss of the
corrupted input left as it is, NT-Xent by log(2B - 1), a uniform guess. Both start near 1 and
`contrastive_weight` sets their balance. The encoder and decoder transfer as context
restoration's do; the projection is left behind.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ctxrestore.models import model_spec
from ctxrestore.pretext.context_restoration import ContextRestorationHybrid, views_as_batch
from ctxrestore.pretext.contrastive import ContrastivePretext, partners_found
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import restoration_metrics


@register_pretext("context_restoration_contrastive")
@dataclass(frozen=True)
class ContextRestorationContrastivePretext(ContextRestorationHybrid):
    """num_swaps, patch_size, foreground_threshold, restoration_loss, placement: context
    restoration's; temperature, projection_dim: the contrastive term's (its views are
    `ContrastivePretext`'s strong augmentation); contrastive_weight: the contrastive term's
    weight against the restoration term's 1, both normalised (see the module's docstring)."""

    num_swaps: int | Sequence[int] = 20
    patch_size: int | Sequence[int] = 16
    foreground_threshold: float | None = None
    restoration_loss: str = "mse"
    placement: str = "uniform"
    contrastive_weight: float = 1.0
    temperature: float = 0.2
    projection_dim: int = 64
    name: str = field(default="context_restoration_contrastive", init=False)

    def __post_init__(self) -> None:
        self._check_contrastive_weight()
        _ = self.restoration, self.contrastive  # validate both parts' options now

    @cached_property
    def contrastive(self) -> ContrastivePretext:
        return ContrastivePretext(temperature=self.temperature, projection_dim=self.projection_dim)

    def network_spec(self, base: dict) -> dict:
        """`base`'s restoration network with a projection head on its encoder."""
        return model_spec(
            "restoration_contrastive",
            network=base["name"],
            network_kwargs=base["kwargs"],
            projection_dim=self.projection_dim,
        )

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """images (B, C, *S) -> (network input (B, 4C, *S): the two views corrupted, then the
        same two clean, each pair as the first view's channels, then the second's; targets
        (the clean views (B, 2C, *S), the corrupted ones: the restoration term's baseline))."""
        foreground = self.restoration.foreground(images)
        views, foreground = self.contrastive.make_views(images, generator, foreground)
        # Both views as one batch, so every image draws its own swaps.
        batch = torch.cat(views.chunk(2, dim=1), dim=0)
        corrupted = self.restoration.corrupt(batch, generator, views_as_batch(foreground))
        corrupted = torch.cat(corrupted.chunk(2, dim=0), dim=1)
        return torch.cat([corrupted, views], dim=1), (views, corrupted)

    def loss(self, outputs, targets) -> torch.Tensor:
        """Restoration term + weight x contrastive term, each divided by what a network that
        learned nothing scores."""
        restored, projections = outputs
        clean, corrupted = targets
        restoration = self.relative_restoration_loss(restored, clean, corrupted)
        partners = torch.arange(len(clean), device=clean.device)
        chance = math.log(2 * len(clean) - 1)
        contrastive = self.contrastive.loss(projections, partners) / chance
        return restoration + self.contrastive_weight * contrastive

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """Context restoration's metrics over both views, and the view retrieval accuracy."""
        restored, projections = outputs
        clean, corrupted = targets
        partners = torch.arange(len(clean), device=clean.device)
        return {
            **restoration_metrics(corrupted, clean, restored),
            **self.contrastive.evaluate(None, partners, projections),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return f"{self.restoration.summary(metrics)} {self.contrastive.summary(metrics)}"

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        """The first view clean, corrupted and restored; the second view, titled with how many
        views of the shown images found their partner among them."""
        restored, projections = outputs
        clean, corrupted = targets
        found, views = partners_found(projections, torch.arange(len(clean)))
        return self.views_preview(
            clean, corrupted, restored, f"partner found for {found}/{views} views"
        )

    def params(self) -> dict:
        """The options, and the contrastive views' augmentation."""
        return {
            **self.restoration.params(),
            "contrastive_weight": self.contrastive_weight,
            "contrastive": self.contrastive.params(),
        }
