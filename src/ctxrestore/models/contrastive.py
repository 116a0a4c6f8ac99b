"""SimCLR network (Chen, Kornblith, Norouzi, Hinton, ICML 2020): encoder, pooling, projection.

Both views of each image go through the SAME encoder (one batch of 2B), are globally average
pooled and mapped by a projection MLP (Linear - BatchNorm1d - ReLU - Linear) into the space
where the NT-Xent loss compares them. The encoder is a ConvEncoder built with exactly the
arguments of the pretraining networks' encoders (`ConvEncoder.config()`), so its `encoder.*`
weights transfer to the downstream networks; the projection `head` is pretext-specific and is
left behind (SimCLR too fine-tunes from the features before the projection).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.network import pooled_pair
from ctxrestore.models.registry import register_model


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: pooled features (N, in_features) -> (N, projection_dim)."""

    def __init__(self, in_features: int, hidden_features: int, projection_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_features, bias=False),
            nn.BatchNorm1d(hidden_features),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_features, projection_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class ContrastiveNetwork(nn.Module):
    """(B, 2 * in_channels, *spatial) -> projections (B, 2, projection_dim).

    The input holds the first view's channels, then the second's (`ContrastivePretext.
    make_batch`); output [:, 0] projects the first view, [:, 1] the second. Every spatial axis
    must be divisible by `encoder.downsampling_factor`.
    """

    def __init__(self, encoder: ConvEncoder, head: ProjectionHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        first, second = pooled_pair(self.encoder, x, "contrastive", "two views of each image")
        # One head pass over both views: BatchNorm1d sees their statistics together.
        projections = self.head(torch.cat([first, second], dim=0))
        return torch.stack(projections.chunk(2, dim=0), dim=1)


@register_model("contrastive")
def contrastive(
    spatial_dims: int = 2,
    in_channels: int = 1,
    stage_channels: Sequence[int] = (16, 32, 64, 128, 128),
    convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    norm: str = "batch",
    projection_dim: int = 64,
    hidden_features: int = 256,
) -> nn.Module:
    """SimCLR network around a ConvEncoder (the defaults are SonoNet-16's)."""
    encoder = ConvEncoder(spatial_dims, in_channels, stage_channels, convs_per_stage, norm)
    if projection_dim < 1:
        raise CtxRestoreError(f"projection_dim must be >= 1, got {projection_dim}")
    if hidden_features < 1:
        raise CtxRestoreError(f"hidden_features must be >= 1, got {hidden_features}")
    head = ProjectionHead(encoder.out_channels, hidden_features, projection_dim)
    return ContrastiveNetwork(encoder, head)
