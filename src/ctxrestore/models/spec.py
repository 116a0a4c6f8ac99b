"""Plain-dict model specs: what a checkpoint stores to rebuild its network (DESIGN.md)."""

from __future__ import annotations

import inspect
import json
from typing import Any

import torch
from torch import nn

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.registry import check_kwargs, create_model, get_factory

# Weight prefixes by role; "neck" is the localiser's extra conv/pool stack, "projection" the
# contrastive projection of a restoration network (left behind, like a head).
PARTS = ("encoder", "decoder", "neck", "head", "projection")


def _to_json(value: Any) -> Any:
    """Tuples become lists (recursively) so that the spec survives json.dumps/json.loads."""
    if isinstance(value, (tuple, list)):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    return value


def model_spec(name: str, **kwargs: Any) -> dict[str, Any]:
    """JSON-able spec of model `name` built with `kwargs`, defaults filled in.

    Returns {"name", "kwargs", "prefixes": {part: "part."}, "downsampling_factor", "encoder"}
    ("encoder": the arguments that rebuild its ConvEncoder, so that a downstream network can
    be built around the same encoder). The defaults
    are recorded so that the spec still rebuilds the same network if they change later.
    """
    check_kwargs(name, kwargs)
    bound = inspect.signature(get_factory(name)).bind(**kwargs)
    bound.apply_defaults()
    spec_kwargs = _to_json(dict(bound.arguments))
    try:
        json.dumps(spec_kwargs)
    except TypeError as error:
        raise CtxRestoreError(
            f"model {name!r} arguments must be JSON values to go in a spec: {error}"
        ) from None
    # On the meta device no weights are allocated, so this costs nothing even for 3D models.
    with torch.device("meta"):
        model = create_model(name, **spec_kwargs)
    children = dict(model.named_children())
    encoder = children.get("encoder")
    return {
        "name": name,
        "kwargs": spec_kwargs,
        "prefixes": {part: f"{part}." for part in PARTS if part in children},
        "downsampling_factor": int(getattr(encoder, "downsampling_factor", 1)),
        "encoder": encoder.config() if hasattr(encoder, "config") else None,
    }


def pretraining_spec(network: str, width: int, spatial_dims: int = 2, in_channels: int = 1) -> dict:
    """The spec of pretraining network `network` whose first stage has `width` channels (a
    U-Net doubles them at each of its five stages; SonoNet has its own widths)."""
    if network == "unet":
        sizes = {"channels": [width * 2**level for level in range(5)]}
    else:
        sizes = {"width": width}
    return model_spec(network, spatial_dims=spatial_dims, in_channels=in_channels, **sizes)


def unet_spec(
    spatial_dims: int, in_channels: int, out_channels: int, encoder: dict, **head: Any
) -> dict:
    """A U-Net on the stages of `encoder` (a ConvEncoder config, `model_spec(...)["encoder"]`):
    its decoder has the shape of a U-Net (or `sononet_unet`) pretraining's on that encoder, so
    the encoder and the decoder both transfer. `head`: more `unet` arguments (head_bias)."""
    return model_spec(
        "unet",
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=list(encoder["stage_channels"]),
        convs_per_stage=list(encoder["convs_per_stage"]),
        norm=encoder["norm"],
        **head,
    )


def build_model(spec: dict[str, Any]) -> nn.Module:
    """Build the model that `spec` (from `model_spec`, possibly via JSON) describes."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise CtxRestoreError(
            f"a model spec must be a dict with a 'name' and 'kwargs', got {spec!r:.200}"
        )
    kwargs = spec.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CtxRestoreError(f"model spec 'kwargs' must be a dict, got {kwargs!r:.200}")
    return create_model(spec["name"], **kwargs)
