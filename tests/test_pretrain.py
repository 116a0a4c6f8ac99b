"""Pretraining through the Python API: files written, weights that load, exact resume."""

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import ctxrestore
from ctxrestore.engine.checkpoint import load_checkpoint, weights_fingerprint
from ctxrestore.engine.environment import ENVIRONMENT_FILE
from ctxrestore.engine.loop import read_log
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json, write_json
from ctxrestore.pretext import training
from ctxrestore.pretext.training import PretextTraining


@pytest.mark.parametrize(
    ("network", "spatial_dims", "channels"),
    [("unet", 2, 1), ("sononet", 2, 4), ("unet", 3, 1)],
)
def test_pretrain_writes_a_checkpoint_that_loads(
    tmp_path, tiny_pretrain, network, spatial_dims, channels
):
    if spatial_dims == 3:
        tiny_pretrain |= dict(image_size=16, batch_size=2, num_images=4, patch_size=3)
    result = ctxrestore.pretrain(
        out=tmp_path / "run",
        network=network,
        spatial_dims=spatial_dims,
        in_channels=channels,
        **tiny_pretrain,
    )
    run = tmp_path / "run"
    for name in (
        "model.safetensors",
        "spec.json",
        "training_state.pt",
        "config.json",
        "log.csv",
        "loss.png",
        "preview.png",
        "metrics.json",
        "report.md",
    ):
        assert (run / name).is_file(), name
    assert result.steps == 4
    assert [row["step"] for row in read_log(run)] == [1, 2, 3, 4]
    model = ctxrestore.load_pretrained(run)
    weights, spec = load_checkpoint(run)
    assert spec["in_channels"] == channels and spec["spatial_dims"] == spatial_dims
    assert spec["pretext"] == {
        "name": "context_restoration",
        "params": {
            "num_swaps": 5,
            "patch_size": tiny_pretrain["patch_size"],
            "foreground_threshold": None,
            "restoration_loss": "mse",
            "placement": "uniform",
        },
    }
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name])
    size = tiny_pretrain["image_size"]
    assert model(torch.rand(1, channels, *(size,) * spatial_dims)).shape[1] == channels


def test_the_restoration_loss_reaches_training_the_spec_and_the_report(tmp_path, tiny_pretrain):
    for loss in ("mse", "l1"):
        ctxrestore.pretrain(out=tmp_path / loss, restoration_loss=loss, **tiny_pretrain)
        assert load_checkpoint(tmp_path / loss)[1]["pretext"]["params"]["restoration_loss"] == loss
        assert f"| restoration_loss | {loss} |" in (tmp_path / loss / "report.md").read_text()
    # Same seed, same first batch: errors below 1 cost less squared than absolute.
    first = {loss: read_log(tmp_path / loss)[0]["loss"] for loss in ("mse", "l1")}
    assert 0 < first["mse"] < first["l1"]


