"""Localisation task: metrics against hand-computed values, boxes from masks against the
phantoms' own boxes, the box encoding, the localizer network and a real (tiny) training run."""

from __future__ import annotations

import math

import pytest
import torch

from ctxrestore.data.phantoms import get_phantom, phantom_dataset
from ctxrestore.data.phantoms.base import mask_box
from ctxrestore.errors import CtxRestoreError
from ctxrestore.models import build_model, create_model
from ctxrestore.tasks.localize import (
    KEEP_COMPONENT_FRACTION,
    MIN_ORGAN_FRACTION,
    LocalizationTask,
    box_iou,
    box_mask_loss,
    box_masks,
    boxes_from_masks,
    decode_box_masks,
    decode_boxes,
    encode_boxes,
    localization_metrics,
    organ_labels,
    organ_masks,
    organ_probabilities,
    tight_boxes,
)

DIMS = (2, 3)
TINY_ENCODER = {"stage_channels": (4, 8, 8, 16, 16), "convs_per_stage": (1, 1, 1, 1, 1)}


def box(first, last) -> list:
    return [list(first), list(last)]


def test_metrics_against_hand_computed_values():
    organs = ("liver", "spleen", "kidney")
    # Image 0, liver: truth rows 2..6 x cols 4..10 (24 px), prediction rows 3..7 x cols 5..9
    # (16 px); overlap rows 3..6 x cols 5..9 = 12 px -> IoU 12 / (24 + 16 - 12) = 3/7 < 0.5.
    # Spacing (2, 0.5) mm: every wall is off by one voxel -> walls 2, 0.5, 2, 0.5 mm, mean
    # 1.25; centres (4, 7) and (5, 7) -> 1 voxel along rows = 2 mm.
    # Image 1, liver: exact. Spleen: present but predicted absent (IoU 0); its box is off by
    # (1, 2) at both walls -> mean wall 1.5 mm, centre sqrt(1 + 4) mm.
    # Spleen is absent in images 0 and 2 and predicted present in image 0: false alarms 1/2.
    # The kidney is never present: NaN, and left out of the means.
    zero = box((0, 0), (0, 0))
    true_boxes = torch.tensor(
        [
            [box((2, 4), (6, 10)), zero, zero],
            [box((1, 1), (5, 5)), box((0, 0), (4, 4)), zero],
            [zero, zero, zero],
        ],
        dtype=torch.float32,
    )
    predicted_boxes = torch.tensor(
        [
            [box((3, 5), (7, 9)), box((0, 0), (3, 3)), zero],
            [box((1, 1), (5, 5)), box((1, 2), (5, 6)), zero],
            [box((0, 0), (2, 2)), zero, zero],
        ],
        dtype=torch.float32,
    )
    true_present = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.float32)
    predicted_present = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    spacing = torch.tensor([[2.0, 0.5], [1.0, 1.0], [1.0, 1.0]])

    metrics = localization_metrics(
        predicted_boxes, predicted_present, true_boxes, true_present, spacing, organs
    )

    assert metrics["iou/liver"] == pytest.approx((3 / 7 + 1) / 2)
    assert metrics["wall_mm/liver"] == pytest.approx((1.25 + 0) / 2)
    assert metrics["centre_mm/liver"] == pytest.approx((2.0 + 0) / 2)
    assert metrics["detection_rate/liver"] == pytest.approx(1 / 2)
    assert metrics["false_alarm_rate/liver"] == 0.0
    assert metrics["iou/spleen"] == 0.0
    assert metrics["detection_rate/spleen"] == 0.0
    assert metrics["wall_mm/spleen"] == pytest.approx(1.5)
    assert metrics["centre_mm/spleen"] == pytest.approx(math.sqrt(5))
    assert metrics["false_alarm_rate/spleen"] == pytest.approx(1 / 2)
    for metric in ("iou", "wall_mm", "centre_mm", "detection_rate"):
        assert math.isnan(metrics[f"{metric}/kidney"])
    assert metrics["false_alarm_rate/kidney"] == 0.0
    assert metrics["iou/mean"] == pytest.approx((5 / 7 + 0) / 2)
    assert metrics["wall_mm/mean"] == pytest.approx((0.625 + 1.5) / 2)
    assert metrics["centre_mm/mean"] == pytest.approx((1 + math.sqrt(5)) / 2)
    assert metrics["detection_rate/mean"] == pytest.approx(1 / 4)


