"""Encoder + decoder + head: the network trained by context restoration (Chen et al. 2019)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder


class EncoderDecoder(nn.Module):
    """Pixel-wise network: (B, in_channels, *S) -> (B, out_channels, *S).

    The submodules are named `encoder`, `decoder` and `head` because checkpoints select
    weights by these prefixes (DESIGN.md, checkpoint contract): fine-tuning keeps the encoder
    and, for segmentation, the decoder. The decoder receives the encoder's full
    `forward_features` list. Every spatial size must be divisible by
    `encoder.downsampling_factor`.
    """

    def __init__(self, encoder: ConvEncoder, decoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        check_network_input(self.encoder, x)
        return self.head(self.decoder(self.encoder.forward_features(x)))


def check_network_input(encoder: ConvEncoder, x: Tensor) -> None:
    """Clear errors for a wrong input rank, channel count or indivisible spatial size."""
    # Shape-only checks, so they cost nothing next to the convolutions.
    spatial_dims = encoder.spatial_dims
    if x.ndim != spatial_dims + 2:
        raise CtxRestoreError(
            f"expected input of shape (B, C, {', '.join('S' * spatial_dims)}) for a "
            f"{spatial_dims}D network, got shape {tuple(x.shape)}"
        )
    if x.shape[1] != encoder.in_channels:
        raise CtxRestoreError(
            f"the network takes {encoder.in_channels} input channel(s), got "
            f"{x.shape[1]} (input shape {tuple(x.shape)})"
        )
    factor = encoder.downsampling_factor
    spatial = tuple(x.shape[2:])
    if any(size % factor for size in spatial):
        valid = tuple(max(factor, size // factor * factor) for size in spatial)
        raise CtxRestoreError(
            f"input spatial size {spatial} is not divisible by the network's "
            f"downsampling factor {factor}; crop or pad each axis to a multiple of {factor}, "
            f"e.g. {valid}"
        )


def stacked_pair(encoder: ConvEncoder, x: Tensor, network: str, pair: str) -> Tensor:
    """Siamese networks' input: x (B, 2 * in_channels, *S), two images per sample (the first's
    channels, then the second's) -> (2B, in_channels, *S), all first images then all second
    ones, checked for `encoder`. `network` and `pair` name them in errors."""
    expected = 2 * encoder.in_channels
    if x.ndim == encoder.spatial_dims + 2 and x.shape[1] != expected:
        raise CtxRestoreError(
            f"the {network} network takes {pair}, 2 x {encoder.in_channels} = {expected} "
            f"channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})"
        )
    images = torch.cat(x.chunk(2, dim=1), dim=0)  # one encoder pass, shared weights
    check_network_input(encoder, images)
    return images


def pooled_pair(encoder: ConvEncoder, x: Tensor, network: str, pair: str) -> tuple[Tensor, Tensor]:
    """Siamese networks' shared step: `stacked_pair`'s images -> their globally average-pooled
    features, (B, F) each, from one pass of the shared encoder."""
    features = encoder(stacked_pair(encoder, x, network, pair))
    pooled = features.mean(dim=tuple(range(2, features.ndim)))  # (2B, out_channels)
    return pooled.chunk(2, dim=0)
