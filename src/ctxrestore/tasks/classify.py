"""Classification: a SonoNet-style classifier whose encoder is transferred (Chen et al. 2019,
fetal ultrasound scan planes). Loss: class-weighted cross-entropy; metrics: precision, recall
and F1 per class and macro-averaged (the paper's scan-plane metrics), and accuracy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_labelled_gallery
from ctxrestore.models.spec import model_spec
from ctxrestore.tasks.base import weights_per_name

if TYPE_CHECKING:
    from ctxrestore.tasks.augment import Augmentation

logger = logging.getLogger(__name__)

# `balanced` never weighs a class more than this many times the most common one: with a handful
# of examples of a class, inverse frequency alone would let them dominate the loss.
MAX_WEIGHT_RATIO = 10.0
PREVIEW_IMAGES = 8


@dataclass(frozen=True)
class ClassificationTask:
    """Classes are indices into `class_names`: batch "label" (B,) int64 in [0, K).

    `class_weights` (one per class) weigh the cross-entropy; None weighs all classes equally.
    """

    class_names: tuple[str, ...]
    class_weights: tuple[float, ...] | None = None
    augmentation: Augmentation | None = None
    name: str = field(default="classify", init=False)
    metric: str = field(default="macro_f1", init=False)

    def __post_init__(self) -> None:
        names = tuple(self.class_names)
        if len(names) < 2 or len(set(names)) != len(names):
            raise CtxRestoreError(f"classification needs >= 2 distinct class names, got {names}")
        object.__setattr__(self, "class_names", names)
        if self.class_weights is not None:
            weights = weights_per_name(
                "class_weights", self.class_weights, names, per="class", zero_allowed=True
            )
            object.__setattr__(self, "class_weights", weights)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def network_spec(self, spatial_dims: int, in_channels: int, encoder: dict) -> dict:
        return model_spec(
            "classifier",
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_classes=self.num_classes,
            **encoder,
        )

    def balanced(self, train_items: Sequence[dict[str, torch.Tensor]]) -> ClassificationTask:
        """A copy weighing class k by N / (K * count_k) (sklearn's "balanced"), so that every
        class contributes alike to the loss.

        A class absent from the training items has no inverse frequency; it gets the largest
        weight of the present ones, and a warning that the network cannot learn it from these
        items. Weights are clipped to MAX_WEIGHT_RATIO times the smallest.
        """
        labels = _class_indices(
            [item["label"] for item in train_items], self.num_classes, "training labels"
        )
        if labels.size == 0:
            raise CtxRestoreError("cannot balance the classes of an empty training set")
        counts = np.bincount(labels, minlength=self.num_classes)
        present = counts > 0
        weights = np.zeros(self.num_classes)
        weights[present] = labels.size / (self.num_classes * counts[present])
        weights = np.minimum(weights, MAX_WEIGHT_RATIO * weights[present].min())
        if not present.all():
            absent = [self.class_names[index] for index in np.flatnonzero(~present)]
            logger.warning(
                "classes %s have no training examples; giving them the largest weight of the "
                "others",
                absent,
            )
            weights[~present] = weights[present].max()
        return dataclasses.replace(self, class_weights=tuple(float(w) for w in weights))

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        if self.augmentation is not None:
            batch = self.augmentation(batch, generator)
        labels = batch["label"].long()
        # One host sync per step, on a bool: a label outside [0, K) would otherwise surface as
        # an opaque CUDA device-side assert inside cross_entropy.
        if ((labels < 0) | (labels >= self.num_classes)).any():
            raise CtxRestoreError(
                f"batch labels {sorted(set(labels.tolist()))} fall outside the class indices "
                f"0..{self.num_classes - 1} of {self.class_names}"
            )
        logits = model(batch["image"]).float()
        weight = None
        if self.class_weights is not None:
            weight = torch.tensor(self.class_weights, dtype=torch.float32, device=logits.device)
        return functional.cross_entropy(logits, labels, weight=weight)

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None:
        """A gallery of the batch's first images titled with their true and predicted class."""
        images = batch["image"][:PREVIEW_IMAGES]
        predicted = model(images).argmax(dim=1).tolist()
        truth = batch["label"][:PREVIEW_IMAGES].tolist()
        panels = [
            {
                "image": plane,
                "title": f"truth: {self._class_name(true)}\npredicted: {self._class_name(guess)}",
            }
            for plane, true, guess in zip(_display_planes(images), truth, predicted)
        ]
        save_labelled_gallery(path, panels, columns=4)

    def _class_name(self, index: int) -> str:
        return self.class_names[index] if 0 <= index < self.num_classes else f"#{index}"

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        device: torch.device,
    ) -> dict[str, float]:
        """`classification_metrics` over all batches."""
        model.eval()
        truth, predicted = [], []
        for batch in batches:
            predicted.append(model(batch["image"].to(device)).argmax(dim=1).cpu())
            truth.append(batch["label"].reshape(-1).cpu())
        return classification_metrics(torch.cat(truth), torch.cat(predicted), self.class_names)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, C, *S) -> "probabilities" (B, K) float32 and "label" (B,) int64."""
        model.eval()
        probabilities = torch.softmax(model(images).float(), dim=1)
        return {"probabilities": probabilities, "label": probabilities.argmax(dim=1)}

    def to_json(self) -> dict:
        return {"name": self.name, "class_names": list(self.class_names)}

    @classmethod
    def from_json(cls, data: dict) -> ClassificationTask:
        """The task that `to_json` described (unweighted, unaugmented: what predict needs)."""
        if (
            not isinstance(data, dict)
            or data.get("name") != "classify"
            or not data.get("class_names")
        ):
            raise CtxRestoreError(
                f"not a classification task description (need name 'classify' and "
                f"class_names): {data!r:.200}"
            )
        return cls(tuple(data["class_names"]))


def _display_planes(images: torch.Tensor) -> list[np.ndarray]:
    """(B, C, *S) -> channel 0 of each image (the middle slice of a volume) as (H, W) in [0, 1].

    One grey scale for the whole batch: intensity may be what tells the classes apart.
    """
    planes = images[:, 0].detach().to("cpu", torch.float32)
    while planes.ndim > 3:
        planes = planes[:, planes.shape[1] // 2]
    planes = torch.nan_to_num(planes)
    low, high = planes.min(), planes.max()
    return list(((planes - low) / (high - low).clamp_min(1e-12)).numpy())


def _class_indices(values, num_classes: int, what: str) -> np.ndarray:
    """Class indices from a tensor / sequence (of ints or scalar tensors) as int64 (N,)."""
    if isinstance(values, torch.Tensor):
        indices = values.detach().cpu().reshape(-1).long().numpy()
    else:
        indices = np.asarray([int(value) for value in values], dtype=np.int64)
    outside = indices[(indices < 0) | (indices >= num_classes)]
    if outside.size:
        raise CtxRestoreError(
            f"{what} hold class indices {sorted(set(outside.tolist()))[:10]} outside "
            f"0..{num_classes - 1}"
        )
    return indices


def confusion_matrix(
    true: Sequence[int] | torch.Tensor,
    predicted: Sequence[int] | torch.Tensor,
    num_classes: int,
) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    true_indices = _class_indices(true, num_classes, "true labels")
    predicted_indices = _class_indices(predicted, num_classes, "predicted labels")
    if true_indices.shape != predicted_indices.shape:
        raise CtxRestoreError(
            f"{true_indices.size} true labels but {predicted_indices.size} predictions; "
            "give one prediction per label"
        )
    flat = np.bincount(true_indices * num_classes + predicted_indices, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def classification_metrics(
    true: Sequence[int] | torch.Tensor,
    predicted: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, float]:
    """Per class: "precision/<name>", "recall/<name>", "f1/<name>", "support/<name>" (number of
    true examples); "macro_precision", "macro_recall", "macro_f1" (unweighted means over all
    classes, present or not) and "accuracy".

    Undefined ratios count as 0, as sklearn's zero_division=0: the precision of a class never
    predicted, the recall of a class with no true examples, the F1 when both are 0.
    """
    matrix = confusion_matrix(true, predicted, len(class_names))
    total = int(matrix.sum())
    if total == 0:
        raise CtxRestoreError("classification metrics need at least one labelled example")
    hits = np.diag(matrix).astype(np.float64)
    predicted_counts = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    precision = _ratio(hits, predicted_counts)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    metrics: dict[str, float] = {}
    for index, name in enumerate(class_names):
        metrics[f"precision/{name}"] = float(precision[index])
        metrics[f"recall/{name}"] = float(recall[index])
        metrics[f"f1/{name}"] = float(f1[index])
        metrics[f"support/{name}"] = float(support[index])
    metrics["macro_precision"] = float(precision.mean())
    metrics["macro_recall"] = float(recall.mean())
    metrics["macro_f1"] = float(f1.mean())
    metrics["accuracy"] = float(hits.sum() / total)
    return metrics


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)
