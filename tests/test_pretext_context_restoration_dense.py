"""Context restoration with a dense contrastive term: the views, points and swaps it draws (2D,
3D, several channels), its loss against the two normalised terms written out, the one-pass
network that restores and projects, the points read in the clean views instead
(`dense_views="clean"`), options, and a CLI pretraining whose encoder and decoder transfer to
the localiser's segment head."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import ctxrestore
from ctxrestore.bench.benchmark import parse_methods
from ctxrestore.cli import app
from ctxrestore.engine.checkpoint import load_checkpoint
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json
from ctxrestore.models import build_model, model_spec
from ctxrestore.pretext import create_pretext
from ctxrestore.pretext.restoration import RESTORATION_LOSSES
from ctxrestore.pretext.training import PretrainConfig

runner = CliRunner()
METHOD = "context_restoration_dense"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_swapped(before: torch.Tensor, after: torch.Tensor) -> None:
    """`after` is `before` (C, *S) with patches swapped: a permutation of its voxels, the same
    one in every channel."""
    before, after = before.flatten(1), after.flatten(1)
    assert not torch.equal(before, after)
    moved = before[0] != after[0]
    for c in range(before.shape[0]):
        torch.testing.assert_close(before[c].sort().values, after[c].sort().values)
        assert torch.equal(before[c] != after[c], moved)


@pytest.mark.parametrize(("spatial", "channels"), [((32, 32), 1), ((16, 16, 16), 2)])
def test_the_views_and_points_are_dense_contrastives_and_each_view_is_swapped(spatial, channels):
    pretext = create_pretext(METHOD, num_swaps=3, patch_size=4, points_per_image=20)
    images = torch.rand(3, channels, *spatial, generator=generator(1))
    (corrupted, located), (clean, baseline, inside) = pretext.make_batch(images, generator(2))
    # The clean views and the points are dense_contrastive's for the same generator state.
    (views, dense_located), dense_inside = create_pretext(
        "dense_contrastive", points_per_image=20
    ).make_batch(images, generator(2))
    torch.testing.assert_close(clean, views)
    assert torch.equal(located, dense_located) and torch.equal(inside, dense_inside)
    assert corrupted.shape == clean.shape == (3, 2 * channels, *spatial)
    assert torch.equal(baseline, corrupted)  # the restoration term's baseline is the input
    # Each view of each image is its own swap of patches: a permutation of its voxels, the
    # same one in every channel, and different between the two views.
    for view in range(2):
        picked = slice(view * channels, (view + 1) * channels)
        for b in range(3):
            assert_swapped(clean[b, picked], corrupted[b, picked])
    swapped = corrupted != clean
    assert not torch.equal(swapped[:, :channels], swapped[:, channels:])


@pytest.mark.parametrize(
    ("method", "options"),
    [(METHOD, {"dense_views": "corrupted"}), (METHOD, {"dense_views": "clean"}),
     ("context_restoration_contrastive", {})],
)  # fmt: skip
def test_swaps_stay_on_the_body_in_views_whose_air_the_augmentation_lifted(method, options):
    # A bright disc on black air. The views' brightness shift and noise lift much of the air
    # above the threshold, 0.05; only the image's own foreground, moved into each view, keeps
    # the swaps on the disc.
    size, patch = 32, 4
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disc = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 36).float()  # radius 6
    images = disc[None, None].repeat(8, 1, 1, 1)
    pretext = create_pretext(
        method, foreground_threshold=0.05, patch_size=patch, num_swaps=3, **options
    )
    _, targets = pretext.make_batch(images, generator(3))
    corrupted = targets[1]
    clean = targets[0][:, : corrupted.shape[1]]
    air_lifted = 0
    for view, swapped in zip(clean.flatten(0, 1), corrupted.flatten(0, 1), strict=True):
        # The disc in the view: contrast >= 0.6 above its air, whose noise is ~0.03.
        on_disc = view > view.median() + 0.3
        near_disc = F.max_pool2d(on_disc[None].float(), 2 * patch + 1, 1, patch)[0] > 0
        changed = view != swapped
        assert changed.any()  # three swaps of noisy patches change voxels
        assert not (changed & ~near_disc).any(), "a swap was placed in the air"
        air_lifted += int((view[~near_disc] > 0.05).any())
    assert air_lifted >= 4  # the threshold alone would have let swaps into the air


def test_loss_is_both_terms_divided_by_what_learning_nothing_scores():
    pretext = create_pretext(METHOD, num_swaps=2, patch_size=4, temperature=0.5)
    dense = create_pretext("dense_contrastive", temperature=0.5)
    clean = torch.rand(2, 2, 16, 16, generator=generator(3))
    corrupted = clean.flip(-1)
    restored = clean + 0.1 * torch.randn(clean.shape, generator=generator(4))
    projections = torch.randn(2, 2, 4, 8, generator=generator(5))
    inside = torch.tensor([[True, True, False, True], [True, True, True, False]])  # N = 6
    mse = RESTORATION_LOSSES["mse"]
    restoration = mse(restored, clean) / mse(corrupted, clean)
    contrast = dense.loss(projections, inside) / math.log(6)
    targets = (clean, corrupted, inside)
    for weight in (0, 1, 3):
        weighted = create_pretext(METHOD, contrastive_weight=weight, temperature=0.5)
        loss = weighted.loss((restored, projections), targets)
        assert float(loss) == pytest.approx(float(restoration + weight * contrast), rel=1e-5)
    # Leaving the input as it is scores 1 on the restoration term; a perfect one scores 0.
    unweighted = create_pretext(METHOD, contrastive_weight=0)
    assert float(unweighted.loss((corrupted, projections), targets)) == pytest.approx(1)
    assert float(pretext.loss((clean, projections), targets)) == pytest.approx(float(contrast))
    metrics = pretext.evaluate(None, targets, (restored, projections))
    assert set(metrics) >= {"restoration_mse", "identity_mse", "point_retrieval_accuracy"}
    assert metrics["chance_accuracy"] == pytest.approx(1 / 6)
    summary = pretext.summary(metrics)
    assert "restoration MSE" in summary and "point retrieval accuracy" in summary
    # The preview: view 1 clean, corrupted, restored (its channel only), view 2 clean, titled.
    rows = pretext.preview_rows(None, targets, (restored, projections))
    assert [title.split("\n")[0] for title, _ in rows] == [
        "view 1", "view 1 corrupted", "view 1 restored", "view 2"]  # fmt: skip
    assert rows[3][0].endswith("points found again") and "/6 points" in rows[3][0]
    for (_, shown), expected in zip(rows, (clean[:, :1], corrupted[:, :1], restored[:, :1],
                                           clean[:, 1:]), strict=True):  # fmt: skip
        assert torch.equal(shown, expected)


@pytest.mark.parametrize(("network", "spatial_dims"), [("sononet_unet", 2), ("unet", 3)])
def test_one_pass_restores_the_views_and_projects_the_same_features(network, spatial_dims):
    pretext = create_pretext(METHOD, projection_dim=8)
    sizes = {"width": 4} if network == "sononet_unet" else {"channels": [2, 4, 8, 8, 8]}
    base = model_spec(network, spatial_dims=spatial_dims, in_channels=1, **sizes)
    spec = pretext.network_spec(base)
    assert spec["name"] == "restoration_dense" and spec["encoder"] == base["encoder"]
    model = build_model(spec).eval()
    # The restoration network's names and shapes, head included, and a projection beside.
    plain = build_model(base).eval()
    state = model.state_dict()
    restoration = {n: t for n, t in state.items() if not n.startswith("projection.")}
    assert {n: t.shape for n, t in restoration.items()} == {
        n: t.shape for n, t in plain.state_dict().items()
    }
    plain.load_state_dict(restoration)
    dense = build_model(create_pretext("dense_contrastive", projection_dim=8).network_spec(base))
    dense.load_state_dict({n: t for n, t in state.items() if not n.startswith("head.")})
    dense.eval()

    views = torch.rand(2, 2, *(16,) * spatial_dims, generator=generator())
    located = torch.rand(2, 2, 5, spatial_dims, generator=generator(2)) * 2 - 1
    restored, projections = model((views, located))
    torch.testing.assert_close(projections, dense((views, located)))
    for view in range(2):
        torch.testing.assert_close(restored[:, view : view + 1], plain(views[:, view : view + 1]))
    with pytest.raises(CtxRestoreError, match=r"positions in both views"):
        model((views, located[:, :1]))


@pytest.mark.parametrize(("spatial", "channels"), [((32, 32), 1), ((16, 16, 16), 2)])
def test_clean_dense_views_read_points_in_the_clean_views_and_restore_the_first_swapped(
    spatial, channels
):
    pretext = create_pretext(
        METHOD, num_swaps=3, patch_size=4, points_per_image=20, dense_views="clean"
    )
    images = torch.rand(3, channels, *spatial, generator=generator(1))
    (views, located, corrupted), (clean, baseline, inside) = pretext.make_batch(
        images, generator(2)
    )
    (dense_views, dense_located), dense_inside = create_pretext(
        "dense_contrastive", points_per_image=20
    ).make_batch(images, generator(2))
    # The points are read in dense_contrastive's clean views, untouched by any swap.
    assert torch.equal(views, dense_views) and torch.equal(clean, dense_views)
    assert torch.equal(located, dense_located) and torch.equal(inside, dense_inside)
    # Only the first view is swapped: the restoration term's input and baseline.
    assert corrupted.shape == (3, channels, *spatial) and torch.equal(baseline, corrupted)
    for b in range(3):
        assert_swapped(clean[b, :channels], corrupted[b])

    # The loss restores the first view: a perfect restoration leaves the dense term alone,
    # and the swapped view left as it is scores 1 on the restoration term.
    projections = torch.randn(3, 2, 20, 8, generator=generator(5))
    targets = (clean, corrupted, inside)
    dense = create_pretext("dense_contrastive").loss(projections, inside)
    chance = math.log(max(int(inside.sum()), 2))
    perfect = pretext.loss((clean[:, :channels], projections), targets)
    assert float(perfect) == pytest.approx(float(dense) / chance, rel=1e-5)
    left = pretext.loss((corrupted, projections), targets)
    assert float(left) == pytest.approx(1 + float(dense) / chance, rel=1e-5)
    metrics = pretext.evaluate(None, targets, (corrupted, projections))
    assert metrics["restoration_mse"] == pytest.approx(metrics["identity_mse"])
    rows = pretext.preview_rows(None, targets, (clean[:, :channels], projections))
    assert torch.equal(rows[1][1], corrupted) and torch.equal(rows[3][1], clean[:, channels:])
    assert pretext.params()["dense_views"] == "clean"


def test_with_images_to_restore_one_pass_restores_them_and_reads_the_clean_views():
    pretext = create_pretext(METHOD, projection_dim=8, dense_views="clean")
    base = model_spec("sononet_unet", spatial_dims=2, in_channels=1, width=4)
    model = build_model(pretext.network_spec(base)).eval()
    plain = build_model(base).eval()
    plain.load_state_dict(
        {n: t for n, t in model.state_dict().items() if not n.startswith("projection.")}
    )
    views = torch.rand(2, 2, 16, 16, generator=generator())
    located = torch.rand(2, 2, 5, 2, generator=generator(2)) * 2 - 1
    to_restore = torch.rand(3, 1, 16, 16, generator=generator(3))
    restored, projections = model((views, located, to_restore))
    # Eval mode: batch norm's running statistics, so the shared pass changes nothing.
    torch.testing.assert_close(restored, plain(to_restore))
    torch.testing.assert_close(projections, model((views, located))[1])
    with pytest.raises(CtxRestoreError, match=r"restores images shaped as one view"):
        model((views, located, to_restore[:, :, :8]))
    dense = build_model(create_pretext("dense_contrastive", projection_dim=8).network_spec(base))
    with pytest.raises(CtxRestoreError, match=r"takes \(two views of each image, the points' "
                       r"positions in each view\)"):  # fmt: skip
        dense((views, located, to_restore))  # nothing in it restores


def test_options_are_checked_and_named_for_this_pretext():
    bad = [
        (dict(contrastive_weight=-1), "contrastive_weight must be >= 0"),
        (dict(contrastive_weight="high"), "contrastive_weight must be a number"),
        (dict(points_per_image=1), "points_per_image must be an int >= 2"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(foreground_threshold=float("nan")), "foreground_threshold must be a finite"),
        (dict(dense_views="both"), "dense_views must be one of \\('corrupted', 'clean'\\)"),
    ]
    for options, message in bad:
        with pytest.raises(CtxRestoreError, match=f"{METHOD}: {message}"):
            create_pretext(METHOD, **options)
    with pytest.raises(CtxRestoreError, match="restoration loss"):
        create_pretext(METHOD, restoration_loss="ssim")
    params = create_pretext(METHOD, foreground_threshold=0.05, num_swaps=30).params()
    assert params["foreground_threshold"] == 0.05 and params["num_swaps"] == 30
    assert params["dense"]["points_per_image"] == 64
    assert "foreground_threshold" not in params["dense"]  # the shared one, recorded once
    assert params["dense"]["views"]["scale"] == (0.7, 1.4)
    assert params["dense_views"] == "corrupted"
    with pytest.raises(CtxRestoreError, match=f"dense_views is for {METHOD}; dense_contrastive"):
        PretrainConfig(out=Path("x"), method="dense_contrastive", dense_views="clean")
    assert METHOD not in parse_methods(None)
    assert parse_methods(f"{METHOD},random") == ("random", METHOD)


def test_pretrain_through_the_cli_then_the_segment_head_takes_encoder_and_decoder(tmp_path):
    pretrained = tmp_path / "hybrid"
    result = runner.invoke(app, [
        "pretrain", "--out", str(pretrained), "--method", METHOD, "--network", "sononet_unet",
        "--phantom", "abdomen", "--num-images", "16", "--image-size", "32", "--width", "4",
        "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1", "--device", "cpu",
        "--foreground-threshold", "0.05", "--patch-size", "4", "--num-swaps", "5",
        "--contrastive-weight", "2", "--dense-views", "clean", "--dense-level", "1",
        "--preview-every", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    state, spec = load_checkpoint(pretrained)
    assert spec["pretext"]["name"] == METHOD and spec["model"]["name"] == "restoration_dense"
    assert spec["pretext"]["params"]["contrastive_weight"] == 2
    assert any(name.startswith("head.") for name in state)
    metrics = read_json(pretrained / "metrics.json")
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert "restoration MSE" in metrics["summary"] and "point retrieval" in metrics["summary"]
    report = (pretrained / "report.md").read_text()
    for row in ("| num_swaps | 5 |", "| patch_size | 4 |", "| contrastive_weight | 2.0 |",
                "| dense_views | clean |", "| dense.points_per_image | 64 |",
                "| dense.dense_level | 1 |"):  # fmt: skip
        assert row in report

    finetuned = tmp_path / "loc"
    ctxrestore.finetune("localize", out=finetuned, init=str(pretrained), box_head="segment",
                        num_images=40, image_size=32, width=4, batch_size=8, max_steps=2,
                        warmup_steps=1, device="cpu")  # fmt: skip
    transfer = read_json(finetuned / "metrics.json")["transfer"]
    assert set(transfer["transferred"]) == {"encoder", "decoder"}
    assert set(transfer["left_behind"]) == {"head", "projection"}
