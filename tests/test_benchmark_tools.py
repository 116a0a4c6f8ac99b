"""The measuring tools in benchmarks/ that experiments draw conclusions from: the restoration
fill (restoration_fill.py) and the linear probes (feature_probe.py)."""

import importlib.util
import itertools
from pathlib import Path

import pytest
import torch

import ctxrestore
from ctxrestore.errors import CtxRestoreError

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fill = _script("restoration_fill")
probe = _script("feature_probe")


@pytest.mark.parametrize("shape", [(2, 3, 9, 11), (1, 2, 5, 6, 7)], ids=["2d", "3d"])
def test_the_mean_fill_paints_swapped_voxels_with_their_window_mean_of_unswapped_ones(shape):
    generator = torch.Generator().manual_seed(0)
    corrupted = torch.rand(shape, generator=generator)
    swapped = torch.rand((shape[0], 1, *shape[2:]), generator=generator) < 0.4
    window = 3
    filled = fill.local_mean_fill(corrupted, swapped, window)

    keep = ~swapped.expand_as(corrupted)
    assert torch.equal(filled[keep], corrupted[keep])
    spatial = shape[2:]
    for b, c in itertools.product(range(shape[0]), range(shape[1])):
        for voxel in itertools.product(*(range(n) for n in spatial)):
            if not swapped[(b, 0, *voxel)]:
                continue
            around = tuple(slice(max(i - 1, 0), i + 2) for i in voxel)
            values = corrupted[(b, c, *around)][~swapped[(b, 0, *around)]]
            expected = values.mean() if values.numel() else torch.tensor(0.0)
            assert filled[(b, c, *voxel)] == pytest.approx(float(expected), abs=1e-5)


def test_a_window_with_nothing_unswapped_paints_zero():
    corrupted = torch.full((1, 1, 5, 5), 7.0)
    swapped = torch.ones((1, 1, 5, 5), dtype=torch.bool)
    assert torch.equal(fill.local_mean_fill(corrupted, swapped, 3), torch.zeros_like(corrupted))


def test_the_fill_measure_scores_a_pretraining_and_refuses_other_methods(tmp_path, tiny_pretrain):
    run = tmp_path / "cr"
    ctxrestore.pretrain(out=run, phantom="shapes", **tiny_pretrain)
    row = fill.measure(run, count=4, seed=0)
    assert row["images"] == 4
    assert row["patch_size"] == tiny_pretrain["patch_size"]
    assert 0 < row["swapped_share"] < 1
    assert row["corrupted_mse_swapped"] > 0
    # A share of the corruption's error removed: at most all of it.
    for key in ("restored_removes", "mean_fill_5px_removes", "mean_fill_9px_removes"):
        assert row[key] <= 1, key
    assert fill.measure(run, count=4, seed=0) == row  # fixed seed, same numbers

    other = tmp_path / "ae"
    ctxrestore.pretrain(out=other, phantom="shapes", method="autoencoder", **tiny_pretrain)
    with pytest.raises(CtxRestoreError, match=r"autoencoder.*context_restoration pretraining"):
        fill.measure(other, count=4, seed=0)


def test_the_linear_probe_separates_separable_classes_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(100)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
    points = centres[labels] + torch.randn(300, 2, generator=generator)
    train, test = torch.arange(0, 300, 2), torch.arange(1, 300, 2)
    separable = probe.linear_probe(points[train], labels[train], points[test], labels[test], 3)
    assert separable > 0.97
    noise = torch.randn(300, 2, generator=generator)
    chance = probe.linear_probe(noise[train], labels[train], noise[test], labels[test], 3)
    assert chance < 0.5


def test_balanced_accuracy_averages_over_the_classes_present_in_the_test_pixels():
    # Class 2 is absent from the test pixels: it must not count as a class recalled at 0.
    train_x = torch.tensor([[-5.0], [-4.0], [0.0], [0.5], [4.0], [5.0]])
    train_y = torch.tensor([0, 0, 1, 1, 2, 2])
    test_x, test_y = torch.tensor([[-4.5], [0.2]]), torch.tensor([0, 1])
    assert probe.linear_probe(train_x, train_y, test_x, test_y, 3) == pytest.approx(1.0)


def test_a_fresh_head_is_slow_on_features_whose_signal_lies_in_a_small_direction():
    """Two classes told apart by feature 0 alone. Well scaled, a fresh head trained by Adam
    separates them within 1,000 steps; with feature 0 shrunk 1000-fold beside a large
    uninformative feature 1, the standardised probe still separates them but the fresh head,
    reading the features as they are, is still near chance at 1,000 steps."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) // 2 % 2  # both classes among the even and the odd pixels
    signal = (2 * labels - 1).float() + 0.3 * torch.randn(400, generator=generator)
    noise = torch.randn(400, generator=generator)
    train, test = torch.arange(0, 400, 2), torch.arange(1, 400, 2)
    scaled = torch.stack([signal, noise], dim=1)
    hidden = torch.stack([1e-3 * signal, 100 * noise], dim=1)
    well = probe.fresh_head_probe(scaled[train], labels[train], scaled[test], labels[test], 2,
                                  [10, 1000])  # fmt: skip
    slow = probe.fresh_head_probe(hidden[train], labels[train], hidden[test], labels[test], 2,
                                  [1000])  # fmt: skip
    assert set(well) == {10, 1000} and set(slow) == {1000}
    assert well[10] < 0.75 and well[1000] > 0.95 and slow[1000] < 0.75
    assert probe.linear_probe(hidden[train], labels[train], hidden[test], labels[test], 2) > 0.95
    assert probe.fresh_head_probe(scaled, labels, scaled, labels, 2, []) == {}


def test_effective_rank_counts_independent_directions():
    generator = torch.Generator().manual_seed(0)
    one_direction = torch.randn(500, 1, generator=generator) * torch.tensor([[1.0, -2.0, 3.0]])
    assert probe.effective_rank(one_direction) == pytest.approx(1.0, abs=1e-3)
    independent = torch.randn(5000, 4, generator=generator)
    assert probe.effective_rank(independent) == pytest.approx(4.0, abs=0.1)
