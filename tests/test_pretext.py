"""Every registered pretext: deterministic batches, a network that takes them, a finite loss
that trains, JSON-able parameters and network spec, metrics, summary and preview rows; for the
pretexts that restore images, a clean target that a perfect restoration matches exactly."""

import inspect
import json
import math

import pytest
import torch

from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import build_model, model_spec
from ctxrestore.pretext import create_pretext, list_pretexts
from ctxrestore.pretext.registry import get_pretext_factory

SHARED_OPTIONS = {"num_swaps": 5, "patch_size": 4}  # small enough for 16^3 volumes
IDENTITY_INPUT = {"autoencoder"}  # the one restoration pretext that corrupts nothing


def tiny_pretext(name):
    """The pretext with the shared pretrain options it takes, as `pretrain` passes them."""
    accepted = inspect.signature(get_pretext_factory(name)).parameters
    return create_pretext(name, **{k: v for k, v in SHARED_OPTIONS.items() if k in accepted})


@pytest.mark.parametrize("name", list_pretexts())
@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_pretext_batches_loss_and_metrics(name, spatial):
    pretext = tiny_pretext(name)
    images = torch.rand(2, 3, *spatial)
    inputs, targets = pretext.make_batch(images, torch.Generator().manual_seed(0))
    again = pretext.make_batch(images, torch.Generator().manual_seed(0))
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])

    # A shallow U-Net (downsampling factor 2), so that patch-based pretexts fit 16^3 volumes.
    base = model_spec("unet", spatial_dims=len(spatial), in_channels=3, channels=[4, 8])
    network = pretext.network_spec(base)
    json.dumps(network)
    json.dumps(pretext.params())
    torch.manual_seed(0)
    outputs = build_model(network)(inputs)
    loss = pretext.loss(outputs, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()

    outputs = outputs.detach()
    metrics = pretext.evaluate(inputs, targets, outputs)
    assert metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert isinstance(pretext.summary(metrics), str) and pretext.summary(metrics)
    rows = pretext.preview_rows(inputs, targets, outputs)
    assert rows and all(isinstance(title, str) for title, _ in rows)
    assert all(row.shape[0] == len(images) for _, row in rows)

    if network is base:  # an image-restoration pretext: images in, images out
        check_restoration(name, pretext, images, inputs, targets)
        assert all(row.shape == images.shape for _, row in rows)


def check_restoration(name, pretext, images, inputs, targets):
    assert inputs.shape == images.shape
    # The target is the clean image: restoring it exactly costs nothing, and scores 0.
    assert pretext.loss(images, targets) == 0
    perfect = pretext.evaluate(inputs, targets, images)
    assert perfect["restoration_mse"] == 0
    if name in IDENTITY_INPUT:
        assert torch.equal(inputs, images) and perfect["identity_mse"] == 0
    else:  # the input is corrupted: leaving it as it is costs something
        assert not torch.equal(inputs, images)
        assert pretext.loss(inputs, targets) > 0 and perfect["identity_mse"] > 0


def test_unknown_pretext_and_options_are_named():
    with pytest.raises(CtxRestoreError, match=r"unknown pretext 'jigsaw'; known pretexts: .*"):
        create_pretext("jigsaw")
    with pytest.raises(CtxRestoreError, match=r"does not accept 'mask_ratio'"):
        create_pretext("context_restoration", mask_ratio=0.5)
