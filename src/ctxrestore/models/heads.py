"""Pixel-wise output heads."""

from __future__ import annotations

from torch import Tensor, nn

from ctxrestore.models.layers import conv_layer


class ConvHead(nn.Module):
    """1x1 convolution to per-pixel outputs (restored image or segmentation logits).

    (B, in_channels, *S) -> (B, out_channels, *S). `bias`: the outputs' initial bias; None
    keeps PyTorch's default initialisation.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, bias: float | None = None
    ) -> None:
        super().__init__()
        self.conv = conv_layer(spatial_dims, in_channels, out_channels, kernel_size=1)
        if bias is not None:
            nn.init.constant_(self.conv.bias, bias)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
