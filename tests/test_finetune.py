"""Fine-tuning end to end: each task from random and pretrained weights through the CLI, what
transfer really loads, the errors for checkpoints that do not fit, splits, resume, predict."""

import csv
import json
import re
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_PRETRAIN
from safetensors.torch import save_file
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.cli import app
from ctxrestore.data.layouts import read_boxes_csv
from ctxrestore.data.nifti import read_nifti
from ctxrestore.data.splits import read_split
from ctxrestore.engine.checkpoint import load_checkpoint, weights_fingerprint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models.transfer import adapt_input_channels
from ctxrestore.tasks.localize import LocalizationTask
from ctxrestore.tasks.predict import _write_outputs
from ctxrestore.tasks.training import FinetuneConfig, build_network, freeze_encoder, load_data

runner = CliRunner()
TINY_FINETUNE = dict(num_images=40, image_size=32, width=4, batch_size=8, max_steps=6,
                     warmup_steps=1, log_every=1, device="cpu")  # fmt: skip
# The pretraining each task's test starts from: (network, phantom).
PRETRAINING = {"classify": ("sononet", "ultrasound"), "localize": ("sononet", "abdomen"),
               "segment": ("unet", "brain")}  # fmt: skip
HEADLINE = {"classify": "macro_f1", "localize": "iou/mean", "segment": "global_dice/mean"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """One tiny pretraining run per task, shared by the tests of this module."""
    folders = {}
    for task, (network, phantom) in PRETRAINING.items():
        folder = tmp_path_factory.mktemp(f"pretrain_{task}")
        ctxrestore.pretrain(out=folder, network=network, phantom=phantom, **TINY_PRETRAIN)
        folders[task] = folder
    return folders


def _cli_options(options: dict) -> list[str]:
    return [part for key, value in options.items()
            for part in (f"--{key.replace('_', '-')}", str(value))]  # fmt: skip


@pytest.mark.parametrize("task", ["classify", "localize", "segment"])
@pytest.mark.parametrize("init", ["random", "pretrained"])
def test_finetune_end_to_end_through_the_cli(tmp_path, pretrained, task, init):
    out = tmp_path / "run"
    source = str(pretrained[task]) if init == "pretrained" else "random"
    arguments = ["finetune", task, "--out", str(out), "--init", source, "--fraction", "0.5"]
    result = runner.invoke(app, [*arguments, *_cli_options(TINY_FINETUNE)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= summary["test"][HEADLINE[task]] <= 1.0
    assert summary["split"]["train"]["cases"] == 14  # half of the 28 left after test and val
    report = (out / "report.md").read_text()
    assert HEADLINE[task] in report and "What was transferred" in report
    assert f"PyTorch {torch.__version__}" in report  # the environment line
    assert json.loads((out / "environment.json").read_text())["sessions"][0]["device"] == "cpu"
    expected = "pretrained" if init == "pretrained" else "random (--init random)"
    encoder_row = next(line for line in report.splitlines() if line.startswith("| encoder |"))
    assert encoder_row.endswith(f"| {expected} |")
    for name in ("best/model.safetensors", "split.json", "validation.csv", "test_predictions.png"):
        assert (out / name).is_file(), name
    # Which weights it started from, by their fingerprint: `compare` groups runs by it.
    started = (
        weights_fingerprint(load_checkpoint(pretrained[task])[0]) if init != "random" else None
    )
    assert summary["init_weights"] == load_checkpoint(out)[1]["init"]["weights"] == started
    assert (f"(weights {started})" in report) == (init != "random")
    if task == "classify":
        assert (out / "confusion.png").is_file()


def test_transfer_loads_the_pretrained_tensors(pretrained):
    config = FinetuneConfig(task="segment", out="unused", init=str(pretrained["segment"]),
                            **TINY_FINETUNE)  # fmt: skip
    data = load_data(config, None)
    state, spec = load_checkpoint(pretrained["segment"])
    model, _, report = build_network(config, data.task, data, (state, spec))
    assert report.transferred == {"encoder": report.transferred["encoder"], "decoder": 56}
    loaded = model.state_dict()
    for name, tensor in state.items():
        if name.startswith(("encoder.", "decoder.")):
            assert torch.equal(loaded[name], tensor), name
    assert loaded["head.conv.weight"].shape[0] == 4  # BraTS classes, not restored channels
    # A SonoNet pretraining has a deconvolution decoder: the U-Net decoder starts random.
    sononet = FinetuneConfig(task="segment", out="unused", init=str(pretrained["classify"]),
                             adapt_channels=True, **TINY_FINETUNE)  # fmt: skip
    state, spec = load_checkpoint(pretrained["classify"])
    model, _, report = build_network(sononet, data.task, data, (state, spec))
    assert "decoder" in report.random and "encoder" in report.transferred
    assert report.adapted == {"encoder.stages.0.0.conv.weight": "repeat 1 -> 4 channels"}
    first = model.state_dict()["encoder.stages.0.0.conv.weight"]
    assert torch.allclose(first, state["encoder.stages.0.0.conv.weight"].repeat(1, 4, 1, 1) / 4)


def test_a_sononet_unet_pretraining_gives_the_classifier_its_whole_encoder(tmp_path):
    ctxrestore.pretrain(out=tmp_path / "pre", network="sononet_unet", phantom="ultrasound",
                        **TINY_PRETRAIN)  # fmt: skip
    config = FinetuneConfig(task="classify", out="unused", init=str(tmp_path / "pre"),
                            **TINY_FINETUNE)  # fmt: skip
    data = load_data(config, None)
    state, spec = load_checkpoint(tmp_path / "pre")
    model, _, report = build_network(config, data.task, data, (state, spec))
    encoder = [name for name in state if name.startswith("encoder.")]
    assert encoder and all(torch.equal(model.state_dict()[n], state[n]) for n in encoder)
    assert report.transferred == {"encoder": len(encoder)}  # the U-Net decoder stays behind


def test_channel_adaptation_keeps_the_response_to_equal_channels():
    weight = torch.randn(8, 4, 3, 3)
    fewer, how = adapt_input_channels(weight, 1)
    assert how == "average 4 -> 1 channels"
    assert torch.allclose(fewer[:, 0], weight.sum(dim=1))  # same output for an image x4
    more, how = adapt_input_channels(weight[:, :1], 3)
    assert how == "repeat 1 -> 3 channels"
    assert torch.allclose(more.sum(dim=1), weight[:, 0])


def test_mismatched_checkpoints_stop_before_training(tmp_path, pretrained):
    # The brain U-Net has 4 channels (T1, T1ce, T2, FLAIR); the ultrasound data has 1.
    with pytest.raises(CtxRestoreError) as error:
        ctxrestore.finetune("classify", out=tmp_path / "a", init=str(pretrained["segment"]),
                            **TINY_FINETUNE)  # fmt: skip
    message = str(error.value)
    assert "4 channel(s) ['t1', 't1ce', 't2', 'flair']" in message.lower()
    assert "1 channel(s) ['ultrasound']" in message and "--adapt-channels" in message
    assert not (tmp_path / "a" / "model.safetensors").exists()
    three_d = tmp_path / "pre3d"
    ctxrestore.pretrain(out=three_d, network="unet", phantom="brain",
                        **{**TINY_PRETRAIN, "spatial_dims": 3, "image_size": 16})  # fmt: skip
    with pytest.raises(CtxRestoreError, match="pretrained in 3D, but the segment data"):
        ctxrestore.finetune("segment", out=tmp_path / "b", init=str(three_d), **TINY_FINETUNE)
    result = runner.invoke(app, ["finetune", "classify", "--out", str(tmp_path / "c"),
                                 "--init", str(pretrained["segment"]),
                                 *_cli_options(TINY_FINETUNE)])  # fmt: skip
    assert result.exit_code == 2 and "--adapt-channels" in result.output


def test_fine_tuning_from_an_unfinished_pretraining_says_so(tmp_path, pretrained, caplog):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(pretrained["classify"], unfinished)
    (unfinished / "metrics.json").unlink()  # as while it still runs: checkpoints, no metrics
    with caplog.at_level("WARNING", logger="ctxrestore"):
        ctxrestore.finetune("classify", out=tmp_path / "a", init=str(unfinished), **TINY_FINETUNE)
    assert f"{unfinished} holds an unfinished run" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="ctxrestore"):
        ctxrestore.finetune("classify", out=tmp_path / "b", init=str(pretrained["classify"]),
                            **TINY_FINETUNE)  # fmt: skip
    assert "unfinished run" not in caplog.text


@pytest.mark.parametrize("missing", ["prefixes", "in_channels"])
def test_an_init_folder_without_a_ctxrestore_spec_is_refused_by_name(tmp_path, pretrained,
                                                                      missing):  # fmt: skip
    """Pretraining and fine-tuning read --init through one check, before any run folder."""
    foreign = tmp_path / "foreign"
    shutil.copytree(pretrained["classify"], foreign)
    spec = json.loads((foreign / "spec.json").read_text())
    del (spec["model"] if missing == "prefixes" else spec)[missing]
    (foreign / "spec.json").write_text(json.dumps(spec))
    message = f"{foreign / 'spec.json'} is not a ctxrestore spec"
    with pytest.raises(CtxRestoreError, match=re.escape(message)):
        ctxrestore.finetune("classify", out=tmp_path / "a", init=str(foreign), **TINY_FINETUNE)
    with pytest.raises(CtxRestoreError, match=re.escape(message)):
        ctxrestore.pretrain(out=tmp_path / "b", network="sononet", phantom="ultrasound",
                            init=str(foreign), **TINY_PRETRAIN)  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_frozen_encoder_keeps_its_pretrained_values(tmp_path, pretrained):
    out = tmp_path / "frozen"
    options = dict(init=str(pretrained["localize"]), freeze_encoder=True, **TINY_FINETUNE)
    ctxrestore.finetune("localize", out=out, **options)
    before, spec = load_checkpoint(pretrained["localize"])
    after, _ = load_checkpoint(out)
    # Weights and BN running statistics; num_batches_tracked only counts (momentum is set).
    encoder = [n for n in before if n.startswith("encoder.") and "num_batches" not in n]
    assert encoder and all(torch.equal(before[n], after[n]) for n in encoder)
    config = FinetuneConfig(task="localize", out="unused", **options)
    data = load_data(config, None)
    initial, _, _ = build_network(config, data.task, data, (before, spec))
    trained = [n for n, t in initial.state_dict().items()
               if not torch.equal(t, after[n]) and "num_batches" not in n]  # fmt: skip
    assert trained and all(n.startswith(("neck.", "head.")) for n in trained)


def test_a_frozen_random_encoder_is_a_fixed_function_the_decoder_can_learn_on(tmp_path):
    """Random features: the encoder's normalisation statistics come from the training images
    (a fresh BatchNorm's mean 0 / variance 1 would not normalise), then nothing in it changes,
    and it computes the same in training and in evaluation."""
    options = dict(init="random", freeze_encoder=True, **TINY_FINETUNE)
    config = FinetuneConfig(task="segment", out="unused", **options)
    data = load_data(config, None)
    model, _, _ = build_network(config, data.task, data, (None, None))
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    images = list(torch.rand(8, len(data.channel_names), 32, 32) * 3 + 1)  # far from N(0, 1)
    inputs = {}
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    hooks = [m.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0].clone()))
             for m in norms]  # fmt: skip
    freeze_encoder(model, images, torch.device("cpu"))
    for hook in hooks:
        hook.remove()
    for norm in norms:  # one batch of 8: the statistics are exactly its mean and variance
        seen = inputs[norm].transpose(0, 1).flatten(1)
        assert torch.allclose(norm.running_mean, seen.mean(dim=1), atol=1e-5)
        assert torch.allclose(norm.running_var, seen.var(dim=1), rtol=1e-4, atol=1e-6)
    batch = torch.stack(images)
    model.train()
    in_training = model.encoder(batch)
    model.eval()
    in_evaluation = model.encoder(batch)
    assert all(torch.equal(a, b) for a, b in zip(in_training, in_evaluation))
    assert 0.1 < float(in_evaluation[-1].std()) < 10  # normalised all the way down
    out = tmp_path / "frozen_random"
    ctxrestore.finetune("segment", out=out, **options)
    after, _ = load_checkpoint(out)
    weights = [n for n in after if n.startswith("encoder.") and "running" not in n
               and "num_batches" not in n]  # fmt: skip
    assert weights and all(torch.equal(initial[n], after[n]) for n in weights)
    estimated = [n for n in after if n.startswith("encoder.") and "running_var" in n]
    assert estimated and not any(torch.equal(initial[n], after[n]) for n in estimated)
    decoder = [n for n in after if n.startswith("decoder.") and "num_batches" not in n]
    assert any(not torch.equal(initial[n], after[n]) for n in decoder)


