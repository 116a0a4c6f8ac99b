"""Context restoration with a contrastive term: the corrupted views (each a permutation of its
clean view's pixels), the two normalised loss terms against their formulas, the network with
two outputs, options, and a pretraining through the CLI whose encoder and decoder transfer."""

import math

import pytest
import torch
from conftest import TINY_PRETRAIN
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.bench.benchmark import parse_methods
from ctxrestore.cli import app
from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json
from ctxrestore.models import build_model, create_model, model_spec
from ctxrestore.pretext import create_pretext

runner = CliRunner()
METHOD = "context_restoration_contrastive"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the batch


@pytest.mark.parametrize("spatial", [(32, 40), (16, 16, 16)])
@pytest.mark.parametrize("channels", [1, 3])
def test_both_views_are_augmented_then_corrupted_by_swaps(spatial, channels):
    pretext = create_pretext(METHOD, num_swaps=2, patch_size=4)
    images = torch.rand(3, channels, *spatial, generator=generator(9))
    inputs, (clean, corrupted) = pretext.make_batch(images, generator(1))
    assert inputs.shape == (3, 4 * channels, *spatial)
    assert clean.shape == corrupted.shape == (3, 2 * channels, *spatial)
    # The network sees the corrupted views, then the clean ones (for the contrastive term).
    assert torch.equal(inputs, torch.cat([corrupted, clean], dim=1))
    # The clean views are the contrastive pretext's views for the same generator state.
    views, _ = create_pretext("contrastive").make_batch(images, generator(1))
    torch.testing.assert_close(clean, views)
    for image in range(3):
        for view in (slice(0, channels), slice(channels, 2 * channels)):
            swapped, original = corrupted[image, view], clean[image, view]
            assert not torch.equal(swapped, original)  # swaps happened
            # A swap moves pixels: each channel keeps exactly its values, rearranged.
            for channel in range(channels):
                assert torch.equal(
                    swapped[channel].flatten().sort().values,
                    original[channel].flatten().sort().values,
                )
        assert not torch.allclose(clean[image, :channels], clean[image, channels:], atol=1e-3)
    again, _ = pretext.make_batch(images, generator(1))
    assert torch.equal(inputs, again)
    assert not torch.equal(inputs, pretext.make_batch(images, generator(2))[0])


# ----------------------------------------------------------------------------- the loss


def test_each_term_is_a_fraction_of_what_a_network_that_learned_nothing_scores():
    pretext = create_pretext(METHOD, num_swaps=2, patch_size=4, temperature=0.5)
    batch = 4
    _, targets = pretext.make_batch(torch.rand(batch, 1, 16, 16, generator=generator()),
                                    generator(3))  # fmt: skip
    clean, inputs = targets  # inputs: the corrupted views
    one_hot = torch.eye(batch)
    matching = torch.stack([one_hot, one_hot], dim=1)  # every view equals its partner
    contrastive = create_pretext("contrastive", temperature=0.5)
    chance = math.log(2 * batch - 1)
    expected_contrastive = float(contrastive.loss(matching, torch.arange(batch))) / chance

    # Restored perfectly: only the contrastive term is left.
    assert float(pretext.loss((clean, matching), targets)) == pytest.approx(expected_contrastive)
    # The input left as it is scores 1 on the restoration term, whatever the image scale.
    loss = float(pretext.loss((inputs, matching), targets))
    assert loss == pytest.approx(1 + expected_contrastive)
    scaled = (inputs * 10, (clean * 10, inputs * 10))
    assert float(pretext.loss((scaled[0], matching), scaled[1])) == pytest.approx(loss)
    # Projections that carry nothing (all equal) score log(2B - 1): 1 after normalisation.
    uniform = torch.ones(batch, 2, 3)
    assert float(pretext.loss((clean, uniform), targets)) == pytest.approx(1.0)
    # The weight scales the contrastive term only; at 0 the loss is the restoration term.
    weighted = create_pretext(METHOD, num_swaps=2, patch_size=4, contrastive_weight=0.25)
    assert float(weighted.loss((inputs, uniform), targets)) == pytest.approx(1.25)
    alone = create_pretext(METHOD, num_swaps=2, patch_size=4, contrastive_weight=0)
    assert float(alone.loss((inputs, uniform), targets)) == pytest.approx(1.0)
    # The baseline is not trained: the loss's gradient reaches the outputs only.
    restored, baseline_input = inputs.clone().requires_grad_(), inputs.clone().requires_grad_()
    pretext.loss((restored, uniform), (clean, baseline_input)).backward()
    assert baseline_input.grad is None and restored.grad.abs().sum() > 0
    l1 = create_pretext(METHOD, num_swaps=2, patch_size=4, restoration_loss="l1")
    assert float(l1.loss((inputs, uniform), targets)) == pytest.approx(2.0)


