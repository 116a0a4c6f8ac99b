"""Siamese relative-position network (Doersch, Gupta, Efros, ICCV 2015; the "RP" baseline of
Chen et al. 2019).

Both patches of a pair go through the SAME encoder (one batch of 2B), are globally average
pooled, concatenated and classified into the neighbour's position (8 in 2D, 26 in 3D). The
encoder is a ConvEncoder built with exactly the arguments of the pretraining networks'
encoders (`ConvEncoder.config()`), so its `encoder.*` weights transfer to the downstream
networks; the MLP `head` is pretext-specific and is left behind.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.network import pooled_pair
from ctxrestore.models.registry import register_model


class PairHead(nn.Module):
    """MLP on the two patches' pooled features: (B, 2 * in_features) -> logits (B, outputs)."""

    def __init__(self, in_features: int, hidden_features: int, num_positions: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2 * in_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, num_positions),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class RelativePositionNetwork(nn.Module):
    """(B, 2 * in_channels, *patch) -> logits (B, num_positions).

    The input holds the anchor's channels, then the neighbour's (`sample_patch_pairs`). Every
    patch axis must be divisible by `encoder.downsampling_factor`.
    """

    def __init__(self, encoder: ConvEncoder, head: PairHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        anchor, neighbour = pooled_pair(self.encoder, x, "relative-position", "a pair of patches")
        return self.head(torch.cat([anchor, neighbour], dim=1))


@register_model("relative_position")
def relative_position(
    spatial_dims: int = 2,
    in_channels: int = 1,
    stage_channels: Sequence[int] = (16, 32, 64, 128, 128),
    convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    norm: str = "batch",
    num_positions: int | None = None,
    hidden_features: int = 256,
) -> nn.Module:
    """Relative-position network around a ConvEncoder (the defaults are SonoNet-16's).

    `num_positions` defaults to the neighbours of a 3x3 (3x3x3) grid: 8 in 2D, 26 in 3D.
    """
    encoder = ConvEncoder(spatial_dims, in_channels, stage_channels, convs_per_stage, norm)
    if num_positions is None:
        num_positions = 3**spatial_dims - 1
    if num_positions < 2:
        raise CtxRestoreError(f"num_positions must be >= 2, got {num_positions}")
    if hidden_features < 1:
        raise CtxRestoreError(f"hidden_features must be >= 1, got {hidden_features}")
    head = PairHead(encoder.out_channels, hidden_features, num_positions)
    return RelativePositionNetwork(encoder, head)
