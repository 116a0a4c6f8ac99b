"""What a run ran on, recorded beside its config: the same seed and options give the same
numbers only on the same software and the same kernels.

On one machine a run repeats to the digit. On another CPU it does not: PyTorch picks its
convolution kernels by the instruction set (AVX2, AVX512...), their sums round differently,
and over hundreds of steps a seed's test score moves by a few points (docs/experiments.md
29: macro-F1 0.460 with AVX512 kernels, 0.443 with AVX2, same seed, same code). So every run
writes OUT/environment.json, one entry per start or resume, and a resume on a machine whose
kernels differ says so.
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
from pathlib import Path

import numpy as np
import torch

import ctxrestore
from ctxrestore.files import read_json, write_json

logger = logging.getLogger(__name__)

ENVIRONMENT_FILE = "environment.json"
# What decides the numbers, beyond the options and the seed.
NUMERICS_KEYS = ("torch", "device", "cpu_capability", "gpu", "cuda", "cudnn", "world_size")
# Variables that override PyTorch's kernel choice (set one to repeat a run from another CPU).
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def describe_environment(device: torch.device, world_size: int = 1) -> dict:
    """The software, the device and the kernels of this process, as JSON values."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "ctxrestore": ctxrestore.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": device.type,
        "world_size": int(world_size),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if on_gpu else None,
        "cuda": torch.version.cuda if on_gpu else None,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "kernel_variables": {
            name: os.environ[name] for name in KERNEL_VARIABLES if name in os.environ
        },
    }


def record_environment(
    out: Path, device: torch.device, world_size: int = 1, resume: bool = False
) -> dict:
    """Write OUT/environment.json: a new list for a new run, one more entry on resume.

    On resume, warns when what decides the numbers (NUMERICS_KEYS) differs from the run's
    start: the resumed run is a valid run, but not the one an uninterrupted run would give."""
    path = Path(out) / ENVIRONMENT_FILE
    current = describe_environment(device, world_size)
    sessions = []
    if resume and path.is_file():
        sessions = list(read_json(path).get("sessions", []))
    if sessions:
        changed = environment_changes(sessions[0], current)
        if changed:
            logger.warning(
                "%s was started on other software or kernels (%s): the resumed run will "
                "not repeat an uninterrupted one to the digit",
                out, "; ".join(changed),
            )  # fmt: skip
    sessions.append(current)
    write_json(path, {"sessions": sessions})
    return current


def environment_changes(before: dict, after: dict) -> list[str]:
    """'key: before -> after' for each of NUMERICS_KEYS that differs."""
    return [
        f"{key}: {before.get(key)} -> {after.get(key)}"
        for key in NUMERICS_KEYS
        if before.get(key) != after.get(key)
    ]


def environment_fingerprint(run_dir: Path) -> str:
    """What decided a run's numbers (NUMERICS_KEYS at its start) in one short string, so
    runs can be grouped by it; "" for a run without the file."""
    sessions = _sessions(run_dir)
    if not sessions:
        return ""
    return f"torch {sessions[0]['torch']}, {_kernels(sessions[0])}"


def _kernels(entry: dict) -> str:
    """Where the kernels ran: the GPU by name with CUDA and cuDNN, the CPU by its capability
    ("cpu AVX512"), another device by its type; and how many processes."""
    if entry["gpu"]:
        device = f"{entry['gpu']}, CUDA {entry['cuda']}, cuDNN {entry['cudnn']}"
    elif entry["device"] == "cpu":
        device = f"cpu {entry['cpu_capability']}"
    else:
        device = entry["device"]
    return f"{device}, {entry['world_size']} process(es)"


def _sessions(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / ENVIRONMENT_FILE
    return list(read_json(path).get("sessions", [])) if path.is_file() else []


def environment_summary(run_dir: Path) -> str | None:
    """One Markdown line for a report: what the run started on (None for a run without the
    file, e.g. one from before it was written)."""
    sessions = _sessions(run_dir)
    if not sessions:
        return None
    first = sessions[0]
    line = (
        f"Environment: ctxrestore {first['ctxrestore']}, PyTorch {first['torch']}, "
        f"{_kernels(first)}; `{ENVIRONMENT_FILE}` has the details"
    )
    changes = [change for later in sessions[1:] for change in environment_changes(first, later)]
    if changes:
        line += f". Resumed on other software or kernels ({'; '.join(sorted(set(changes)))})"
    return line + "."
