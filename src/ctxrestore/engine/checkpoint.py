"""Checkpoint files, written atomically and read without unpickling arbitrary objects.

A checkpoint folder holds `model.safetensors` (weights) and `spec.json` (everything needed to
rebuild and adapt the network; see DESIGN.md). Exact resume additionally needs
`training_state.pt`: optimizer, schedule, step and random states, loaded with
`torch.load(weights_only=True)`, which refuses arbitrary objects.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import atomic_write, read_json, write_json

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.json"
TRAINING_STATE_FILE = "training_state.pt"


def save_checkpoint(folder: Path, state_dict: dict[str, torch.Tensor], spec: dict) -> Path:
    """Weights (safetensors) and spec (JSON) into `folder`; weights first, each atomic."""
    folder = Path(folder)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda temporary: save_file(tensors, str(temporary)))
    write_json(folder / SPEC_FILE, spec)
    return folder


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict on CPU, spec) from a checkpoint folder, with errors that name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CtxRestoreError(f"checkpoint folder {folder} does not exist")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise CtxRestoreError(
            f"{folder} is not a ctxrestore checkpoint: {WEIGHTS_FILE} is missing "
            f"(a pretraining run writes it at its first checkpoint)"
        )
    spec = read_json(folder / SPEC_FILE)
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise CtxRestoreError(f"{weights} cannot be read as safetensors: {error}") from None
    return state_dict, spec


def weights_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A short hash of the weights themselves (names, dtypes, shapes, values): which pretraining
    a fine-tuning run started from, whatever the folder was called or later became."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def save_training_state(folder: Path, state: dict) -> Path:
    """Optimizer, schedule, step and RNG states for exact resume (tensors and plain types)."""
    return atomic_write(
        Path(folder) / TRAINING_STATE_FILE, lambda temporary: torch.save(state, temporary)
    )


def load_training_state(folder: Path) -> dict | None:
    """The saved training state, or None when the folder has none (a fresh run)."""
    path = Path(folder) / TRAINING_STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or foreign files
        raise CtxRestoreError(f"{path} cannot be read to resume from: {error}") from None
