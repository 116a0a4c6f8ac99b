"""Model registry by name, as in timm: `@register_model`, `create_model`, `list_models`."""

from __future__ import annotations

from ctxrestore.registry import Registry

MODELS = Registry("model")

register_model = MODELS.register
list_models = MODELS.names
get_factory = MODELS.get
check_kwargs = MODELS.check_kwargs
create_model = MODELS.create
