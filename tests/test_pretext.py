"""Every registered pretext: batch shapes, clean targets, finite loss, JSON-able parameters."""

import json

import pytest
import torch

from ctxrestore.errors import CtxRestoreError
from ctxrestore.pretext import create_pretext, list_pretexts

TINY_OPTIONS = {"context_restoration": {"patch_size": 4}}  # small enough for 16^3 volumes


@pytest.mark.parametrize("name", list_pretexts())
@pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
def test_pretext_batches_and_loss(name, spatial):
    pretext = create_pretext(name, **TINY_OPTIONS.get(name, {}))
    images = torch.rand(2, 3, *spatial)
    inputs, targets = pretext.make_batch(images, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == images.shape
    assert torch.equal(targets, images) and not torch.equal(inputs, images)
    loss = pretext.loss(inputs, targets)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert pretext.loss(targets, targets) == 0
    json.dumps(pretext.params())


def test_unknown_pretext_and_options_are_named():
    with pytest.raises(CtxRestoreError, match=r"unknown pretext 'jigsaw'; known pretexts: .*"):
        create_pretext("jigsaw")
    with pytest.raises(CtxRestoreError, match=r"does not accept 'mask_ratio'"):
        create_pretext("context_restoration", mask_ratio=0.5)
