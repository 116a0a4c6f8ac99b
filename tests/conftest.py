"""Shared tiny settings: every training test runs in seconds on 2 CPU cores."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _cache_in_a_temporary_folder(tmp_path_factory):
    """Preprocessed-array caches go to a session folder, never to the user's ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CTXRESTORE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


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
