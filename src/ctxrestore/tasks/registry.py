"""The downstream tasks by name: what `finetune TASK` and a run's spec.json refer to."""

from __future__ import annotations

from ctxrestore.errors import CtxRestoreError
from ctxrestore.tasks.classify import ClassificationTask
from ctxrestore.tasks.localize import LocalizationTask
from ctxrestore.tasks.segment import SegmentationTask

TASKS = {
    "classify": ClassificationTask,
    "localize": LocalizationTask,
    "segment": SegmentationTask,
}


def task_from_json(data: dict):
    """Rebuild a task from its `to_json()` description (a run's spec.json "task")."""
    name = data.get("name") if isinstance(data, dict) else None
    if name not in TASKS:
        raise CtxRestoreError(f"unknown task {name!r} in a run's spec; tasks: {', '.join(TASKS)}")
    return TASKS[name].from_json(data)
