"""Decoders: the "reconstruction part" of Chen et al. 2019, trained during pretraining.

Both take the encoder's full `forward_features` list (shallow to deep) and return a feature
map at the input resolution; a ConvHead then maps it to pixel-wise outputs. `forward_levels`
returns every level's output on the way, deepest first, and `level_channels` their widths, for
pretexts that read features above the output (`dense_contrastive --dense-level`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.layers import ConvBlock, UpBlock, check_spatial_dims, transposed_conv


class DeconvDecoder(nn.Module):
    """Light decoder for classification/localisation pretraining: stacked 2x transposed convs.

    Uses only the deepest feature, (B, in_channels, *S), and returns
    (B, out_channels, *S * 2**num_upsamplings). `channels[i]` is the width after upsampling i;
    by default each upsampling halves the width (never below 1). Skip-free on purpose: the
    paper discards this part after pretraining, so the encoder must carry the semantics.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_upsamplings: int,
        channels: Sequence[int] | None = None,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if num_upsamplings < 1:
            raise CtxRestoreError(f"num_upsamplings must be >= 1, got {num_upsamplings}")
        if channels is None:
            channels = [max(in_channels // 2 ** (i + 1), 1) for i in range(num_upsamplings)]
        if len(channels) != num_upsamplings:
            raise CtxRestoreError(
                f"DeconvDecoder needs one channel count per upsampling ({num_upsamplings}), "
                f"got channels={tuple(channels)}"
            )
        widths = (in_channels, *channels)
        self.blocks = nn.Sequential(
            *(UpBlock(spatial_dims, widths[i], widths[i + 1], norm) for i in range(num_upsamplings))
        )
        self.level_channels = tuple(int(width) for width in widths[1:])
        self.out_channels = self.level_channels[-1]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Encoder features (deepest: (B, in_channels, *S)) -> (B, out_channels, *S * 2**n)."""
        return self.blocks(features[-1])

    def forward_levels(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Every upsampling's output, deepest first; the last is `forward`'s."""
        levels, x = [], features[-1]
        for block in self.blocks:
            x = block(x)
            levels.append(x)
        return levels


class UNetLevel(nn.Module):
    """One U-Net decoder level: upsample the deeper map, concatenate the skip, two ConvBlocks.

    (deep: (B, deep_channels, *S), skip: (B, channels, *2S)) -> (B, channels, *2S).
    """

    def __init__(self, spatial_dims: int, deep_channels: int, channels: int, norm: str) -> None:
        super().__init__()
        self.up = transposed_conv(spatial_dims, deep_channels, channels)
        self.convs = nn.Sequential(
            ConvBlock(spatial_dims, 2 * channels, channels, norm),
            ConvBlock(spatial_dims, channels, channels, norm),
        )

    def forward(self, deep: Tensor, skip: Tensor) -> Tensor:
        return self.convs(torch.cat([self.up(deep), skip], dim=1))


class UNetDecoder(nn.Module):
    """U-Net decoder symmetric to a ConvEncoder with `encoder_stage_channels`.

    Takes the encoder's features [(B, encoder_stage_channels[i], *S / 2**i)] and returns
    (B, encoder_stage_channels[0], *S). The whole U-Net is transferred for segmentation.
    """

    def __init__(
        self, spatial_dims: int, encoder_stage_channels: Sequence[int], norm: str = "batch"
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        if len(encoder_stage_channels) < 2:
            raise CtxRestoreError(
                "UNetDecoder needs an encoder with at least 2 stages, got stage channels "
                f"{tuple(encoder_stage_channels)}"
            )
        widths = tuple(int(c) for c in encoder_stage_channels)
        # levels[0] is the deepest level, so forward walks them in order.
        self.levels = nn.ModuleList(
            UNetLevel(spatial_dims, widths[i + 1], widths[i], norm)
            for i in reversed(range(len(widths) - 1))
        )
        self.level_channels = widths[-2::-1]  # deepest level first
        self.out_channels = widths[0]

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        """Encoder features, shallow to deep -> (B, out_channels, *S of features[0])."""
        return self.forward_levels(features)[-1]

    def forward_levels(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Every level's output, deepest first, (B, encoder_stage_channels[i], *S of
        features[i]) for i from the second-deepest stage to 0; the last is `forward`'s."""
        levels, x = [], features[-1]
        for level, skip in zip(self.levels, reversed(features[:-1]), strict=True):
            x = level(x, skip)
            levels.append(x)
        return levels
