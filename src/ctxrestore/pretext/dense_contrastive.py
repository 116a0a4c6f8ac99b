"""Dense contrastive learning: the same anatomical point found again in another view.

Beyond Chen et al. 2019, and opt-in in `benchmark`; after VADeR (Pinheiro, Almahairi, Benmalek,
Golemo, Courville, NeurIPS 2020), whose pixel-level contrast uses the known correspondence
between two views. Restoration pretexts teach where the body and its boundaries are, and on
the abdomen phantom their weights do not tell one organ from another (docs/experiments.md
34-36); SimCLR's pooled features say which image this is, not what lies where. Here each
image is augmented twice (`ContrastivePretext`'s strong views: rotation, zoom, shift,
contrast, brightness, noise); points are drawn on the image (on its foreground when
`foreground_threshold` is set) and followed into both views through the views' own affine
maps; the restoration network's decoder features are read at each point in each view and
projected (`models.contrastive.DenseContrastiveNetwork`), and InfoNCE
asks every point of view 1 to find its own point among all points of view 2 in the batch, and
the other way round. Points of the same image are negatives of each other, so a voxel's
features must say where in the anatomy it lies, which is what a segmentation-style head reads.

Points that leave either view (zoom and shift move content out) take no part. The encoder and
decoder transfer as a restoration network's do; the projection is left behind.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from ctxrestore.corruption.swap import threshold_foreground
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import model_spec
from ctxrestore.models.contrastive import PROJECTORS
from ctxrestore.pretext.contrastive import ContrastivePretext, retrieval_summary
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.tasks.augment import apply_augmentation, sampling_theta


@register_pretext("dense_contrastive")
@dataclass(frozen=True)
class DenseContrastivePretext:
    """foreground_threshold: draw points only where some channel exceeds this (None:
    anywhere; on CT windowed to [0, 1], 0.05 keeps them off the air around the body);
    points_per_image: points drawn per image; temperature, projection_dim: InfoNCE's tau and
    the size of the points' projections (the views are `ContrastivePretext`'s); projector:
    "mlp" (SimCLR's) or "none", InfoNCE on the decoder's features themselves (projection_dim
    then unused); dense_level: read the points at the decoder's output (0) or that many levels
    below it (1: half the resolution, twice the channels), where a restoring head's channels
    are not the points' too (`context_restoration_dense`)."""

    foreground_threshold: float | None = None
    points_per_image: int = 64
    temperature: float = 0.2
    projection_dim: int = 64
    projector: str = "mlp"
    dense_level: int = 0
    name: str = field(default="dense_contrastive", init=False)

    def __post_init__(self) -> None:
        threshold = self.foreground_threshold
        if threshold is not None and (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise CtxRestoreError(
                f"{self.name}: foreground_threshold must be a finite number or None, got "
                f"{threshold!r}"
            )
        points = self.points_per_image
        if isinstance(points, bool) or not isinstance(points, int) or points < 2:
            raise CtxRestoreError(
                f"{self.name}: points_per_image must be an int >= 2, got {points!r}"
            )
        if self.projector not in PROJECTORS:
            raise CtxRestoreError(
                f"{self.name}: projector must be one of {PROJECTORS}, got {self.projector!r}"
            )
        level = self.dense_level
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise CtxRestoreError(f"{self.name}: dense_level must be an int >= 0, got {level!r}")
        try:
            _ = self.views
        except CtxRestoreError as error:  # SimCLR's message, named for this pretext
            message = str(error).removeprefix("contrastive: ")
            raise CtxRestoreError(f"{self.name}: {message}") from None

    @cached_property
    def views(self) -> ContrastivePretext:
        """SimCLR's pretext, for its validated temperature and its strong view augmentation."""
        return ContrastivePretext(temperature=self.temperature, projection_dim=self.projection_dim)

    def network_spec(self, base: dict) -> dict:
        """`base`'s encoder and decoder, with a projection of points instead of its head."""
        return model_spec(
            "dense_contrastive",
            network=base["name"],
            network_kwargs=base["kwargs"],
            projection_dim=self.projection_dim,
            projector=self.projector,
            read_level=self.dense_level,
        )

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """images (B, C, *S) -> (network input: (two views (B, 2C, *S), the first's channels
        then the second's; where each of M points lies in each view (B, 2, M, D), in
        grid_sample's normalised coordinates and order); target: whether each point lies
        inside both views (B, M) bool)."""
        network_input, inside, _ = self.make_views(images, generator)
        return network_input, inside

    def make_views(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """`make_batch`'s network input and target, and where the foreground (some channel of
        the image above foreground_threshold) lies in each view, (B, 2, *S) bool, moved with
        the view's content; None without a threshold. Restoration in these views must keep
        its swaps on it: the views' shifted and noised air lies above any threshold."""
        augmentation = self.views.augmentation
        foreground = threshold_foreground(images, self.foreground_threshold)
        batch = {"image": images} if foreground is None else {"image": images, "mask": foreground}
        plans = [augmentation.plan(batch, generator) for _ in range(2)]
        views = [apply_augmentation(batch, plan) for plan in plans]
        points = self._draw_points(images, foreground, generator)
        spatial_shape = tuple(images.shape[2:])
        located = torch.stack(
            [view_positions(points, sampling_theta(plan, spatial_shape)) for plan in plans], dim=1
        )
        inside = (located.abs() < 1).all(dim=-1).all(dim=1)
        network_input = (torch.cat([view["image"] for view in views], dim=1), located)
        if foreground is None:
            return network_input, inside, None
        return network_input, inside, torch.stack([view["mask"] for view in views], dim=1)

    def _draw_points(
        self, images: torch.Tensor, foreground: torch.Tensor | None, generator: torch.Generator
    ) -> torch.Tensor:
        """(B, M, D) positions in the images, normalised and in grid_sample's order: voxels
        drawn uniformly among the `foreground` ones (B, *S) bool (all voxels of an image
        without any, or without a foreground), each moved to a uniform place inside its
        voxel."""
        batch_size = len(images)
        spatial_shape = tuple(images.shape[2:])
        if foreground is None:
            weights = torch.ones(batch_size, math.prod(spatial_shape), device=images.device)
        else:
            foreground = foreground.flatten(1).float()
            empty = foreground.sum(dim=1, keepdim=True) == 0
            weights = torch.where(empty, 1.0, foreground)
        voxel = torch.multinomial(
            weights, self.points_per_image, replacement=True, generator=generator
        )
        place = torch.rand(
            batch_size, self.points_per_image, len(spatial_shape), generator=generator,
            device=images.device,
        )  # fmt: skip
        index = torch.stack(torch.unravel_index(voxel, spatial_shape), dim=-1)
        size = torch.tensor(spatial_shape, dtype=torch.float32, device=images.device)
        normalised = 2 * (index + place) / size - 1  # align_corners=False: -1, 1 at the edges
        return normalised.flip(-1)  # grid_sample's order: the last axis first

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """InfoNCE both ways: each point of one view against every point of the other view in
        the batch, by cosine similarity / tau; the mean cross entropy of finding its own."""
        first, second = points_in_both(outputs, targets)
        if len(first) < 2:  # (almost) no point is in both views: nothing to contrast
            return outputs.sum() * 0
        with torch.autocast(first.device.type, enabled=False):
            similarity = first @ second.T / self.temperature
            partners = torch.arange(len(first), device=first.device)
            return (
                F.cross_entropy(similarity, partners) + F.cross_entropy(similarity.T, partners)
            ) / 2

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """How often a point of view 1 finds its own point as the most similar of view 2's,
        and that of a guess among them."""
        found, points = points_found(outputs, targets)
        return {
            "point_retrieval_accuracy": found / max(points, 1),
            "chance_accuracy": 1.0 / max(points, 1),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return retrieval_summary(
            metrics["point_retrieval_accuracy"], metrics["chance_accuracy"], "point",
            "a voxel's features find the same point in another view ({ratio:.0f}x chance)",
        )  # fmt: skip

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        """The two views, the second titled with how many points found their own again."""
        views = inputs[0]
        channels = views.shape[1] // 2
        found, points = points_found(outputs, targets)
        return [
            ("view 1", views[:, :channels]),
            (f"view 2\n{found}/{points} points found again", views[:, channels:]),
        ]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        # The views' augmentation; SimCLR's temperature and projection are this pretext's own.
        params["views"] = {
            key: value
            for key, value in self.views.params().items()
            if key not in ("temperature", "projection_dim")
        }
        return params


def view_positions(points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Where input positions (B, M, D) lie in a view whose voxels read the input through
    `theta` (B, D, D + 1), `sampling_theta`'s map from view to input: its inverse."""
    with torch.autocast(points.device.type, enabled=False):
        matrix, offset = theta[..., :-1].float(), theta[..., -1].float()
        return (points.float() - offset[:, None]) @ torch.linalg.inv(matrix).transpose(1, 2)


def points_in_both(
    outputs: torch.Tensor, inside: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Projections (B, 2, M, P) -> the unit-length projections of the N points inside both
    views, (N, P) from view 1 and (N, P) from view 2, row i of both the same point; float32."""
    images_and_points = (outputs.shape[0], outputs.shape[2]) if outputs.ndim == 4 else None
    if outputs.shape[1:2] != (2,) or images_and_points != tuple(inside.shape):
        raise CtxRestoreError(
            f"dense_contrastive: expected projections (B, 2, M, P) of {tuple(inside.shape)} "
            f"images x points, got shape {tuple(outputs.shape)}"
        )
    with torch.autocast(outputs.device.type, enabled=False):
        chosen = outputs.float().transpose(1, 2)[inside]  # (N, 2, P)
        return F.normalize(chosen[:, 0], dim=1), F.normalize(chosen[:, 1], dim=1)


def points_found(outputs: torch.Tensor, inside: torch.Tensor) -> tuple[int, int]:
    """How many of the N points inside both views find their own point in view 2 as the most
    similar, of N."""
    first, second = points_in_both(outputs, inside)
    if len(first) == 0:
        return 0, 0
    nearest = (first @ second.T).argmax(dim=1)
    return int((nearest == torch.arange(len(first), device=first.device)).sum()), len(first)
