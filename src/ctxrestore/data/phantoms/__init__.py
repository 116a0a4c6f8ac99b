"""Built-in procedural phantoms: seeded, generated on access, no download."""

from ctxrestore.data.phantoms.shapes import ShapesPhantomDataset, shapes_phantom

PHANTOMS = {"shapes": ShapesPhantomDataset}


def list_phantoms() -> list[str]:
    """Names of the registered phantom datasets, sorted."""
    return sorted(PHANTOMS)


__all__ = ["PHANTOMS", "ShapesPhantomDataset", "list_phantoms", "shapes_phantom"]
