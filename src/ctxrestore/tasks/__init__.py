"""Downstream tasks: a head + a loss + metrics + how labels are read (one file per task)."""

from ctxrestore.tasks.classify import (
    ClassificationTask,
    classification_metrics,
    confusion_matrix,
)
from ctxrestore.tasks.localize import LocalizationTask, box_iou, localization_metrics
from ctxrestore.tasks.registry import TASKS, task_from_json
from ctxrestore.tasks.segment import SegmentationTask, segmentation_scores

__all__ = [
    "TASKS",
    "ClassificationTask",
    "LocalizationTask",
    "SegmentationTask",
    "box_iou",
    "classification_metrics",
    "confusion_matrix",
    "localization_metrics",
    "segmentation_scores",
    "task_from_json",
]
