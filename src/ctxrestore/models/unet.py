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
    convs_per_stage: Sequence[int] | None = None,
    head_bias: float | Sequence[float] | None = None,
) -> nn.Module:
    """U-Net with concatenation skips and two ConvBlocks per encoder level unless
    `convs_per_stage` says otherwise (e.g. a SonoNet encoder's (2, 2, 3, 3, 3), so that a
    segmentation U-Net can take over the encoder of a SonoNet pretraining).

    (B, in_channels, *S) -> (B, out_channels, *S), S divisible by 2**(len(channels) - 1).
    `out_channels` defaults to `in_channels` (image restoration); set it to the number of
    classes for segmentation. `head_bias`: the output layer's initial bias, one value or one per
    channel (None: PyTorch's default); outputs with rare positives start at their prior's
    logit (Lin et al. 2017), or Adam, moving the bias ~1e-3 a step, needs thousands of steps
    to get there.
    """
    encoder = ConvEncoder(
        spatial_dims,
        in_channels,
        channels,
        convs_per_stage=(2,) * len(channels) if convs_per_stage is None else convs_per_stage,
        norm=norm,
    )
    decoder = UNetDecoder(spatial_dims, encoder.stage_channels, norm=norm)
    if out_channels is None:
        out_channels = in_channels
    head = ConvHead(spatial_dims, decoder.out_channels, out_channels, bias=head_bias)
    return EncoderDecoder(encoder, decoder, head)