def test_transfer_stages_copies_only_the_first_encoder_stages(tmp_path, pretrained):
    before, spec = load_checkpoint(pretrained["segment"])
    options = dict(init=str(pretrained["segment"]), transfer_stages=2, **TINY_FINETUNE)
    config = FinetuneConfig(task="segment", out="unused", **options)
    data = load_data(config, None)
    model, _, report = build_network(config, data.task, data, (before, spec))
    random_model, _, _ = build_network(  # the same seed: what every tensor is without transfer
        FinetuneConfig(task="segment", out="unused", **{**TINY_FINETUNE}),
        data.task, data, (None, None),
    )  # fmt: skip
    state, random_state = model.state_dict(), random_model.state_dict()
    copied = [n for n in state if "num_batches" not in n and torch.equal(state[n], before[n])]
    assert copied and all(n.startswith(("encoder.stages.0.", "encoder.stages.1.")) for n in copied)
    deeper = [n for n in state if n.startswith(("encoder.stages.2.", "decoder.")) and
              "num_batches" not in n]  # fmt: skip
    assert deeper and all(torch.equal(state[n], random_state[n]) for n in deeper)
    assert report.prefixes == ("encoder.stages.0.", "encoder.stages.1.")
    assert report.random["decoder"] > 0 and "stages 2 and deeper" in report.reasons["encoder"]
    # Through the CLI: a count the encoder does not have, and nonsense combinations, stop early.
    stages = 1 + max(int(n.split(".")[2]) for n in before if n.startswith("encoder.stages."))
    for extra, message in [
        (["--transfer-stages", str(stages + 1)], f"has {stages} stages; use 1..{stages}"),
        (["--transfer-stages", "1", "--freeze-encoder"], "choose one"),
    ]:
        result = runner.invoke(app, ["finetune", "segment", "--out", str(tmp_path / "x"),
                                     "--init", str(pretrained["segment"]), *extra,
                                     *_cli_options(TINY_FINETUNE)])  # fmt: skip
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(CtxRestoreError, match="needs pretrained weights"):
        FinetuneConfig(task="segment", out="unused", transfer_stages=1, **TINY_FINETUNE)
    result = ctxrestore.finetune("segment", out=tmp_path / "run", **options)
    assert result.transfer["prefixes"] == ["encoder.stages.0.", "encoder.stages.1."]


