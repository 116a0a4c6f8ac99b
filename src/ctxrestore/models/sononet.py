"""SonoNet-64 analysis part + light deconvolution decoder (Chen et al. 2019, classification).

SonoNet (Baumgartner et al. 2017) is VGG-like: 13 conv layers in 5 stages with 4 max-poolings.
For context-restoration pretraining the paper attaches a few transposed convolutions as the
reconstruction part and discards them before fine-tuning (`sononet`). `sononet_unet` puts the
same encoder under a U-Net decoder instead: the light decoder must rebuild every pixel from the
16x-pooled features, so its restorations are blurred throughout; with skips the unchanged
pixels are copied and the loss is left to the swapped patches (docs/experiments.md 26).
"""

from __future__ import annotations

from torch import nn

from ctxrestore.models.decoders import DeconvDecoder
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.heads import ConvHead
from ctxrestore.models.network import EncoderDecoder
from ctxrestore.models.registry import register_model
from ctxrestore.models.unet import unet

CONVS_PER_STAGE = (2, 2, 3, 3, 3)


def stage_channels(width: int) -> tuple[int, ...]:
    return (width, 2 * width, 4 * width, 8 * width, 8 * width)


@register_model("sononet")
def sononet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    width: int = 64,
    norm: str = "batch",
) -> nn.Module:
    """SonoNet-`width` encoder, 4-step DeconvDecoder and a 1x1 head.

    (B, in_channels, *S) -> (B, out_channels, *S), S divisible by 16. `out_channels` defaults to
    `in_channels`: the network restores the image. `width` = 64 is SonoNet-64.
    """
    encoder = ConvEncoder(
        spatial_dims,
        in_channels,
        stage_channels=stage_channels(width),
        convs_per_stage=CONVS_PER_STAGE,
        norm=norm,
    )
    # Halve the width at each upsampling, mirroring the encoder, but never below `width`.
    decoder = DeconvDecoder(
        spatial_dims,
        encoder.out_channels,
        num_upsamplings=4,
        channels=(4 * width, 2 * width, width, width),
        norm=norm,
    )
    if out_channels is None:
        out_channels = in_channels
    head = ConvHead(spatial_dims, decoder.out_channels, out_channels)
    return EncoderDecoder(encoder, decoder, head)


@register_model("sononet_unet")
def sononet_unet(
    spatial_dims: int = 2,
    in_channels: int = 1,
    out_channels: int | None = None,
    width: int = 64,
    norm: str = "batch",
) -> nn.Module:
    """SonoNet-`width` encoder (as `sononet`'s, so the classifier and localiser take it over)
    under a U-Net decoder with skips; (B, in_channels, *S) -> (B, out_channels, *S)."""
    return unet(
        spatial_dims,
        in_channels,
        out_channels,
        channels=stage_channels(width),
        norm=norm,
        convs_per_stage=CONVS_PER_STAGE,
    )
