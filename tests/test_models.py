"""Tests for ctxrestore.models: every pretraining network, in 2D and 3D, at tiny widths.

The downstream networks (classifier, localizer) are tested with their tasks."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import (
    PRETRAINING_NETWORKS,
    ConvEncoder,
    EncoderDecoder,
    build_model,
    create_model,
    list_models,
    model_spec,
)
from ctxrestore.models.decoders import DeconvDecoder, UNetDecoder
from ctxrestore.models.transfer import check_compatible

# Smallest sensible arguments per registered model; a new model must add an entry here.
TINY_KWARGS = {
    "sononet": {"width": 4},
    "sononet_unet": {"width": 4},
    "unet": {"channels": (4, 8, 16)},
}

MODELS = list(PRETRAINING_NETWORKS)
DIMS = (2, 3)


def tiny_kwargs(name: str, spatial_dims: int = 2, **overrides) -> dict:
    return {**TINY_KWARGS[name], "spatial_dims": spatial_dims, **overrides}


def tiny_input(model: EncoderDecoder, spatial_dims: int, batch: int = 2) -> torch.Tensor:
    """The smallest input the model accepts, with at least 16 (2D) or 8 (3D) voxels per axis."""
    factor = model.encoder.downsampling_factor
    side = max(2 * factor, 16) if spatial_dims == 2 else max(factor, 8)
    shape = (batch, model.encoder.in_channels, *(side,) * spatial_dims)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def test_every_model_has_tiny_kwargs():
    assert set(MODELS) == set(TINY_KWARGS)
    assert set(list_models()) == {
        *PRETRAINING_NETWORKS,
        "classifier",
        "contrastive",
        "dense_contrastive",
        "localizer",
        "relative_position",
        "restoration_contrastive",
        "restoration_dense",
    }


def test_sononet_unet_puts_sononets_encoder_under_a_unet_decoder():
    def shapes(model, part):
        return {n: t.shape for n, t in model.state_dict().items() if n.startswith(part)}

    ours, sononet = create_model("sononet_unet", width=4), create_model("sononet", width=4)
    assert shapes(sononet, "encoder.") and shapes(ours, "encoder.") == shapes(sononet, "encoder.")
    assert (
        model_spec("sononet_unet", width=4)["encoder"] == model_spec("sononet", width=4)["encoder"]
    )
    assert isinstance(ours.decoder, UNetDecoder) and isinstance(sononet.decoder, DeconvDecoder)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", DIMS)
@pytest.mark.parametrize("in_channels", (1, 4))
@pytest.mark.parametrize("out_channels", (None, 3))
def test_output_shape(name, spatial_dims, in_channels, out_channels):
    model = create_model(
        name, **tiny_kwargs(name, spatial_dims, in_channels=in_channels, out_channels=out_channels)
    )
    x = tiny_input(model, spatial_dims)
    expected_channels = in_channels if out_channels is None else out_channels
    assert model(x).shape == (x.shape[0], expected_channels, *x.shape[2:])


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", DIMS)
def test_encoder_stages_match_features(name, spatial_dims):
    model = create_model(name, **tiny_kwargs(name, spatial_dims))
    x = tiny_input(model, spatial_dims)
    features = model.encoder.forward_features(x)
    encoder = model.encoder
    assert len(features) == len(encoder.stage_channels) == len(encoder.stage_strides)
    for feature, channels, stride in zip(
        features, encoder.stage_channels, encoder.stage_strides, strict=True
    ):
        assert feature.shape == (x.shape[0], channels, *(s // stride for s in x.shape[2:]))
    assert encoder.out_channels == encoder.stage_channels[-1]
    assert encoder.downsampling_factor == encoder.stage_strides[-1]
    assert torch.equal(encoder(x), features[-1])


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_conv_encoder_pools_before_every_stage_but_the_first(spatial_dims):
    encoder = ConvEncoder(spatial_dims, 2, stage_channels=(3, 5, 7), convs_per_stage=(1, 2, 1))
    assert encoder.stage_strides == (1, 2, 4)
    features = encoder.forward_features(torch.zeros(1, 2, *(8,) * spatial_dims))
    assert [tuple(f.shape[1:]) for f in features] == [
        (c, *(8 // s,) * spatial_dims) for c, s in zip((3, 5, 7), (1, 2, 4), strict=True)
    ]


@pytest.mark.parametrize("name", MODELS)
def test_parameters_live_under_spec_prefixes(name):
    spec = model_spec(name, **tiny_kwargs(name))
    model = build_model(spec)
    prefixes = spec["prefixes"]
    assert set(prefixes) == {"encoder", "decoder", "head"}
    assert spec["encoder"] == model.encoder.config()
    names = [param_name for param_name, _ in model.named_parameters()]
    for part, prefix in prefixes.items():
        assert any(n.startswith(prefix) for n in names), f"{part} has no parameters"
    assert all(n.startswith(tuple(prefixes.values())) for n in names)
    assert all(k.startswith(tuple(prefixes.values())) for k in model.state_dict())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", DIMS)
def test_spec_round_trips_through_json(name, spatial_dims):
    kwargs = tiny_kwargs(name, spatial_dims, in_channels=4, out_channels=2)
    spec = json.loads(json.dumps(model_spec(name, **kwargs)))
    rebuilt, direct = build_model(spec), create_model(name, **kwargs)
    assert spec["downsampling_factor"] == direct.encoder.downsampling_factor
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in direct.state_dict().items()
    }


def test_spec_records_defaults():
    spec = model_spec("sononet", width=4)
    assert spec["kwargs"] == {
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": None,
        "width": 4,
        "norm": "batch",
    }
    assert spec["downsampling_factor"] == 16


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", DIMS)
def test_gradients_reach_every_part(name, spatial_dims):
    model = create_model(name, **tiny_kwargs(name, spatial_dims))
    x = tiny_input(model, spatial_dims)
    torch.nn.functional.mse_loss(model(x), x).backward()
    for part in ("encoder", "decoder", "head"):
        grads = [p.grad for p in getattr(model, part).parameters()]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), part
        assert any(g.abs().sum() > 0 for g in grads), part


@pytest.mark.parametrize("norm", ("batch", "instance", "group"))
def test_norms(norm):
    model = create_model("unet", **tiny_kwargs("unet", norm=norm))
    x = tiny_input(model, 2)
    assert model(x).shape == x.shape


def test_channels_last_and_bf16_autocast():
    model = create_model("unet", **tiny_kwargs("unet")).eval()
    x = tiny_input(model, 2)
    reference = model(x)
    model = model.to(memory_format=torch.channels_last)
    x_last = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model(x_last), reference, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(x_last)
    assert output.shape == reference.shape and output.dtype == torch.bfloat16


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("spatial_dims", DIMS)
def test_decoder_levels_double_the_resolution_and_end_in_the_output(name, spatial_dims):
    model = create_model(name, **tiny_kwargs(name, spatial_dims)).eval()
    x = tiny_input(model, spatial_dims)
    features = model.encoder.forward_features(x)
    levels = model.decoder.forward_levels(features)
    assert [level.shape[1] for level in levels] == list(model.decoder.level_channels)
    assert model.decoder.level_channels[-1] == model.decoder.out_channels
    size = x.shape[2]
    assert [level.shape[2:] for level in levels] == [
        (size // 2 ** (len(levels) - 1 - i),) * spatial_dims for i in range(len(levels))
    ]
    torch.testing.assert_close(levels[-1], model.decoder(features), rtol=0, atol=0)


def test_deconv_decoder_halves_channels_by_default():
    decoder = DeconvDecoder(2, in_channels=16, num_upsamplings=3)
    out = decoder([torch.zeros(1, 16, 2, 2)])
    assert out.shape == (1, 2, 16, 16) and decoder.out_channels == 2


def test_unknown_model_lists_known_names():
    with pytest.raises(CtxRestoreError, match=r"unknown model 'resnet'.*sononet.*unet"):
        create_model("resnet")
    with pytest.raises(CtxRestoreError, match="unknown model 'resnet'"):
        build_model({"name": "resnet", "kwargs": {}})


def test_unknown_kwarg_is_named_with_accepted_ones():
    with pytest.raises(CtxRestoreError, match=r"'depth'.*accepted arguments:.*channels"):
        create_model("unet", depth=3)
    with pytest.raises(CtxRestoreError, match=r"'depth'.*accepted arguments:.*width"):
        build_model({"name": "sononet", "kwargs": {"depth": 3}})
    with pytest.raises(CtxRestoreError, match="'depth'"):
        model_spec("unet", depth=3)


def test_spec_without_name():
    with pytest.raises(CtxRestoreError, match="'name'"):
        build_model({"kwargs": {}})


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_non_divisible_input_names_size_and_factor(spatial_dims):
    model = create_model("sononet", **tiny_kwargs("sononet", spatial_dims))
    x = torch.zeros(1, 1, 24, *(16,) * (spatial_dims - 1))
    with pytest.raises(CtxRestoreError, match=r"\(24, 16.*downsampling factor 16"):
        model(x)


def test_wrong_input_channels_or_rank():
    model = create_model("unet", **tiny_kwargs("unet", in_channels=4))
    with pytest.raises(CtxRestoreError, match="takes 4 input channel"):
        model(torch.zeros(1, 1, 16, 16))
    with pytest.raises(CtxRestoreError, match="2D network"):
        model(torch.zeros(1, 4, 16, 16, 16))


def test_bad_configuration():
    with pytest.raises(CtxRestoreError, match="norm must be one of batch, instance, group"):
        create_model("unet", **tiny_kwargs("unet", norm="layer"))
    with pytest.raises(CtxRestoreError, match="spatial_dims must be 2 or 3"):
        create_model("unet", **tiny_kwargs("unet", spatial_dims=1))
    with pytest.raises(CtxRestoreError, match="at least 2 stages"):
        UNetDecoder(2, (4,))
    with pytest.raises(CtxRestoreError, match="equal length"):
        ConvEncoder(2, 1, stage_channels=(4, 8), convs_per_stage=(2,))


@pytest.mark.parametrize(
    ("pretrained", "target", "warning"),
    [
        (["T1", "T2"], ["T2", "T1"], "in another order"),
        (["FLAIR", "T1"], ["CT", "T1"], "will see other channels"),
        (["T1", "T2"], ["t1 ", "T2"], None),  # case and spaces do not count
        (["channel_0", "channel_1"], ["T2", "T1"], None),  # undeclared: nothing to compare
        (["T1", "T2"], ["channel_0", "channel_1"], None),
    ],
)
def test_channels_declared_differently_on_both_sides_are_warned_of(
    caplog, pretrained, target, warning
):
    spec = {"spatial_dims": 2, "in_channels": 2, "channel_names": pretrained}
    with caplog.at_level(logging.WARNING, logger="ctxrestore.models.transfer"):
        check_compatible(spec, spatial_dims=2, in_channels=2, channel_names=target,
                         adapt_channels=False, source="run A", target="data B")  # fmt: skip
    messages = [r.message for r in caplog.records if "pretrained on channels" in r.message]
    if warning is None:
        assert messages == []
    else:
        assert len(messages) == 1 and warning in messages[0]
        assert "run A" in messages[0] and "data B" in messages[0] and str(target) in messages[0]