def test_false_alarm_rate_is_nan_for_an_organ_never_absent():
    boxes = torch.tensor([[box((0, 0), (2, 2))]], dtype=torch.float32)
    present = torch.ones(1, 1)
    metrics = localization_metrics(boxes, present, boxes, present, torch.ones(1, 2), ["liver"])
    assert metrics["iou/liver"] == 1.0 and metrics["detection_rate/liver"] == 1.0
    assert math.isnan(metrics["false_alarm_rate/liver"])


def test_metrics_refuse_mismatched_shapes():
    boxes = torch.zeros(2, 1, 2, 2)
    with pytest.raises(CtxRestoreError, match="O = 2 organs"):
        localization_metrics(
            boxes, torch.ones(2, 1), boxes, torch.ones(2, 1), torch.ones(2, 2), ["a", "b"]
        )


def test_box_iou_in_3d_by_hand():
    a = torch.tensor([[0.0, 0, 0], [2, 2, 2]])  # 8 voxels
    b = torch.tensor([[1.0, 1, 1], [3, 3, 4]])  # 2 * 2 * 3 = 12 voxels, 1 shared
    assert box_iou(a, b) == pytest.approx(1 / 19)
    assert box_iou(a, a) == pytest.approx(1.0)
    far = torch.tensor([[5.0, 5, 5], [6, 6, 6]])
    assert box_iou(a, far) == 0.0
    empty = torch.zeros(2, 3)
    assert box_iou(empty, empty) == 0.0
    # Broadcasting over leading axes.
    assert box_iou(torch.stack([a, b]), a).tolist() == pytest.approx([1.0, 1 / 19])


def test_boxes_from_masks_equal_the_phantom_boxes():
    info = get_phantom("abdomen")
    values = [value for value in info.labels if value != 0]
    dataset = phantom_dataset("abdomen", 4, spatial_size=(64, 64))
    masks = torch.stack([dataset[index]["mask"] for index in range(len(dataset))])
    boxes, present = boxes_from_masks(masks, values)
    assert boxes.shape == (4, len(values), 2, 2) and boxes.dtype == torch.float32
    assert present.shape == (4, len(values)) and present.dtype == torch.float32
    assert (present == 0).any(), "the sample should include an organ out of view"
    for image in range(len(dataset)):
        for organ, value in enumerate(values):
            expected = mask_box((masks[image] == value).numpy())
            if expected is None:
                assert present[image, organ] == 0
                assert (boxes[image, organ] == 0).all()
            else:
                assert present[image, organ] == 1
                assert boxes[image, organ].tolist() == [list(expected[0]), list(expected[1])]
                # The phantom records the same boxes.
                name = info.labels[value]
                assert dataset.sample(image).boxes[name] == expected


def test_boxes_from_masks_in_3d():
    mask = torch.zeros(1, 6, 7, 8, dtype=torch.int64)
    mask[0, 1:3, 2:7, 0:1] = 4
    mask[0, 5, 6, 7] = 4  # a second blob of the same organ widens its box
    boxes, present = boxes_from_masks(mask, [4, 9])
    assert present.tolist() == [[1.0, 0.0]]
    assert boxes[0, 0].tolist() == [[1, 2, 0], [6, 7, 8]]
    assert boxes[0, 1].tolist() == [[0, 0, 0], [0, 0, 0]]


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_decode_inverts_the_encoding(spatial_dims):
    spatial_size = (40, 48, 56)[:spatial_dims]
    boxes = torch.tensor(
        [[[3.0, 10, 20][:spatial_dims], [30, 17, 51][:spatial_dims]]]
    )  # (O=1, 2, D), inside the image
    parameters = encode_boxes(boxes, spatial_size)
    logits = torch.tensor([[2.0]])
    outputs = torch.cat([logits, parameters], dim=-1)[None]  # (B=1, O=1, 1 + 2D)
    presence, decoded = decode_boxes(outputs, spatial_size)
    assert presence.shape == (1, 1) and presence.item() == pytest.approx(torch.sigmoid(logits))
    assert decoded.shape == (1, 1, 2, spatial_dims)
    torch.testing.assert_close(decoded[0], boxes, atol=1e-3, rtol=0)


