"""Classification task: metrics against hand-computed values, the classifier network, class
balancing, and a short real training run."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_confusion_matrix
from ctxrestore.models import build_model, create_model, model_spec
from ctxrestore.tasks.classify import (
    ClassificationTask,
    classification_metrics,
    confusion_matrix,
)

TINY = dict(stage_channels=(4, 8), convs_per_stage=(1, 1))


def test_metrics_against_a_hand_worked_example():
    # Truth a a a a b b b c, prediction a a a b b c a c:
    #            predicted a  b  c
    #   truth a            3  1  0   precision a 3/4, b 1/2, c 1/2
    #   truth b            1  1  1   recall    a 3/4, b 1/3, c 1/1
    #   truth c            0  0  1   F1        a 3/4, b 2/5, c 2/3
    true = [0, 0, 0, 0, 1, 1, 1, 2]
    predicted = [0, 0, 0, 1, 1, 2, 0, 2]
    assert confusion_matrix(true, predicted, 3).tolist() == [[3, 1, 0], [1, 1, 1], [0, 0, 1]]
    metrics = classification_metrics(torch.tensor(true), torch.tensor(predicted), ("a", "b", "c"))
    expected = {
        "precision/a": 3 / 4, "precision/b": 1 / 2, "precision/c": 1 / 2,
        "recall/a": 3 / 4, "recall/b": 1 / 3, "recall/c": 1.0,
        "f1/a": 3 / 4, "f1/b": 2 / 5, "f1/c": 2 / 3,
        "support/a": 4, "support/b": 3, "support/c": 1,
        "macro_precision": 7 / 12,  # (3/4 + 1/2 + 1/2) / 3
        "macro_recall": 25 / 36,  # (3/4 + 1/3 + 1) / 3
        "macro_f1": 109 / 180,  # (3/4 + 2/5 + 2/3) / 3
        "accuracy": 5 / 8,
    }  # fmt: skip
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def test_a_never_predicted_class_has_precision_zero_and_counts_in_the_macro_mean():
    metrics = classification_metrics([0, 1, 2], [0, 0, 0], ("a", "b", "c"))
    assert metrics["precision/b"] == 0.0 and metrics["precision/c"] == 0.0
    assert metrics["recall/b"] == 0.0 and metrics["f1/c"] == 0.0
    assert metrics["f1/a"] == pytest.approx(1 / 2)  # precision 1/3, recall 1
    assert metrics["macro_f1"] == pytest.approx(1 / 6)


def test_metrics_refuse_bad_labels():
    with pytest.raises(CtxRestoreError, match=r"class indices \[3\] outside 0..2"):
        classification_metrics([0, 3], [0, 1], ("a", "b", "c"))
    with pytest.raises(CtxRestoreError, match="one prediction per label"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(CtxRestoreError, match="at least one"):
        classification_metrics([], [], ("a", "b"))


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_classifier_outputs_logits_per_class(spatial_dims, in_channels):
    model = create_model(
        "classifier", spatial_dims=spatial_dims, in_channels=in_channels, num_classes=5,
        stage_channels=(4, 8, 16), convs_per_stage=(1, 2, 2),
    )  # fmt: skip
    images = torch.randn(2, in_channels, *(16,) * spatial_dims)
    assert model(images).shape == (2, 5)
    wrong = torch.randn(2, in_channels + 1, *(16,) * spatial_dims)
    with pytest.raises(CtxRestoreError, match="input channel"):
        model(wrong)


def test_classifier_encoder_takes_the_sononet_pretraining_weights():
    sononet = create_model("sononet", width=4)
    classifier = create_model(
        "classifier", num_classes=3, stage_channels=(4, 8, 16, 32, 32),
        convs_per_stage=(2, 2, 3, 3, 3),
    )  # fmt: skip

    def encoder_shapes(model):
        return {
            key: tuple(value.shape)
            for key, value in model.state_dict().items()
            if key.startswith("encoder.")
        }

    assert encoder_shapes(classifier) == encoder_shapes(sononet)
    classifier.encoder.load_state_dict(sononet.encoder.state_dict())  # strict


def test_network_spec_builds_around_the_pretrained_encoder_and_is_json():
    task = ClassificationTask(("background", "heart", "brain"))
    pretrained = model_spec("sononet", width=4)
    spec = json.loads(json.dumps(task.network_spec(2, 1, pretrained["encoder"])))
    assert spec["name"] == "classifier" and spec["kwargs"]["num_classes"] == 3
    assert spec["encoder"] == pretrained["encoder"]
    assert spec["prefixes"] == {"encoder": "encoder.", "head": "head."}
    assert build_model(spec)(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    assert model_spec("classifier")["kwargs"]["adaptation_channels"] is None


def test_task_refuses_bad_configuration_and_round_trips_through_json():
    with pytest.raises(CtxRestoreError, match="distinct class names"):
        ClassificationTask(("a", "a"))
    with pytest.raises(CtxRestoreError, match="one per class"):
        ClassificationTask(("a", "b"), class_weights=(1.0,))
    with pytest.raises(CtxRestoreError, match=r"2 finite values >= 0, one per class \('a', 'b'\)"):
        ClassificationTask(("a", "b"), class_weights=(1.0, float("nan")))
    assert ClassificationTask(("a", "b"), class_weights=(0, 1)).class_weights == (0.0, 1.0)
    task = ClassificationTask(("a", "b"), class_weights=(1.0, 2.0))
    assert task.name == "classify" and task.metric == "macro_f1"
    rebuilt = ClassificationTask.from_json(json.loads(json.dumps(task.to_json())))
    assert rebuilt == ClassificationTask(("a", "b"))
    with pytest.raises(CtxRestoreError, match="not a classification task"):
        ClassificationTask.from_json({"name": "segment"})


def _items(labels):
    return [{"label": torch.tensor(label)} for label in labels]


def test_balanced_weighs_the_rarer_class_more():
    task = ClassificationTask(("common", "rare")).balanced(_items([0, 0, 0, 1]))
    assert task.class_weights == pytest.approx((4 / (2 * 3), 4 / (2 * 1)))
    # 30 against 1: inverse frequency gives 31/60 and 31/2, clipped to 10x the smallest.
    clipped = ClassificationTask(("common", "rare")).balanced(_items([0] * 30 + [1]))
    assert clipped.class_weights == pytest.approx((31 / 60, 10 * 31 / 60))


def test_balanced_gives_an_absent_class_the_largest_weight_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ctxrestore.tasks.classify"):
        task = ClassificationTask(("a", "b", "c")).balanced(_items([0, 0, 0, 1]))
    assert task.class_weights == pytest.approx((4 / 9, 4 / 3, 4 / 3))
    assert "'c'" in caplog.text
    with pytest.raises(CtxRestoreError, match=r"outside 0..2"):
        task.balanced(_items([0, 5]))


def _bright_and_dark(count, generator):
    """Half the images bright (class 1), half dark (class 0), with noise: trivially separable."""
    labels = torch.arange(count) % 2
    images = 0.3 + 0.4 * labels[:, None, None, None].float()
    images = images + 0.1 * torch.randn(count, 1, 16, 16, generator=generator)
    return images, labels


def test_training_loss_decreases_and_evaluate_reports_the_metric(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, labels = _bright_and_dark(32, generator)
    task = ClassificationTask(("dark", "bright"))
    task = task.balanced(_items(labels.tolist()))
    torch.manual_seed(0)
    spec = task.network_spec(2, 1, {**TINY, "norm": "batch"})
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        chosen = torch.arange(16) + 16 * (step % 2)
        loss = task.training_loss(
            model, {"image": images[chosen], "label": labels[chosen]}, generator
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])

    test_images, test_labels = _bright_and_dark(16, torch.Generator().manual_seed(1))
    batches = [{"image": test_images[:8], "label": test_labels[:8]},
               {"image": test_images[8:], "label": test_labels[8:]}]  # fmt: skip
    metrics = task.evaluate(model, batches, torch.device("cpu"))
    assert metrics[task.metric] >= 0.9 and metrics["support/bright"] == 8

    prediction = task.predict(model, test_images)
    assert prediction["probabilities"].dtype == torch.float32
    assert prediction["probabilities"].shape == (16, 2)
    assert torch.allclose(prediction["probabilities"].sum(dim=1), torch.ones(16))
    assert torch.equal(prediction["label"], prediction["probabilities"].argmax(dim=1))

    task.save_preview(tmp_path / "preview.png", model, batches[0], generator)
    with Image.open(tmp_path / "preview.png") as png:
        assert png.format == "PNG"


def test_training_loss_refuses_labels_outside_the_classes():
    task = ClassificationTask(("a", "b"))
    model = create_model("classifier", **TINY)
    batch = {"image": torch.randn(2, 1, 8, 8), "label": torch.tensor([0, 2])}
    with pytest.raises(CtxRestoreError, match=r"labels \[0, 2\] fall outside"):
        task.training_loss(model, batch, torch.Generator())


def test_preview_of_volumes(tmp_path):
    task = ClassificationTask(("a", "b"))
    model = create_model("classifier", spatial_dims=3, **TINY).eval()
    batch = {"image": torch.randn(3, 1, 8, 8, 8), "label": torch.tensor([0, 1, 1])}
    task.save_preview(tmp_path / "volumes.png", model, batch, torch.Generator())
    assert (tmp_path / "volumes.png").is_file()


def test_save_confusion_matrix_writes_a_png(tmp_path):
    matrix = np.array([[3, 1, 0], [1, 1, 1], [0, 0, 0]])  # an empty truth row too
    path = save_confusion_matrix(tmp_path / "confusion.png", matrix, ("a", "b", "c"), "test")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > 100
    with pytest.raises(CtxRestoreError, match=r"give a \(2, 2\) matrix"):
        save_confusion_matrix(tmp_path / "bad.png", matrix, ("a", "b"))