def test_fresh_decoder_levels_leave_the_last_decoder_levels_random(tmp_path, pretrained):
    before, spec = load_checkpoint(pretrained["segment"])
    levels = 1 + max(int(n.split(".")[2]) for n in before if n.startswith("decoder.levels."))
    options = dict(init=str(pretrained["segment"]), fresh_decoder_levels=1, **TINY_FINETUNE)
    config = FinetuneConfig(task="segment", out="unused", **options)
    data = load_data(config, None)
    model, _, report = build_network(config, data.task, data, (before, spec))
    random_model, _, _ = build_network(  # the same seed: what every tensor is without transfer
        FinetuneConfig(task="segment", out="unused", **TINY_FINETUNE), data.task, data, (None, None)
    )
    state, random_state = model.state_dict(), random_model.state_dict()
    last = f"decoder.levels.{levels - 1}."
    weights = [n for n in state if "num_batches" not in n and not n.startswith("head.")]
    fresh = [n for n in weights if n.startswith(last)]
    kept = [n for n in weights if not n.startswith(last)]
    assert fresh and all(torch.equal(state[n], random_state[n]) for n in fresh)
    assert not any(torch.equal(state[n], before[n]) for n in fresh if "weight" in n and
                   "norm" not in n)  # fmt: skip
    assert any(n.startswith("decoder.") for n in kept)
    assert all(torch.equal(state[n], before[n]) for n in kept)
    assert report.prefixes == ("encoder.", *(f"decoder.levels.{i}." for i in range(levels - 1)))
    assert report.random["decoder"] == len([n for n in state if n.startswith(last)])
    assert f"last 1 of {levels} levels" in report.reasons["decoder"]
    # Through the CLI: a count the decoder does not have, a network without a transferred
    # decoder, and nonsense combinations stop early with the reason.
    for task, init, extra, message in [
        ("segment", "segment", ["--fresh-decoder-levels", str(levels + 1)], f"use 1..{levels}"),
        ("segment", "segment", ["--fresh-decoder-levels", "1", "--transfer-stages", "1"],
         "choose one"),
        ("segment", "segment", ["--fresh-decoder-levels", "-1"], "must be >= 0"),
        ("classify", "classify", ["--fresh-decoder-levels", "1"], "classify network has no"),
        ("localize", "localize", ["--fresh-decoder-levels", "1"], "localize network has no"),
        # A U-Net task network after a pretraining without a decoder: nothing to leave fresh.
        ("segment", "classify", ["--fresh-decoder-levels", "1", "--adapt-channels"],
         "no decoder that takes"),
    ]:  # fmt: skip
        result = runner.invoke(app, ["finetune", task, "--out", str(tmp_path / task / init),
                                     "--init", str(pretrained[init]), *extra,
                                     *_cli_options(TINY_FINETUNE)])  # fmt: skip
        assert result.exit_code == 2 and message in result.output, result.output
    with pytest.raises(CtxRestoreError, match="needs pretrained weights"):
        FinetuneConfig(task="segment", out="unused", fresh_decoder_levels=1, **TINY_FINETUNE)
    result = ctxrestore.finetune("segment", out=tmp_path / "run", **options)
    assert result.transfer["random"]["decoder"] == report.random["decoder"]


