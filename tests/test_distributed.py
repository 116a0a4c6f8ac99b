"""Distributed pretraining for real: torchrun with 2 CPU processes and gloo (as lightly does)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.engine.loop import read_log

COMPARE_SCRIPT = """
import os
from ctxrestore import api
from ctxrestore.bench import comparison

writes = []
write_results = comparison.write_results


def counted_write_results(*args):
    writes.append(args[0])
    return write_results(*args)


comparison.write_results = counted_write_results
result = api.compare(arm=["random={runs}/random/*/*",
                          "context_restoration={runs}/context_restoration/*/*"], out="{out}")
# One file per rank: lines printed by two processes to one pipe can interleave.
rank = os.environ["RANK"]
with open(f"{marks}/rank_{{rank}}.txt", "w") as mark:
    mark.write(f"rank {{rank}} wrote results.csv {{len(writes)}} time(s); {{result.runs}} runs")
"""


REFUSAL_SCRIPT = """
import sys

import torch.distributed as dist

from ctxrestore.cli import app

try:
    app(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
dist.barrier()
sys.exit(code)
"""


def _torchrun(
    port: int, arguments: list[str], script: Path | None = None
) -> subprocess.CompletedProcess:
    """Two CPU processes of `ctxrestore ARGUMENTS` (or of `script ARGUMENTS`)."""
    target = [str(script)] if script else ["-m", "ctxrestore"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), *target, *arguments]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


@pytest.mark.distributed
def test_torchrun_two_processes_pretrain(tmp_path):
    out = tmp_path / "run"
    result = _torchrun(29517, [
        "--quiet", "pretrain", "--out", str(out), "--device", "cpu", "--num-images", "32",
        "--image-size", "32", "--width", "4", "--batch-size", "8", "--max-steps", "4",
        "--patch-size", "4", "--log-every", "1",
    ])  # fmt: skip
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
    result = _torchrun(29518, [
        "--quiet", "finetune", "segment", "--out", str(out), "--device", "cpu",
        "--num-images", "40", "--image-size", "32", "--width", "4", "--batch-size", "8",
        "--max-steps", "6", "--epochs", "1",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] == 6
    assert 0.0 <= summary["test"]["global_dice/mean"] <= 1.0
    assert (out / "best" / "model.safetensors").is_file()


@pytest.mark.distributed
def test_torchrun_two_processes_benchmark_resumes_and_refuses_changed_settings(tmp_path):
    """One process pretrains and fine-tunes many times: it joins the process group once (a
    second join after leaving it failed inside gloo), rank 0 alone decides what is finished and
    writes the outputs, and its refusal stops every rank instead of leaving them waiting."""
    out = tmp_path / "bench"
    arguments = [
        "benchmark", "--task", "classify", "--methods", "random,context_restoration",
        "--fractions", "1.0", "--seeds", "2", "--pretrain-seeds", "2", "--num-images", "40",
        "--image-size", "32", "--width", "4", "--pretrain-images", "32", "--pretrain-steps", "2",
        "--pretrain-batch-size", "8", "--max-steps", "2", "--batch-size", "8",
        "--patch-size", "4", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    first = _torchrun(29519, arguments)
    assert first.returncode == 0, first.stderr[-3000:]
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((row["method"], row["seed"], row["pretrain_seed"]) for row in rows) == [
        ("context_restoration", "0", "0"), ("context_restoration", "1", "1"),
        ("random", "0", ""), ("random", "1", ""),
    ]  # fmt: skip
    assert all(0.0 <= float(row["macro_f1"]) <= 1.0 for row in rows)
    assert (out / "report.md").is_file() and (out / "plot.png").is_file()
    probes = (out / "probe" / "context_restoration" / "probe.csv").read_text().splitlines()
    assert len(probes) == 3  # the header and one row per pretraining
    # Rank 0 alone logs: each line once.
    assert first.stderr.count("4 runs (4 trained now, 0 finished before)") == 1
    assert not [path for path in out.rglob(".*")]  # no stray temporaries from a second writer

    again = _torchrun(29520, arguments)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("4 runs (0 trained now, 4 finished before)") == 1

    # A command that runs in one process (probe) runs on rank 0, which hands on its result.
    probed = _torchrun(29522, [
        "probe", "classify", "--init", str(out / "pretrain" / "context_restoration" / "seed_*"),
        "--init", "random", "--num-images", "40", "--image-size", "32", "--width", "4",
        "--device", "cpu", "--out", str(tmp_path / "probe"),
    ])  # fmt: skip
    assert probed.returncode == 0, probed.stderr[-3000:]
    assert len((tmp_path / "probe" / "probe.csv").read_text().splitlines()) == 4
    assert probed.stderr.count("best: ") == 1

    # compare reads runs and writes files only: rank 0 does it, the other rank gets its result.
    script = tmp_path / "compare_on_two_ranks.py"
    script.write_text(COMPARE_SCRIPT.format(runs=out / "runs", out=tmp_path / "compared",
                                            marks=tmp_path))  # fmt: skip
    compared = _torchrun(29523, [], script)
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert [(tmp_path / f"rank_{rank}.txt").read_text() for rank in (0, 1)] == [
        "rank 0 wrote results.csv 1 time(s); 4 runs",
        "rank 1 wrote results.csv 0 time(s); 4 runs",
    ]
    assert (tmp_path / "compared" / "report.md").is_file()
    assert not [path for path in (tmp_path / "compared").rglob(".*")]

    # torchrun stops the other ranks as soon as one exits, which can be before rank 1 has
    # printed its error: this script has each rank print its error, then wait for the other.
    script = tmp_path / "refuse_on_two_ranks.py"
    script.write_text(REFUSAL_SCRIPT)
    changed = _torchrun(29521, [*arguments[:-2], "--width", "8", "--out", str(out)], script)
    assert changed.returncode != 0  # (torchrun then prints its own traceback)
    # Rank 0 refused, and rank 1 stopped with the same one-line error instead of waiting.
    assert changed.stderr.count("holds a benchmark with other settings (width") == 2
