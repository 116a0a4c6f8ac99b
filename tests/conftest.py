"""Shared tiny settings: every training test runs in seconds on 2 CPU cores."""

import pytest

TINY_PRETRAIN = dict(
    num_images=32,
    image_size=32,
    width=4,
    batch_size=8,
    max_steps=4,
    patch_size=4,
    num_swaps=5,
    warmup_steps=1,
    log_every=1,
    device="cpu",
)


@pytest.fixture
def tiny_pretrain():
    return dict(TINY_PRETRAIN)
