"""The command line as a user meets it: same options as the API, clear errors, the demo."""

import inspect
import json
import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

import ctxrestore
from ctxrestore import api
from ctxrestore.cli import app
from ctxrestore.pretext.training import PretrainConfig
from ctxrestore.tasks.training import FinetuneConfig

runner = CliRunner()


@pytest.mark.parametrize(
    "name", ["pretrain", "finetune", "benchmark", "ablate", "predict", "demo", "phantoms"]
)
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
    ("function", "config"), [(api.pretrain, PretrainConfig), (api.finetune, FinetuneConfig)]
)
def test_api_options_are_the_config_fields(function, config):
    fields = {f.name: f.default for f in config.__dataclass_fields__.values()}
    signature = inspect.signature(function).parameters
    assert set(fields) == set(signature)
    for key, parameter in signature.items():
        default = parameter.default
        default = default.value if hasattr(default, "value") else default
        if key not in ("out", "task"):
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


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        ["ctxrestore", "demo", "--quick", "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    report = (out / "report.md").read_text()
    assert "![preview](pretrain/preview.png)" in report
    for name in ("ultrasound", "abdomen", "brain"):
        assert f"![{name} phantom](phantoms/{name}.png)" in report
        assert (out / "phantoms" / f"{name}.png").stat().st_size > 1000
    assert (out / "pretrain" / "preview.png").stat().st_size > 1000
    assert (out / "pretrain" / "loss.png").stat().st_size > 1000
    metrics = json.loads((out / "pretrain" / "metrics.json").read_text())
    # The quick demo must learn something: restore better than leaving the corruption.
    assert metrics["restoration_mse"] < 0.8 * metrics["identity_mse"]
    model = ctxrestore.load_pretrained(out / "pretrain")
    assert sum(p.numel() for p in model.parameters()) > 0