def _crash_in_step(step: int, monkeypatch, **options) -> None:
    """Run ctxrestore.pretrain(**options) and kill it in `step`, as a crash would."""
    original = PretextTraining.training_loss
    calls = {"count": 0}

    def crash(self, *args):
        calls["count"] += 1
        if calls["count"] == step:
            raise KeyboardInterrupt("simulated crash")
        return original(self, *args)

    monkeypatch.setattr(PretextTraining, "training_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        ctxrestore.pretrain(**options)
    monkeypatch.setattr(PretextTraining, "training_loss", original)


def test_interrupted_run_resumes_exactly(tmp_path, tiny_pretrain, monkeypatch):
    settings = tiny_pretrain | dict(max_steps=6, checkpoint_every=2)
    straight = ctxrestore.pretrain(out=tmp_path / "straight", **settings)

    # Kill the second run in step 4; its last checkpoint is from step 2, so it resumes there.
    _crash_in_step(4, monkeypatch, out=tmp_path / "split", **settings)
    assert [row["step"] for row in read_log(tmp_path / "split")] == [1, 2, 3]

    resumed = ctxrestore.pretrain(out=tmp_path / "split", resume=True, **settings)
    assert resumed.resumed_from == 2
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.final_loss == straight.final_loss
    assert [row["step"] for row in read_log(tmp_path / "split")] == [1, 2, 3, 4, 5, 6]
    # One environment entry per start: the resume added the second.
    sessions = {name: read_json(tmp_path / name / ENVIRONMENT_FILE)["sessions"]
                for name in ("straight", "split")}  # fmt: skip
    assert [len(sessions["straight"]), len(sessions["split"])] == [1, 2]
    assert "Environment: ctxrestore" in (tmp_path / "split" / "report.md").read_text()


def test_a_finished_run_is_never_overwritten(tmp_path, tiny_pretrain):
    ctxrestore.pretrain(out=tmp_path / "run", **tiny_pretrain)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(CtxRestoreError, match="already holds a run; pass --resume"):
        ctxrestore.pretrain(out=tmp_path / "run", **tiny_pretrain)
    with pytest.raises(CtxRestoreError, match="patch_size: 4 -> 6"):
        ctxrestore.pretrain(out=tmp_path / "run", resume=True, **tiny_pretrain | dict(patch_size=6))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before


def test_a_run_from_an_older_version_resumes_when_new_options_keep_their_defaults(
    tmp_path, tiny_pretrain
):
    # A config.json written before `skip_bad` and `slice_axis` existed: the run used the
    # behaviour that is now their default, so resuming it must not be refused...
    ctxrestore.pretrain(out=tmp_path / "run", **tiny_pretrain)
    config = read_json(tmp_path / "run" / "config.json")
    older = {k: v for k, v in config.items() if k not in ("skip_bad", "slice_axis")}
    write_json(tmp_path / "run" / "config.json", older)
    resumed = ctxrestore.pretrain(out=tmp_path / "run", resume=True, **tiny_pretrain)
    assert resumed.steps == tiny_pretrain["max_steps"]
    # ... but a non-default value is a change the old run did not have.
    write_json(tmp_path / "run" / "config.json", older)
    with pytest.raises(CtxRestoreError, match=r"slice_axis: not recorded \(default 0\) -> 1"):
        ctxrestore.pretrain(out=tmp_path / "run", resume=True, **tiny_pretrain | dict(slice_axis=1))


def test_pretrain_on_a_folder_of_png_and_npy(tmp_path, tiny_pretrain):
    images = tmp_path / "images"
    (images / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(
            images / f"{index}.png"
        )
        np.save(images / "nested" / f"{index}.npy", rng.random((30, 30)).astype(np.float32))
    tiny_pretrain.pop("num_images")
    result = ctxrestore.pretrain(images, out=tmp_path / "run", **tiny_pretrain)
    assert result.steps == 4
    spec = load_checkpoint(tmp_path / "run")[1]
    assert spec["data"]["source"] == str(images)
    assert spec["intensity"]["method"] == "robust_unit_range"


def test_the_placement_reaches_the_swaps_the_spec_and_the_report(tmp_path, tiny_pretrain):
    for placement in ("uniform", "poisson_disc"):
        ctxrestore.pretrain(out=tmp_path / placement, placement=placement, **tiny_pretrain)
        params = load_checkpoint(tmp_path / placement)[1]["pretext"]["params"]
        assert params["placement"] == placement
        assert f"| placement | {placement} |" in (tmp_path / placement / "report.md").read_text()
    # Same seed, same weights and images: only where the swaps went differs.
    first = {p: read_log(tmp_path / p)[0]["loss"] for p in ("uniform", "poisson_disc")}
    assert first["uniform"] != first["poisson_disc"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(image_size=40), "image_size 40 is not divisible by 16"),
        (dict(patch_size=20), "does not fit twice"),
        (dict(num_swaps=0), "T must be >= 1"),
        (dict(network="resnet"), "unknown network 'resnet'"),
        (dict(batch_size=64), "fewer than batch_size 64"),
        (dict(spatial_dims=4), "spatial_dims must be 2 or 3"),
        (dict(restoration_loss="huber"), "unknown restoration loss 'huber'"),
        (
            dict(method="relative_position", restoration_loss="l1"),
            "restoration_loss 'l1' is for the restoration pretexts .*; relative_position has its",
        ),
        (dict(placement="grid"), "unknown placement 'grid'; placements: uniform, poisson_disc"),
        (dict(freeze_encoder=True), "freeze_encoder keeps the encoder of --init fixed; give"),
        (
            dict(method="autoencoder", placement="poisson_disc"),
            "placement is for context_restoration, context_restoration_contrastive, "
            "context_restoration_dense; autoencoder swaps no patches",
        ),
    ],
)
def test_bad_options_fail_before_training(tmp_path, tiny_pretrain, change, message):
    with pytest.raises(CtxRestoreError, match=message):
        ctxrestore.pretrain(out=tmp_path / "run", **tiny_pretrain | change)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("first_network", "second_network", "decoder_moves"),
    [("unet", "unet", True), ("sononet", "sononet_unet", False)],
)
def test_a_second_pretext_starts_from_the_first_runs_weights(
    tmp_path, tiny_pretrain, monkeypatch, first_network, second_network, decoder_moves
):
    ctxrestore.pretrain(out=tmp_path / "first", network=first_network, **tiny_pretrain)
    first, _ = load_checkpoint(tmp_path / "first")
    started = {}  # the weights the second run's training starts from
    fit = training.fit

    def recording_fit(*, model, **kwargs):
        started.update({k: v.clone() for k, v in model.state_dict().items()})
        return fit(model=model, **kwargs)

    monkeypatch.setattr("ctxrestore.pretext.training.fit", recording_fit)
    ctxrestore.pretrain(
        out=tmp_path / "second", network=second_network, method="dense_contrastive",
        init=tmp_path / "first", **tiny_pretrain,
    )  # fmt: skip
    moved = {"encoder"} | ({"decoder"} if decoder_moves else set())
    for name, tensor in started.items():
        part = name.split(".")[0]
        assert (part in moved) == (name in first and torch.equal(tensor, first[name])), name
    assert {name.split(".")[0] for name in started} >= moved | {"projection"}
    init = load_checkpoint(tmp_path / "second")[1]["init"]
    assert init["folder"] == str(tmp_path / "first")
    assert init["weights"] == weights_fingerprint(first)  # the first stage's draw, by its weights
    assert set(init["transferred"]) == moved
    assert init["reasons"]["projection"] == "task-specific"
    if not decoder_moves:
        assert init["reasons"]["decoder"] == "its architecture differs from the pretrained one"
    report = (tmp_path / "second" / "report.md").read_text()
    started_line = next(line for line in report.splitlines() if line.startswith("Started from"))
    assert started_line.startswith(f"Started from `{tmp_path / 'first'}`: ")
    moved_part = started_line.split("from its weights")[0]
    assert "encoder (" in moved_part and ("decoder (" in moved_part) == decoder_moves


