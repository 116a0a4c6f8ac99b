"""Pretext tasks by name. Adding a method is one file with `@register_pretext` and an import."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Protocol

import torch

from ctxrestore.errors import CtxRestoreError


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


_PRETEXTS: dict[str, Callable[..., Pretext]] = {}


def register_pretext(name: str):
    def decorator(factory):
        if name in _PRETEXTS:
            raise CtxRestoreError(f"pretext '{name}' is registered twice")
        _PRETEXTS[name] = factory
        return factory

    return decorator


def list_pretexts() -> list[str]:
    return sorted(_PRETEXTS)


def create_pretext(name: str, **kwargs) -> Pretext:
    if name not in _PRETEXTS:
        raise CtxRestoreError(f"unknown pretext '{name}'; known pretexts: {list_pretexts()}")
    factory = _PRETEXTS[name]
    accepted = set(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise CtxRestoreError(
            f"pretext '{name}' does not take {unknown}; it takes {sorted(accepted)}"
        )
    return factory(**kwargs)
