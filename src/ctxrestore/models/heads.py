"""Pixel-wise output heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.layers import conv_layer


class ConvHead(nn.Module):
    """1x1 convolution to per-pixel outputs (restored image or segmentation logits).

    (B, in_channels, *S) -> (B, out_channels, *S). `bias`: the outputs' initial bias, one
    value for all or one per output channel; None keeps PyTorch's default initialisation.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        bias: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.conv = conv_layer(spatial_dims, in_channels, out_channels, kernel_size=1)
        if bias is not None:
            values = torch.as_tensor(bias, dtype=self.conv.bias.dtype).flatten()
            if values.numel() not in (1, out_channels):
                raise CtxRestoreError(
                    f"head bias: one value or {out_channels} (one per output channel), got "
                    f"{values.numel()}"
                )
            with torch.no_grad():
                self.conv.bias.copy_(values.expand(out_channels))
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)