def test_a_second_pretext_can_keep_the_first_runs_encoder_fixed(tmp_path, tiny_pretrain):
    ctxrestore.pretrain(out=tmp_path / "first", **tiny_pretrain)
    first, _ = load_checkpoint(tmp_path / "first")
    second = dict(method="dense_contrastive", init=tmp_path / "first", **tiny_pretrain)
    for frozen in (True, False):
        ctxrestore.pretrain(out=tmp_path / str(frozen), freeze_encoder=frozen, **second)
    kept, spec = load_checkpoint(tmp_path / "True")
    trained, _ = load_checkpoint(tmp_path / "False")
    encoder = [name for name in first if name.startswith("encoder.")]
    # Weights and normalisation statistics (running means, batch counts) stay the first run's.
    assert all(torch.equal(kept[name], first[name]) for name in encoder)
    assert not all(torch.equal(trained[name], first[name]) for name in encoder)
    decoder = [name for name in first if name.startswith("decoder.") and "weight" in name]
    assert not all(torch.equal(kept[name], first[name]) for name in decoder)  # it trained
    assert spec["init"]["frozen"] == ["encoder"]
    report = (tmp_path / "True" / "report.md").read_text()
    assert "; kept fixed: encoder" in report
    assert "kept fixed" not in (tmp_path / "False" / "report.md").read_text()