def test_head_only_steps_hold_exactly_the_pretrained_layers(tmp_path, pretrained, monkeypatch):
    import ctxrestore.tasks.training as training

    calls = []

    def recording_fit(**kwargs):
        calls.append(kwargs["delays"])
        return fit(**kwargs)

    fit = training.fit
    monkeypatch.setattr(training, "fit", recording_fit)
    options = dict(init=str(pretrained["classify"]), head_only_steps=3, **TINY_FINETUNE)
    result = ctxrestore.finetune("classify", out=tmp_path / "run", **options)
    assert result.transfer["prefixes"] and calls == [dict.fromkeys(result.transfer["prefixes"], 3)]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["head_only_steps"] == 3
    assert "| head_only_steps | 3 |" in (tmp_path / "run" / "report.md").read_text()
    for extra, message in [
        (["--head-only-steps", "6"], "--head-only-steps 6 is not shorter than the 6-step"),
        (["--head-only-steps", "2", "--freeze-encoder"], "never trains; choose one"),
        (["--head-only-steps", "2", "--init", "random"], "needs pretrained weights"),
    ]:
        result = runner.invoke(app, ["finetune", "classify", "--out", str(tmp_path / "x"),
                                     "--init", str(pretrained["classify"]), *extra,
                                     *_cli_options(TINY_FINETUNE)])  # fmt: skip
        assert result.exit_code == 2 and message in result.output, result.output


