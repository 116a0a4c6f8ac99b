"""What a run ran on: environment.json per start and resume, the resume warning, the report line."""

import logging

import pytest
import torch

from ctxrestore.engine.environment import (
    ENVIRONMENT_FILE,
    describe_environment,
    environment_changes,
    environment_fingerprint,
    environment_summary,
    record_environment,
)
from ctxrestore.files import read_json, write_json


def test_the_description_names_the_kernels_and_their_overrides(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    described = describe_environment(torch.device("cpu"), world_size=2)
    assert described["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert described["torch"] == torch.__version__ and described["device"] == "cpu"
    assert described["world_size"] == 2 and described["gpu"] is None
    assert described["kernel_variables"] == {"ATEN_CPU_CAPABILITY": "default"}


def test_a_new_run_starts_the_list_and_a_resume_adds_to_it(tmp_path, caplog):
    record_environment(tmp_path, torch.device("cpu"))
    record_environment(tmp_path, torch.device("cpu"), resume=True)
    assert len(read_json(tmp_path / ENVIRONMENT_FILE)["sessions"]) == 2
    assert "kernels" not in caplog.text  # same machine: no warning
    record_environment(tmp_path, torch.device("cpu"))  # not a resume: a new run's list
    assert len(read_json(tmp_path / ENVIRONMENT_FILE)["sessions"]) == 1


def test_a_resume_on_other_kernels_warns_and_the_report_says_so(tmp_path, caplog):
    first = record_environment(tmp_path, torch.device("cpu"))
    first_line = environment_summary(tmp_path)
    assert first_line.startswith(f"Environment: ctxrestore {first['ctxrestore']}, PyTorch ")
    assert f"cpu {first['cpu_capability']}, 1 process(es)" in first_line
    assert "Resumed" not in first_line
    # The run started on another CPU: rewrite its first entry as if it had.
    write_json(tmp_path / ENVIRONMENT_FILE, {"sessions": [first | {"cpu_capability": "OTHER"}]})
    with caplog.at_level(logging.WARNING):
        record_environment(tmp_path, torch.device("cpu"), resume=True)
    change = f"cpu_capability: OTHER -> {first['cpu_capability']}"
    assert change in caplog.text and "not repeat an uninterrupted one" in caplog.text
    assert f"Resumed on other software or kernels ({change})" in environment_summary(tmp_path)


@pytest.mark.parametrize("key", ["torch", "gpu", "cudnn", "world_size"])
def test_every_key_that_decides_the_numbers_counts_as_a_change(key):
    before = describe_environment(torch.device("cpu"))
    assert environment_changes(before, dict(before)) == []
    assert environment_changes(before, before | {key: "other"}) == [
        f"{key}: {before[key]} -> other"
    ]


def test_a_run_without_the_file_has_no_line_and_no_fingerprint(tmp_path):
    assert environment_summary(tmp_path) is None and environment_fingerprint(tmp_path) == ""


def test_the_fingerprint_names_a_gpu_by_its_name_and_other_devices_by_their_type(tmp_path):
    entry = describe_environment(torch.device("cpu"))
    gpu = entry | {"device": "cuda", "gpu": "NVIDIA H100", "cuda": "12.8", "cudnn": 91002}
    write_json(tmp_path / ENVIRONMENT_FILE, {"sessions": [gpu]})
    assert environment_fingerprint(tmp_path) == (
        f"torch {torch.__version__}, NVIDIA H100, CUDA 12.8, cuDNN 91002, 1 process(es)"
    )
    write_json(tmp_path / ENVIRONMENT_FILE, {"sessions": [entry | {"device": "mps"}]})
    assert environment_fingerprint(tmp_path) == f"torch {torch.__version__}, mps, 1 process(es)"
