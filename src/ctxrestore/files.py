"""Files that are never half-written: atomic writes and JSON with errors that name the file."""

from __future__ import annotations

import csv
import glob
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from ctxrestore.errors import CtxRestoreError


def atomic_write(path: Path | str, write: Callable[[Path], None], suffix: str = "") -> Path:
    """Call write(temporary_path) in the target folder, then rename over `path`.

    `suffix` ends the temporary name, for writers that pick the format by it (NIfTI).

    A crash leaves either the old file or the new one, never half of one; readers (a person
    opening a preview during training) never see a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide results on a shared machine
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_json(path: Path | str, data: dict) -> Path:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda temporary: temporary.write_text(text))


def write_csv(path: Path | str, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows as CSV, atomically; the columns default to the first row's keys, missing cells
    are left empty."""

    def write(temporary: Path) -> None:
        with temporary.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns or rows[0]), restval="")
            writer.writeheader()
            writer.writerows(rows)

    return atomic_write(path, write)


def read_json(path: Path | str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CtxRestoreError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CtxRestoreError(f"{path} is not valid JSON: {error}") from None


def matching_folders(pattern: str, what: str) -> list[Path]:
    """The folders a pattern names: a folder itself, or the folders a glob matches, sorted
    (files it also matches, such as the log files beside runs, are left out). `what` names
    the folders the user meant, for the error."""
    if not glob.has_magic(pattern):
        folder = Path(pattern)
        if not folder.is_dir():
            raise CtxRestoreError(f"{folder} is not a folder ({what})")
        return [folder]
    folders = sorted(Path(match) for match in glob.glob(pattern) if Path(match).is_dir())
    if not folders:
        raise CtxRestoreError(f"no folder matches '{pattern}' ({what})")
    return folders