def test_volumes_are_split_by_case_and_predicted_back(tmp_path):
    """A 2D segmentation on 3D volumes: slices of one volume stay on one side of the split."""
    data = tmp_path / "brain3d"
    ctxrestore.api.phantoms("brain", out=data, count=12, spatial_dims=3, image_size=16)
    out = tmp_path / "run"
    options = {**TINY_FINETUNE, "image_size": 16}
    options.pop("num_images")
    ctxrestore.finetune("segment", data, out=out, **options)
    split = read_split(out / "split.json")
    sides = [set(split.case_ids(name)) for name in ("train", "val", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    # Slices with brain or labels only (air slices are left out), and every volume has some.
    per_case = Counter(split.cases[i] for i in split.train)
    assert set(per_case) == sides[0] and all(0 < n <= 16 for n in per_case.values())
    assert sum(per_case.values()) < 16 * len(per_case)
    predictions = tmp_path / "predictions"
    ctxrestore.predict(out, data, out=predictions)
    labels, spacing = read_nifti(predictions / "brain_00000.nii.gz")
    image, image_spacing = read_nifti(data / "imagesTr" / "brain_00000_0000.nii.gz")
    assert labels.shape == image.shape and np.allclose(spacing, image_spacing)
    assert set(np.unique(labels)) <= {0, 1, 2, 4}


def test_predict_writes_each_task_output(tmp_path, pretrained):
    runs = {}
    for task in ("classify", "localize"):
        runs[task] = tmp_path / task
        ctxrestore.finetune(task, out=runs[task], **TINY_FINETUNE)
    images = tmp_path / "ultrasound"
    ctxrestore.api.phantoms("ultrasound", out=images, count=9, image_size=32)
    pngs = sorted(images.rglob("*.png"))
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in pngs[:4]:
        if path.name != "gallery.png":
            (flat / path.name).write_bytes(path.read_bytes())
    result = ctxrestore.predict(runs["classify"], flat, out=tmp_path / "p_classify")
    with (tmp_path / "p_classify" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == result.count == len(list(flat.iterdir()))
    assert all(abs(sum(float(v) for k, v in row.items() if k.startswith("p_")) - 1) < 1e-3
               for row in rows)  # fmt: skip
    abdomen = tmp_path / "abdomen"
    ctxrestore.api.phantoms("abdomen", out=abdomen, count=3, image_size=32)
    ctxrestore.predict(runs["localize"], abdomen, out=tmp_path / "p_localize")
    boxes = read_boxes_csv(tmp_path / "p_localize" / "boxes.csv")
    assert len(boxes) == 3 and all(len(organs) == 5 for organs in boxes.values())
    with pytest.raises(CtxRestoreError, match="has 4 channel"):
        brain = tmp_path / "brain"
        ctxrestore.api.phantoms("brain", out=brain, count=1, image_size=32)
        ctxrestore.predict(runs["classify"], brain, out=tmp_path / "p_bad")


def test_boxes_csv_takes_presence_from_the_task_decoding(tmp_path):
    # The mask head calls a confident speck absent (decode_box_masks): boxes.csv must say what
    # predict says, not re-threshold the probability.
    task = LocalizationTask(("liver", "spleen"), box_head="mask")
    outputs = {
        "boxes": torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]]),
        "presence": torch.tensor([[0.99, 0.99]]),
        "present": torch.tensor([[True, False]]),
    }
    item = SimpleNamespace(source=tmp_path / "a.png")
    rows = []
    _write_outputs(tmp_path, task, item, None, outputs, torch.ones(2), 0, rows)
    assert [row[:3] for row in rows] == [["a.png", "liver", 1], ["a.png", "spleen", 0]]
    assert rows[0][3:7] == [1, 2, 3, 4] and rows[1][3:7] == ["", "", "", ""]


