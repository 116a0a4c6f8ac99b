"""Models Genesis (Zhou et al., MICCAI 2019 / Medical Image Analysis 67, 2021): restore images
corrupted by a non-linear intensity transform, local pixel shuffling and in- or out-painting,
each applied per image with the authors' probabilities (see `corruption.genesis`).

The network sees the corrupted image and is trained with an L2 loss to output the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ctxrestore.corruption.genesis import (
    BLOCK_RATE,
    INPAINT_RATE,
    INVERT_RATE,
    LOCAL_RATE,
    NONLINEAR_RATE,
    PAINT_RATE,
    models_genesis,
)
from ctxrestore.errors import CtxRestoreError
from ctxrestore.pretext.registry import register_pretext
from ctxrestore.pretext.restoration import (
    RESTORATION_LOSSES,
    check_restoration_loss,
    restoration_metrics,
    restoration_rows,
    restoration_summary,
)

RATES = ("nonlinear_rate", "local_rate", "paint_rate", "inpaint_rate", "invert_rate",
         "block_rate")  # fmt: skip


@register_pretext("models_genesis")
@dataclass(frozen=True)
class ModelsGenesisPretext:
    """patch_size: side of the blocks of local pixel shuffling (Genesis draws blocks of 1 to
    1/10 of the image per axis; pretrain passes its --patch-size). The rates are per-image
    probabilities; the defaults are the authors' (block_rate: the fraction of blocks shuffled;
    invert_rate: how often the intensity curve is decreasing); restoration_loss: a name in
    RESTORATION_LOSSES (Genesis's is mse)."""

    patch_size: int | Sequence[int] = 4
    nonlinear_rate: float = NONLINEAR_RATE
    local_rate: float = LOCAL_RATE
    paint_rate: float = PAINT_RATE
    inpaint_rate: float = INPAINT_RATE
    invert_rate: float = INVERT_RATE
    block_rate: float = BLOCK_RATE
    restoration_loss: str = "mse"
    name: str = field(default="models_genesis", init=False)

    def __post_init__(self) -> None:
        check_restoration_loss(self.restoration_loss)
        for rate in RATES:
            value = getattr(self, rate)
            if not 0 <= value <= 1:
                raise CtxRestoreError(f"{rate} is a probability in [0, 1], got {value}")

    def network_spec(self, base: dict) -> dict:
        return base

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (B, C, *spatial) clean -> (corrupted input, clean target)."""
        rates = {rate: getattr(self, rate) for rate in RATES}
        corrupted = models_genesis(images, generator, block_size=self.patch_size, **rates)
        return corrupted, images

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return RESTORATION_LOSSES[self.restoration_loss](outputs, targets)

    def evaluate(self, inputs, targets, outputs) -> dict[str, float]:
        return restoration_metrics(inputs, targets, outputs)

    def summary(self, metrics: dict[str, float]) -> str:
        return restoration_summary(metrics)

    def preview_rows(self, inputs, targets, outputs) -> list[tuple[str, torch.Tensor]]:
        return restoration_rows(inputs, targets, outputs)

    def params(self) -> dict:
        params = asdict(self)
        params.pop("name")
        return params
