"""Segmentation task: label mapping, metrics against hand-computed values, a real training run."""

import math

import pytest
import torch

from ctxrestore.data.phantoms import phantom_dataset
from ctxrestore.data.phantoms.brain import BRATS_LABELS, BRATS_REGIONS
from ctxrestore.engine.distributed import DistributedContext
from ctxrestore.engine.loop import LoopConfig, fit, read_log
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import create_model, model_spec
from ctxrestore.tasks import SegmentationTask, segmentation_scores

BRATS = SegmentationTask(tuple(BRATS_LABELS), tuple(BRATS_LABELS.values()), regions=BRATS_REGIONS)


def test_brats_values_map_to_contiguous_classes_and_unknown_values_fail():
    mask = torch.tensor([[0, 1], [2, 4]])
    assert BRATS.class_indices(mask).tolist() == [[0, 1], [2, 3]]
    with pytest.raises(CtxRestoreError, match=r"label values \[3\] that are not declared"):
        BRATS.class_indices(torch.tensor([0, 3]))
    with pytest.raises(CtxRestoreError, match="outside the declared labels"):
        BRATS.class_indices(torch.tensor([0, 9]))


def test_dice_and_hd95_against_hand_computed_values():
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:4, 2:4] = True  # 4 pixels
    predicted = torch.zeros(8, 8, dtype=torch.bool)
    predicted[2:4, 3:5] = True  # 2 of them + 2 others
    assert segmentation_scores(predicted, expected)["dice"] == pytest.approx(2 * 2 / (4 + 4))
    one = torch.zeros(8, 8, dtype=torch.bool)
    one[1, 1] = True
    other = torch.zeros(8, 8, dtype=torch.bool)
    other[4, 1] = True  # 3 pixels further along axis 0
    assert segmentation_scores(one, other)["hd95"] == pytest.approx(3.0)
    assert segmentation_scores(one, other, spacing=[2.0, 1.0])["hd95"] == pytest.approx(6.0)
    empty = torch.zeros(8, 8, dtype=torch.bool)
    assert segmentation_scores(empty, empty)["dice"] == 1.0
    assert segmentation_scores(one, empty)["dice"] == 0.0
    assert math.isnan(segmentation_scores(one, empty)["hd95"])


def test_segmentation_trains_on_the_brain_phantom_and_reports_regions(tmp_path):
    dataset = phantom_dataset("brain", 16, spatial_size=(32, 32))
    spec = model_spec("unet", in_channels=4, out_channels=4, channels=(4, 8, 16))
    torch.manual_seed(0)
    model = create_model(spec["name"], **spec["kwargs"])
    context = DistributedContext(0, 0, 1, torch.device("cpu"))
    config = LoopConfig(max_steps=30, batch_size=8, learning_rate=3e-3, log_every=1)
    fit(model=model, dataset=dataset, task=BRATS, config=config, context=context,
        run_dir=tmp_path, spec={"model": spec})  # fmt: skip
    losses = [row["loss"] for row in read_log(tmp_path)]
    # Dice + CE starts near 2.3 (Dice ~1 on small classes); training must bring it down.
    assert sum(losses[-5:]) < 0.92 * sum(losses[:5])
    loader = torch.utils.data.DataLoader(dataset, batch_size=8)
    metrics = BRATS.evaluate(model, loader, torch.device("cpu"))
    for name in ("necrotic_core", "oedema", "enhancing_tumour", *BRATS_REGIONS, "mean"):
        assert 0.0 <= metrics[f"dice/{name}"] <= 1.0
        if name != "mean":
            assert 0.0 <= metrics[f"global_dice/{name}"] <= 1.0
    assert (tmp_path / "previews").is_dir()
