"""Dense contrastive pretext (after VADeR, Pinheiro et al. 2020): points followed exactly into
two augmented views (2D and 3D), drawn on the foreground when asked, the point-level InfoNCE
against its formula, the network that reads and projects the decoder's features at the points,
options, and a pretraining through the CLI whose encoder and decoder transfer to the
localiser's segment head."""

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
from ctxrestore.models import build_model, create_model, model_spec
from ctxrestore.models.contrastive import DenseContrastiveNetwork
from ctxrestore.pretext import create_pretext
from ctxrestore.pretext.dense_contrastive import view_positions
from ctxrestore.pretext.training import PretrainConfig
from ctxrestore.tasks.augment import Augmentation, apply_augmentation, sampling_theta

runner = CliRunner()
METHOD = "dense_contrastive"


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_images(batch: int, spatial: tuple[int, ...]) -> torch.Tensor:
    """(B, D, *S): channel d holds each voxel centre's normalised coordinate along grid_sample's
    axis d (x: the last spatial axis), a linear function that bilinear reads return exactly."""
    axes = torch.meshgrid(*[(2 * torch.arange(n) + 1) / n - 1 for n in spatial], indexing="ij")
    return torch.stack(axes[::-1])[None].repeat(batch, 1, *([1] * len(spatial)))