def test_decoded_boxes_stay_inside_the_image():
    outputs = torch.tensor([[[0.0, 10.0, -10.0, 10.0, 10.0]]])  # centres at the edges, full size
    _, boxes = decode_boxes(outputs, (32, 16))
    assert (boxes >= 0).all()
    assert (boxes[..., 0] <= 32).all() and (boxes[..., 1] <= 16).all()
    with pytest.raises(CtxRestoreError, match="1 \\+ 2 \\* 3 = 7 values"):
        decode_boxes(outputs, (32, 16, 8))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_localizer_output_shape(spatial_dims):
    model = create_model(
        "localizer", spatial_dims=spatial_dims, in_channels=2, num_organs=3, **TINY_ENCODER
    )
    for side in (16, 32):  # one downsampling factor per axis still passes the neck's pooling
        x = torch.randn(2, 2, *(side,) * spatial_dims)
        assert model(x).shape == (2, 3, 1 + 2 * spatial_dims)
    with pytest.raises(CtxRestoreError, match="not divisible"):
        model(torch.randn(1, 2, *(24,) * spatial_dims))


def test_localizer_encoder_matches_the_pretraining_encoder():
    width = 4
    localizer = create_model(
        "localizer",
        stage_channels=(width, 2 * width, 4 * width, 8 * width, 8 * width),
        convs_per_stage=(2, 2, 3, 3, 3),
    )
    sononet = create_model("sononet", width=width)

    def encoder_shapes(model):
        return {k: v.shape for k, v in model.state_dict().items() if k.startswith("encoder.")}

    assert encoder_shapes(localizer) == encoder_shapes(sononet)
    localizer.load_state_dict(
        {k: v for k, v in sononet.state_dict().items() if k.startswith("encoder.")}, strict=False
    )


def test_network_spec_builds_the_localizer_around_the_encoder():
    task = LocalizationTask(("liver", "spleen"))
    encoder = create_model("sononet", width=4).encoder.config()
    spec = task.network_spec(3, 1, encoder)
    assert spec["name"] == "localizer" and spec["kwargs"]["num_organs"] == 2
    assert spec["encoder"] == encoder
    assert set(spec["prefixes"]) == {"encoder", "neck", "head"}
    model = build_model(spec)
    assert model(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 2, 7)


def test_task_validation_json_and_balancing(caplog):
    with pytest.raises(CtxRestoreError, match="distinct organ names"):
        LocalizationTask(("liver", "liver"))
    with pytest.raises(CtxRestoreError, match="presence_weights must be 2"):
        LocalizationTask(("liver", "spleen"), presence_weights=(1.0,))
    with pytest.raises(CtxRestoreError, match=r"2 finite values > 0, one per organ"):
        LocalizationTask(("liver", "spleen"), presence_weights=(0.0, 1.0))
    task = LocalizationTask(("liver", "spleen", "kidney", "aorta"))
    assert task.name == "localize" and task.metric == "iou/mean"
    assert task.to_json() == {
        "name": "localize",
        "organ_names": list(task.organ_names),
        "box_head": "regression",
    }
    assert LocalizationTask.from_json(task.to_json()) == task
    mask_head = LocalizationTask(("liver",), box_head="mask")
    assert LocalizationTask.from_json(mask_head.to_json()) == mask_head
    # A task written before box heads existed is the regression head's.
    assert LocalizationTask.from_json({"name": "localize", "organ_names": ["liver"]}).box_head == (
        "regression"
    )
    with pytest.raises(CtxRestoreError, match="unknown box head 'heatmap'; box heads: regr"):
        LocalizationTask(("liver",), box_head="heatmap")
    # liver in 3 of 4 items (1/3), spleen in 1 (3), kidney never (1, warned), aorta always
    # (0, clipped to 0.1).
    present = [[1, 1, 0, 1], [1, 0, 0, 1], [1, 0, 0, 1], [0, 0, 0, 1]]
    items = [{"present": torch.tensor(flags, dtype=torch.float32)} for flags in present]
    with caplog.at_level("WARNING"):
        balanced = task.balanced(items)
    assert balanced.presence_weights == pytest.approx((1 / 3, 3.0, 1.0, 0.1))
    assert "kidney" in caplog.text
    assert balanced.organ_names == task.organ_names
    with pytest.raises(CtxRestoreError, match="no 'present'"):
        task.balanced([{"image": torch.zeros(1, 4, 4)}])


