"""Readers, dataset layouts, intensity normalisation and built-in phantoms."""

from ctxrestore.data.image_folder import ImageFolderDataset, find_images, read_image
from ctxrestore.data.phantoms import list_phantoms, phantom_dataset

__all__ = ["ImageFolderDataset", "find_images", "list_phantoms", "phantom_dataset", "read_image"]
