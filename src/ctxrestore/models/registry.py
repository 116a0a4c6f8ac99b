"""Model registry by name, as in timm: `@register_model`, `create_model`, `list_models`."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ctxrestore.errors import CtxRestoreError

Factory = TypeVar("Factory", bound=Callable[..., nn.Module])

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Factory], Factory]:
    """Decorator that registers a factory function under `name`; returns it unchanged."""

    def decorator(factory: Factory) -> Factory:
        if name in _FACTORIES:
            raise CtxRestoreError(f"a model named {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_FACTORIES)


def get_factory(name: str) -> Callable[..., nn.Module]:
    """The factory registered under `name`; CtxRestoreError listing the known names if none."""
    try:
        return _FACTORIES[name]
    except KeyError:
        raise CtxRestoreError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def accepted_kwargs(name: str) -> list[str]:
    """Keyword arguments that the factory of model `name` accepts."""
    return list(inspect.signature(get_factory(name)).parameters)


def check_kwargs(name: str, kwargs: dict) -> None:
    """Raise CtxRestoreError naming any key the factory of `name` does not accept."""
    accepted = accepted_kwargs(name)
    unknown = [key for key in kwargs if key not in accepted]
    if unknown:
        raise CtxRestoreError(
            f"model {name!r} does not accept {', '.join(map(repr, unknown))}; "
            f"accepted arguments: {', '.join(accepted)}"
        )


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model `name` with the factory's keyword arguments."""
    check_kwargs(name, kwargs)
    return get_factory(name)(**kwargs)