def squares(count: int, seed: int, side: int = 64) -> dict[str, torch.Tensor]:
    """Images with one bright square (the "organ") at a random place, absent in every 4th."""
    generator = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.randn(count, 1, side, side, generator=generator)
    masks = torch.zeros(count, side, side, dtype=torch.int64)
    for index in range(count):
        if index % 4 == 3:
            continue
        size = int(torch.randint(12, 24, (), generator=generator))
        row, column = torch.randint(0, side - size, (2,), generator=generator).tolist()
        masks[index, row : row + size, column : column + size] = 1
    images += masks[:, None].float()
    boxes, present = boxes_from_masks(masks, [1])
    spacing = torch.ones(count, 2)
    return {"image": images, "mask": masks, "boxes": boxes, "present": present, "spacing": spacing}


def train_on(task, model, train: dict, steps: int, learning_rate: float, generator) -> list:
    """Adam on batches of 16 of the 64 training squares in turn; the loss of every step."""
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    losses = []
    model.train()
    for step in range(steps):
        start = (step % 4) * 16
        batch = {key: value[start : start + 16] for key, value in train.items()}
        loss = task.training_loss(model, batch, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_training_reduces_the_loss_and_beats_an_untrained_net(tmp_path):
    torch.manual_seed(0)
    task = LocalizationTask(("square",))
    model = create_model("localizer", num_organs=1, hidden_features=32, **TINY_ENCODER)
    train, test = squares(64, seed=1), squares(32, seed=2)
    task = task.balanced([{"present": train["present"]}])
    untrained = task.evaluate(model, [test], torch.device("cpu"))

    generator = torch.Generator().manual_seed(0)
    losses = train_on(task, model, train, steps=40, learning_rate=3e-3, generator=generator)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])

    trained = task.evaluate(model, [test], torch.device("cpu"))
    # Untrained: presence 0.5 is not "present", so every IoU is 0.
    assert trained["iou/mean"] > untrained["iou/mean"] + 0.2
    assert trained["detection_rate/mean"] > 0
    prediction = task.predict(model, test["image"][:3])
    assert prediction["presence"].shape == prediction["present"].shape == (3, 1)
    assert prediction["present"].dtype == torch.bool
    assert prediction["boxes"].shape == (3, 1, 2, 2)
    preview_batch = {key: value[:4] for key, value in test.items()}
    task.save_preview(tmp_path / "preview.png", model, preview_batch, generator)
    assert (tmp_path / "preview.png").stat().st_size > 0


def test_training_loss_refuses_boxes_for_other_organs():
    task = LocalizationTask(("liver", "spleen"))
    model = create_model("localizer", num_organs=2, hidden_features=8, **TINY_ENCODER)
    batch = squares(2, seed=0, side=32)  # boxes for one organ
    with pytest.raises(CtxRestoreError, match="do not fit 2 organs"):
        task.training_loss(model, batch, torch.Generator())


# ----------------------------------------------------------------------------- the mask head
def test_box_masks_by_hand_and_back_to_the_boxes():
    boxes = torch.tensor([[box((1, 0), (3, 2)), box((0.4, 2.6), (1.6, 4.0)), box((0, 0), (4, 4))]])
    masks = box_masks(boxes, torch.tensor([[1.0, 1.0, 0.0]]), (4, 4))
    assert masks.shape == (1, 3, 4, 4) and masks.dtype == torch.float32
    expected = torch.zeros(4, 4)
    expected[1:3, 0:2] = 1
    assert torch.equal(masks[0, 0], expected)
    # Fractional walls: a voxel is inside when its centre (index + 0.5) is.
    assert masks[0, 1].nonzero().tolist() == [[0, 3], [1, 3]]
    assert masks[0, 2].sum() == 0  # absent: no mask, whatever its box says
    back, present = tight_boxes(masks > 0.5)
    assert back[0, 0].tolist() == box((1, 0), (3, 2)) and present.tolist() == [[1.0, 1.0, 0.0]]
    assert back[0, 2].tolist() == box((0, 0), (0, 0))


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_box_masks_of_phantom_boxes_give_them_back(spatial_dims):
    generator = torch.Generator().manual_seed(3)
    size = (9, 10, 11)[:spatial_dims]
    first = torch.stack([torch.randint(0, s - 1, (6,), generator=generator) for s in size], -1)
    extent = torch.stack([torch.randint(1, s, (6,), generator=generator) for s in size], -1)
    last = torch.minimum(first + extent, torch.tensor(size))
    boxes = torch.stack([first, last], dim=-2).float().view(2, 3, 2, spatial_dims)
    present = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    masks = box_masks(boxes, present, size)
    back, back_present = tight_boxes(masks > 0.5)
    assert torch.equal(back_present, present)
    assert torch.equal(back, boxes * present[..., None, None])
    # The mask holds exactly the box's voxels.
    assert torch.equal(masks.flatten(2).sum(-1), (last - first).prod(-1).view(2, 3) * present)