def test_metrics_summary_and_preview():
    pretext = create_pretext(METHOD, num_swaps=2, patch_size=4)
    batch = 4
    inputs, targets = pretext.make_batch(torch.rand(batch, 2, 16, 16, generator=generator()),
                                         generator())  # fmt: skip
    clean, corrupted = targets
    matching = torch.stack([torch.eye(batch), torch.eye(batch)], dim=1)
    metrics = pretext.evaluate(inputs, targets, (clean, matching))
    assert metrics["restoration_mse"] == 0
    assert metrics["identity_mse"] == pytest.approx(float(((corrupted - clean) ** 2).mean()))
    assert metrics["view_retrieval_accuracy"] == 1 and metrics["chance_accuracy"] == 1 / 7
    summary = pretext.summary(metrics)
    assert "removes 100.0% of the corruption's error" in summary and "100.0%" in summary
    assert "view retrieval accuracy" in summary

    rows = pretext.preview_rows(inputs, targets, (clean * 0.5, matching))
    assert [title.split("\n")[0] for title, _ in rows] == [
        "view 1", "view 1 corrupted", "view 1 restored", "view 2"]  # fmt: skip
    assert "partner found for 8/8 views" in rows[3][0]
    assert torch.equal(rows[0][1], clean[:, :2]) and torch.equal(rows[1][1], corrupted[:, :2])
    assert torch.equal(rows[2][1], clean[:, :2] * 0.5) and torch.equal(rows[3][1], clean[:, 2:])


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize(("network", "spatial_dims"), [("sononet", 2), ("unet", 3)])
def test_network_restores_and_projects_both_views_with_the_base_networks_names(
    network, spatial_dims
):
    in_channels = 2
    pretext = create_pretext(METHOD, projection_dim=8)
    sizes = {"width": 4} if network == "sononet" else {"channels": [2, 4, 8, 8, 8]}
    base = model_spec(network, spatial_dims=spatial_dims, in_channels=in_channels, **sizes)
    spec = pretext.network_spec(base)
    assert spec["name"] == "restoration_contrastive" and spec["encoder"] == base["encoder"]
    assert spec["prefixes"] == {**base["prefixes"], "projection": "projection."}
    model = build_model(spec)
    plain = build_model(base).state_dict()
    state = model.state_dict()
    # Encoder, decoder and head named and shaped as the plain restoration network's.
    assert {n: t.shape for n, t in state.items() if not n.startswith("projection.")} == {
        n: t.shape for n, t in plain.items()
    }

    corrupted = torch.rand(2, 2 * in_channels, *(16,) * spatial_dims, generator=generator())
    clean = torch.rand(2, 2 * in_channels, *(16,) * spatial_dims, generator=generator(1))
    model.eval()
    restored, projections = model(torch.cat([corrupted, clean], dim=1))
    assert restored.shape == corrupted.shape and projections.shape == (2, 2, 8)
    # The restoration of a view is the plain network's, given the same weights; it does not
    # depend on the clean views.
    restoration = build_model(base).eval()
    restoration.load_state_dict({n: t for n, t in state.items() if n in plain})
    for view in (slice(0, in_channels), slice(in_channels, 2 * in_channels)):
        torch.testing.assert_close(restoration(corrupted[:, view]), restored[:, view])
    other_clean = torch.cat([corrupted, clean.flip(0)], dim=1)
    torch.testing.assert_close(model(other_clean)[0], restored)
    # The projections are the clean views': the encoder's pooled deepest features, projected,
    # whatever the corrupted views are.
    first = restoration.encoder(clean[:, :in_channels]).flatten(2).mean(2)
    torch.testing.assert_close(model.projection(first), projections[:, 0])
    other_corrupted = torch.cat([corrupted.flip(0), clean], dim=1)
    torch.testing.assert_close(model(other_corrupted)[1], projections)
    with pytest.raises(CtxRestoreError, match=r"the same two clean, 4 x 2 = 8 .* got 4"):
        model(corrupted)


