"""Relative position (Doersch, Gupta, Efros, ICCV 2015): where does this patch lie next to that one?

The "RP" baseline of Chen et al. 2019. From each image, an anchor patch and one of its 8 (26 in
3D) grid neighbours are cut (`corruption.patch_pairs`, with gaps and jitter against trivial
edge cues); a siamese network (`models.relative_position`) classifies the neighbour's
position. Its encoder is the chosen --network's encoder, so it transfers to the downstream
networks; the position head is left behind.

Patches are not resized: every patch axis must be a multiple of the encoder's downsampling
factor (16 for SonoNet and the default U-Net, which pool 4 times), checked when the network
is chosen. Resizing would let any patch size run, but would pretrain the encoder at another
scale than the images it is fine-tuned on. With patch 16 and the default gap 4, the 3x3 grid
spans 60 voxels, so 64-voxel images fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ctxrestore.corruption.patch_pairs import neighbour_offsets, resolve_grid, sample_patch_pairs
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import model_spec
from ctxrestore.pretext.registry import register_pretext


@register_pretext("relative_position")
@dataclass(frozen=True)
class RelativePositionPretext:
    """patch_size: int or one per axis, a multiple of the encoder's downsampling factor;
    gap / jitter: see `sample_patch_pairs` (None: patch_size // 4 and patch_size // 8,
    recorded resolved in the checkpoint spec)."""

    patch_size: int | Sequence[int] = 16
    gap: int | Sequence[int] | None = None
    jitter: int | Sequence[int] | None = None
    name: str = "relative_position"

    def __post_init__(self) -> None:
        scalar = isinstance(self.patch_size, int)
        dims = 2 if scalar else len(tuple(self.patch_size))
        _, gaps, jitters = resolve_grid(self.patch_size, dims, self.gap, self.jitter)
        if self.gap is None:
            object.__setattr__(self, "gap", gaps[0] if scalar else gaps)
        if self.jitter is None:
            object.__setattr__(self, "jitter", jitters[0] if scalar else jitters)

    def network_spec(self, base: dict) -> dict:
        """The siamese network around `base`'s encoder; the patch must suit that encoder."""
        kwargs = base["kwargs"]
        spatial_dims = kwargs["spatial_dims"]
        patch, _, _ = resolve_grid(self.patch_size, spatial_dims, self.gap, self.jitter)
        factor = base["downsampling_factor"]
        if any(size % factor for size in patch):
            raise CtxRestoreError(
                f"relative_position: patch_size {self.patch_size} is not a multiple of {factor}, "
                f"the downsampling factor of network '{base['name']}' (patches are not "
                f"resized); use patch_size {factor} or another multiple of {factor}"
            )
        return model_spec(
            "relative_position",
            spatial_dims=spatial_dims,
            in_channels=kwargs["in_channels"],
            **base["encoder"],
        )

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *spatial) -> (patch pairs (B, 2C, *patch), positions (B,) int64)."""
        return sample_patch_pairs(
            images, self.patch_size, generator, gap=self.gap, jitter=self.jitter
        )

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """Accuracy of the predicted positions, and that of guessing: the labels are uniform,
        so any guess that ignores the patches is right 1 / num_positions of the time."""
        correct = (outputs.argmax(dim=1) == targets).float().mean()
        return {
            "position_accuracy": float(correct),
            "chance_accuracy": 1.0 / outputs.shape[1],
        }

    def summary(self, metrics: dict[str, float]) -> str:
        accuracy, chance = metrics["position_accuracy"], metrics["chance_accuracy"]
        positions = round(1 / chance)
        if accuracy > chance:
            return (
                f"Held-out relative-position accuracy {100 * accuracy:.1f}% against "
                f"{100 * chance:.1f}% by chance ({positions} positions): the encoder tells "
                f"where patches lie relative to each other ({accuracy / chance:.2f}x chance)."
            )
        return (
            f"Held-out relative-position accuracy {100 * accuracy:.1f}% is no better than "
            f"chance ({100 * chance:.1f}%, {positions} positions): the network has not learned "
            "yet (train longer, or check the data)."
        )

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        """Anchor and neighbour patches (titled with the true / predicted position indices of
        `neighbour_offsets`), then each pair laid out on its 3x3 grid at the true and at the
        predicted position (3D: the patches' middle slices, the grid's depth layers side by
        side)."""
        channels = inputs.shape[1] // 2
        anchors, neighbours = inputs[:, :channels], inputs[:, channels:]
        predicted = outputs.argmax(dim=1)
        right = int((predicted == targets).sum())
        shown = zip(targets[:8].tolist(), predicted[:8].tolist())  # the grid shows 8 columns
        pairs = " ".join(f"{true}/{guess}" for true, guess in shown)
        return [
            ("anchor", anchors),
            (f"neighbour\nposition true/predicted\n{pairs}", neighbours),
            ("true position", grid_layout(anchors, neighbours, targets)),
            (
                f"predicted ({right}/{len(targets)} right)",
                grid_layout(anchors, neighbours, predicted),
            ),
        ]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params


def grid_layout(
    anchors: torch.Tensor, neighbours: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """(B, C, *patch) pairs -> (B, C, rows, columns) images: the anchor in the centre cell of a
    3x3 grid and the neighbour in the cell of `positions` (B,); empty cells hold the pair's
    minimum. Volumes show the patches' middle slices, the grid's 3 depth layers side by side."""
    spatial_dims = anchors.ndim - 2
    cells = neighbour_offsets(spatial_dims).to(positions.device)[positions] + 1  # (B, D)
    if spatial_dims == 3:
        anchors, neighbours = (x[:, :, x.shape[2] // 2] for x in (anchors, neighbours))
        row, column = cells[:, 1], cells[:, 0] * 3 + cells[:, 2]
    else:
        row, column = cells[:, 0], cells[:, 1]
    batch, channels, height, width = anchors.shape
    columns = 3 ** (spatial_dims - 1)
    fill = torch.minimum(anchors.flatten(1).amin(1), neighbours.flatten(1).amin(1))
    canvas = fill.view(batch, 1, 1, 1, 1, 1).expand(batch, channels, 3, height, columns, width)
    canvas = canvas.clone()
    canvas[:, :, 1, :, columns // 2, :] = anchors
    canvas[torch.arange(batch, device=row.device), :, row, :, column, :] = neighbours
    return canvas.reshape(batch, channels, 3 * height, columns * width)
