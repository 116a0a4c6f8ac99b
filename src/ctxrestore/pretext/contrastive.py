"""Contrastive instance discrimination: SimCLR (Chen, Kornblith, Norouzi, Hinton, ICML 2020).

Beyond Chen et al. 2019's comparison, and opt-in in `benchmark` (name it in --methods). Each
image is augmented twice, independently (`tasks.augment.Augmentation`, with strong settings);
a siamese network (`models.contrastive`) projects both views, and the NT-Xent loss pulls each
view's projection towards its partner's and away from the other 2B - 2 views of the batch.
Its encoder is the chosen --network's encoder, so it transfers to the downstream networks; the
projection head is left behind.

SimCLR's random crops are the zoom and translation of `Augmentation`, its colour distortion
the contrast, brightness and noise; there is no flip, which would swap laterality.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import model_spec
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.tasks.augment import Augmentation


@register_pretext("contrastive")
@dataclass(frozen=True)
class ContrastivePretext:
    """temperature: NT-Xent's tau (> 0); projection_dim: size of the projections compared.
    rotation_degrees, scale, translation, contrast, brightness, noise_std: the view
    augmentation (`Augmentation`'s meaning, applied to every image: probability 1); stronger
    than fine-tuning's, as SimCLR's views must differ enough that matching them takes more
    than the pixels."""

    temperature: float = 0.2
    projection_dim: int = 64
    rotation_degrees: float = 20.0
    scale: tuple[float, float] = (0.7, 1.4)
    translation: float = 0.15
    contrast: tuple[float, float] = (0.6, 1.4)
    brightness: float = 0.3
    noise_std: float = 0.1
    name: str = "contrastive"

    def __post_init__(self) -> None:
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise CtxRestoreError(f"contrastive: temperature must be a number, got {temperature!r}")
        if not 0 < temperature < math.inf:  # also refuses NaN
            raise CtxRestoreError(
                f"contrastive: temperature must be > 0 and finite, got {temperature} "
                "(SimCLR uses 0.1 to 0.5)"
            )
        dim = self.projection_dim
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise CtxRestoreError(f"contrastive: projection_dim must be an int >= 1, got {dim!r}")
        try:
            augmentation = self.augmentation
        except CtxRestoreError as error:
            raise CtxRestoreError(f"contrastive: view {error}") from None
        except TypeError as error:
            raise CtxRestoreError(f"contrastive: bad view augmentation option: {error}") from None
        object.__setattr__(self, "temperature", float(temperature))
        # The validated ranges as float pairs, so the checkpoint spec records them plainly.
        object.__setattr__(self, "scale", augmentation.scale)
        object.__setattr__(self, "contrast", augmentation.contrast)

    @cached_property  # built once, not per batch (not a dataclass field: params() skips it)
    def augmentation(self) -> Augmentation:
        """The view augmentation: every image moved (probability 1) and its intensity changed."""
        return Augmentation(
            rotation_degrees=self.rotation_degrees,
            scale=self.scale,
            translation=self.translation,
            contrast=self.contrast,
            brightness=self.brightness,
            noise_std=self.noise_std,
            probability=1.0,
        )

    def network_spec(self, base: dict) -> dict:
        """The siamese projection network around `base`'s encoder."""
        kwargs = base["kwargs"]
        return model_spec(
            "contrastive",
            spatial_dims=kwargs["spatial_dims"],
            in_channels=kwargs["in_channels"],
            projection_dim=self.projection_dim,
            **base["encoder"],
        )

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *spatial) -> (two views (B, 2C, *spatial): the first view's channels,
        then the second's; image indices (B,) int64, which say that view i of image b pairs
        with the other view of image b)."""
        views, _ = self.make_views(images, generator)
        return views, torch.arange(len(images), device=images.device)

    def make_views(
        self,
        images: torch.Tensor,
        generator: torch.Generator,
        foreground: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, C, *S) -> (two views (B, 2C, *S), the first's channels then the
        second's; where `foreground` (B, *S) bool lies in each view, (B, 2, *S), moved with the
        view's content and False where the view shows what lay outside the image, or None
        without a foreground)."""
        batch = {"image": images} if foreground is None else {"image": images, "mask": foreground}
        first, second = (self.augmentation(batch, generator) for _ in range(2))
        views = torch.cat([first["image"], second["image"]], dim=1)
        if foreground is None:
            return views, None
        return views, torch.stack([first["mask"], second["mask"]], dim=1)

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """NT-Xent: outputs (B, 2, projection_dim) -> the mean over the 2B views of the cross
        entropy of finding the partner among the other 2B - 1 views, by cosine similarity / tau."""
        similarity, partners = _similarities(outputs, targets)
        with torch.autocast(similarity.device.type, enabled=False):
            return F.cross_entropy(similarity / self.temperature, partners)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        """How often a view's most similar other view is its partner, and that of guessing one
        of the other 2B - 1 views."""
        similarity, partners = _similarities(outputs, targets)
        found = (similarity.argmax(dim=1) == partners).float().mean()
        return {
            "view_retrieval_accuracy": float(found),
            "chance_accuracy": 1.0 / (len(partners) - 1),
        }

    def summary(self, metrics: dict[str, float]) -> str:
        return retrieval_summary(
            metrics["view_retrieval_accuracy"], metrics["chance_accuracy"], "view",
            "the encoder recognises an image under strong augmentation ({ratio:.2f}x chance)",
        )  # fmt: skip

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        """The two views of each image, the second titled with how many views of the shown
        images found their partner among them."""
        channels = inputs.shape[1] // 2
        found, views = partners_found(outputs, targets)
        return [
            ("view 1", inputs[:, :channels]),
            (f"view 2\npartner found for {found}/{views} views", inputs[:, channels:]),
        ]

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params


