"""Downstream tasks: a head + a loss + metrics + how labels are read (one file per task)."""

from ctxrestore.tasks.segment import SegmentationTask, segmentation_scores

__all__ = ["SegmentationTask", "segmentation_scores"]
