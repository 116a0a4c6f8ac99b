"""ctxrestore: self-supervised pretraining by context restoration (Chen et al., MedIA 2019)."""

__version__ = "0.1.0"
