"""Progress bars: one switch for all of them (`ctxrestore --quiet` turns it off), and shown by
rank 0 only under torchrun, so N processes do not draw N bars over each other."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.progress import track as _rich_track

from ctxrestore.launcher import launched_rank

T = TypeVar("T")
_state = {"shown": True}


def show_progress(shown: bool = True) -> None:
    """Show (the default) or hide every progress bar ctxrestore draws, in this process."""
    _state["shown"] = bool(shown)


def progress_shown() -> bool:
    return _state["shown"] and launched_rank() == 0


def track(sequence: Iterable[T], description: str, **options) -> Iterator[T]:
    """rich's `track`, hidden when progress is off (see `show_progress`)."""
    return _rich_track(sequence, description=description, disable=not progress_shown(), **options)
