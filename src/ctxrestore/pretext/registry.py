"""Pretext tasks by name. Adding a method is one file with `@register_pretext` and an import."""

from __future__ import annotations

from typing import Protocol

import torch

from ctxrestore.registry import Registry


class Pretext(Protocol):
    """What pretraining needs from a pretext task.

    - `network_spec(base)`: the network to pretrain. `base` is `models.model_spec` of the
      chosen image-to-image network (--network: encoder + decoder + head); restoration pretexts
      return it as is, others build their own network around `base["encoder"]` (its
      ConvEncoder arguments), keeping the "encoder." prefix so that the encoder transfers.
    - `make_batch`: (network input, target) from clean images (B, C, *S) on their device, with
      all randomness from `generator`.
    - `loss(outputs, targets)`: a scalar to minimise.
    - `evaluate(inputs, targets, outputs)`: held-out metrics for metrics.json and the report,
      with a baseline that a network which learned nothing would reach.
    - `summary(metrics)`: one Markdown sentence saying what those metrics show.
    - `preview_rows(inputs, targets, outputs)`: rows of images (title, (B, C, *S)) to draw.
    - `params()`: what the checkpoint spec records.

    The factory takes only the options it uses among `num_swaps`, `patch_size`,
    `foreground_threshold`, `restoration_loss`, `contrastive_weight`, `projector`,
    `dense_views`, `dense_level` and `placement` (pretrain's options that pretexts share or
    name).
    """

    name: str

    def network_spec(self, base: dict) -> dict: ...

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def evaluate(
        self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
    ) -> dict[str, float]: ...

    def summary(self, metrics: dict[str, float]) -> str: ...

    def preview_rows(
        self, inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]: ...

    def params(self) -> dict: ...


PRETEXTS = Registry("pretext")

register_pretext = PRETEXTS.register
list_pretexts = PRETEXTS.names
create_pretext = PRETEXTS.create
get_pretext_factory = PRETEXTS.get
