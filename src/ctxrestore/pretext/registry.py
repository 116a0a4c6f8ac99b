"""Pretext tasks by name. Adding a method is one file with `@register_pretext` and an import."""

from __future__ import annotations

from typing import Protocol

import torch

from ctxrestore.registry import Registry


class Pretext(Protocol):
    """What the training loop needs from a pretext task.

    `make_batch` builds (network input, target) from clean images on their device, with all
    randomness from `generator`; `loss` compares the network output with the target; `params`
    is what the checkpoint spec records.
    """

    name: str

    def make_batch(
        self, images: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def params(self) -> dict: ...


PRETEXTS = Registry("pretext")

register_pretext = PRETEXTS.register
list_pretexts = PRETEXTS.names
create_pretext = PRETEXTS.create
