"""The command line as a user meets it: same options as the API, clear errors, the demo."""

import csv
import inspect
import json
import os
import re
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import ctxrestore
from ctxrestore import api
from ctxrestore.cli import app
from ctxrestore.pretext.training import PretrainConfig
from ctxrestore.tasks.probe import ProbeConfig
from ctxrestore.tasks.training import FinetuneConfig

runner = CliRunner()


@pytest.mark.parametrize(
    "name",
    ["pretrain", "finetune", "benchmark", "ablate", "compare", "probe", "predict", "demo",
     "phantoms"],
)  # fmt: skip
def test_cli_and_api_share_options_and_defaults(name):
    command = get_command(app).commands[name]
    cli = {param.name: param.default for param in command.params}
    signature = inspect.signature(getattr(api, name)).parameters
    python = {key: p.default for key, p in signature.items()}
    assert set(cli) == set(python)
    for key, default in python.items():
        if default is inspect.Parameter.empty:  # a required argument
            assert command.params[list(cli).index(key)].required, key
            continue
        default = default.value if hasattr(default, "value") else default
        assert cli[key] == default or str(cli[key]) == str(default), key


@pytest.mark.parametrize(
    ("function", "config"),
    [(api.pretrain, PretrainConfig), (api.finetune, FinetuneConfig), (api.probe, ProbeConfig)],
)
def test_api_options_are_the_config_fields(function, config):
    fields = {f.name: f.default for f in config.__dataclass_fields__.values()}
    signature = inspect.signature(function).parameters
    assert set(fields) == set(signature)
    for key, parameter in signature.items():
        default = parameter.default
        default = default.value if hasattr(default, "value") else default
        if key not in ("out", "task") and default is not inspect.Parameter.empty:
            assert fields[key] == default, key


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ctxrestore {ctxrestore.__version__}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["pretrain", "--image-size", "40"], "image_size 40 is not divisible by 16"),
        (["pretrain", "--patch-size", "40"], "does not fit twice"),
        (["pretrain", "MISSING_FOLDER"], "MISSING_FOLDER"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, arguments, message):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctxrestore",
            *arguments,
            "--out",
            str(tmp_path / "run"),
            "--max-steps",
            "1",
            "--width",
            "4",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize("quiet", [False, True])
def test_quiet_hides_progress_bars_and_progress_lines(tmp_path, quiet):
    result = subprocess.run(
        [sys.executable, "-m", "ctxrestore", *(["--quiet"] if quiet else []), "finetune",
         "classify", "--out", str(tmp_path / "run"), "--num-images", "40", "--image-size", "32",
         "--width", "4", "--batch-size", "8", "--max-steps", "2", "--epochs", "1",
         "--device", "cpu"],
        capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = result.stdout + result.stderr
    shown = ["phantom ultrasound", "2/2 steps", "fine-tuned 2 steps"]  # two bars, one log line
    assert [text in printed for text in shown] == [not quiet] * len(shown), printed
    assert quiet == (printed.strip() == "")


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["ctxrestore", "demo", "--quick", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    for task, phantom in (("classify", "ultrasound"), ("localize", "abdomen"),
                          ("segment", "brain")):  # fmt: skip
        assert f"## {task} ({phantom} phantom)" in report
        with (out / task / "results.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        # random and context restoration, one fraction, two seeds: paired runs.
        assert sorted((row["method"], row["seed"]) for row in rows) == [
            ("context_restoration", "0"), ("context_restoration", "1"),
            ("random", "0"), ("random", "1"),
        ]  # fmt: skip
        assert f"![{phantom} phantom](phantoms/{phantom}.png)" in report
    # Every picture the report shows exists and is a real image.
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(pictures) >= 9
    for picture in pictures:
        assert (out / picture).stat().st_size > 1000, picture
    pretrained = out / "segment" / "pretrain" / "context_restoration"
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["restoration_mse"] > 0 and metrics["identity_mse"] > 0
    model = ctxrestore.load_pretrained(pretrained)
    assert sum(p.numel() for p in model.parameters()) > 0
