"""Readers, dataset layouts, preprocessing, caching and built-in phantoms."""

from ctxrestore.data.phantoms import list_phantoms, phantom_dataset
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.readers import find_sources, read_volume

__all__ = ["Preprocessing", "find_sources", "list_phantoms", "phantom_dataset", "read_volume"]
