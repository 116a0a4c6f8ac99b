"""Organ localisation: one bounding box and a presence score per organ, from a network whose
encoder is transferred (Chen et al. 2019, multi-organ localisation in abdominal CT).

Box parametrisation. Per organ the localizer (models/localizer.py) outputs
[presence logit, D centre parameters, D size parameters]. Through a sigmoid these become the
box centre and size along each axis as fractions of the image extent, so a box can never be
inverted or far outside the image, and the fractions do not depend on the image size. The box
in voxels is derived from them: first = (centre - size / 2) * extent, last = (centre +
size / 2) * extent, clipped to the image. Boxes follow the batch format of tasks/base.py: the
first voxel and one past the last, per spatial axis, as float voxel coordinates.

Loss: binary cross-entropy with logits on presence (pos_weight per organ from
`presence_weights`) plus a smooth-L1 on the normalised first/last coordinates of the organs
present in the truth (an absent organ has no box to learn).

Box heads (`box_head`). "regression" is the paper's: encoder, one more conv stage and a fully
connected head regressing the box parameters above; only the encoder is pretrained. "mask"
goes beyond the paper: a U-Net on the same encoder predicts a mask per organ (one sigmoid
channel per organ; loss BCE + soft Dice): the organ itself where the data has label maps (an
MSD folder, the phantom: `organ_values`), else its filled box. Decoding (`decode_box_masks`):
the pixels above PRESENCE_THRESHOLD, less the connected pieces smaller than
KEEP_COMPONENT_FRACTION of the largest; the organ is present when they cover at least
MIN_ORGAN_FRACTION of the image, and its box is their tight box.
"segment" is the same U-Net with one softmax over the background and the organs, trained
as the segmentation task is (Dice + cross-entropy against the organs' label map; needs label
maps; organs do not overlap). Started at the prior like the mask head, it lost no organ in
10 runs where the mask head's sigmoids lost one in a quarter (docs/experiments.md 32-33).
It decodes as the mask head does, from the organs' softmax probabilities (`organ_probabilities`).
The U-Net heads' decoder has the shape of a U-Net (or `sononet_unet`) pretraining's, so the
restoration network transfers whole, as for segmentation; presence_weights do not apply.

Metrics (`localization_metrics`): per organ the wall distance and the centre distance in mm,
the IoU, the detection rate and the false alarm rate, and their means over organs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from scipy import ndimage
from torch import nn
from torch.nn import functional

from ctxrestore.errors import CtxRestoreError
from ctxrestore.figures import save_labelled_gallery
from ctxrestore.models.spec import model_spec, unet_spec
from ctxrestore.tasks.base import weights_per_name

if TYPE_CHECKING:
    from ctxrestore.tasks.augment import Augmentation

logger = logging.getLogger(__name__)

# Smooth-L1 turns from quadratic to linear at 5% of the image extent: large errors keep a
# constant pull, small ones fade smoothly instead of oscillating around the target.
BOX_LOSS_BETA = 0.05
# `balanced` clips presence pos_weights to this range: a handful of positives (or negatives)
# must not dominate the loss.
PRESENCE_WEIGHT_RANGE = (0.1, 10.0)
# An instance counts as detected when it is predicted present with at least this IoU.
DETECTION_IOU = 0.5
PRESENCE_THRESHOLD = 0.5
PREVIEW_IMAGES = 8
# Fractions are kept this far from 0 and 1 when encoded, where the sigmoid's inverse is finite.
_ENCODE_EPSILON = 1e-4
BOX_HEADS = ("regression", "mask", "segment")
# The box heads that are U-Nets: their decoder transfers from a U-Net (or sononet_unet)
# pretraining.
DECODER_BOX_HEADS = ("mask", "segment")
# The U-Net box heads' organ outputs (mask: sigmoids; segment: softmax shares) start at this
# probability: an organ covers a few percent of the image, and at 0.5 (or 1 / (1 + organs))
# the background's cross-entropy would dominate the first thousand steps.
MASK_PRIOR = 0.01
BOXES_ONLY_MESSAGE = (
    "--box-head segment learns the organs' label map, and this data gives boxes only (a boxes "
    "CSV, or a folder with a boxes.csv and a case without a mask); use --box-head mask, "
    "which learns filled boxes"
)
# The mask head's decoding, both chosen on the validation splits of experiment 30's runs
# (docs/experiments.md 31; means over the 7 that learned every organ). Pieces of an organ's
# mask under half the size of its largest are dropped: an organ can show as two pieces in a
# slice, but stray blobs moved the box walls (wall error 8.51 -> 7.89 mm). An organ needs
# 0.05% of the image (8 pixels at 128^2) to count as present: lone specks were false alarms
# (false-alarm rate 0.35 -> 0.25, balanced presence accuracy 0.826 -> 0.851).
KEEP_COMPONENT_FRACTION = 0.5
MIN_ORGAN_FRACTION = 0.0005


@dataclass(frozen=True)
class LocalizationTask:
    """Organs are indices into `organ_names`: batch "boxes" (B, O, 2, D) and "present" (B, O).

    `presence_weights` (one per organ) is the presence BCE's pos_weight; None weighs presence
    and absence alike. `box_head`: one of BOX_HEADS (module docstring). `organ_values`: the
    organs' label values in the items' "mask" label maps, where the data has them (the mask
    head then learns the organs' masks); None: boxes only.
    """

    organ_names: tuple[str, ...]
    presence_weights: tuple[float, ...] | None = None
    augmentation: Augmentation | None = None
    box_head: str = "regression"
    organ_values: tuple[int, ...] | None = None
    name: str = field(default="localize", init=False)
    metric: str = field(default="iou/mean", init=False)

    def __post_init__(self) -> None:
        names = tuple(self.organ_names)
        if not names or len(set(names)) != len(names):
            raise CtxRestoreError(f"localisation needs >= 1 distinct organ names, got {names}")
        object.__setattr__(self, "organ_names", names)
        check_box_head(self.box_head)
        if self.organ_values is not None:
            values = tuple(int(value) for value in self.organ_values)
            if len(values) != len(names) or len(set(values)) != len(values):
                raise CtxRestoreError(
                    f"organ_values must be {len(names)} distinct label values, one per organ "
                    f"{names}; got {self.organ_values}"
                )
            object.__setattr__(self, "organ_values", values)
        if self.presence_weights is not None:
            weights = weights_per_name(
                "presence_weights", self.presence_weights, names, per="organ", zero_allowed=False
            )
            object.__setattr__(self, "presence_weights", weights)

    @property
    def num_organs(self) -> int:
        return len(self.organ_names)

    def network_spec(self, spatial_dims: int, in_channels: int, encoder: dict) -> dict:
        if self.box_head == "mask":
            prior_logit = math.log(MASK_PRIOR / (1 - MASK_PRIOR))
            return unet_spec(
                spatial_dims, in_channels, self.num_organs, encoder, head_bias=prior_logit
            )
        if self.box_head == "segment":  # background + one channel per organ, at the prior
            organ = min(MASK_PRIOR, 0.5 / self.num_organs)  # the background keeps >= half
            background = 1 - self.num_organs * organ
            prior_logits = [math.log(background)] + [math.log(organ)] * self.num_organs
            return unet_spec(
                spatial_dims, in_channels, self.num_organs + 1, encoder, head_bias=prior_logits
            )
        return model_spec(
            "localizer",
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            num_organs=self.num_organs,
            **encoder,
        )

    def balanced(self, train_items: Sequence[dict[str, torch.Tensor]]) -> LocalizationTask:
        """A copy whose presence pos_weight per organ is negatives / positives in these items,
        clipped to PRESENCE_WEIGHT_RANGE; an organ never present gets 1 (and a warning)."""
        present = _stack_present(train_items, self.num_organs)
        positives = present.sum(dim=0)
        negatives = present.shape[0] - positives
        low, high = PRESENCE_WEIGHT_RANGE
        weights = (negatives / positives.clamp_min(1)).clamp(low, high)
        never = positives == 0
        if never.any():
            missing = [self.organ_names[index] for index in never.nonzero().flatten().tolist()]
            logger.warning(
                "organs %s are never present in the %d training items; their presence cannot "
                "be learnt (pos_weight 1)",
                missing,
                present.shape[0],
            )
            weights[never] = 1.0
        return dataclasses.replace(self, presence_weights=tuple(float(w) for w in weights))

    def training_loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
    ) -> torch.Tensor:
        self.check_head_fits_data()
        uses_masks = self.box_head in DECODER_BOX_HEADS and self.organ_values is not None
        if not uses_masks:  # label maps only the mask head learns: no per-step resampling
            batch = {key: value for key, value in batch.items() if key != "mask"}
        if self.augmentation is not None:
            batch = self.augmentation(batch, generator)
        images = batch["image"]
        spatial_size = images.shape[2:]
        self._check_targets(batch["boxes"], batch["present"], images.shape[0], len(spatial_size))
        outputs = model(images).float()
        boxes, present = batch["boxes"].float(), batch["present"].float()
        if self.box_head == "mask":
            masks = organ_masks(batch["mask"], self.organ_values) if uses_masks else None
            return box_mask_loss(outputs, boxes, present, masks)
        if self.box_head == "segment":
            labels = organ_labels(batch["mask"], self.organ_values)
            return organ_label_loss(outputs, labels, self.num_organs)
        return localization_loss(outputs, boxes, present, spatial_size, self.presence_weights)

    def check_head_fits_data(self) -> None:
        """The segment head learns the organs' label map: data with boxes only (boxes.csv)
        cannot train it."""
        if self.box_head == "segment" and self.organ_values is None:
            raise CtxRestoreError(BOXES_ONLY_MESSAGE)

    def _check_targets(
        self, boxes: torch.Tensor, present: torch.Tensor, batch_size: int, spatial_dims: int
    ) -> None:
        expected = (batch_size, self.num_organs, 2, spatial_dims)
        if tuple(boxes.shape) != expected or tuple(present.shape) != expected[:2]:
            raise CtxRestoreError(
                f"batch 'boxes' {tuple(boxes.shape)} and 'present' {tuple(present.shape)} do "
                f"not fit {self.num_organs} organs {self.organ_names} in {spatial_dims}D: "
                f"expected {expected} and {expected[:2]}"
            )

    def save_preview(
        self,
        path: Path,
        model: nn.Module,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator,
    ) -> None:
        """A gallery with two panels per image: the true boxes, then the boxes predicted
        present. A volume shows its middle slice with the boxes projected onto it."""
        images = batch["image"][:PREVIEW_IMAGES]
        predicted = self.predict(model, images)
        pairs = [
            ("truth", batch["boxes"][:PREVIEW_IMAGES], batch["present"][:PREVIEW_IMAGES] > 0.5),
            ("predicted", predicted["boxes"], predicted["present"]),
        ]
        panels = []
        for index, image in enumerate(images):
            display = _display_image(image)
            for title, boxes, present in pairs:
                panels.append(
                    {
                        "image": display,
                        "title": f"{index}: {title}",
                        "boxes": _gallery_boxes(boxes[index], present[index]),
                    }
                )
        label_names = {index + 1: name for index, name in enumerate(self.organ_names)}
        save_labelled_gallery(path, panels, columns=8, label_names=label_names)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        batches: Iterable[dict[str, torch.Tensor]],
        device: torch.device,
    ) -> dict[str, float]:
        """`localization_metrics` over all batches (distances in mm from "spacing", voxels
        when a batch has none)."""
        model.eval()
        collected: dict[str, list[torch.Tensor]] = {}
        for batch in batches:
            images = batch["image"].to(device)
            predicted = self.predict(model, images)
            spacing = batch.get("spacing")
            if spacing is None:
                spacing = torch.ones(images.shape[0], images.ndim - 2)
            for key, value in (
                ("predicted_boxes", predicted["boxes"]),
                ("predicted_present", predicted["present"]),
                ("true_boxes", batch["boxes"]),
                ("true_present", batch["present"] > 0.5),
                ("spacing", spacing),
            ):
                collected.setdefault(key, []).append(value.detach().cpu())
        if not collected:
            raise CtxRestoreError("localisation metrics need at least one batch of images")
        merged = {key: torch.cat(values) for key, values in collected.items()}
        return localization_metrics(**merged, organ_names=self.organ_names)

    @torch.no_grad()
    def predict(self, model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, C, *S) -> "presence" (B, O) probabilities, "present" (B, O) bool and
        "boxes" (B, O, 2, D) float voxel coordinates (decoded whether present or not)."""
        model.eval()
        outputs = model(images).float()
        if self.box_head in DECODER_BOX_HEADS:
            probabilities = organ_probabilities(outputs, self.num_organs, self.box_head)
            presence, present, boxes = decode_box_masks(probabilities)
        else:
            presence, boxes = decode_boxes(outputs, images.shape[2:])
            present = presence > PRESENCE_THRESHOLD
        return {"presence": presence, "present": present, "boxes": boxes}

    def to_json(self) -> dict:
        return {"name": self.name, "organ_names": list(self.organ_names), "box_head": self.box_head}

    @classmethod
    def from_json(cls, data: dict) -> LocalizationTask:
        """The task that `to_json` described (unweighted, unaugmented: what predict needs)."""
        if (
            not isinstance(data, dict)
            or data.get("name") != "localize"
            or not data.get("organ_names")
        ):
            raise CtxRestoreError(
                f"not a localisation task description (need name 'localize' and "
                f"organ_names): {data!r:.200}"
            )
        # Written before box heads existed: the regression head, the only one then.
        return cls(tuple(data["organ_names"]), box_head=data.get("box_head", "regression"))


def check_box_head(box_head: str, task: str = "localize") -> None:
    """A known box head, and a head other than the default only for localisation."""
    if box_head not in BOX_HEADS:
        raise CtxRestoreError(f"unknown box head {box_head!r}; box heads: {', '.join(BOX_HEADS)}")
    if box_head != BOX_HEADS[0] and task != "localize":
        raise CtxRestoreError(
            f"--box-head {box_head} is a localisation option; the {task} task has no boxes"
        )


def _stack_present(items: Sequence[dict[str, torch.Tensor]], num_organs: int) -> torch.Tensor:
    """The items' "present" flags as (N, num_organs) float64 (an item may hold one image or a
    batch)."""
    flags = []
    for index, item in enumerate(items):
        if "present" not in item:
            raise CtxRestoreError(
                f"training item {index} has no 'present' (organ presence flags); it holds "
                f"{sorted(item)}"
            )
        present = torch.as_tensor(item["present"]).detach().cpu().double()
        if present.numel() % num_organs or (present.ndim and present.shape[-1] != num_organs):
            raise CtxRestoreError(
                f"training item {index}: 'present' has shape {tuple(present.shape)}, expected "
                f"({num_organs},) or (B, {num_organs}), one flag per organ"
            )
        flags.append(present.reshape(-1, num_organs))
    if not flags:
        raise CtxRestoreError("cannot balance organ presence over an empty training set")
    return (torch.cat(flags) > 0.5).double()


def _spatial_extent(spatial_size: Sequence[int], reference: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(
        [float(size) for size in spatial_size], dtype=reference.dtype, device=reference.device
    )


def _check_outputs(outputs: torch.Tensor, spatial_dims: int) -> None:
    if outputs.ndim < 1 or outputs.shape[-1] != 1 + 2 * spatial_dims:
        raise CtxRestoreError(
            f"localizer outputs of shape {tuple(outputs.shape)} do not fit {spatial_dims}D "
            f"images: the last axis must hold 1 + 2 * {spatial_dims} = {1 + 2 * spatial_dims} "
            "values per organ (presence logit, centres, sizes)"
        )


def box_fractions(outputs: torch.Tensor) -> torch.Tensor:
    """Raw outputs (..., 1 + 2D) -> unclipped box corners (..., 2, D) as fractions of the image
    extent: [centre - size / 2, centre + size / 2] with centre, size = sigmoid(parameters)."""
    spatial_dims = (outputs.shape[-1] - 1) // 2
    _check_outputs(outputs, spatial_dims)
    centre = torch.sigmoid(outputs[..., 1 : 1 + spatial_dims])
    size = torch.sigmoid(outputs[..., 1 + spatial_dims :])
    return torch.stack([centre - size / 2, centre + size / 2], dim=-2)


def decode_boxes(
    outputs: torch.Tensor, spatial_size: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw outputs (B, O, 1 + 2D) of images of `spatial_size` (D,) -> presence probabilities
    (B, O) and boxes (B, O, 2, D) in float voxel coordinates, clipped to the image."""
    _check_outputs(outputs, len(spatial_size))
    extent = _spatial_extent(spatial_size, outputs)
    boxes = torch.minimum((box_fractions(outputs) * extent).clamp_min(0), extent)
    return torch.sigmoid(outputs[..., 0]), boxes


def encode_boxes(boxes: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Boxes (..., 2, D) in voxels -> the box parameters (..., 2D) that `decode_boxes` turns
    back into them: logits of the centre and size fractions (kept within (0, 1))."""
    extent = _spatial_extent(spatial_size, boxes.float())
    first, last = boxes.float().unbind(dim=-2)
    centre = (first + last) / 2 / extent
    size = (last - first) / extent
    fractions = torch.cat([centre, size], dim=-1).clamp(_ENCODE_EPSILON, 1 - _ENCODE_EPSILON)
    return torch.logit(fractions)


def localization_loss(
    outputs: torch.Tensor,
    true_boxes: torch.Tensor,
    true_present: torch.Tensor,
    spatial_size: Sequence[int],
    presence_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Presence BCE-with-logits (mean over images and organs; pos_weight per organ) + smooth-L1
    on the 2D first/last coordinates as fractions of the extent, summed per box and averaged
    over the truly present boxes.

    outputs (B, O, 1 + 2D) float32; true_boxes (B, O, 2, D) voxels; true_present (B, O) 1/0.
    """
    pos_weight = None
    if presence_weights is not None:
        pos_weight = torch.as_tensor(presence_weights, dtype=outputs.dtype, device=outputs.device)
    presence_loss = functional.binary_cross_entropy_with_logits(
        outputs[..., 0], true_present, pos_weight=pos_weight
    )
    extent = _spatial_extent(spatial_size, outputs)
    per_box = functional.smooth_l1_loss(
        box_fractions(outputs), true_boxes / extent, reduction="none", beta=BOX_LOSS_BETA
    ).sum(dim=(-2, -1))
    # No `if`: a batch without any present organ adds a zero box loss, without a host sync.
    box_loss = (per_box * true_present).sum() / true_present.sum().clamp_min(1)
    return presence_loss + box_loss


def box_masks(
    boxes: torch.Tensor, present: torch.Tensor, spatial_size: Sequence[int]
) -> torch.Tensor:
    """Boxes (B, O, 2, D) in voxels and present (B, O) -> (B, O, *spatial_size) float masks,
    1 at the voxels whose centre (index + 0.5) lies in [first, one past the last) of a
    present organ's box: integer boxes give exactly their voxels, and `tight_boxes` of the
    masks gives the boxes back (clipped to the image)."""
    batch_size, num_organs = boxes.shape[:2]
    boxes = boxes.float()
    masks = (present > 0.5).float().view(batch_size, num_organs, *(1,) * len(spatial_size))
    for axis, size in enumerate(spatial_size):
        centres = torch.arange(size, dtype=boxes.dtype, device=boxes.device) + 0.5
        first, last = boxes[..., 0, axis, None], boxes[..., 1, axis, None]
        inside = ((centres >= first) & (centres < last)).float()  # (B, O, size)
        shape = [batch_size, num_organs] + [1] * len(spatial_size)
        shape[2 + axis] = size
        masks = masks * inside.view(shape)
    return masks


def organ_masks(label_maps: torch.Tensor, organ_values: Sequence[int]) -> torch.Tensor:
    """Label maps (B, *S) -> (B, O, *S) float32, 1 where the voxel is organ k's value."""
    values = torch.as_tensor(list(organ_values), device=label_maps.device)
    shape = (1, len(organ_values)) + (1,) * (label_maps.ndim - 1)
    return (label_maps.long()[:, None] == values.view(shape)).float()


def box_mask_loss(
    outputs: torch.Tensor,
    true_boxes: torch.Tensor,
    true_present: torch.Tensor,
    true_masks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The "mask" head's loss: BCE-with-logits per voxel + soft Dice per organ over the batch
    (MONAI's, so that small organs count as much as large ones) against the organs' masks
    when given, else their filled boxes.

    outputs (B, O, *S) logits; true_boxes (B, O, 2, D) voxels; true_present (B, O) 1/0;
    true_masks (B, O, *S) 1/0 (`organ_masks`) or None.
    """
    _check_mask_outputs(outputs, true_boxes.shape[1])
    if true_masks is None:
        targets = box_masks(true_boxes, true_present, outputs.shape[2:])
    else:
        targets = true_masks.float()
    dice = DiceLoss(sigmoid=True, batch=True)(outputs, targets)
    return functional.binary_cross_entropy_with_logits(outputs, targets) + dice


def organ_labels(label_maps: torch.Tensor, organ_values: Sequence[int]) -> torch.Tensor:
    """Label maps (B, *S) -> the segment head's targets (B, 1, *S) int64: k + 1 where the voxel
    is organ k's value, 0 (background) elsewhere, other label values included."""
    masks = organ_masks(label_maps, organ_values)  # organs are disjoint in a label map
    indices = torch.arange(1, len(organ_values) + 1, device=masks.device, dtype=masks.dtype)
    return (masks * indices.view(1, -1, *(1,) * (masks.ndim - 2))).sum(dim=1, keepdim=True).long()


def organ_label_loss(outputs: torch.Tensor, labels: torch.Tensor, num_organs: int) -> torch.Tensor:
    """The "segment" head's loss, the segmentation task's: soft Dice + cross-entropy over a
    softmax of background and organs (MONAI's DiceCELoss). outputs (B, 1 + O, *S) logits;
    labels (B, 1, *S) from `organ_labels`."""
    _check_mask_outputs(outputs, num_organs, "segment")
    return DiceCELoss(to_onehot_y=True, softmax=True)(outputs, labels)


def organ_probabilities(outputs: torch.Tensor, num_organs: int, box_head: str) -> torch.Tensor:
    """A U-Net box head's logits -> each organ's probability per voxel (B, O, *S): the "mask"
    head's sigmoids (B, O, *S), or the organs' share of the "segment" head's softmax over
    (B, 1 + O, *S), background first."""
    _check_mask_outputs(outputs, num_organs, box_head)
    if box_head == "segment":
        return outputs.float().softmax(dim=1)[:, 1:]
    return torch.sigmoid(outputs.float())


def decode_box_masks(
    probabilities: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Organ probabilities (B, O, *S) from a U-Net box head (`organ_probabilities`) ->
    presence probabilities (B, O) (the most confident voxel's), present (B, O) bool and boxes
    (B, O, 2, D).

    An organ's voxels are those above PRESENCE_THRESHOLD, less the connected pieces smaller
    than KEEP_COMPONENT_FRACTION of its largest; its box is their tight box, and it is present
    when they are at least MIN_ORGAN_FRACTION of the image. An organ with no voxel above the
    threshold still gets its best guess, the box of the voxels at least half as confident as
    its most confident one (pieces filtered alike), as the regression head decodes a box
    whether present or not (the wall distance measures the box, not presence)."""
    if probabilities.ndim not in (4, 5):
        raise CtxRestoreError(
            f"organ probabilities of shape {tuple(probabilities.shape)}: expected (B, O, H, W) "
            "or (B, O, D, H, W)"
        )
    presence = probabilities.flatten(2).amax(dim=-1)
    cut = torch.where(presence > PRESENCE_THRESHOLD, PRESENCE_THRESHOLD, presence / 2)
    inside = probabilities >= cut.view(*cut.shape, *(1,) * (probabilities.ndim - 2))
    inside = keep_large_components(inside, KEEP_COMPONENT_FRACTION)
    boxes, _ = tight_boxes(inside)
    voxels = inside.flatten(2).sum(dim=-1)
    image_voxels = math.prod(probabilities.shape[2:])
    present = (presence > PRESENCE_THRESHOLD) & (voxels >= MIN_ORGAN_FRACTION * image_voxels)
    return presence, present, boxes


def keep_large_components(masks: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean masks (B, O, *S) -> the same masks keeping, in each, the connected pieces (face
    connectivity) of at least `fraction` times the size of its largest piece. Runs on the CPU
    (scipy); the result is on the masks' device."""
    kept = masks.detach().cpu().numpy().copy()
    for index in np.ndindex(*kept.shape[:2]):
        labels, count = ndimage.label(kept[index])
        if count > 1:
            sizes = np.bincount(labels.ravel())[1:]
            large = 1 + np.flatnonzero(sizes >= fraction * sizes.max())
            kept[index] = np.isin(labels, large)
    return torch.from_numpy(kept).to(masks.device)


def _check_mask_outputs(outputs: torch.Tensor, num_organs: int, box_head: str = "mask") -> None:
    channels = num_organs + 1 if box_head == "segment" else num_organs
    if outputs.ndim not in (4, 5) or outputs.shape[1] != channels:
        per = "background + one channel per organ" if box_head == "segment" else "one per organ"
        raise CtxRestoreError(
            f"{box_head} box-head outputs of shape {tuple(outputs.shape)} do not fit "
            f"{num_organs} organs: expected (B, {channels}, H, W) or (B, {channels}, D, H, W), "
            f"{per}"
        )


def tight_boxes(inside: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (B, O, *S) -> the tight box of each mask (B, O, 2, D) float32 (first
    voxel, one past the last, per axis; all-zero for an empty mask) and present (B, O) float32
    (whether the mask has any voxel)."""
    spatial_dims = inside.ndim - 2
    inside = inside.to(torch.uint8)
    present = inside.flatten(2).amax(dim=-1)
    firsts, lasts = [], []
    for axis in range(spatial_dims):
        others = tuple(2 + other for other in range(spatial_dims) if other != axis)
        profile = inside.amax(dim=others) if others else inside  # (B, O, S_axis)
        # argmax returns the first maximum: the first touched slice from either end.
        firsts.append(profile.argmax(dim=-1))
        lasts.append(profile.shape[-1] - profile.flip(-1).argmax(dim=-1))
    boxes = torch.stack([torch.stack(firsts, dim=-1), torch.stack(lasts, dim=-1)], dim=-2)
    present = present.float()
    return boxes.float() * present[..., None, None], present


def boxes_from_masks(
    masks: torch.Tensor, label_values: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps (B, *S) -> boxes (B, O, 2, D) float32 and present (B, O) float32, organ k
    being the voxels equal to `label_values[k]`.

    Each box is the tight box of its organ (first voxel, one past the last, per axis), as
    data.phantoms.base.mask_box; an absent organ has present 0 and an all-zero box.
    """
    spatial_dims = masks.ndim - 1
    if spatial_dims not in (2, 3) or not len(label_values):
        raise CtxRestoreError(
            f"boxes_from_masks needs masks (B, H, W) or (B, D, H, W) and >= 1 label value; got "
            f"masks of shape {tuple(masks.shape)} and label values {tuple(label_values)}"
        )
    values = torch.as_tensor(list(label_values), dtype=masks.dtype, device=masks.device)
    return tight_boxes(masks[:, None] == values.view(1, -1, *(1,) * spatial_dims))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Intersection over union of boxes (..., 2, D) (first, one past the last, per axis), any
    D; broadcasts. Two empty boxes score 0."""
    intersection = (
        (torch.minimum(a[..., 1, :], b[..., 1, :]) - torch.maximum(a[..., 0, :], b[..., 0, :]))
        .clamp_min(0)
        .prod(dim=-1)
    )
    union = _volume(a) + _volume(b) - intersection
    return torch.where(union > 0, intersection / union.clamp_min(1e-12), torch.zeros_like(union))


def _volume(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 1, :] - boxes[..., 0, :]).clamp_min(0).prod(dim=-1)


def localization_metrics(
    predicted_boxes: torch.Tensor,
    predicted_present: torch.Tensor,
    true_boxes: torch.Tensor,
    true_present: torch.Tensor,
    spacing: torch.Tensor,
    organ_names: Sequence[str],
) -> dict[str, float]:
    """Box metrics over B images and O organs; boxes (B, O, 2, D) voxels, present (B, O)
    bool (or 1/0), spacing (B, D) mm per voxel.

    Per organ, over the images where it is truly present ("instances"):
    - "wall_mm/<organ>": mean absolute distance of the 2D box walls, in mm;
    - "centre_mm/<organ>": mean Euclidean distance of the box centres, in mm;
    - "iou/<organ>": mean IoU; an instance predicted absent scores 0;
    - "detection_rate/<organ>": the fraction predicted present with IoU >= DETECTION_IOU;
    and over the images where it is truly absent:
    - "false_alarm_rate/<organ>": the fraction predicted present (NaN when never absent).
    The wall and centre distances use the predicted box whether it is predicted present or
    not: they measure the box, the rates measure the presence decision.
    An organ never present is NaN in the first four and skipped by their "<metric>/mean" over
    organs; "false_alarm_rate/mean" likewise skips organs never absent.
    """
    names = tuple(organ_names)
    predicted_boxes, true_boxes = predicted_boxes.double().cpu(), true_boxes.double().cpu()
    shape = tuple(true_boxes.shape)
    if (
        len(shape) != 4
        or shape[1:3] != (len(names), 2)
        or tuple(predicted_boxes.shape) != shape
        or tuple(predicted_present.shape) != shape[:2]
        or tuple(true_present.shape) != shape[:2]
        or tuple(spacing.shape) != (shape[0], shape[3])
    ):
        raise CtxRestoreError(
            f"localisation metrics need boxes (B, O, 2, D) with O = {len(names)} organs "
            f"{names}, present (B, O) and spacing (B, D); got predicted boxes "
            f"{tuple(predicted_boxes.shape)}, true boxes {shape}, predicted present "
            f"{tuple(predicted_present.shape)}, true present {tuple(true_present.shape)}, "
            f"spacing {tuple(spacing.shape)}"
        )
    predicted_present = predicted_present.cpu() > 0.5
    true_present = true_present.cpu() > 0.5
    millimetres = spacing.double().cpu()[:, None, None, :]  # (B, 1, 1, D)
    wall = ((predicted_boxes - true_boxes).abs() * millimetres).mean(dim=(-2, -1))
    centre_offset = (predicted_boxes.mean(dim=-2) - true_boxes.mean(dim=-2)) * millimetres[:, :, 0]
    centre = centre_offset.norm(dim=-1)
    iou = torch.where(predicted_present, box_iou(predicted_boxes, true_boxes), 0.0)
    detected = (iou >= DETECTION_IOU).double()
    per_instance = {"wall_mm": wall, "centre_mm": centre, "iou": iou, "detection_rate": detected}

    metrics: dict[str, float] = {}
    for index, organ in enumerate(names):
        present, absent = true_present[:, index], ~true_present[:, index]
        for metric, values in per_instance.items():
            metrics[f"{metric}/{organ}"] = _mean(values[:, index][present])
        metrics[f"false_alarm_rate/{organ}"] = _mean(predicted_present[:, index][absent].double())
    for metric in (*per_instance, "false_alarm_rate"):
        metrics[f"{metric}/mean"] = _nanmean([metrics[f"{metric}/{organ}"] for organ in names])
    return metrics


def _mean(values: torch.Tensor) -> float:
    return float(values.mean()) if values.numel() else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else float("nan")


def _display_image(image: torch.Tensor) -> np.ndarray:
    """(C, *S) -> channel 0 (the middle slice of a volume) as (H, W) scaled to [0, 1]."""
    plane = image[0].detach().to("cpu", torch.float32)
    while plane.ndim > 2:
        plane = plane[plane.shape[0] // 2]
    plane = torch.nan_to_num(plane)
    low, high = plane.min(), plane.max()
    return ((plane - low) / (high - low).clamp_min(1e-12)).numpy()


def _gallery_boxes(boxes: torch.Tensor, present: torch.Tensor) -> list:
    """(O, 2, D) boxes of one image -> save_labelled_gallery's [(organ index + 1, ((y0, x0),
    (y1, x1)))] for the organs present, on the last two axes (a volume's in-plane axes)."""
    corners = boxes.detach().cpu()[..., -2:].tolist()
    return [
        (index + 1, (tuple(first), tuple(last)))
        for index, (first, last) in enumerate(corners)
        if bool(present[index])
    ]
