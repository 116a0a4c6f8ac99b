"""SonoNet-style image classifier (Baumgartner et al. 2017; Chen et al. 2019, scan planes).

A VGG-like ConvEncoder, then SonoNet's 1x1 "adaptation" layers, which turn the last feature
map into one map per class, then global average pooling to logits. No fully connected layer,
so the network takes any input size the encoder accepts.

The encoder is built with exactly the arguments of the pretraining networks' encoders
(`ConvEncoder.config()`), so that its `encoder.*` weights carry over unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.layers import conv_layer, norm_layer
from ctxrestore.models.network import check_network_input
from ctxrestore.models.registry import register_model


class AdaptationHead(nn.Module):
    """1x1 conv -> norm -> ReLU, 1x1 conv to one map per class, global average pooling.

    (B, in_channels, *S) -> logits (B, num_classes).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        adaptation_channels: int,
        num_classes: int,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        # No conv bias before the norm: the norm's shift makes it redundant.
        self.adapt = nn.Sequential(
            conv_layer(spatial_dims, in_channels, adaptation_channels, kernel_size=1, bias=False),
            norm_layer(norm, spatial_dims, adaptation_channels),
            nn.ReLU(inplace=True),
        )
        self.classify = conv_layer(spatial_dims, adaptation_channels, num_classes, kernel_size=1)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        # Pooling after the class maps (not before) keeps SonoNet's per-class activation maps.
        class_maps = self.classify(self.adapt(x))
        return class_maps.mean(dim=tuple(range(2, class_maps.ndim)))


class Classifier(nn.Module):
    """Encoder + adaptation head: (B, in_channels, *S) -> logits (B, num_classes).

    Every spatial size must be divisible by `encoder.downsampling_factor`. The submodules are
    named `encoder` and `head` because checkpoints select weights by these prefixes.
    """

    def __init__(self, encoder: ConvEncoder, head: AdaptationHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.num_classes = head.num_classes

    def forward(self, x: Tensor) -> Tensor:
        check_network_input(self.encoder, x)
        return self.head(self.encoder(x))


@register_model("classifier")
def classifier(
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_classes: int = 2,
    stage_channels: Sequence[int] = (16, 32, 64, 128, 128),
    convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    norm: str = "batch",
    adaptation_channels: int | None = None,
) -> nn.Module:
    """SonoNet-like classifier; the defaults are SonoNet-16's encoder (SonoNet-64: channels
    (64, 128, 256, 512, 512), as `create_model("sononet", width=64)` pretrains).

    `adaptation_channels` defaults to half the encoder's last stage, as in SonoNet.
    (B, in_channels, *S) -> logits (B, num_classes), S divisible by 2**(len(stage_channels) - 1).
    """
    if num_classes < 2:
        raise CtxRestoreError(f"a classifier needs num_classes >= 2, got {num_classes}")
    encoder = ConvEncoder(spatial_dims, in_channels, stage_channels, convs_per_stage, norm)
    if adaptation_channels is None:
        adaptation_channels = max(1, encoder.out_channels // 2)
    if adaptation_channels < 1:
        raise CtxRestoreError(
            f"adaptation_channels must be >= 1 (or None for half the encoder's "
            f"{encoder.out_channels} channels), got {adaptation_channels}"
        )
    head = AdaptationHead(
        spatial_dims, encoder.out_channels, adaptation_channels, num_classes, norm
    )
    return Classifier(encoder, head)