def test_fraction_counts_and_resume(tmp_path):
    out = tmp_path / "run"
    first = ctxrestore.finetune("classify", out=out, fraction="9", checkpoint_every=3,
                                **{**TINY_FINETUNE, "max_steps": 3})  # fmt: skip
    assert first.steps == 3 and len(read_split(out / "split.json").train) == 9
    with pytest.raises(CtxRestoreError, match="already holds a run"):
        ctxrestore.finetune("classify", out=out, fraction="9", **TINY_FINETUNE)
    resumed = ctxrestore.finetune("classify", out=out, fraction="9", resume=True,
                                  **TINY_FINETUNE)  # fmt: skip
    assert resumed.steps == 6
    with pytest.raises(CtxRestoreError, match="fraction: '9' -> '10'"):
        ctxrestore.finetune("classify", out=out, fraction="10", resume=True, **TINY_FINETUNE)


def test_a_resume_refuses_an_init_folder_pretrained_again_since(tmp_path, pretrained):
    folder = tmp_path / "pre"
    shutil.copytree(pretrained["classify"], folder)
    out = tmp_path / "run"
    options = {**TINY_FINETUNE, "init": str(folder), "fraction": "9"}
    ctxrestore.finetune("classify", out=out, checkpoint_every=3, **{**options, "max_steps": 3})
    weights = folder / "model.safetensors"
    original = weights.read_bytes()
    state, _ = load_checkpoint(folder)
    save_file({name: tensor + 1 for name, tensor in state.items()}, str(weights))
    with pytest.raises(CtxRestoreError, match=rf"{out} started from weights .* but {folder} now"):
        ctxrestore.finetune("classify", out=out, resume=True, **options)
    weights.write_bytes(original)  # the same weights again: the run continues
    assert ctxrestore.finetune("classify", out=out, resume=True, **options).steps == 6


