"""Preprocessed arrays on disk, memory-mapped, so that training never waits on decoding.

An entry is a folder `root/<key[:2]>/<key>/` holding one `<name>.npy` per array and a
`meta.json`; the key is a hash of everything the arrays depend on (the files' paths, sizes
and modification times, the preprocessing, what was made). Entries are written to a
temporary sibling folder and renamed into place, so readers and concurrent writers (DataLoader
workers, DDP ranks) only ever see whole entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ctxrestore.errors import CtxRestoreError

CACHE_FORMAT = 1
_ARRAY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

logger = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]


def default_cache_dir() -> Path:
    """$CTXRESTORE_CACHE_DIR, else $XDG_CACHE_HOME/ctxrestore, else ~/.cache/ctxrestore."""
    if os.environ.get("CTXRESTORE_CACHE_DIR"):
        return Path(os.environ["CTXRESTORE_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "ctxrestore"
    return Path.home() / ".cache" / "ctxrestore"


def file_fingerprint(paths: Sequence[Path | str]) -> list[list]:
    """[[absolute path, size in bytes, mtime in ns], ...]: changes when a file is replaced."""
    fingerprint = []
    for path in paths:
        path = Path(path).expanduser().absolute()
        try:
            status = path.stat()
        except OSError as error:
            raise CtxRestoreError(f"cannot read {path} to fingerprint it: {error}") from None
        fingerprint.append([str(path), status.st_size, status.st_mtime_ns])
    return fingerprint


def cache_key(key_parts: dict) -> str:
    text = json.dumps({"format": CACHE_FORMAT, **key_parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ArrayCache:
    """Arrays made once by a `create` callable, then read back memory-mapped.

    root: the cache folder (created on first write); None disables caching, so `get` calls
    `create` every time. `hits` and `misses` count `get` calls that did not / did call
    `create`.
    """

    def __init__(self, root: Path | str | None):
        self.root = None if root is None else Path(root).expanduser()
        self.hits = 0
        self.misses = 0

    def get(
        self, key_parts: dict, create: Callable[[], tuple[Arrays, dict]]
    ) -> tuple[Arrays, dict]:
        """The (arrays, metadata) for `key_parts`, from disk when present, else from
        `create()` (then stored). Cached arrays are read-only `np.memmap`s and the metadata
        is read back from JSON (tuples become lists), on a miss as on a hit."""
        if self.root is None:
            self.misses += 1
            return create()
        key = cache_key(key_parts)
        entry = self.root / key[:2] / key
        found = self._load(entry)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        arrays, metadata = create()
        self._store(entry, key_parts, arrays, metadata)
        found = self._load(entry)
        if found is None:
            raise CtxRestoreError(
                f"cache entry {entry} cannot be read back right after writing it; check that "
                f"{self.root} has space and is not shared with an older version, or disable "
                "the cache"
            )
        return found

    def _load(self, entry: Path) -> tuple[Arrays, dict] | None:
        if not entry.is_dir():
            return None
        try:
            meta = json.loads((entry / "meta.json").read_text())
            arrays = {name: _load_array(entry / f"{name}.npy") for name in meta["arrays"]}
            return arrays, meta["metadata"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            # ValueError covers broken JSON and truncated .npy files.
            logger.warning("rebuilding the broken cache entry %s (%s)", entry, error)
            shutil.rmtree(entry, ignore_errors=True)
            return None

    def _store(self, entry: Path, key_parts: dict, arrays: Arrays, metadata: dict) -> None:
        for name in arrays:
            if not _ARRAY_NAME.fullmatch(name) or name == "meta":
                raise CtxRestoreError(
                    f"cache array name {name!r} is not valid; use letters, digits, _ . - "
                    "(not starting with . or -, and not 'meta')"
                )
        meta = {
            "format": CACHE_FORMAT,
            "key_parts": key_parts,
            "arrays": sorted(arrays),
            "metadata": metadata,
        }
        meta_text = json.dumps(meta, indent=2, sort_keys=True, default=str)
        entry.parent.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
        try:
            os.chmod(temporary, 0o755)  # mkdtemp's 0700 would hide the cache on a shared machine
            for name, array in arrays.items():
                np.save(temporary / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            (temporary / "meta.json").write_text(meta_text)
            os.rename(temporary, entry)
        except OSError:
            shutil.rmtree(temporary, ignore_errors=True)
            if not entry.is_dir():
                raise
            # Another process stored the same entry first: keep theirs.
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise


def _load_array(path: Path) -> np.ndarray:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    if not isinstance(array, np.ndarray):
        raise ValueError(f"{path} is not a single array")
    return array
