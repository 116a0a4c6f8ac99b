"""Organ localisation network of Chen et al. 2019 (CT abdomen): the SonoNet-like encoder with
one more stack of convolution and pooling, then a fully connected regression head.

Per organ the network outputs a presence logit and 2 * spatial_dims box parameters; what the
box parameters mean (and how they become voxel boxes) is the task's business
(tasks/localize.py), so that the network stays a plain regressor.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.layers import ConvBlock, check_spatial_dims
from ctxrestore.models.network import check_network_input
from ctxrestore.models.registry import register_model

# Cells per axis that the head pools the neck's features to: a coarse grid keeps where in the
# image a feature fired, which global average pooling would throw away.
HEAD_GRID = 4

_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_ADAPTIVE_AVG_POOL = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


class Localizer(nn.Module):
    """Encoder -> neck -> head: (B, in_channels, *S) -> (B, num_organs, 1 + 2 * spatial_dims).

    Submodules are named `encoder`, `neck` and `head`, the checkpoint prefixes (models.spec
    PARTS): fine-tuning loads `encoder.*` from a pretrained network and trains the rest from
    scratch. Every spatial size must be divisible by `encoder.downsampling_factor`.
    """

    def __init__(
        self,
        encoder: ConvEncoder,
        num_organs: int,
        hidden_features: int = 256,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_organs < 1:
            raise CtxRestoreError(f"num_organs must be >= 1, got {num_organs}")
        if hidden_features < 1:
            raise CtxRestoreError(f"hidden_features must be >= 1, got {hidden_features}")
        if not 0.0 <= dropout < 1.0:
            raise CtxRestoreError(f"dropout must be in [0, 1), got {dropout}")
        spatial_dims = encoder.spatial_dims
        channels = encoder.out_channels
        self.spatial_dims = spatial_dims
        self.num_organs = num_organs
        self.outputs_per_organ = 1 + 2 * spatial_dims
        self.encoder = encoder
        # One more stage like the encoder's last. ceil_mode: an input of one downsampling
        # factor per axis (a 1-voxel encoder output) still passes.
        neck: list[nn.Module] = [_MAX_POOL[spatial_dims](kernel_size=2, stride=2, ceil_mode=True)]
        neck += [
            ConvBlock(spatial_dims, channels, channels, encoder.norm)
            for _ in range(encoder.convs_per_stage[-1])
        ]
        self.neck = nn.Sequential(*neck)
        self.head = nn.Sequential(
            _ADAPTIVE_AVG_POOL[spatial_dims](HEAD_GRID),
            nn.Flatten(),
            nn.Linear(channels * HEAD_GRID**spatial_dims, hidden_features),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden_features, num_organs * self.outputs_per_organ),
        )
        # Zero outputs at the start: presence 0.5 and, under the task's sigmoid box
        # parametrisation, a centred box of half the image, instead of random extreme boxes.
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_channels, *S) -> (B, num_organs, 1 + 2 * spatial_dims) raw outputs."""
        check_network_input(self.encoder, x)
        outputs = self.head(self.neck(self.encoder(x)))
        return outputs.view(x.shape[0], self.num_organs, self.outputs_per_organ)


@register_model("localizer")
def localizer(
    spatial_dims: int = 2,
    in_channels: int = 1,
    num_organs: int = 1,
    stage_channels: Sequence[int] = (16, 32, 64, 128, 128),
    convs_per_stage: Sequence[int] = (2, 2, 3, 3, 3),
    norm: str = "batch",
    hidden_features: int = 256,
    dropout: float = 0.0,
) -> nn.Module:
    """Localisation network around a ConvEncoder built exactly as in pretraining.

    The defaults are the SonoNet-16 encoder (`sononet` with width 16); pass a pretrained
    network's `encoder.config()` so that its `encoder.*` weights load. Output: per organ
    [presence logit, 2 * spatial_dims box parameters] (see tasks/localize.py).
    """
    check_spatial_dims(spatial_dims)
    encoder = ConvEncoder(spatial_dims, in_channels, stage_channels, convs_per_stage, norm)
    return Localizer(encoder, num_organs, hidden_features, dropout)
