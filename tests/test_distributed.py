"""Distributed pretraining for real: torchrun with 2 CPU processes and gloo (as lightly does)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.engine.loop import read_log


@pytest.mark.distributed
def test_torchrun_two_processes_pretrain(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29517", "-m", "ctxrestore", "--quiet", "pretrain",
        "--out", str(out), "--device", "cpu", "--num-images", "32", "--image-size", "32",
        "--width", "4", "--batch-size", "8", "--max-steps", "4", "--patch-size", "4",
        "--log-every", "1",
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in read_log(out)] == [1, 2, 3, 4]
    weights, spec = load_checkpoint(out)
    assert spec["model"]["name"] == "unet"
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert json.loads((out / "metrics.json").read_text())["steps"] == 4
    # Only rank 0 wrote files: no stray temporaries from a second writer.
    assert not [path for path in out.iterdir() if path.name.startswith(".")]


@pytest.mark.distributed
def test_torchrun_two_processes_finetune_with_validation(tmp_path):
    """Validation runs on rank 0 and its early-stop decision reaches every process."""
    out = tmp_path / "segment"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29518", "-m", "ctxrestore", "--quiet", "finetune", "segment",
        "--out", str(out), "--device", "cpu", "--num-images", "40", "--image-size", "32",
        "--width", "4", "--batch-size", "8", "--max-steps", "6", "--epochs", "1",
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] == 6
    assert 0.0 <= summary["test"]["global_dice/mean"] <= 1.0
    assert (out / "best" / "model.safetensors").is_file()
