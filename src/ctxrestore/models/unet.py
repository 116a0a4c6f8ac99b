"""U-Net (Ronneberger et al. 2015) for segmentation pretraining (Chen et al. 2019, BraTS).

The reconstruction part is the U-Net decoder itself, so the whole network is transferred.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ctxrestore.models.decoders import UNetDecoder
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.heads import ConvHead
from ctxrestore.models.network import EncoderDecoder
from ctxrestore.models.registry import register_model


@register_model("unet")
def unet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    channels: Sequence[int] = (32, 64, 128, 256, 512),
    norm: str = "batch",
) -> nn.Module:
    """U-Net with two ConvBlocks per level and concatenation skips.

    (B, in_channels, *S) -> (B, out_channels, *S), S divisible by 2**(len(channels) - 1).
    `out_channels` defaults to `in_channels` (image restoration); set it to the number of
    classes for segmentation.
    """
    encoder = ConvEncoder(
        spatial_dims, in_channels, channels, convs_per_stage=(2,) * len(channels), norm=norm
    )
    decoder = UNetDecoder(spatial_dims, encoder.stage_channels, norm=norm)
    if out_channels is None:
        out_channels = in_channels
    head = ConvHead(spatial_dims, decoder.out_channels, out_channels)
    return EncoderDecoder(encoder, decoder, head)
