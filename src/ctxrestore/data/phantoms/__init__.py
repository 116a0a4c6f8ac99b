"""Built-in procedural phantoms: seeded, generated on access, no download."""

from ctxrestore.data.phantoms.base import PhantomDataset, PhantomSample
from ctxrestore.data.phantoms.registry import (
    PHANTOMS,
    PhantomInfo,
    get_phantom,
    list_phantoms,
    phantom_dataset,
)

__all__ = [
    "PHANTOMS",
    "PhantomDataset",
    "PhantomInfo",
    "PhantomSample",
    "get_phantom",
    "list_phantoms",
    "phantom_dataset",
]
