"""PNG figures a person opens to check a run: image grids and loss curves.

Figures are drawn on matplotlib's object API with an Agg canvas, so no global backend is
switched and nothing needs a display. Files are written atomically: a reader never sees a
half-written PNG, even while training keeps overwriting it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps as matplotlib_colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write

_CELL_INCHES = 1.6


def _save(figure: Figure, path: Path | str) -> Path:
    FigureCanvasAgg(figure)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))


def _display_slices(title: str, images: torch.Tensor, max_images: int) -> list[np.ndarray]:
    """The first channel of the first `max_images` images; the middle slice of a volume."""
    if images.ndim not in (4, 5):
        raise CtxRestoreError(
            f"image grid row {title!r} has shape {tuple(images.shape)}; "
            "give (B, C, H, W) or (B, C, D, H, W)"
        )
    first_channel = images[:max_images, 0].detach().to("cpu", torch.float32)
    if first_channel.ndim == 4:
        first_channel = first_channel[:, first_channel.shape[1] // 2]
    return list(first_channel.numpy())


def _column_range(slices: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([s[np.isfinite(s)] for s in slices])
    if values.size == 0:
        return 0.0, 1.0
    return float(values.min()), float(values.max())


def save_image_grid(
    path: Path | str,
    rows: Sequence[tuple[str, torch.Tensor]],
    max_images: int = 8,
) -> Path:
    """Write a PNG grid: one row per (title, images (B, C, *spatial)), one column per image.

    Shows channel 0 of the first `max_images` images of each row; a 3D image shows its middle
    slice along the first spatial axis. All images in a column share one grey scale, so that
    e.g. input, corrupted and restored versions of the same image compare directly.
    """
    if not rows:
        raise CtxRestoreError(f"image grid {path}: no rows to draw")
    if max_images < 1:
        raise CtxRestoreError(f"image grid {path}: max_images {max_images} must be >= 1")
    titled = [(title, _display_slices(title, images, max_images)) for title, images in rows]
    num_columns = max(len(slices) for _, slices in titled)
    if num_columns == 0:
        raise CtxRestoreError(f"image grid {path}: every row holds 0 images")
    ranges = [
        _column_range([slices[c] for _, slices in titled if c < len(slices)])
        for c in range(num_columns)
    ]

    # One mosaic in one axes: drawing a subplot per image costs ~1.5 s per grid.
    height = max(s.shape[0] for _, slices in titled for s in slices)
    width = max(s.shape[1] for _, slices in titled for s in slices)
    gap = max(1, height // 16)
    mosaic = np.ones(
        (len(titled) * (height + gap) - gap, num_columns * (width + gap) - gap), np.float32
    )
    for row, (_, slices) in enumerate(titled):
        for column, image in enumerate(slices):
            low, high = ranges[column]
            scaled = np.clip((image - low) / max(high - low, 1e-12), 0, 1)
            top, left = row * (height + gap), column * (width + gap)
            mosaic[top : top + image.shape[0], left : left + image.shape[1]] = scaled
    figure = Figure(figsize=(_CELL_INCHES * num_columns, _CELL_INCHES * len(titled)))
    ax = figure.subplots()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([row * (height + gap) + height / 2 for row in range(len(titled))])
    ax.set_yticklabels([title for title, _ in titled])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    figure.tight_layout()
    return _save(figure, path)


def save_loss_curve(
    path: Path | str,
    steps: Sequence[int],
    losses: Sequence[float],
    title: str = "loss",
    ylabel: str = "loss",
    log_scale: bool = True,
) -> Path:
    """Write a PNG line plot of loss (or another value: `ylabel`) against step, with a
    log-scale y axis unless `log_scale` is off.

    Falls back to a linear y axis when a finite value is <= 0, which a log scale cannot show.
    Non-finite values leave gaps in the line.
    """
    if len(steps) != len(losses):
        raise CtxRestoreError(
            f"loss curve {path}: {len(steps)} steps but {len(losses)} losses; give one per step"
        )
    if not losses:
        raise CtxRestoreError(f"loss curve {path}: no losses to draw")
    values = [float(loss) for loss in losses]
    finite = [value for value in values if math.isfinite(value)]

    figure = Figure(figsize=(6.0, 4.0))
    ax = figure.subplots()
    ax.plot(list(steps), values, linewidth=1.2, marker="." if len(values) < 50 else None)
    if log_scale and finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    return _save(figure, path)


def save_labelled_gallery(
    path: Path | str,
    panels: Sequence[dict],
    columns: int = 6,
    label_names: dict[int, str] | None = None,
) -> Path:
    """Write a PNG of labelled images: masks coloured, boxes drawn, a title per image.

    Each panel: {"image": (H, W) array in [0, 1], "title": str, optionally "mask": (H, W) int
    label map and "boxes": [(label value, ((y0, x0), (y1, x1)))] (one past the last pixel),
    drawn in the colour of that label's mask.
    """
    if not panels:
        raise CtxRestoreError(f"gallery {path}: no images to draw")
    rows = math.ceil(len(panels) / columns)
    columns = min(columns, len(panels))
    figure = Figure(figsize=(2.2 * columns, 2.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    colours = matplotlib_colormaps["tab10"]
    for ax, panel in zip(axes.flat, panels):
        ax.imshow(panel["image"], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        mask = panel.get("mask")
        if mask is not None and mask.any():
            values = [v for v in np.unique(mask) if v != 0]
            overlay = np.zeros((*mask.shape, 4), np.float32)
            for value in values:
                overlay[mask == value] = (*colours(int(value) % 10)[:3], 0.45)
            ax.imshow(overlay, interpolation="nearest")
        for value, box in panel.get("boxes", ()):
            (y0, x0), (y1, x1) = box
            ax.add_patch(
                Rectangle(
                    (x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0,
                    fill=False, linewidth=1.0, edgecolor=colours(int(value) % 10),
                )
            )  # fmt: skip
        ax.set_title(panel.get("title", ""), fontsize=8)
        ax.set_axis_off()
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_axis_off()
    if label_names:
        handles = [
            Rectangle((0, 0), 1, 1, color=colours(value % 10), alpha=0.6)
            for value in label_names
            if value != 0
        ]
        names = [name for value, name in label_names.items() if value != 0]
        figure.legend(handles, names, loc="lower center", ncol=min(6, len(names)), fontsize=8)
    figure.tight_layout(rect=(0, 0.05 if label_names else 0, 1, 1))
    return _save(figure, path)


def save_confusion_matrix(
    path: Path | str,
    matrix: np.ndarray,
    class_names: Sequence[str],
    title: str = "",
) -> Path:
    """Write a PNG heatmap of a (K, K) confusion matrix: rows truth, columns prediction.

    Each cell shows its count; its colour is the count as a fraction of its truth row (the
    recall along the diagonal), so that rare classes are as readable as common ones.
    """
    matrix = np.asarray(matrix)
    num_classes = len(class_names)
    if matrix.shape != (num_classes, num_classes):
        raise CtxRestoreError(
            f"confusion matrix {path}: shape {matrix.shape} does not fit {num_classes} class "
            f"names; give a ({num_classes}, {num_classes}) matrix"
        )
    row_totals = matrix.sum(axis=1, keepdims=True)
    fractions = np.divide(
        matrix, row_totals, out=np.zeros(matrix.shape, np.float64), where=row_totals > 0
    )

    side = max(4.0, 0.55 * num_classes + 2.5)
    figure = Figure(figsize=(side + 1.0, side))
    ax = figure.subplots()
    heatmap = ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    # Small fonts once the cells get small, so the counts still fit.
    fontsize = 9 if num_classes <= 10 else 6
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if fractions[row, column] > 0.5 else "black"
        text = str(int(count)) if float(count).is_integer() else f"{count:.2f}"
        ax.text(column, row, text, ha="center", va="center", color=colour, fontsize=fontsize)
    ticks = list(range(num_classes))
    ax.set_xticks(ticks)
    ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=fontsize)
    ax.set_yticks(ticks)
    ax.set_yticklabels(class_names, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    if title:
        ax.set_title(title)
    figure.colorbar(heatmap, ax=ax, fraction=0.046, pad=0.04, label="fraction of truth row")
    figure.tight_layout()
    return _save(figure, path)
