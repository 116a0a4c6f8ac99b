"""Encoders, decoders and heads, built by name (`create_model`) or from a spec (`build_model`)."""

# Importing the architecture modules registers their factories.
from ctxrestore.models import classifier as _classifier  # noqa: F401
from ctxrestore.models import contrastive as _contrastive  # noqa: F401
from ctxrestore.models import localizer as _localizer  # noqa: F401
from ctxrestore.models import relative_position as _relative_position  # noqa: F401
from ctxrestore.models import sononet as _sononet  # noqa: F401
from ctxrestore.models import unet as _unet  # noqa: F401
from ctxrestore.models.encoder import ConvEncoder
from ctxrestore.models.network import EncoderDecoder
from ctxrestore.models.registry import create_model, list_models, register_model
from ctxrestore.models.spec import build_model, model_spec, pretraining_spec

# Image-to-image networks (encoder + reconstruction part) that a pretext can train; the
# classifier and localizer are downstream networks built around their encoders.
PRETRAINING_NETWORKS = ("sononet", "sononet_unet", "unet")

__all__ = [
    "PRETRAINING_NETWORKS",
    "ConvEncoder",
    "EncoderDecoder",
    "build_model",
    "create_model",
    "list_models",
    "model_spec",
    "pretraining_spec",
    "register_model",
]
