"""SimCLR network (Chen, Kornblith, Norouzi, Hinton, ICML 2020): encoder, pooling, projection;
a restoration network with a projection on its encoder, for context restoration with a
contrastive term (`RestorationContrastiveNetwork`); and a restoration network whose decoder
features are read at given points and projected, for dense contrastive learning, with or
without restoring its input too (`DenseContrastiveNetwork`).

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
import torch.nn.functional as F
from torch import Tensor, nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.network import EncoderDecoder, pooled_pair, stacked_pair
from ctxrestore.models.registry import create_model, register_model


class ProjectionHead(nn.Module):
    """SimCLR's projection MLP: pooled features (N, in_features) -> (N, projection_dim)."""

    def __init__(self, in_features: int, hidden_features: int, projection_dim: int) -> None:
        super().__init__()
        if projection_dim < 1:
            raise CtxRestoreError(f"projection_dim must be >= 1, got {projection_dim}")
        if hidden_features < 1:
            raise CtxRestoreError(f"hidden_features must be >= 1, got {hidden_features}")
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
    head = ProjectionHead(encoder.out_channels, hidden_features, projection_dim)
    return ContrastiveNetwork(encoder, head)


class RestorationContrastiveNetwork(nn.Module):
    """An image-to-image network whose encoder also feeds a SimCLR projection head.

    (B, 4 * in_channels, *S): two corrupted views of each image, then the same two views clean
    (each pair as the siamese networks take it: the first's channels, then the second's) ->
    (the corrupted views restored (B, 2 * out_channels, *S), in the same layout; projections
    of the clean views (B, 2, projection_dim)). The encoder runs once over the 2B corrupted
    views, for the decoder, and once over the 2B clean ones, for the projection: instance
    discrimination on swap-corrupted views transfers no better than context restoration
    (docs/experiments.md 28). The children keep the restoration network's names (`encoder`,
    `decoder`, `head`), so its encoder and decoder transfer as a plain restoration network's
    would; `projection` is left behind.
    """

    def __init__(self, restoration: EncoderDecoder, projection: ProjectionHead) -> None:
        super().__init__()
        self.encoder = restoration.encoder
        self.decoder = restoration.decoder
        self.head = restoration.head
        self.projection = projection

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        expected = 4 * self.encoder.in_channels
        if x.ndim == self.encoder.spatial_dims + 2 and x.shape[1] != expected:
            raise CtxRestoreError(
                f"the restoration-contrastive network takes two corrupted views of each image "
                f"and the same two clean, 4 x {self.encoder.in_channels} = {expected} "
                f"channel(s), got {x.shape[1]} (input shape {tuple(x.shape)})"
            )
        corrupted, clean = x.chunk(2, dim=1)
        views = stacked_pair(self.encoder, corrupted, "restoration-contrastive", "views")
        restored = self.head(self.decoder(self.encoder.forward_features(views)))
        first, second = pooled_pair(self.encoder, clean, "restoration-contrastive", "views")
        projections = self.projection(torch.cat([first, second]))  # BatchNorm1d sees both
        return (
            torch.cat(restored.chunk(2, dim=0), dim=1),
            torch.stack(projections.chunk(2, dim=0), dim=1),
        )


@register_model("restoration_contrastive")
def restoration_contrastive(
    network: str = "sononet",
    network_kwargs: dict | None = None,
    projection_dim: int = 64,
    hidden_features: int = 256,
) -> nn.Module:
    """Pretraining network `network` (a registered image-to-image network, built with
    `network_kwargs`) with a projection head on its encoder's pooled deepest features."""
    restoration = _encoder_decoder("restoration_contrastive", network, network_kwargs)
    projection = ProjectionHead(restoration.encoder.out_channels, hidden_features, projection_dim)
    return RestorationContrastiveNetwork(restoration, projection)


