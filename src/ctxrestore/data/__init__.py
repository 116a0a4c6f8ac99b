"""Readers, dataset layouts, preprocessing and built-in phantoms."""

from ctxrestore.data.image_folder import ImageFolderDataset, find_images, read_image
from ctxrestore.data.phantoms import PHANTOMS, list_phantoms

__all__ = ["PHANTOMS", "ImageFolderDataset", "find_images", "list_phantoms", "read_image"]