def test_network_options():
    with pytest.raises(CtxRestoreError, match="needs an encoder-decoder network"):
        create_model("restoration_contrastive", network="classifier")
    with pytest.raises(CtxRestoreError, match="projection_dim must be >= 1"):
        create_model("restoration_contrastive", projection_dim=0)
    with pytest.raises(CtxRestoreError, match="hidden_features must be >= 1"):
        create_model("contrastive", hidden_features=0)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(contrastive_weight=-1), "contrastive_weight must be >= 0"),
        (dict(contrastive_weight=float("inf")), "contrastive_weight must be >= 0"),
        (dict(contrastive_weight="high"), "contrastive_weight must be a number"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(projection_dim=0), "projection_dim must be an int >= 1"),
        (dict(restoration_loss="ssim"), "unknown restoration loss 'ssim'"),
        (dict(num_swaps=0), "num_swaps"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(CtxRestoreError, match=message):
        create_pretext(METHOD, **options)


def test_params_record_both_parts_and_the_benchmark_runs_it_only_when_named():
    params = create_pretext(METHOD, num_swaps=5, patch_size=12).params()
    assert params["num_swaps"] == 5 and params["patch_size"] == 12
    assert params["contrastive_weight"] == 1.0
    assert params["contrastive"]["temperature"] == 0.2 and params["contrastive"]["scale"] == (
        0.7, 1.4)  # fmt: skip
    assert METHOD not in parse_methods(None)
    assert parse_methods(f"{METHOD},random") == ("random", METHOD)


# ----------------------------------------------------------------------------- end to end


def test_pretrain_through_the_cli_then_the_encoder_and_decoder_transfer(tmp_path):
    pretrained = tmp_path / "pre"
    options = dict(TINY_PRETRAIN, num_swaps=2, patch_size=4, max_steps=2, warmup_steps=1)
    cli = [part for key, value in options.items()
           for part in (f"--{key.replace('_', '-')}", str(value))]  # fmt: skip
    result = runner.invoke(app, ["pretrain", "--out", str(pretrained), "--method", METHOD,
                                 "--network", "unet", "--phantom", "brain", "--preview-every",
                                 "1", *cli])  # fmt: skip
    assert result.exit_code == 0, result.output
    state, spec = load_checkpoint(pretrained)
    assert spec["pretext"]["name"] == METHOD and spec["model"]["name"] == "restoration_contrastive"
    assert sum(name.startswith("projection.") for name in state) == 8  # saved, left behind later
    metrics = read_json(pretrained / "metrics.json")
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert metrics["identity_mse"] > 0 and 0 <= metrics["view_retrieval_accuracy"] <= 1
    assert (pretrained / "preview.png").is_file() and (pretrained / "report.md").is_file()

    finetuned = tmp_path / "seg"
    ctxrestore.finetune("segment", out=finetuned, init=str(pretrained), num_images=40,
                        image_size=32, batch_size=8, max_steps=2, warmup_steps=1,
                        device="cpu")  # fmt: skip
    transfer = read_json(finetuned / "metrics.json")["transfer"]
    assert set(transfer["transferred"]) == {"encoder", "decoder"}
    assert transfer["left_behind"] == {"head": 2, "projection": 8}


def test_the_contrastive_weight_option_reaches_its_pretext_only(tmp_path):
    options = dict(TINY_PRETRAIN, num_swaps=2, max_steps=1, network="sononet")
    ctxrestore.pretrain(out=tmp_path / "w", method=METHOD, phantom="ultrasound",
                        contrastive_weight=3, **options)  # fmt: skip
    assert load_checkpoint(tmp_path / "w")[1]["pretext"]["params"]["contrastive_weight"] == 3.0
    with pytest.raises(CtxRestoreError, match="contrastive_weight is for " + METHOD):
        ctxrestore.pretrain(out=tmp_path / "cr", method="context_restoration",
                            contrastive_weight=3, **options)  # fmt: skip
    assert not (tmp_path / "cr").exists()
    result = runner.invoke(app, ["pretrain", "--out", str(tmp_path / "bad"), "--method", METHOD,
                                 "--contrastive-weight", "-1"])  # fmt: skip
    assert result.exit_code != 0 and "contrastive_weight must be >= 0" in result.output
    assert "Traceback" not in result.output