class DenseContrastiveNetwork(nn.Module):
    """An image-to-image network whose last decoder features are read at given points and
    projected.

    Input: (two views of each image (B, 2 * in_channels, *S), the first's channels then the
    second's; the points' positions in each view (B, 2, M, D), in grid_sample's normalised
    coordinates and order) -> projections (B, 2, M, projection_dim), [:, 0] of the first
    view. The features read are the ones the restoration network's 1x1 head would read,
    which is what a segmentation-style head reads downstream. Only the points are projected
    (SimCLR's MLP): a projection of every voxel cost more than the network itself on a CPU.
    Children keep the restoration network's names (`encoder`, `decoder`), so both transfer as
    a restoration network's do; `projection` (SimCLR's MLP, or nn.Identity for `--projector
    none`) is left behind.

    With `restores`, the restoration network's 1x1 `head` is kept and the output is (the views
    restored (B, 2 * out_channels, *S), in the input's layout; the projections): one pass
    serves context restoration of the views and the points' contrast
    (`context_restoration_dense`). Given a third input, images to restore (B', in_channels,
    *S), it restores those instead, (B', out_channels, *S), in the same pass as the views
    whose points are read (`context_restoration_dense --dense-views clean`). Without
    `restores`, nothing restores an image and the head is not built in.

    `read_level` > 0 reads the points that many decoder levels below the output (1: the level
    before it, at half its resolution, with `decoder.level_channels[-2]` features), so that a
    restoring network's 1x1 head and the points do not share the output's few channels
    (`--dense-level`); the decoder must have `forward_levels`, as ours do.
    """

    def __init__(
        self,
        restoration: EncoderDecoder,
        projection: nn.Module,
        restores: bool = False,
        read_level: int = 0,
    ) -> None:
        super().__init__()
        check_read_level(restoration.decoder, read_level)
        self.encoder = restoration.encoder
        self.decoder = restoration.decoder
        self.restores = restores
        self.read_level = read_level
        if restores:
            self.head = restoration.head
        self.projection = projection

    def forward(self, inputs: tuple[Tensor, ...]) -> Tensor | tuple[Tensor, Tensor]:
        takes = (2, 3) if self.restores else (2,)
        if not isinstance(inputs, (tuple, list)) or len(inputs) not in takes:
            also = ", and optionally images to restore" if self.restores else ""
            raise CtxRestoreError(
                "the dense contrastive network takes (two views of each image, the points' "
                f"positions in each view{also}), as its pretext's make_batch gives them"
            )
        views, located = inputs[:2]
        to_restore = inputs[2] if len(inputs) == 3 else None
        spatial_dims = self.encoder.spatial_dims
        if located.ndim != 4 or located.shape[1] != 2 or located.shape[3] != spatial_dims:
            raise CtxRestoreError(
                f"the dense contrastive network takes the points' positions in both views, "
                f"(B, 2, M, {spatial_dims}), got shape {tuple(located.shape)}"
            )
        batch_size, _, points, _ = located.shape
        images = stacked_pair(self.encoder, views, "dense contrastive", "two views of each image")
        if to_restore is not None:
            if to_restore.ndim != images.ndim or to_restore.shape[1:] != images.shape[1:]:
                raise CtxRestoreError(
                    f"the dense contrastive network restores images shaped as one view, (B', "
                    f"{tuple(images.shape[1:])}), got shape {tuple(to_restore.shape)}"
                )
            images = torch.cat([images, to_restore])  # one pass; the points read the views only
        encoded = self.encoder.forward_features(images)
        if self.read_level == 0:
            features = level = self.decoder(encoded)
        else:
            levels = self.decoder.forward_levels(encoded)
            features, level = levels[-1], levels[-1 - self.read_level]
        view_features = level[: 2 * batch_size]  # (2B, F, *S / 2**read_level)
        # All first views, then all second ones, as `stacked_pair` orders the images.
        grid = located.transpose(0, 1).reshape(
            2 * batch_size, points, *([1] * (spatial_dims - 1)), spatial_dims
        )
        read = F.grid_sample(
            view_features, grid.to(features.dtype), align_corners=False, padding_mode="border"
        )  # (2B, F, M, 1...); points outside a view read its border and take no part
        read = read.reshape(2 * batch_size, -1, points).transpose(1, 2)  # (2B, M, F)
        # One head pass over both views' points: BatchNorm1d sees their statistics together.
        projected = self.projection(read.reshape(2 * batch_size * points, -1))
        projections = torch.stack(projected.reshape(2, batch_size, points, -1).unbind(0), dim=1)
        if not self.restores:
            return projections
        if to_restore is not None:
            return self.head(features[2 * batch_size :]), projections
        restored = self.head(features)
        return torch.cat(restored.chunk(2, dim=0), dim=1), projections


