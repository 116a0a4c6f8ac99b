"""Context restoration with a dense contrastive term: restore swapped patches AND say, at every
point, where in the anatomy it lies.

Beyond Chen et al. 2019, and opt-in in `benchmark`. On the abdomen phantom, context
restoration's decoder features do not tell one organ from another (docs/experiments.md 34-36;
a linear probe at the localiser's head input reads 0.39-0.47 of the organs right, random
weights 0.41), while `dense_contrastive`'s do (0.79, experiment 38). Here one network does both
on the same batch, in one pass:

- each image is augmented twice, as `dense_contrastive`'s views, and its points are followed
  into both views;
- both views are corrupted by patch swaps (`context_restoration`) and restored by the chosen
  --network, its loss against the clean views; the foreground threshold keeps the points and
  the swaps on the body, read in the image and moved into each view with its content (the
  views' shifted and noised air lies above any threshold);
- the decoder features that restore the corrupted views are read at the points, projected,
  and InfoNCE asks each point of view 1 to find its own point among all points of view 2 in
  the batch, and the other way round (`models.contrastive.DenseContrastiveNetwork` with
  `restores`). A point inside a swapped patch must still say where it lies: what surrounds it
  tells, which is context restoration's own lesson.

With `dense_views="clean"` the points are read in the CLEAN views instead, and the swapped
first view alone is restored, in the same pass (1.5 times the images, not 2): in the corrupted
views 30 swaps of 8x8 patches scramble about two-thirds of the body, a point's own content
often belongs elsewhere, and the dense term went unlearnt (held-out point retrieval 0.4%,
docs/experiments.md 39). `context_restoration_contrastive` reads its term on the clean views
for the same reason (experiment 28).

Each loss is divided by what a network that learned nothing scores, as in
`context_restoration_contrastive`: restoration by the loss of the corrupted views left as they
are, InfoNCE by log(N), a uniform guess among the N points inside both views;
`contrastive_weight` sets their balance. The encoder and decoder transfer; the projection is
left behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import model_spec
from ctxrestore.pretext.context_restoration import ContextRestorationHybrid, views_as_batch
from ctxrestore.pretext.dense_contrastive import DenseContrastivePretext, points_found
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import restoration_metrics

DENSE_VIEWS = ("corrupted", "clean")


@register_pretext("context_restoration_dense")
@dataclass(frozen=True)
class ContextRestorationDensePretext(ContextRestorationHybrid):
    """num_swaps, patch_size, restoration_loss, placement: context restoration's;
    foreground_threshold: both parts' (no swaps of pure background, no points on it);
    points_per_image, temperature, projection_dim, projector: `dense_contrastive`'s;
    contrastive_weight: the dense term's weight against the restoration term's 1, both
    normalised; dense_views: where the points are read, "corrupted" (both views swapped and
    restored) or "clean" (the first view swapped and restored); dense_level: the decoder level
    they are read at, 0 the output that the restoration head reads too, 1 the level below it;
    see the module's docstring."""

    num_swaps: int | Sequence[int] = 20
    patch_size: int | Sequence[int] = 16
    foreground_threshold: float | None = None
    restoration_loss: str = "mse"
    placement: str = "uniform"
    contrastive_weight: float = 1.0
    points_per_image: int = 64
    temperature: float = 0.2
    projection_dim: int = 64
    projector: str = "mlp"
    dense_views: str = "corrupted"
    dense_level: int = 0
    name: str = field(default="context_restoration_dense", init=False)

    def __post_init__(self) -> None:
        self._check_contrastive_weight()
        if self.dense_views not in DENSE_VIEWS:
            raise CtxRestoreError(
                f"{self.name}: dense_views must be one of {DENSE_VIEWS}, got {self.dense_views!r}"
            )
        _ = self.restoration  # validate both parts' options now
        try:
            _ = self.dense
        except CtxRestoreError as error:  # dense_contrastive's message, named for this pretext
            message = str(error).removeprefix("dense_contrastive: ")
            raise CtxRestoreError(f"{self.name}: {message}") from None

    @cached_property
    def dense(self) -> DenseContrastivePretext:
        return DenseContrastivePretext(
            foreground_threshold=self.foreground_threshold,
            points_per_image=self.points_per_image,
            temperature=self.temperature,
            projection_dim=self.projection_dim,
            projector=self.projector,
            dense_level=self.dense_level,
        )

    def network_spec(self, base: dict) -> dict:
        """`base`'s restoration network, whose decoder features are also read at points."""
        return model_spec(
            "restoration_dense",
            network=base["name"],
            network_kwargs=base["kwargs"],
            projection_dim=self.projection_dim,
            projector=self.projector,
            read_level=self.dense_level,
        )

    def make_batch(self, images: torch.Tensor, generator: torch.Generator):
        """images (B, C, *S) -> (network input: (the views the points are read in (B, 2C,
        *S), the first's channels then the second's; the points' positions in each view
        (B, 2, M, D)[; with dense_views "clean", the first view swapped (B, C, *S), restored
        apart]); targets: (the clean views (B, 2C, *S); the swapped views (B, 2C or C, *S),
        the restoration term's input and baseline; whether each point lies inside both views
        (B, M) bool))."""
        (views, located), inside, foreground = self.dense.make_views(images, generator)
        if self.dense_views == "clean":
            channels = images.shape[1]
            first = None if foreground is None else foreground[:, 0]
            corrupted = self.restoration.corrupt(views[:, :channels], generator, first)
            return (views, located, corrupted), (views, corrupted, inside)
        # Both views as one batch, so every view draws its own swaps.
        batch = torch.cat(views.chunk(2, dim=1), dim=0)
        corrupted = self.restoration.corrupt(batch, generator, views_as_batch(foreground))
        corrupted = torch.cat(corrupted.chunk(2, dim=0), dim=1)
        return (corrupted, located), (views, corrupted, inside)

    def loss(self, outputs, targets) -> torch.Tensor:
        """Restoration term + weight x dense term, each divided by what a network that learned
        nothing scores."""
        restored, projections = outputs
        clean, corrupted, inside = targets
        restoration = self.relative_restoration_loss(
            restored, _swapped_views(clean, corrupted), corrupted
        )
        # log N on the device: no host sync per step (InfoNCE's own is in points_in_both)
        chance = inside.sum().clamp_min(2).float().log()
        dense = self.dense.loss(projections, inside) / chance
        return restoration + self.contrastive_weight * dense

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """Context restoration's metrics over both views, and the point retrieval accuracy."""
        restored, projections = outputs
        clean, corrupted, inside = targets
        return {
            **restoration_metrics(corrupted, _swapped_views(clean, corrupted), restored),
            **self.dense.evaluate(None, inside, projections),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return f"{self.restoration.summary(metrics)} {self.dense.summary(metrics)}"

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        """The first view clean, swapped and restored; the second view, titled with how many
        points found their own again."""
        restored, projections = outputs
        clean, corrupted, inside = targets
        found, points = points_found(projections, inside)
        title = f"{found}/{points} points found again"
        return self.views_preview(clean, corrupted, restored, title)

    def params(self) -> dict:
        """The options, and the dense term's (its views' augmentation among them)."""
        dense = self.dense.params()
        dense.pop("foreground_threshold")  # the restoration's, shared
        return {
            **self.restoration.params(),
            "contrastive_weight": self.contrastive_weight,
            "dense_views": self.dense_views,
            "dense": dense,
        }


def _swapped_views(clean: torch.Tensor, corrupted: torch.Tensor) -> torch.Tensor:
    """The clean views (B, 2C, *S) that `corrupted` swaps, the restoration's target: both, or
    the first alone (dense_views "clean")."""
    return clean[:, : corrupted.shape[1]]
