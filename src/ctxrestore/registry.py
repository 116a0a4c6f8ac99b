"""Factories by name (timm-style), shared by the model and pretext registries."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ctxrestore.errors import CtxRestoreError

Factory = TypeVar("Factory", bound=Callable[..., Any])


class Registry:
    """`register(name)` decorates a factory; `create(name, **kwargs)` calls it after checking
    the name and the keyword arguments, with errors that list what would be valid."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Factory], Factory]:
        def decorator(factory: Factory) -> Factory:
            if name in self._factories:
                raise CtxRestoreError(f"a {self.kind} named {name!r} is already registered")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._factories:
            raise CtxRestoreError(
                f"unknown {self.kind} {name!r}; known {self.kind}s: {', '.join(self.names())}"
            )
        return self._factories[name]

    def check_kwargs(self, name: str, kwargs: dict) -> None:
        accepted = list(inspect.signature(self.get(name)).parameters)
        unknown = [key for key in kwargs if key not in accepted]
        if unknown:
            raise CtxRestoreError(
                f"{self.kind} {name!r} does not accept {', '.join(map(repr, unknown))}; "
                f"accepted arguments: {', '.join(accepted)}"
            )

    def create(self, name: str, **kwargs: Any) -> Any:
        self.check_kwargs(name, kwargs)
        return self.get(name)(**kwargs)