def retrieval_summary(accuracy: float, chance: float, kind: str, learned: str) -> str:
    """One Markdown sentence on a held-out retrieval accuracy against chance, for the
    contrastive pretexts: `kind` names what is retrieved ("view", "point"); `learned` says what
    an accuracy above chance shows, with `{ratio}` for accuracy / chance."""
    candidates = round(1 / chance)
    head = f"Held-out {kind} retrieval accuracy {100 * accuracy:.1f}%"
    if accuracy > chance:
        return (
            f"{head} against {100 * chance:.1f}% by chance ({candidates} candidate {kind}s): "
            f"{learned.format(ratio=accuracy / chance)}."
        )
    return (
        f"{head} is no better than chance ({100 * chance:.1f}%, {candidates} candidate "
        f"{kind}s): the network has not learned yet (train longer, or check the data)."
    )


def partners_found(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """How many of the 2B views find their partner as their most similar other view, of 2B."""
    similarity, partners = _similarities(outputs, targets)
    return int((similarity.argmax(dim=1) == partners).sum()), len(partners)


def _similarities(
    outputs: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs (B, 2, P), targets (B,) -> cosine similarities (2B, 2B) in float32 with -inf on
    the diagonal (a view is not its own partner), and each view's partner (2B,): views are
    ordered all first views, then all second views, so view i pairs with i + B (mod 2B)."""
    if outputs.ndim != 3 or outputs.shape[1] != 2 or len(targets) != len(outputs):
        raise CtxRestoreError(
            f"contrastive: expected projections (B, 2, projection_dim) for B = {len(targets)} "
            f"images, got shape {tuple(outputs.shape)}"
        )
    batch = len(outputs)
    # float32 even under autocast, which would run the product in bf16 / fp16.
    with torch.autocast(outputs.device.type, enabled=False):
        views = F.normalize(torch.cat([outputs[:, 0], outputs[:, 1]]).float(), dim=1)
        similarity = views @ views.T
    self_pairs = torch.eye(2 * batch, dtype=torch.bool, device=similarity.device)
    similarity = similarity.masked_fill(self_pairs, -math.inf)
    indices = torch.arange(2 * batch, device=similarity.device)
    return similarity, (indices + batch) % (2 * batch)
