"""VGG-like convolutional encoder: the "analysis part" of Chen et al. 2019 (SonoNet, U-Net)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.layers import ConvBlock, check_spatial_dims, max_pool


class ConvEncoder(nn.Module):
    """Stages of 3x3 ConvBlocks, with a 2x max-pool before every stage but the first.

    Stage i has `convs_per_stage[i]` ConvBlocks of `stage_channels[i]` channels and works at
    stride `stage_strides[i]` = 2**i. For input (B, in_channels, *S), `forward_features` returns
    one tensor per stage, (B, stage_channels[i], *S / stage_strides[i]); `forward` returns the
    last one, (B, out_channels, *S / downsampling_factor).
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        stage_channels: Sequence[int],
        convs_per_stage: Sequence[int],
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(stage_channels) == 0 or len(stage_channels) != len(convs_per_stage):
            raise CtxRestoreError(
                "stage_channels and convs_per_stage must be non-empty and of equal length; got "
                f"{len(stage_channels)} stage_channels and {len(convs_per_stage)} convs_per_stage"
            )
        if min(convs_per_stage) < 1:
            raise CtxRestoreError(f"convs_per_stage must all be >= 1, got {tuple(convs_per_stage)}")
        self.spatial_dims = check_spatial_dims(spatial_dims)
        self.in_channels = in_channels
        self.stage_channels = tuple(int(c) for c in stage_channels)
        self.convs_per_stage = tuple(int(n) for n in convs_per_stage)
        self.norm = norm
        self.stage_strides = tuple(2**i for i in range(len(self.stage_channels)))
        self.out_channels = self.stage_channels[-1]
        self.downsampling_factor = self.stage_strides[-1]

        self.stages = nn.ModuleList()
        channels = in_channels
        for index, (width, num_convs) in enumerate(
            zip(self.stage_channels, convs_per_stage, strict=True)
        ):
            layers: list[nn.Module] = [max_pool(spatial_dims)] if index > 0 else []
            for _ in range(num_convs):
                layers.append(ConvBlock(spatial_dims, channels, width, norm))
                channels = width
            self.stages.append(nn.Sequential(*layers))

    def config(self) -> dict:
        """The arguments that rebuild this encoder's layers (and so its weight names/shapes)."""
        return {
            "stage_channels": list(self.stage_channels),
            "convs_per_stage": list(self.convs_per_stage),
            "norm": self.norm,
        }

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """(B, in_channels, *S) -> one feature map per stage, shallow to deep (U-Net skips)."""
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *S) -> (B, out_channels, *S / downsampling_factor)."""
        for stage in self.stages:
            x = stage(x)
        return x