def read_at(images: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """images (B, C, *S) read bilinearly at positions (B, M, D) -> (B, M, C)."""
    batch, points, dims = positions.shape
    grid = positions.reshape(batch, points, *([1] * (dims - 1)), dims)
    return F.grid_sample(images, grid, align_corners=False).reshape(batch, -1, points).mT


# ----------------------------------------------------------------------------- the points


@pytest.mark.parametrize("spatial", [(24, 32), (12, 16, 20)])
def test_a_point_is_followed_into_a_view_through_the_views_own_map(spatial):
    """Move coordinate images with a random plan (rotation, zoom, shift; no intensity change):
    a view read where `view_positions` puts an input position gives back that position."""
    moves = Augmentation(rotation_degrees=30, scale=(0.7, 1.4), translation=0.15, contrast=(1, 1),
                         brightness=0, noise_std=0, probability=1)  # fmt: skip
    images = coordinate_images(4, spatial)
    plan = moves.plan({"image": images}, generator(3))
    view = apply_augmentation({"image": images}, plan)["image"]
    points = torch.rand(4, 50, len(spatial), generator=generator(4)) * 1.6 - 0.8
    located = view_positions(points, sampling_theta(plan, spatial))
    assert not torch.allclose(located, points, atol=0.05)  # the views did move
    # Away from a view's edge (where bilinear reads blend in the zero padding) exactly.
    margin = 1 - 2 / min(spatial)
    kept = (located.abs() < margin).all(dim=-1)
    assert kept.sum() > 50
    torch.testing.assert_close(read_at(view, located)[kept], points[kept], atol=1e-4, rtol=0)


@pytest.mark.parametrize("spatial", [(32, 40), (16, 16, 16)])
@pytest.mark.parametrize("channels", [1, 3])
def test_the_views_are_simclrs_and_the_points_land_on_the_same_anatomy(spatial, channels):
    pretext = create_pretext(METHOD, points_per_image=200)
    images = coordinate_images(3, spatial)[:, :1].repeat(1, channels, *([1] * len(spatial)))
    images = images + torch.arange(channels).view(1, -1, *([1] * len(spatial)))
    (views, located), inside = pretext.make_batch(images, generator(1))
    assert views.shape == (3, 2 * channels, *spatial)
    assert located.shape == (3, 2, 200, len(spatial)) and inside.shape == (3, 200)
    assert inside.dtype == torch.bool and inside.float().mean() > 0.5
    # The views are SimCLR's for the same generator state (drawn first, in the same order).
    simclr, _ = create_pretext("contrastive").make_batch(images, generator(1))
    torch.testing.assert_close(views, simclr)
    # A point reads the same anatomy in both views, up to each view's intensity change
    # (contrast and brightness per image and channel, noise per voxel): the values of the
    # points correlate across views, and not when the partners are shuffled. (Away from the
    # views' edges, where bilinear reads blend in the zero padding.)
    first = read_at(views[:, :channels], located[:, 0])
    second = read_at(views[:, channels:], located[:, 1])
    clear = inside & (located.abs() < 1 - 2 / min(spatial)).all(dim=-1).all(dim=1)
    for image in range(3):
        for channel in range(channels):
            kept = clear[image]
            assert kept.sum() >= 10
            a, b = first[image, kept, channel], second[image, kept, channel]
            assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9
            assert abs(torch.corrcoef(torch.stack([a, b.roll(1)]))[0, 1]) < 0.5
    again = pretext.make_batch(images, generator(1))
    assert torch.equal(again[0][1], located) and torch.equal(again[1], inside)
    assert not torch.equal(pretext.make_batch(images, generator(2))[0][1], located)


@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_points_are_drawn_on_the_foreground_when_asked(spatial):
    """Only a small block is foreground; every point, mapped back through view 1's plan (the
    first draw of the generator), lies in it. Without a threshold they spread everywhere."""
    images = torch.zeros(4, 2, *spatial)
    block = (slice(None), 1, *[slice(4, 10)] * len(spatial))  # foreground in channel 1 only
    images[block] = 0.5
    inside_block = torch.zeros(4, 1, *spatial)
    inside_block[(slice(None), 0, *block[2:])] = 1

    def landed_in_block(pretext, seed):
        (_, located), _ = pretext.make_batch(images, generator(seed))
        plan = pretext.views.augmentation.plan({"image": images}, generator(seed))
        theta = sampling_theta(plan, spatial)
        source = located[:, 0] @ theta[..., :-1].mT + theta[:, None, :, -1]
        # Points sit inside their voxel, so a nearest read tells the voxel exactly.
        grid = source.reshape(4, -1, *([1] * (len(spatial) - 1)), len(spatial))
        read = F.grid_sample(inside_block, grid, mode="nearest", align_corners=False)
        return read.flatten()

    on_foreground = create_pretext(METHOD, foreground_threshold=0.1, points_per_image=64)
    assert bool((landed_in_block(on_foreground, 5) == 1).all())
    anywhere = create_pretext(METHOD, points_per_image=64)
    assert float(landed_in_block(anywhere, 5).mean()) < 0.3
    # An image with no foreground at all draws its points anywhere, rather than failing.
    blank = create_pretext(METHOD, foreground_threshold=0.9, points_per_image=64)
    (_, located), _ = blank.make_batch(images, generator(5))
    assert located.isfinite().all() and located[:, 0].std() > 0.3


# ----------------------------------------------------------------------------- the loss


def test_loss_matches_point_infonce_written_out():
    """B = 2 images of M = 2 points, the second point of image 1 outside a view: N = 3 points
    take part. InfoNCE from view 1 to view 2 and back, by cosine / tau, written out."""
    temperature = 0.5
    outputs = torch.randn(2, 2, 2, 3, generator=generator(7))
    inside = torch.tensor([[True, True], [True, False]])
    first = [outputs[0, 0, 0], outputs[0, 0, 1], outputs[1, 0, 0]]
    second = [outputs[0, 1, 0], outputs[0, 1, 1], outputs[1, 1, 0]]

    def cosine(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    def direction(queries, keys):
        total = 0.0
        for i, query in enumerate(queries):
            logits = [cosine(query, key) / temperature for key in keys]
            total -= logits[i] - math.log(sum(math.exp(v) for v in logits))
        return total / len(queries)

    expected = (direction(first, second) + direction(second, first)) / 2
    pretext = create_pretext(METHOD, temperature=temperature)
    loss = pretext.loss(outputs, inside)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # A point outside a view changes nothing, whatever its projection.
    moved = outputs.clone()
    moved[1, :, 1] = 100
    assert float(pretext.loss(moved, inside)) == pytest.approx(expected, rel=1e-5)
    assert pretext.loss(outputs.bfloat16(), inside).dtype == torch.float32


def test_loss_is_low_when_each_point_matches_its_own_and_high_when_partners_swap():
    pretext = create_pretext(METHOD, temperature=0.1)
    outputs = torch.eye(8).view(2, 4, 8)  # 8 points, each its own direction
    matching = torch.stack([outputs, outputs], dim=1)
    inside = torch.ones(2, 4, dtype=torch.bool)
    assert float(pretext.loss(matching, inside)) < 1e-3
    swapped = torch.stack([outputs, outputs.roll(1, dims=1)], dim=1)
    assert float(pretext.loss(swapped, inside)) > 5
    metrics = pretext.evaluate(None, inside, matching)
    assert metrics == {"point_retrieval_accuracy": 1.0, "chance_accuracy": 1 / 8}
    assert pretext.evaluate(None, inside, swapped)["point_retrieval_accuracy"] == 0
    assert "100.0% against 12.5% by chance (8 candidate points)" in pretext.summary(metrics)
    # With fewer than two points in both views nothing is contrasted: zero, with a gradient.
    nothing = matching.clone().requires_grad_()
    loss = pretext.loss(nothing, torch.zeros(2, 4, dtype=torch.bool))
    assert float(loss.detach()) == 0
    loss.backward()
    assert nothing.grad is not None
    with pytest.raises(CtxRestoreError, match=r"expected projections \(B, 2, M, P\)"):
        pretext.loss(outputs, inside)


# ----------------------------------------------------------------------------- network


@pytest.mark.parametrize(("network", "spatial_dims"), [("sononet_unet", 2), ("unet", 3)])
def test_network_projects_the_decoder_features_at_the_points(network, spatial_dims):
    in_channels = 2
    pretext = create_pretext(METHOD, projection_dim=8)
    sizes = {"width": 4} if network == "sononet_unet" else {"channels": [2, 4, 8, 8, 8]}
    base = model_spec(network, spatial_dims=spatial_dims, in_channels=in_channels, **sizes)
    spec = pretext.network_spec(base)
    assert spec["name"] == METHOD and spec["encoder"] == base["encoder"]
    assert spec["prefixes"] == {"encoder": "encoder.", "decoder": "decoder.",
                                "projection": "projection."}  # fmt: skip
    model = build_model(spec).eval()
    plain = build_model(base).eval()
    state = model.state_dict()
    # Encoder and decoder named and shaped as the plain restoration network's; no head.
    shared = {n: t for n, t in state.items() if not n.startswith("projection.")}
    assert {n: t.shape for n, t in shared.items()} == {
        n: t.shape for n, t in plain.state_dict().items() if not n.startswith("head.")
    }
    plain.load_state_dict({**plain.state_dict(), **shared})

    size = 16
    views = torch.rand(2, 2 * in_channels, *(size,) * spatial_dims, generator=generator())
    # Points at voxel centres, so a bilinear read is exactly that voxel's features.
    voxels = torch.randint(0, size, (2, 2, 5, spatial_dims), generator=generator(2))
    located = (2 * voxels + 1) / size - 1
    projections = model((views, located))
    assert projections.shape == (2, 2, 5, 8)
    for view in range(2):
        image = views[:, view * in_channels : (view + 1) * in_channels]
        features = plain.decoder(plain.encoder.forward_features(image))  # (B, F, *S)
        for b in range(2):
            for m in range(5):
                index = tuple(voxels[b, view, m].flip(0).tolist())  # grid order -> array order
                expected = model.projection(features[b][(slice(None), *index)][None])[0]
                torch.testing.assert_close(projections[b, view, m], expected)
    with pytest.raises(CtxRestoreError, match="takes \\(two views of each image, the points'"):
        model(views)
    with pytest.raises(CtxRestoreError, match=r"positions in both views"):
        model((views, located[:, :1]))
    with pytest.raises(CtxRestoreError, match=r"two views of each image, 2 x 2 = 4"):
        model((views[:, :in_channels], located))


@pytest.mark.parametrize("method", [METHOD, "context_restoration_dense"])
def test_without_a_projector_infonce_reads_the_decoder_features_themselves(method):
    pretext = create_pretext(method, projector="none")
    base = model_spec("sononet_unet", spatial_dims=2, in_channels=1, width=4)
    spec = pretext.network_spec(base)
    assert spec["kwargs"]["projector"] == "none"
    model = build_model(spec).eval()
    assert not any(name.startswith("projection.") for name in model.state_dict())
    views = torch.rand(2, 2, 16, 16, generator=generator())
    voxels = torch.randint(0, 16, (2, 2, 3, 2), generator=generator(2))
    located = (2 * voxels + 1) / 16 - 1  # voxel centres: the read is that voxel's features
    outputs = model((views, located))
    projections = outputs[1] if isinstance(outputs, tuple) else outputs
    features = model.decoder(model.encoder.forward_features(views[:, :1]))
    assert projections.shape == (2, 2, 3, features.shape[1])
    b, m = 1, 2
    x, y = voxels[b, 0, m].tolist()
    torch.testing.assert_close(projections[b, 0, m], features[b, :, y, x])
    params = pretext.params()
    assert (params if method == METHOD else params["dense"])["projector"] == "none"
    with pytest.raises(CtxRestoreError, match=f"{method}: projector must be one of"):
        create_pretext(method, projector="linear")
    with pytest.raises(CtxRestoreError, match="projector is for context_restoration_dense, "):
        PretrainConfig(out=Path("x"), method="contrastive", projector="none")


@pytest.mark.parametrize("method", [METHOD, "context_restoration_dense"])
@pytest.mark.parametrize(("network", "spatial_dims"), [("sononet_unet", 2), ("unet", 3)])
def test_a_deeper_dense_level_reads_the_points_there_and_the_head_still_reads_the_output(
    method, network, spatial_dims
):
    pretext = create_pretext(method, projector="none", dense_level=1)
    sizes = {"width": 4} if network == "sononet_unet" else {"channels": [2, 4, 8, 8, 8]}
    base = model_spec(network, spatial_dims=spatial_dims, in_channels=1, **sizes)
    spec = pretext.network_spec(base)
    assert spec["kwargs"]["read_level"] == 1
    model = build_model(spec).eval()
    size, half = 16, 8
    views = torch.rand(2, 2, *(size,) * spatial_dims, generator=generator())
    # Points at the centres of the half-resolution level's voxels: a read is that voxel's.
    voxels = torch.randint(0, half, (2, 2, 3, spatial_dims), generator=generator(2))
    located = (2 * voxels + 1) / half - 1
    outputs = model((views, located))
    projections = outputs[1] if isinstance(outputs, tuple) else outputs
    for view in range(2):
        image = views[:, view : view + 1]
        levels = model.decoder.forward_levels(model.encoder.forward_features(image))
        level = levels[-2]
        assert level.shape[2:] == (half,) * spatial_dims
        assert projections.shape == (2, 2, 3, level.shape[1]) != levels[-1].shape[1]
        for b in range(2):
            for m in range(3):
                index = tuple(voxels[b, view, m].flip(0).tolist())  # grid order -> array order
                torch.testing.assert_close(projections[b, view, m], level[b][(slice(None), *index)])
    if method != METHOD:  # the restoration is the plain network's, from the output's features
        plain = build_model(base).eval()
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(outputs[0][:, :1], plain(views[:, :1]))
        torch.testing.assert_close(outputs[0][:, 1:], plain(views[:, 1:]))
        assert (pretext.params()["dense"]["dense_level"]) == 1
    else:
        assert pretext.params()["dense_level"] == 1


def test_dense_level_options():
    decoder = create_model("sononet_unet", width=4).decoder
    assert decoder.level_channels == (32, 16, 8, 4)
    mlp = create_model(METHOD, network="sononet_unet", network_kwargs={"width": 4}, read_level=2)
    assert mlp.projection.mlp[0].in_features == 16  # the projection takes that level's width
    with pytest.raises(CtxRestoreError, match=r"dense level 4 is out of range: .* has 4 levels, "
                       r"so the dense level must lie in 0\.\.3"):  # fmt: skip
        create_model(METHOD, network="sononet_unet", network_kwargs={"width": 4}, read_level=4)

    class OutputOnly(torch.nn.Module):  # a decoder that does not expose its levels
        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, features):
            return self.decoder(features)

    restoration = create_model("sononet_unet", width=4)
    restoration.decoder = OutputOnly(restoration.decoder)
    with pytest.raises(CtxRestoreError, match=r"\(OutputOnly\) does not expose its levels"):
        DenseContrastiveNetwork(restoration, torch.nn.Identity(), read_level=1)
    DenseContrastiveNetwork(restoration, torch.nn.Identity(), read_level=0)  # the output: fine
    for method in (METHOD, "context_restoration_dense"):
        for level in (-1, True, 1.0):
            with pytest.raises(CtxRestoreError, match=f"{method}: dense_level must be an int >= 0"):
                create_pretext(method, dense_level=level)
    with pytest.raises(CtxRestoreError, match="dense_level is for context_restoration_dense, "
                       "dense_contrastive; context_restoration reads no points"):  # fmt: skip
        PretrainConfig(out=Path("x"), method="context_restoration", dense_level=1)


def test_network_and_pretext_options():
    with pytest.raises(CtxRestoreError, match="needs an encoder-decoder network"):
        create_model(METHOD, network="classifier")
    with pytest.raises(CtxRestoreError, match="projection_dim must be >= 1"):
        create_model(METHOD, projection_dim=0)
    bad = [
        (dict(points_per_image=1), "points_per_image must be an int >= 2"),
        (dict(points_per_image=2.5), "points_per_image must be an int >= 2"),
        (dict(temperature=0), "temperature must be > 0"),
        (dict(projection_dim=0), "projection_dim must be an int >= 1"),
        (dict(foreground_threshold=float("nan")), "foreground_threshold must be a finite"),
        (dict(foreground_threshold="air"), "foreground_threshold must be a finite"),
    ]
    for options, message in bad:
        with pytest.raises(CtxRestoreError, match=f"{METHOD}: {message}"):
            create_pretext(METHOD, **options)
    params = create_pretext(METHOD, foreground_threshold=0.05).params()
    assert params["foreground_threshold"] == 0.05 and params["points_per_image"] == 64
    assert params["views"]["scale"] == (0.7, 1.4) and params["views"]["noise_std"] == 0.1
    assert METHOD not in parse_methods(None)
    assert parse_methods(f"{METHOD},random") == ("random", METHOD)


# ----------------------------------------------------------------------------- end to end


def test_pretrain_through_the_cli_then_the_segment_head_takes_encoder_and_decoder(tmp_path):
    pretrained = tmp_path / "dense"
    result = runner.invoke(app, [
        "pretrain", "--out", str(pretrained), "--method", METHOD, "--network", "sononet_unet",
        "--phantom", "abdomen", "--num-images", "16", "--image-size", "32", "--width", "4",
        "--batch-size", "8", "--max-steps", "2", "--warmup-steps", "1", "--device", "cpu",
        "--foreground-threshold", "0.05", "--preview-every", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    state, spec = load_checkpoint(pretrained)
    assert spec["pretext"]["name"] == METHOD and spec["model"]["name"] == METHOD
    assert spec["pretext"]["params"]["foreground_threshold"] == 0.05
    assert not any(name.startswith("head.") for name in state)
    metrics = read_json(pretrained / "metrics.json")
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert 0 <= metrics["point_retrieval_accuracy"] <= 1 and metrics["chance_accuracy"] < 0.01
    assert "point retrieval accuracy" in metrics["summary"]
    assert (pretrained / "preview.png").is_file()
    # The report lists the settings this pretext used, and none it did not (swaps, patches).
    report = (pretrained / "report.md").read_text()
    for row in ("| points_per_image | 64 |", "| foreground_threshold | 0.05 |",
                "| views.scale | [0.7, 1.4] |", "| network | sononet_unet |"):  # fmt: skip
        assert row in report
    assert "num_swaps" not in report and "patch_size" not in report

    finetuned = tmp_path / "loc"
    ctxrestore.finetune("localize", out=finetuned, init=str(pretrained), box_head="segment",
                        num_images=40, image_size=32, width=4, batch_size=8, max_steps=2,
                        warmup_steps=1, device="cpu")  # fmt: skip
    transfer = read_json(finetuned / "metrics.json")["transfer"]
    assert set(transfer["transferred"]) == {"encoder", "decoder"}
    assert set(transfer["left_behind"]) == {"projection"}