def test_decode_box_masks_presence_boxes_and_the_best_guess_when_absent():
    logits = torch.full((1, 2, 6, 8), -6.0)
    logits[0, 0, 1:4, 2:7] = 3.0  # organ 0: a confident rectangle
    logits[0, 1, 2:5, 0:2] = -1.0  # organ 1: nothing passes 0.5; its best guess is this
    logits[0, 1, 4, 1] = -0.5
    presence, present, boxes = decode_box_masks(torch.sigmoid(logits))
    assert presence[0].tolist() == pytest.approx(torch.sigmoid(torch.tensor([3.0, -0.5])).tolist())
    assert present.tolist() == [[True, False]]
    assert boxes[0, 0].tolist() == box((1, 2), (4, 7))
    assert boxes[0, 1].tolist() == box((2, 0), (5, 2))
    task = LocalizationTask(("a", "b"), box_head="mask")
    predicted = task.predict(torch.nn.Identity(), logits)
    assert predicted["present"].tolist() == [[True, False]]
    assert torch.equal(predicted["boxes"], boxes)
    with pytest.raises(CtxRestoreError, match="do not fit 3 organs"):
        organ_probabilities(logits, 3, "mask")


@pytest.mark.parametrize("spatial_dims", DIMS)
def test_decode_box_masks_drops_stray_pieces_and_keeps_an_organ_in_two(spatial_dims):
    size = (16, 16, 16)[:spatial_dims]
    logits = torch.full((1, 3, *size), -6.0)
    body = (slice(2, 8),) * spatial_dims
    logits[(0, 0, *body)] = 4.0  # organ 0: a cube and a one-voxel blob far away
    logits[(0, 0, *(14,) * spatial_dims)] = 4.0
    logits[(0, 1, *body)] = 4.0  # organ 1: two pieces, the second over half the first's size
    second = (slice(10, 15),) * spatial_dims
    logits[(0, 1, *second)] = 4.0
    assert 5**spatial_dims >= KEEP_COMPONENT_FRACTION * 6**spatial_dims
    logits[(0, 2, *body)] = -1.0  # organ 2: below threshold, a blob on the best guess too
    logits[(0, 2, *(14,) * spatial_dims)] = -0.9
    logits[(0, 2, *(3,) * spatial_dims)] = -0.8
    _, present, boxes = decode_box_masks(torch.sigmoid(logits))
    assert present.tolist() == [[True, True, False]]
    cube = torch.tensor([[2.0] * spatial_dims, [8.0] * spatial_dims])
    assert torch.equal(boxes[0, 0], cube)
    assert torch.equal(boxes[0, 1], torch.tensor([[2.0] * spatial_dims, [15.0] * spatial_dims]))
    assert torch.equal(boxes[0, 2], cube)


def test_decode_box_masks_counts_specks_absent():
    logits = torch.full((1, 2, 64, 64), -6.0)
    least = math.ceil(MIN_ORGAN_FRACTION * 64 * 64)  # 3 pixels at 64^2
    logits[0, 0, 10, 10 : 10 + least - 1] = 5.0  # one pixel short of an organ
    logits[0, 1, 30, 30 : 30 + least] = 5.0
    presence, present, boxes = decode_box_masks(torch.sigmoid(logits))
    assert presence.min() > 0.99 and present.tolist() == [[False, True]]
    # The speck's box is still its best guess, for the wall distance.
    assert boxes[0, 0].tolist() == box((10, 10), (11, 10 + least - 1))


