"""Pretext tasks: a corruption + a target + a loss, registered by name."""

from ctxrestore.pretext import autoencoder as _autoencoder  # noqa: F401
from ctxrestore.pretext import context_encoder as _context_encoder  # noqa: F401
from ctxrestore.pretext import context_restoration as _context_restoration  # noqa: F401
from ctxrestore.pretext import (  # noqa: F401
    context_restoration_contrastive as _context_restoration_contrastive,
)
from ctxrestore.pretext import context_restoration_dense as _context_restoration_dense  # noqa: F401
from ctxrestore.pretext import contrastive as _contrastive  # noqa: F401
from ctxrestore.pretext import dense_contrastive as _dense_contrastive  # noqa: F401
from ctxrestore.pretext import models_genesis as _models_genesis  # noqa: F401
from ctxrestore.pretext import relative_position as _relative_position  # noqa: F401
from ctxrestore.pretext.registry import Pretext, create_pretext, list_pretexts, register_pretext

__all__ = ["Pretext", "create_pretext", "list_pretexts", "register_pretext"]
