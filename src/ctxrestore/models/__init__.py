"""Encoders, decoders and heads, built by name (`create_model`) or from a spec (`build_model`)."""

# Importing the architecture modules registers their factories.
from ctxrestore.models import sononet as _sononet  # noqa: F401
from ctxrestore.models import unet as _unet  # noqa: F401
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.network import EncoderDecoder
from ctxrestore.models.registry import create_model, list_models, register_model
from ctxrestore.models.spec import build_model, model_spec

__all__ = [
    "ConvEncoder",
    "EncoderDecoder",
    "build_model",
    "create_model",
    "list_models",
    "model_spec",
    "register_model",
]