@pytest.mark.parametrize("freeze_encoder", [False, True])
def test_a_run_started_from_another_resumes_from_its_own_weights(
    tmp_path, tiny_pretrain, monkeypatch, freeze_encoder
):
    ctxrestore.pretrain(out=tmp_path / "first", **tiny_pretrain)
    settings = tiny_pretrain | dict(
        max_steps=6, checkpoint_every=2, init=tmp_path / "first", freeze_encoder=freeze_encoder
    )
    straight = ctxrestore.pretrain(out=tmp_path / "straight", **settings)
    _crash_in_step(4, monkeypatch, out=tmp_path / "split", **settings)
    # The first stage pretrained again since: its record would name weights the run never had.
    weights = tmp_path / "first" / "model.safetensors"
    original = weights.read_bytes()
    state, _ = load_checkpoint(tmp_path / "first")
    save_file({name: tensor + 1 for name, tensor in state.items()}, str(weights))
    with pytest.raises(CtxRestoreError, match=r"split started from weights .* but .*first now"):
        ctxrestore.pretrain(out=tmp_path / "split", resume=True, **settings)
    weights.write_bytes(original)  # the same weights again: the run continues
    resumed = ctxrestore.pretrain(out=tmp_path / "split", resume=True, **settings)
    assert read_json(tmp_path / "split" / "spec.json")["init"]["weights"] == weights_fingerprint(
        state
    )
    assert resumed.resumed_from == 2 and resumed.final_loss == straight.final_loss
    a, _ = load_checkpoint(tmp_path / "straight")
    b, _ = load_checkpoint(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # --init and --freeze-encoder are part of the run: resuming without them is a change, refused.
    dropped = dict(freeze_encoder=False) if freeze_encoder else dict(init=None)
    with pytest.raises(CtxRestoreError, match=f"{next(iter(dropped))}: "):
        ctxrestore.pretrain(out=tmp_path / "split", resume=True, **settings | dropped)


def test_init_that_cannot_start_the_pretraining_is_refused_before_the_run_folder(
    tmp_path, tiny_pretrain
):
    ctxrestore.pretrain(out=tmp_path / "first", **tiny_pretrain)
    refused = {
        "missing": (dict(init=tmp_path / "nowhere"), "checkpoint folder .*nowhere does not exist"),
        "wider": (
            dict(init=tmp_path / "first", width=8),
            r"the encoder of --init .*first does not fit the pretraining network \(unet\)",
        ),
        "volumes": (
            dict(init=tmp_path / "first", spatial_dims=3, image_size=16, num_images=4),
            "was pretrained in 2D, but the pretraining data is 3D",
        ),
        "channels": (
            dict(init=tmp_path / "first", in_channels=2),
            "pretrained on 1 channel",
        ),
        # Relative position's network is the encoder and a classifier: with the encoder fixed,
        # nothing that a task network takes would train.
        "nothing after the encoder": (
            dict(
                init=tmp_path / "first",
                freeze_encoder=True,
                method="relative_position",
                patch_size=16,
                image_size=64,
            ),
            "freeze_encoder: relative_position on network 'unet' trains nothing after the "
            r"encoder .*\(its network is encoder, head\)",
        ),
    }
    for name, (options, message) in refused.items():
        with pytest.raises(CtxRestoreError, match=message):
            ctxrestore.pretrain(out=tmp_path / name, **tiny_pretrain | options)
        assert not (tmp_path / name).exists(), name
