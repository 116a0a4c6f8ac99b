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
from ctxrestore.pretext.restoration import RESTORATION_LOSSES, gradient_difference
from ctxrestore.pretext.training import as_float

SHARED_OPTIONS = {"num_swaps": 5, "patch_size": 4}  # small enough for 16^3 volumes
IDENTITY_INPUT = {"autoencoder"}  # the one restoration pretext that corrupts nothing


def tiny_pretext(name):
    """The pretext with the shared pretrain options it takes, as `pretrain` passes them."""
    accepted = inspect.signature(get_pretext_factory(name)).parameters
    return create_pretext(name, **{k: v for k, v in SHARED_OPTIONS.items() if k in accepted})


def same_tensors(first, second) -> bool:
    """Equal tensors, or equal tuples of them (an input or target with several parts)."""
    if isinstance(first, tuple):
        return len(first) == len(second) and all(map(same_tensors, first, second))
    return torch.equal(first, second)


@pytest.mark.parametrize("name", list_pretexts())
@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_pretext_batches_loss_and_metrics(name, spatial):
    pretext = tiny_pretext(name)
    images = torch.rand(2, 3, *spatial)
    inputs, targets = pretext.make_batch(images, torch.Generator().manual_seed(0))
    again = pretext.make_batch(images, torch.Generator().manual_seed(0))
    assert same_tensors(inputs, again[0]) and same_tensors(targets, again[1])

    # A shallow U-Net (downsampling factor 2), so that patch-based pretexts fit 16^3 volumes.
    base = model_spec("unet", spatial_dims=len(spatial), in_channels=3, channels=[4, 8])
    network = pretext.network_spec(base)
    json.dumps(network)
    json.dumps(pretext.params())
    torch.manual_seed(0)
    model = build_model(network)
    outputs = model(inputs)
    loss = pretext.loss(outputs, targets)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()

    with torch.no_grad():  # as evaluate_pretext runs it
        outputs = as_float(model(inputs))
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


# ------------------------------------------------------------------- restoration losses
# The pretexts whose loss IS the chosen restoration loss. The hybrids (context_restoration_
# contrastive and _dense) take the option too but divide it by a baseline and add a contrastive
# term (tested on their own).
HYBRIDS = ("context_restoration_contrastive", "context_restoration_dense")
RESTORING = [n for n in list_pretexts() if "restoration_loss" in inspect.signature(
    get_pretext_factory(n)).parameters and n not in HYBRIDS]  # fmt: skip


def test_restoration_losses_against_hand_values():
    # A step edge, restored blurred (a) or sharp with an offset beside it (b): equal MSE and
    # equal L1, but the blurred edge has smaller neighbour differences than the target's.
    target = torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 1, 1, 4)
    blurred = torch.tensor([0.0, 0.25, 0.75, 1.0]).view(1, 1, 1, 4)
    sharp = torch.tensor([0.25, 0.25, 1.0, 1.0]).view(1, 1, 1, 4)
    for output in (blurred, sharp):
        assert float(RESTORATION_LOSSES["mse"](output, target)) == pytest.approx(0.03125)
        assert float(RESTORATION_LOSSES["l1"](output, target)) == pytest.approx(0.125)
    # Differences along the width: target (0, 1, 0), blurred (.25, .5, .25), sharp (0, .75, 0);
    # the height of 1 pixel has none and does not count.
    assert float(gradient_difference(blurred, target)) == pytest.approx(1 / 3)
    assert float(gradient_difference(sharp, target)) == pytest.approx(0.25 / 3)
    assert float(RESTORATION_LOSSES["l1_gradient"](blurred, target)) == pytest.approx(0.125 + 1 / 3)
    assert float(RESTORATION_LOSSES["l1_gradient"](sharp, target)) == pytest.approx(
        0.125 + 0.25 / 3
    )
    # An intensity offset keeps every edge: no gradient difference, but an L1 error.
    assert float(gradient_difference(target + 0.5, target)) == 0


@pytest.mark.parametrize("name", RESTORING)
def test_restoration_pretexts_train_with_the_chosen_loss(name):
    images = torch.rand(2, 1, 32, 32)
    outputs = torch.rand(2, 1, 32, 32, requires_grad=True)
    values = set()
    for loss in RESTORATION_LOSSES:
        pretext = create_pretext(name, restoration_loss=loss)
        assert pretext.params()["restoration_loss"] == loss
        value = pretext.loss(outputs, images)
        assert torch.equal(value, RESTORATION_LOSSES[loss](outputs, images))
        assert pretext.loss(images, images) == 0
        value.backward()
        values.add(value.item())
    assert len(values) == len(RESTORATION_LOSSES)  # the option is not ignored
    # Held-out metrics stay MSE whatever the loss, so runs with different losses compare.
    outputs = outputs.detach()
    metrics = create_pretext(name, restoration_loss="l1").evaluate(images, images, outputs)
    assert metrics["restoration_mse"] == pytest.approx(float(((outputs - images) ** 2).mean()))
    with pytest.raises(CtxRestoreError, match=r"unknown restoration loss 'huber'; losses: mse"):
        create_pretext(name, restoration_loss="huber")