def test_localize_in_3d_regresses_one_box_per_organ(tmp_path):
    out = tmp_path / "run3d"
    options = {**TINY_FINETUNE, "num_images": 20, "image_size": 16, "batch_size": 4}
    ctxrestore.finetune("localize", out=out, spatial_dims=3, **options)
    summary = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= summary["test"]["iou/mean"] <= 1.0 and summary["test"]["wall_mm/mean"] > 0
    _, spec = load_checkpoint(out)
    assert spec["model"]["name"] == "localizer" and spec["model"]["kwargs"]["spatial_dims"] == 3


@pytest.mark.parametrize(("box_head", "channels"), [("mask", 5), ("segment", 6)])
def test_the_unet_box_heads_take_a_sononet_unet_pretraining_whole(tmp_path, box_head, channels):
    pretraining = tmp_path / "pre"
    ctxrestore.pretrain(out=pretraining, network="sononet_unet", phantom="abdomen",
                        **TINY_PRETRAIN)  # fmt: skip
    out = tmp_path / "run"
    arguments = ["finetune", "localize", "--out", str(out), "--init", str(pretraining),
                 "--box-head", box_head, *_cli_options(TINY_FINETUNE)]  # fmt: skip
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    _, spec = load_checkpoint(out)
    assert spec["model"]["name"] == "unet" and spec["model"]["kwargs"]["out_channels"] == channels
    assert spec["task"]["box_head"] == box_head
    transfer = spec["init"]["transfer"]
    assert set(transfer["transferred"]) == {"encoder", "decoder"}, transfer
    summary = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= summary["test"]["iou/mean"] <= 1.0
    assert f"| box_head | {box_head} |" in (out / "report.md").read_text()
    # Both have a decoder whose last levels may start fresh.
    FinetuneConfig(task="localize", out="unused", init=str(pretraining), box_head=box_head,
                   fresh_decoder_levels=1)  # fmt: skip
    abdomen = tmp_path / "abdomen"
    ctxrestore.api.phantoms("abdomen", out=abdomen, count=2, image_size=32)
    ctxrestore.predict(out, abdomen, out=tmp_path / "predicted")
    boxes = read_boxes_csv(tmp_path / "predicted" / "boxes.csv")
    assert len(boxes) == 2 and all(len(organs) == 5 for organs in boxes.values())
    with pytest.raises(CtxRestoreError, match="--box-head mask is a localisation option"):
        FinetuneConfig(task="segment", out="unused", box_head="mask")
    with pytest.raises(CtxRestoreError, match="unknown box head 'boxes'"):
        FinetuneConfig(task="localize", out="unused", box_head="boxes")


def test_patience_zero_runs_the_whole_schedule(tmp_path, monkeypatch):
    # Every validation after the first is worse: patience 1 stops at the second validation,
    # patience 0 validates to the end and keeps the first (best) one.
    from ctxrestore.tasks.classify import ClassificationTask

    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1] * 2)
    monkeypatch.setattr(ClassificationTask, "evaluate", lambda *args: {"macro_f1": next(scores)})
    options = {**TINY_FINETUNE, "num_images": 60, "max_steps": 100, "epochs": 5}
    stopped = ctxrestore.finetune("classify", out=tmp_path / "p1", patience=1, **options)
    assert stopped.stopped_early and stopped.steps == 40 and stopped.best_step == 20
    scores = iter([0.9, 0.5, 0.4, 0.3, 0.2, 0.1])
    whole = ctxrestore.finetune("classify", out=tmp_path / "p0", patience=0, **options)
    assert not whole.stopped_early and whole.steps == 100 and whole.best_step == 20
    validated = [row.split(",")[0] for row in (tmp_path / "p0" / "validation.csv").open()]
    assert validated == ["step", "20", "40", "60", "80", "100"]
    with pytest.raises(CtxRestoreError, match=r"patience must be >= 0 validations.*got -1"):
        ctxrestore.finetune("classify", out=tmp_path / "bad", patience=-1, **options)
