"""Building blocks shared by encoders and decoders, for 2D and 3D by `spatial_dims`.

Plain torch.nn layers picked by dimension, so that channels_last memory formats and bf16
autocast work without any dtype handling here.
"""

from __future__ import annotations

import math

from torch import nn

from ctxrestore.errors import CtxRestoreError

NORMS = ("batch", "instance", "group")

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED_CONV = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_INSTANCE_NORM = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return `spatial_dims` if it is 2 or 3, else raise CtxRestoreError."""
    if spatial_dims not in (2, 3):
        raise CtxRestoreError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def conv_layer(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    bias: bool = True,
) -> nn.Module:
    """Stride-1 convolution with 'same' padding: (B, in, *S) -> (B, out, *S) for odd kernels."""
    conv = _CONV[check_spatial_dims(spatial_dims)]
    return conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


def transposed_conv(
    spatial_dims: int, in_channels: int, out_channels: int, bias: bool = True
) -> nn.Module:
    """2x upsampling, kernel 2 stride 2: (B, in, *S) -> (B, out, *2S)."""
    conv = _TRANSPOSED_CONV[check_spatial_dims(spatial_dims)]
    return conv(in_channels, out_channels, kernel_size=2, stride=2, bias=bias)


def max_pool(spatial_dims: int) -> nn.Module:
    """2x downsampling by max-pooling: (B, C, *S) -> (B, C, *S//2)."""
    return _MAX_POOL[check_spatial_dims(spatial_dims)](kernel_size=2, stride=2)


def norm_layer(norm: str, spatial_dims: int, channels: int) -> nn.Module:
    """Normalisation over `channels` features; `norm` is one of NORMS."""
    check_spatial_dims(spatial_dims)
    if norm == "batch":
        return _BATCH_NORM[spatial_dims](channels)
    if norm == "instance":
        # affine=True so that instance norm has the same learnable scale/shift as the others.
        return _INSTANCE_NORM[spatial_dims](channels, affine=True)
    if norm == "group":
        # Groups of (up to) 8: divides any channel count and stays meaningful for tiny widths.
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise CtxRestoreError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")


class ConvBlock(nn.Sequential):
    """3x3(x3) conv -> norm -> ReLU: (B, in_channels, *S) -> (B, out_channels, *S)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        # No conv bias: the norm's shift makes it redundant.
        self.conv = conv_layer(spatial_dims, in_channels, out_channels, bias=False)
        self.norm = norm_layer(norm, spatial_dims, out_channels)
        self.act = nn.ReLU(inplace=True)


class UpBlock(nn.Sequential):
    """Transposed conv (x2) -> norm -> ReLU: (B, in_channels, *S) -> (B, out_channels, *2S)."""

    def __init__(
        self, spatial_dims: int, in_channels: int, out_channels: int, norm: str = "batch"
    ) -> None:
        super().__init__()
        self.up = transposed_conv(spatial_dims, in_channels, out_channels, bias=False)
        self.norm = norm_layer(norm, spatial_dims, out_channels)
        self.act = nn.ReLU(inplace=True)
