"""ctxrestore: self-supervised pretraining by context restoration (Chen et al., MedIA 2019)."""

__version__ = "0.1.0"

from ctxrestore.api import (
    ablate,
    benchmark,
    compare,
    demo,
    finetune,
    load_pretrained,
    predict,
    pretrain,
    probe,
)
from ctxrestore.corruption import ContextRestoration, ContextRestorationd, context_restoration
from ctxrestore.progress import show_progress

__all__ = [
    "ContextRestoration",
    "ContextRestorationd",
    "__version__",
    "ablate",
    "benchmark",
    "compare",
    "context_restoration",
    "demo",
    "finetune",
    "load_pretrained",
    "predict",
    "pretrain",
    "probe",
    "show_progress",
]