def test_box_mask_loss_prefers_the_true_boxes():
    boxes = torch.tensor([[box((1, 2), (4, 7))], [box((0, 0), (0, 0))]])
    present = torch.tensor([[1.0], [0.0]])
    target = box_masks(boxes, present, (6, 8))
    right = box_mask_loss(10 * (2 * target - 1), boxes, present)
    shifted = box_mask_loss(10 * (2 * target.roll(2, dims=-1) - 1), boxes, present)
    assert right < 0.01 < 1.0 < shifted
    with pytest.raises(CtxRestoreError, match="do not fit 1 organs"):
        box_mask_loss(torch.zeros(2, 2, 6, 8), boxes, present)


def test_mask_network_spec_is_a_unet_on_the_encoder_that_takes_a_sononet_unet_whole():
    task = LocalizationTask(("liver", "spleen"), box_head="mask")
    pretraining = create_model("sononet_unet", width=4)
    spec = task.network_spec(2, 1, pretraining.encoder.config())
    assert spec["name"] == "unet" and spec["kwargs"]["out_channels"] == 2
    assert set(spec["prefixes"]) == {"encoder", "decoder", "head"}
    model = build_model(spec)
    shapes = {k: v.shape for k, v in pretraining.state_dict().items() if not k.startswith("head")}
    assert shapes == {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head")}
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 2, 32, 32)


