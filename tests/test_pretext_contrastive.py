"""Contrastive pretext (SimCLR, Chen et al. 2020): the NT-Xent loss against its formula, the
two augmented views, the siamese projection network, options, and pretraining through the CLI
with transfer of its encoder to classification; opt-in in the benchmark."""

import math

import pytest
import torch
from typer.testing import CliRunner

from ctxrestore.bench.benchmark import parse_methods
from ctxrestore.cli import app
from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json
from ctxrestore.models import build_model, create_model, model_spec
from ctxrestore.pretext import create_pretext, list_pretexts

runner = CliRunner()
PAPER_PRETEXTS = ("context_restoration", "autoencoder", "context_encoder",
                  "relative_position", "models_genesis")  # fmt: skip


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- the loss


def test_loss_matches_nt_xent_written_out():
    """B = 2 images, views ordered a0, a1 (first views) then b0, b1 (second views). Cosines by
    hand, with r = 1/sqrt(2): a0 = (1, 0), a1 = (0, 1), b0 = (3, 3) ~ (r, r), b1 = (-2, 0)."""
    outputs = torch.tensor([[[1.0, 0.0], [3.0, 3.0]], [[0.0, 1.0], [-2.0, 0.0]]])
    temperature = 0.5
    r = 1 / math.sqrt(2)
    # (cosine with the partner, cosines with the other two views) for a0, a1, b0, b1.
    rows = [(r, [0.0, -1.0]), (0.0, [0.0, r]), (r, [r, -r]), (0.0, [-1.0, -r])]
    expected = 0.0
    for positive, negatives in rows:
        denominator = math.exp(positive / temperature) + sum(
            math.exp(s / temperature) for s in negatives
        )
        expected += -math.log(math.exp(positive / temperature) / denominator)
    expected /= len(rows)

    pretext = create_pretext("contrastive", temperature=temperature)
    targets = torch.arange(2)
    loss = pretext.loss(outputs, targets)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # Scaling a projection changes nothing (cosine similarity); bf16 inputs give a float32 loss.
    assert float(pretext.loss(outputs * 7, targets)) == pytest.approx(expected, rel=1e-6)
    assert pretext.loss(outputs.bfloat16(), targets).dtype == torch.float32


def test_loss_is_near_its_minimum_for_matching_views_and_grows_when_partners_swap():
    batch, temperature = 4, 0.2
    pretext = create_pretext("contrastive", temperature=temperature, projection_dim=batch)
    one_hot = torch.eye(batch)  # images orthogonal to each other
    perfect = torch.stack([one_hot, one_hot], dim=1)  # each view equals its partner
    loss = float(pretext.loss(perfect, torch.arange(batch)))
    # Partner at cosine 1, the 2B - 2 = 6 other views at 0.
    assert loss == pytest.approx(math.log(1 + 6 * math.exp(-1 / temperature)), rel=1e-5)
    assert loss < 0.05
    swapped = torch.stack([one_hot, one_hot.roll(1, dims=0)], dim=1)
    assert float(pretext.loss(swapped, torch.arange(batch))) > 5.0 > math.log(2 * batch - 1)

    metrics = pretext.evaluate(None, torch.arange(batch), perfect)
    assert metrics == {"view_retrieval_accuracy": 1.0, "chance_accuracy": 1 / 7}
    assert pretext.evaluate(None, torch.arange(batch), swapped)["view_retrieval_accuracy"] == 0
    summary = pretext.summary(metrics)
    assert "100.0%" in summary and "14.3%" in summary and "7.00x chance" in summary
    assert "no better than chance" in pretext.summary(dict(metrics, view_retrieval_accuracy=0.1))
    with pytest.raises(CtxRestoreError, match=r"expected projections \(B, 2, projection_dim\)"):
        pretext.loss(torch.rand(4, 8), torch.arange(4))


# ----------------------------------------------------------------------------- the views


@pytest.mark.parametrize("spatial", [(32, 40), (16, 16, 16)])
@pytest.mark.parametrize("channels", [1, 3])
def test_two_different_views_of_each_image_same_for_the_same_seed(spatial, channels):
    pretext = create_pretext("contrastive")
    images = torch.rand(3, channels, *spatial, generator=generator(9))
    inputs, targets = pretext.make_batch(images, generator(1))
    assert inputs.shape == (3, 2 * channels, *spatial) and inputs.dtype == images.dtype
    assert torch.equal(targets, torch.arange(3))
    first, second = inputs[:, :channels], inputs[:, channels:]
    for image in range(3):  # every view of every image is changed, and differently
        assert not torch.allclose(first[image], second[image], atol=1e-3)
        assert not torch.allclose(first[image], images[image], atol=1e-3)
        assert not torch.allclose(second[image], images[image], atol=1e-3)
    again, _ = pretext.make_batch(images, generator(1))
    assert torch.equal(inputs, again)
    other, _ = pretext.make_batch(images, generator(2))
    assert not torch.equal(inputs, other)
    assert torch.equal(images, torch.rand(3, channels, *spatial, generator=generator(9)))

    rows = pretext.preview_rows(inputs, targets, torch.rand(3, 2, 8))
    assert [title.split("\n")[0] for title, _ in rows] == ["view 1", "view 2"]
    assert torch.equal(rows[0][1], first) and torch.equal(rows[1][1], second)


