"""Segmentation: a U-Net whose encoder and decoder are both transferred (Chen et al. 2019,
BraTS). Loss: Dice + cross-entropy (MONAI's DiceCELoss); metrics: Dice and HD95 per class
(MONAI's implementations) and, for BraTS labels, per region.

Label values need not be contiguous (BraTS uses 0, 1, 2, 4): the network predicts class k for
label value `label_values[k]`. Class imbalance: the Dice term weighs every class equally
whatever its size, and `balanced` adds cross-entropy weights from the training voxel counts.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice, compute_hausdorff_distance
from torch import nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_image_grid
from ctxrestore.models.spec import unet_spec

if TYPE_CHECKING:
    from ctxrestore.tasks.augment import Augmentation

MAX_CLASS_WEIGHT_RATIO = 10.0  # rare classes count more, but never beyond 10x the commonest


@dataclass(frozen=True)
class SegmentationTask:
    label_values: tuple[int, ...]
    label_names: tuple[str, ...]
    regions: dict[str, tuple[int, ...]] = field(default_factory=dict)
    class_weights: tuple[float, ...] | None = None
    augmentation: Augmentation | None = None
    name: str = "segment"
    # Global Dice (all test voxels pooled) over the regions, or the classes when there are
    # none: unlike the per-image mean it does not reward predicting nothing on empty slices.
    metric: str = "global_dice/mean"

    def __post_init__(self) -> None:
        if len(self.label_values) != len(self.label_names) or len(self.label_values) < 2:
            raise CtxRestoreError(
                f"segmentation needs >= 2 labels with one name each, got values "
                f"{self.label_values} and names {self.label_names}"
            )
        if self.label_values[0] != 0:
            raise CtxRestoreError(f"label value 0 must be the background, got {self.label_values}")

    @property
    def num_classes(self) -> int:
        return len(self.label_values)

    def class_indices(self, mask: torch.Tensor) -> torch.Tensor:
        """Label values (*) -> class indices (*), refusing values outside the declared labels."""
        lookup = torch.full((max(self.label_values) + 1,), -1, dtype=torch.long)
        lookup[list(self.label_values)] = torch.arange(self.num_classes)
        mask = mask.long()
        if mask.numel() and (mask.min() < 0 or mask.max() >= lookup.numel()):
            raise CtxRestoreError(
                f"mask holds values {sorted(torch.unique(mask).tolist())[:10]}, outside the "
                f"declared labels {self.label_values}"
            )
        classes = lookup.to(mask.device)[mask]
        if (classes < 0).any():
            bad = sorted(set(torch.unique(mask).tolist()) - set(self.label_values))
            raise CtxRestoreError(
                f"mask holds label values {bad} that are not declared ({self.label_values})"
            )
        return classes

    def network_spec(self, spatial_dims: int, in_channels: int, encoder: dict) -> dict:
        """A U-Net on the encoder's stages: its decoder matches a U-Net pretraining's."""
        return unet_spec(spatial_dims, in_channels, self.num_classes, encoder)

    def balanced(self, train_items: Sequence[dict[str, torch.Tensor]]) -> SegmentationTask:
        """Cross-entropy weights ~ 1 / sqrt(voxel frequency), at most 10x apart; the square
        root because the Dice term already favours small classes."""
        counts = torch.zeros(self.num_classes, dtype=torch.float64)
        for item in train_items:
            counts += torch.bincount(
                self.class_indices(item["mask"]).flatten(), minlength=self.num_classes
            )
        present = counts > 0
        weights = torch.ones(self.num_classes, dtype=torch.float64)
        if present.any():
            weights[present] = (counts[present].sum() / counts[present]).sqrt()
            weights[~present] = weights[present].max()
            weights = weights.clamp(max=weights.min() * MAX_CLASS_WEIGHT_RATIO)
            weights /= weights.mean()
        return dataclasses.replace(self, class_weights=tuple(weights.tolist()))

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        if self.augmentation is not None:
            batch = self.augmentation(batch, generator)
        logits = model(batch["image"]).float()
        target = self.class_indices(batch["mask"])[:, None]
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return DiceCELoss(to_onehot_y=True, softmax=True, weight=weight)(logits, target)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{"mask": (B, *S) label values, "probabilities": (B, K, *S)}."""
        probabilities = model(images).float().softmax(dim=1)
        values = torch.tensor(self.label_values, device=images.device)
        return {"mask": values[probabilities.argmax(dim=1)], "probabilities": probabilities}

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "label_values": list(self.label_values),
            "label_names": list(self.label_names),
            "regions": {name: list(values) for name, values in self.regions.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> SegmentationTask:
        """The task that `to_json` described (unweighted, unaugmented: what predict needs)."""
        if (
            not isinstance(data, dict)
            or data.get("name") != "segment"
            or not data.get("label_values")
        ):
            raise CtxRestoreError(
                f"not a segmentation task description (need name 'segment', label_values and "
                f"label_names), got {data!r:.200}"
            )
        return cls(
            tuple(int(v) for v in data["label_values"]),
            tuple(data["label_names"]),
            regions={k: tuple(v) for k, v in data.get("regions", {}).items()},
        )

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None:
        images = batch["image"][:8]
        prediction = model(images).argmax(dim=1, keepdim=True).float()
        truth = self.class_indices(batch["mask"][:8])[:, None].float()
        save_image_grid(path, [("image", images), ("truth", truth), ("prediction", prediction)])

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        device: torch.device,
    ) -> dict[str, float]:
        """Per class and region: mean over images of Dice and HD95 (mm when the batch has
        "spacing"), and the global Dice over all voxels of all images.

        In the per-image mean, an image whose truth and prediction are both empty scores Dice 1
        and no HD95; a false positive on an empty truth scores 0. On 2D slices, many of which
        hold no enhancing tumour, that rewards predicting nothing: read `global_dice` too.
        """
        model.eval()
        totals: dict[str, list[float]] = {}
        overlap: dict[str, list[int]] = {}  # name -> [intersection, predicted, expected]
        for batch in batches:
            prediction = model(batch["image"].to(device)).argmax(dim=1).cpu()
            truth = self.class_indices(batch["mask"])
            spacing = batch.get("spacing")
            for name, predicted, expected in self._masks(prediction, truth):
                counts = overlap.setdefault(name, [0, 0, 0])
                counts[0] += int((predicted & expected).sum())
                counts[1] += int(predicted.sum())
                counts[2] += int(expected.sum())
                for index in range(predicted.shape[0]):
                    scores = segmentation_scores(
                        predicted[index],
                        expected[index],
                        None if spacing is None else spacing[index].tolist(),
                    )
                    for metric, value in scores.items():
                        totals.setdefault(f"{metric}/{name}", []).append(value)
        metrics = {key: _nanmean(values) for key, values in totals.items()}
        for name, (intersection, predicted, expected) in overlap.items():
            total = predicted + expected
            metrics[f"global_dice/{name}"] = 2 * intersection / total if total else 1.0
        foreground = [f"dice/{name}" for name in self.label_names[1:]]
        metrics["dice/mean"] = _nanmean([metrics[key] for key in foreground])
        scored = list(self.regions) or list(self.label_names[1:])
        metrics["global_dice/mean"] = _nanmean([metrics[f"global_dice/{n}"] for n in scored])
        return metrics

    def _masks(self, prediction: torch.Tensor, truth: torch.Tensor):
        """(name, predicted bool (B, *S), expected bool (B, *S)) per class, then per region."""
        for index, name in enumerate(self.label_names[1:], start=1):
            yield name, prediction == index, truth == index
        for region, values in self.regions.items():
            indices = [self.label_values.index(v) for v in values if v in self.label_values]
            yield region, _isin(prediction, indices), _isin(truth, indices)


def _isin(classes: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    return torch.isin(classes, torch.tensor(indices, dtype=classes.dtype))


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def segmentation_scores(
    predicted: torch.Tensor, expected: torch.Tensor, spacing: Sequence[float] | None = None
) -> dict[str, float]:
    """Dice and HD95 of one binary mask pair (*spatial), with MONAI's implementations.

    Dice: 1.0 when both are empty. HD95 (in mm when `spacing` is given): NaN unless both
    masks are non-empty.
    """
    predicted_onehot = predicted[None, None].float()
    expected_onehot = expected[None, None].float()
    if not expected.any() and not predicted.any():
        return {"dice": 1.0, "hd95": float("nan")}
    dice = float(compute_dice(predicted_onehot, expected_onehot, ignore_empty=False)[0, 0])
    hd95 = float("nan")
    if expected.any() and predicted.any():
        with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal call
            warnings.simplefilter("ignore", FutureWarning)
            distance = compute_hausdorff_distance(
                predicted_onehot, expected_onehot, percentile=95, spacing=spacing
            )
        hd95 = float(distance[0, 0])
    return {"dice": dice, "hd95": hd95}