PROJECTORS = ("mlp", "none")


def check_projector(projector: str) -> None:
    if projector not in PROJECTORS:
        raise CtxRestoreError(f"projector must be one of {PROJECTORS}, got {projector!r}")


@register_model("dense_contrastive")
def dense_contrastive(
    network: str = "unet",
    network_kwargs: dict | None = None,
    projection_dim: int = 64,
    hidden_features: int = 128,
    projector: str = "mlp",
    read_level: int = 0,
) -> nn.Module:
    """Pretraining network `network` (a registered image-to-image network, built with
    `network_kwargs`) with a projection of its decoder's features at given points, read at the
    output or `read_level` levels below it (`projector` "mlp"; "none": the features are
    compared as they are)."""
    return _dense_network(
        "dense_contrastive", network, network_kwargs, projector, hidden_features, projection_dim,
        read_level,
    )  # fmt: skip


@register_model("restoration_dense")
def restoration_dense(
    network: str = "unet",
    network_kwargs: dict | None = None,
    projection_dim: int = 64,
    hidden_features: int = 128,
    projector: str = "mlp",
    read_level: int = 0,
) -> nn.Module:
    """`dense_contrastive`'s network that also restores its input views with `network`'s head."""
    return _dense_network(
        "restoration_dense", network, network_kwargs, projector, hidden_features, projection_dim,
        read_level,
    )  # fmt: skip


def _dense_network(
    model: str,
    network: str,
    network_kwargs: dict | None,
    projector: str,
    hidden_features: int,
    projection_dim: int,
    read_level: int,
) -> DenseContrastiveNetwork:
    """`DenseContrastiveNetwork` around `network`, restoring its input too for
    "restoration_dense". The points' features are projected by SimCLR's MLP, or not at all
    (`projector` "none"): then InfoNCE acts on the very features a downstream head reads,
    and cannot leave them nearly one-dimensional behind a projection that spreads them
    (docs/experiments.md 39)."""
    check_projector(projector)
    restoration = _encoder_decoder(model, network, network_kwargs)
    check_read_level(restoration.decoder, read_level)
    if projector == "none":
        projection = nn.Identity()
    else:
        read_channels = restoration.decoder.level_channels[-1 - read_level]
        projection = ProjectionHead(read_channels, hidden_features, projection_dim)
    return DenseContrastiveNetwork(
        restoration, projection, restores=model == "restoration_dense", read_level=read_level
    )


def check_read_level(decoder: nn.Module, read_level: int) -> None:
    """read_level: 0 (the decoder's output) or a level below it that `decoder` has."""
    if isinstance(read_level, bool) or not isinstance(read_level, int) or read_level < 0:
        raise CtxRestoreError(f"the dense level must be an int >= 0, got {read_level!r}")
    if read_level == 0:
        return
    levels = getattr(decoder, "level_channels", None)
    if levels is None or not hasattr(decoder, "forward_levels"):
        raise CtxRestoreError(
            f"dense level {read_level} reads a decoder level below the output, and this "
            f"network's decoder ({type(decoder).__name__}) does not expose its levels"
        )
    if read_level >= len(levels):
        raise CtxRestoreError(
            f"dense level {read_level} is out of range: this network's decoder has "
            f"{len(levels)} levels, so the dense level must lie in 0..{len(levels) - 1}"
        )


def _encoder_decoder(model: str, network: str, network_kwargs: dict | None) -> EncoderDecoder:
    """The registered image-to-image network `network` that `model` is built around."""
    restoration = create_model(network, **(network_kwargs or {}))
    if not isinstance(restoration, EncoderDecoder):
        raise CtxRestoreError(
            f"{model} needs an encoder-decoder network, and '{network}' is not one"
        )
    return restoration