def test_views_without_augmentation_are_the_image():
    """The views come from `Augmentation`: with every range at identity, both are the input."""
    pretext = create_pretext(
        "contrastive", rotation_degrees=0, scale=(1, 1), translation=0, contrast=(1, 1),
        brightness=0, noise_std=0,
    )  # fmt: skip
    images = torch.rand(2, 2, 16, 16, generator=generator())
    inputs, _ = pretext.make_batch(images, generator())
    assert torch.equal(inputs, torch.cat([images, images], dim=1))


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 2])
def test_network_projects_both_views_and_shares_the_classifiers_encoder(spatial_dims, in_channels):
    pretext = create_pretext("contrastive", projection_dim=8)
    base = model_spec("sononet", spatial_dims=spatial_dims, in_channels=in_channels, width=4)
    spec = pretext.network_spec(base)
    assert spec["name"] == "contrastive" and spec["kwargs"]["projection_dim"] == 8
    assert spec["prefixes"] == {"encoder": "encoder.", "head": "head."}
    assert spec["encoder"] == base["encoder"]
    model = build_model(spec)
    # The classifier fine-tuning builds around the same encoder (as from a SonoNet pretraining).
    classifier = create_model(
        "classifier", spatial_dims=spatial_dims, in_channels=in_channels, **base["encoder"]
    ).state_dict()
    expected = {name: t.shape for name, t in classifier.items() if name.startswith("encoder.")}
    state = model.state_dict()
    assert {name: t.shape for name, t in state.items() if name.startswith("encoder.")} == expected
    assert all(name.startswith(("encoder.", "head.")) for name in state)  # one shared encoder
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in model.head.modules())

    views = torch.rand(3, 2 * in_channels, *(16,) * spatial_dims, generator=generator())
    model.eval()
    projections = model(views)
    assert projections.shape == (3, 2, 8)
    # Each view is projected alone (eval mode): the second view's projection is that of the
    # same image given as a first view.
    swapped = torch.cat([views[:, in_channels:], views[:, :in_channels]], dim=1)
    torch.testing.assert_close(model(swapped)[:, 0], projections[:, 1])
    with pytest.raises(CtxRestoreError, match=r"two views of each image, 2 x .* got 3"):
        model(torch.rand(1, 3, *(16,) * spatial_dims))


def test_network_options():
    with pytest.raises(CtxRestoreError, match="projection_dim must be >= 1"):
        create_model("contrastive", projection_dim=0)
    assert create_model("contrastive", hidden_features=8, projection_dim=4).train()(
        torch.rand(2, 2, 16, 16)
    ).shape == (2, 2, 4)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(temperature=0), "temperature must be > 0"),
        (dict(temperature=-0.1), "temperature must be > 0"),
        (dict(temperature=float("nan")), "temperature must be > 0"),
        (dict(temperature="warm"), "temperature must be a number"),
        (dict(projection_dim=0), "projection_dim must be an int >= 1"),
        (dict(projection_dim=2.5), "projection_dim must be an int >= 1"),
        (dict(rotation_degrees=200), "rotation_degrees must be in"),
        (dict(scale=(1.4, 0.7)), "scale must be"),
        (dict(scale=(0, 1)), "scale must be"),
        (dict(translation=1.5), "translation must be in"),
        (dict(contrast=(-1, 1)), "contrast must be"),
        (dict(brightness=-0.3), "brightness must be in"),
        (dict(noise_std=float("nan")), "noise_std must be in"),
        (dict(num_swaps=5), "does not accept 'num_swaps'"),
    ],
)
def test_bad_options_raise_clear_errors(options, message):
    with pytest.raises(CtxRestoreError, match=message):
        create_pretext("contrastive", **options)


def test_registered_with_json_params():
    assert "contrastive" in list_pretexts()
    assert create_pretext("contrastive", scale=[0.8, 1]).params() == {
        "temperature": 0.2, "projection_dim": 64, "rotation_degrees": 20.0,
        "scale": (0.8, 1.0), "translation": 0.15, "contrast": (0.6, 1.4),
        "brightness": 0.3, "noise_std": 0.1,
    }  # fmt: skip


# ----------------------------------------------------------------------------- benchmark


def test_the_benchmark_runs_contrastive_only_when_named():
    default = parse_methods(None)
    assert default[0] == "random" and sorted(default[1:]) == sorted(PAPER_PRETEXTS)
    assert "contrastive" not in default
    assert parse_methods("contrastive,random") == ("random", "contrastive")
    assert parse_methods("relative_position,contrastive,random_x2,random") == (
        "random", "random_x2", "contrastive", "relative_position")  # fmt: skip


# ----------------------------------------------------------------------------- end to end


def test_pretrain_through_the_cli_then_finetune_transfers_the_encoder(tmp_path):
    pretrained = tmp_path / "simclr"
    result = runner.invoke(app, [
        "pretrain", "--out", str(pretrained), "--method", "contrastive", "--network", "sononet",
        "--phantom", "ultrasound", "--num-images", "16", "--image-size", "32", "--width", "4",
        "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (pretrained / "model.safetensors").is_file() and (pretrained / "spec.json").is_file()
    _, spec = load_checkpoint(pretrained)
    assert spec["pretext"]["name"] == "contrastive"
    assert spec["pretext"]["params"]["temperature"] == 0.2
    assert spec["model"]["name"] == "contrastive"
    metrics = read_json(pretrained / "metrics.json")
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert 0 <= metrics["view_retrieval_accuracy"] <= 1
    assert metrics["chance_accuracy"] == pytest.approx(1 / 63)  # 32 held-out images, 64 views
    assert "view retrieval" in metrics["summary"]

    finetuned = tmp_path / "cls"
    result = runner.invoke(app, [
        "finetune", "classify", "--out", str(finetuned), "--init", str(pretrained),
        "--num-images", "40", "--image-size", "32", "--width", "4", "--batch-size", "8",
        "--max-steps", "2", "--warmup-steps", "1", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    transfer = read_json(finetuned / "metrics.json")["transfer"]
    assert "encoder" in transfer["transferred"]
    assert "head" in transfer["left_behind"]