@pytest.mark.parametrize(("box_head", "organ_values"), [("mask", None), ("segment", (1,))])
def test_unet_head_training_learns_the_boxes(tmp_path, box_head, organ_values):
    torch.manual_seed(0)
    task = LocalizationTask(("square",), box_head=box_head, organ_values=organ_values)
    model = build_model(task.network_spec(2, 1, {**TINY_ENCODER, "norm": "batch"}))
    train, test = squares(64, seed=1), squares(32, seed=2)
    untrained = task.evaluate(model, [test], torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    losses = train_on(task, model, train, steps=60, learning_rate=1e-2, generator=generator)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    trained = task.evaluate(model, [test], torch.device("cpu"))
    assert trained["iou/mean"] > max(0.9, untrained["iou/mean"] + 0.5)
    assert trained["detection_rate/mean"] > 0.9 and trained["false_alarm_rate/mean"] < 0.2
    task.save_preview(tmp_path / "preview.png", model, test, generator)
    assert (tmp_path / "preview.png").stat().st_size > 0


def test_the_mask_head_learns_the_organs_where_the_data_has_label_maps():
    label_maps = torch.zeros(2, 6, 8, dtype=torch.int64)
    label_maps[0, 1:4, 2:4] = 7  # an L-shaped organ: its box holds voxels that are not it
    label_maps[0, 1, 4:7] = 7
    label_maps[1, 2:5, 0:3] = 3
    masks = organ_masks(label_maps, (7, 3))
    assert masks.shape == (2, 2, 6, 8) and masks.dtype == torch.float32
    assert masks[0, 0].sum() == 9 and masks[0, 1].sum() == 0 and masks[1, 1].sum() == 9
    boxes, present = boxes_from_masks(label_maps, [7, 3])
    batch = {"image": 10 * (2 * masks - 1), "mask": label_maps, "boxes": boxes, "present": present}
    organs = LocalizationTask(("a", "b"), box_head="mask", organ_values=(7, 3))
    boxes_only = LocalizationTask(("a", "b"), box_head="mask")
    # The model returns its input: logits that paint exactly the organs.
    on_organs = organs.training_loss(torch.nn.Identity(), batch, torch.Generator())
    on_boxes = boxes_only.training_loss(torch.nn.Identity(), batch, torch.Generator())
    assert on_organs < 0.01 < 0.1 < on_boxes
    # The decoded boxes are the organs' boxes (an absent organ's best guess, a uniform
    # map's, is the whole image).
    predicted = organs.predict(torch.nn.Identity(), batch["image"])
    assert torch.equal(predicted["present"].float(), present)
    assert torch.equal(predicted["boxes"][present > 0], boxes[present > 0])
    assert predicted["boxes"][0, 1].tolist() == box((0, 0), (6, 8))
    with pytest.raises(CtxRestoreError, match="organ_values must be 2 distinct label values"):
        LocalizationTask(("a", "b"), organ_values=(7, 7))


def test_a_head_bias_is_one_value_or_one_per_channel():
    from ctxrestore.models.heads import ConvHead

    assert ConvHead(2, 4, 3, bias=[1.0, 2.0, 3.0]).conv.bias.tolist() == [1.0, 2.0, 3.0]
    assert ConvHead(2, 4, 3, bias=-2.0).conv.bias.tolist() == [-2.0] * 3
    with pytest.raises(CtxRestoreError, match="one value or 3"):
        ConvHead(2, 4, 3, bias=[1.0, 2.0])


def test_mask_head_outputs_start_at_the_prior():
    task = LocalizationTask(("liver", "spleen"), box_head="mask")
    spec = task.network_spec(2, 1, {**TINY_ENCODER, "norm": "batch"})
    bias = build_model(spec).head.conv.bias
    assert torch.sigmoid(bias).tolist() == pytest.approx([0.01, 0.01])


def test_organ_labels_number_the_organs_after_the_background():
    label_maps = torch.tensor([[[0, 7, 7], [3, 5, 0]]])  # 5: a label that is not an organ
    labels = organ_labels(label_maps, (7, 3))
    assert labels.dtype == torch.int64
    assert labels.tolist() == [[[[0, 1, 1], [2, 0, 0]]]]


def test_the_segment_head_learns_the_organs_label_map_and_boxes_it():
    label_maps = torch.zeros(2, 6, 8, dtype=torch.int64)
    label_maps[0, 1:4, 2:4] = 7  # an L-shaped organ
    label_maps[0, 1, 4:7] = 7
    label_maps[1, 2:5, 0:3] = 3
    label_maps[1, 0, 6] = 9  # not an organ: background to the head
    boxes, present = boxes_from_masks(label_maps, [7, 3])
    one_hot = torch.nn.functional.one_hot(organ_labels(label_maps, (7, 3))[:, 0], 3)
    right = 10 * (2 * one_hot.permute(0, 3, 1, 2).float() - 1)
    batch = {"image": right, "mask": label_maps, "boxes": boxes, "present": present}
    task = LocalizationTask(("a", "b"), box_head="segment", organ_values=(7, 3))
    # The model returns its input: logits that paint exactly background and organs.
    on_organs = task.training_loss(torch.nn.Identity(), batch, torch.Generator())
    swapped = {**batch, "image": right[:, [0, 2, 1]]}  # the two organs' channels swapped
    assert on_organs < 0.01 < 1.0 < task.training_loss(torch.nn.Identity(), swapped, None)
    predicted = task.predict(torch.nn.Identity(), right)
    assert torch.equal(predicted["present"].float(), present)
    assert torch.equal(predicted["boxes"][present > 0], boxes[present > 0])
    # Organ probabilities are the softmax's organ channels, background dropped.
    probabilities = organ_probabilities(right, 2, "segment")
    assert torch.allclose(probabilities, right.softmax(dim=1)[:, 1:])
    with pytest.raises(CtxRestoreError, match=r"expected \(B, 3, H, W\).*background"):
        organ_probabilities(right[:, :2], 2, "segment")
    boxes_only = LocalizationTask(("a", "b"), box_head="segment")
    with pytest.raises(CtxRestoreError, match="boxes only"):
        boxes_only.training_loss(torch.nn.Identity(), batch, torch.Generator())


def test_segment_network_spec_has_a_background_channel_and_takes_a_sononet_unet_whole():
    task = LocalizationTask(("liver", "spleen"), box_head="segment", organ_values=(1, 2))
    pretraining = create_model("sononet_unet", width=4)
    model = build_model(task.network_spec(2, 1, pretraining.encoder.config()))
    shapes = {k: v.shape for k, v in pretraining.state_dict().items() if not k.startswith("head")}
    assert shapes == {k: v.shape for k, v in model.state_dict().items() if not k.startswith("head")}
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3, 32, 32)
    # The softmax starts at the prior: each organ 1%, the background the rest.
    assert model.head.conv.bias.softmax(0).tolist() == pytest.approx([0.98, 0.01, 0.01])
