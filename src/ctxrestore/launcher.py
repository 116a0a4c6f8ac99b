"""What torchrun told this process, readable anywhere and before any process group exists:
progress bars and log lines (drawn by rank 0 only) need it in every layer, so it sits beside
errors.py rather than in engine/, which joins the group (engine/distributed.py)."""

from __future__ import annotations

import os


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))
