"""Pretrained weights into a downstream network, by the prefixes of the checkpoint contract.

The encoder always transfers (the downstream network is built around the pretrained encoder's
configuration, so names and shapes agree); the decoder transfers when the downstream network
has the same decoder (segmentation after a U-Net pretraining); necks and heads are
task-specific and start random. What moved and what did not is returned, for the run's report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from ctxrestore.errors import CtxRestoreError

logger = logging.getLogger(__name__)
# Channel names of data that does not say what its channels are: channel_0, channel_1, ...
GENERIC_CHANNEL = "channel_"

TRANSFERABLE_PARTS = ("encoder", "decoder")


@dataclass(frozen=True)
class TransferReport:
    """transferred / random: part -> number of tensors; adapted: tensor name -> how."""

    transferred: dict[str, int] = field(default_factory=dict)
    random: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)  # part -> why it started random
    adapted: dict[str, str] = field(default_factory=dict)
    left_behind: dict[str, int] = field(default_factory=dict)  # pretrained parts not used
    # Parameter-name prefixes that hold pretrained weights (for their learning-rate scale).
    prefixes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "transferred": self.transferred,
            "random": self.random,
            "reasons": self.reasons,
            "adapted": self.adapted,
            "left_behind": self.left_behind,
            "prefixes": list(self.prefixes),
        }


def _part_of(name: str, prefixes: dict[str, str]) -> str:
    for part, prefix in prefixes.items():
        if name.startswith(prefix):
            return part
    return "other"


def _split_by_part(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, dict]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        parts.setdefault(_part_of(name, prefixes), {})[name] = tensor
    return parts


def first_conv_name(state: dict[str, torch.Tensor], encoder_prefix: str = "encoder.") -> str:
    """The encoder's first convolution weight: the only tensor that sees the input channels."""
    for name, tensor in state.items():
        if name.startswith(encoder_prefix) and name.endswith("weight") and tensor.ndim >= 4:
            return name
    raise CtxRestoreError("the pretrained encoder holds no convolution weight")


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> tuple[torch.Tensor, str]:
    """A first-layer weight (out, in, *k) for `in_channels` inputs, and how it was made.

    More channels: the pretrained ones repeat cyclically; fewer: every new channel gets their
    average. Both are scaled by in/new so that an input whose channels are all equal gives the
    same response as before.
    """
    old = weight.shape[1]
    if in_channels == old:
        return weight, "unchanged"
    scale = old / in_channels
    if in_channels > old:
        repeats = -(-in_channels // old)
        adapted = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_channels] * scale
        return adapted, f"repeat {old} -> {in_channels} channels"
    mean = weight.mean(dim=1, keepdim=True)
    adapted = mean.expand(-1, in_channels, *weight.shape[2:]).clone() * scale
    return adapted, f"average {old} -> {in_channels} channels"


def check_compatible(
    pretrained: dict,
    *,
    spatial_dims: int,
    in_channels: int,
    channel_names: list[str],
    adapt_channels: bool,
    source: str,
    target: str,
) -> None:
    """Stop before training when the checkpoint cannot initialise the task: names both sides."""
    if pretrained["spatial_dims"] != spatial_dims:
        raise CtxRestoreError(
            f"{source} was pretrained in {pretrained['spatial_dims']}D, but {target} is "
            f"{spatial_dims}D; pretrain with --spatial-dims {spatial_dims} (no adaptation "
            "between 2D and 3D weights is offered)"
        )
    if pretrained["in_channels"] != in_channels and not adapt_channels:
        raise CtxRestoreError(
            f"{source} was pretrained on {pretrained['in_channels']} channel(s) "
            f"{pretrained.get('channel_names')}, but {target} has {in_channels} channel(s) "
            f"{channel_names}; pass --adapt-channels to repeat or average the first layer's "
            "pretrained weights across the new channels"
        )
    _warn_if_channels_differ(pretrained.get("channel_names"), channel_names, source, target)


def _declared(names) -> bool:
    return bool(names) and not any(str(n).startswith(GENERIC_CHANNEL) for n in names)


def _warn_if_channels_differ(pretrained_names, names, source: str, target: str) -> None:
    """The first layer's weights are per channel: pretrained on (T1, T2) and fine-tuned on
    (T2, T1), each filter would see the other modality. Only names both sides declare count
    (generic channel_0, ... say nothing); case and spaces are ignored."""
    if not (_declared(pretrained_names) and _declared(names)):
        return
    canonical = [[str(n).strip().lower() for n in group] for group in (pretrained_names, names)]
    if canonical[0] == canonical[1]:
        return
    order = " in another order" if sorted(canonical[0]) == sorted(canonical[1]) else ""
    logger.warning(
        "%s was pretrained on channels %s, but %s has channels %s%s: the first layer's "
        "pretrained filters will see other channels than they learnt; reorder the channels "
        "of one of them if they are the same images",
        source, list(pretrained_names), target, list(names), order,
    )  # fmt: skip


def _stay_in_eval_mode(module: nn.Module, inputs) -> None:
    module.training = False


def estimate_missing_statistics(
    module: nn.Module, batches: Iterable[torch.Tensor], every_layer: bool = False
) -> int:
    """Running statistics for the BatchNorm layers of `module` that never saw data (random
    weights), from one pass over `batches`; returns how many layers were estimated.

    A fresh BatchNorm's statistics (mean 0, variance 1) do not describe its input, so in eval
    mode it does not normalise: through a random SonoNet encoder the features shrank 10^5-fold
    and a frozen random encoder scored as a constant guess (docs/experiments.md, 23). Layers
    with statistics (a pretrained encoder's) are left as they are, unless `every_layer`: then
    all are estimated again on these batches (the images a new task normalises by).
    """
    fresh = [
        part
        for part in module.modules()
        if isinstance(part, nn.modules.batchnorm._BatchNorm)
        and part.track_running_stats
        and (every_layer or int(part.num_batches_tracked) == 0)
    ]
    if not fresh:
        return 0
    modes = {part: part.training for part in module.modules()}
    momenta = {part: part.momentum for part in fresh}
    module.eval()  # only the fresh layers learn their statistics from this pass
    for part in fresh:
        part.reset_running_stats()
        part.momentum = None  # a cumulative average over the pass, not an exponential one
        part.train()
    with torch.no_grad():
        for batch in batches:
            module(batch)
    for part, momentum in momenta.items():
        part.momentum = momentum
    for part, training in modes.items():
        part.training = training
    return len(fresh)


def freeze(module: nn.Module) -> None:
    """Make `module` a fixed function: no gradients, and eval mode in every forward pass
    (normalisation by its running statistics, never by the batch's), whatever mode the
    training loop sets. In training mode a frozen BatchNorm would still normalise by batch
    statistics and meet its running ones only at test time: for random weights, whose running
    statistics were never estimated, that mismatch left the decoder nothing to work with
    (global Dice 0.05; docs/experiments.md, 21)."""
    module.requires_grad_(False)
    for part in module.modules():
        part.register_forward_pre_hook(_stay_in_eval_mode)


def transfer_weights(
    model: nn.Module,
    pretrained_state: dict[str, torch.Tensor],
    pretrained_prefixes: dict[str, str],
    model_prefixes: dict[str, str],
    *,
    adapt_channels: bool = False,
    encoder_stages: int | None = None,
    fresh_decoder_levels: int = 0,
    source: str = "the checkpoint",
    destination: str = "the task's network",
) -> TransferReport:
    """Copy the encoder (and a matching decoder) from `pretrained_state` into `model`.

    `encoder_stages`: copy only the encoder's first N stages (`<encoder>stages.<i>.`); the
    deeper ones, and then the decoder, keep their random initialisation: the deep layers of
    a pretext network can be too specialised for its pretext to help a task.
    `fresh_decoder_levels`: the decoder's last N levels (`<decoder>levels.<i>.`, the ones
    nearest the output) keep their random initialisation: a restoration network's last
    levels serve its one-channel image output (docs/experiments.md 32).

    Raises when the encoder does not fit: that means the downstream network was not built
    around the pretrained encoder, or the input channels differ and `adapt_channels` is off.
    """
    target = model.state_dict()
    source_parts = _split_by_part(pretrained_state, pretrained_prefixes)
    target_parts = _split_by_part(target, model_prefixes)
    transferred, random, reasons, adapted = {}, {}, {}, {}
    prefixes: list[str] = []  # of the names that get pretrained weights
    decoder_left_fresh = False  # the pretrained decoder fit and its last levels stay random
    updates: dict[str, torch.Tensor] = {}
    for part, tensors in target_parts.items():
        pretrained = source_parts.get(part, {})
        if part not in TRANSFERABLE_PARTS or not pretrained:
            random[part] = len(tensors)
            reasons[part] = (
                "task-specific" if part not in TRANSFERABLE_PARTS else "not in the checkpoint"
            )
            continue
        names_differ = set(tensors) != set(pretrained)
        shapes_differ = [
            n for n in tensors if n in pretrained and tensors[n].shape != pretrained[n].shape
        ]
        if part == "encoder":
            first = first_conv_name(pretrained)
            if adapt_channels and first in shapes_differ:
                updates[first], adapted[first] = adapt_input_channels(
                    pretrained[first], tensors[first].shape[1]
                )
                logger.warning("%s: first layer %s adapted (%s)", source, first, adapted[first])
                shapes_differ.remove(first)
            if names_differ or shapes_differ:
                raise CtxRestoreError(
                    f"the encoder of {source} does not fit {destination}: "
                    f"{_difference(tensors, pretrained, shapes_differ)}"
                )
        elif names_differ or shapes_differ:
            random[part] = len(tensors)
            reasons[part] = "its architecture differs from the pretrained one"
            continue
        part_prefixes = [model_prefixes[part]]
        if part == "encoder" and encoder_stages is not None:
            kept = _first_stages(tensors, model_prefixes["encoder"], encoder_stages, source)
            if len(kept) < len(tensors):
                random["encoder"] = len(tensors) - len(kept)
                reasons["encoder"] = f"stages {encoder_stages} and deeper start random"
            tensors = kept
            part_prefixes = [f"{model_prefixes[part]}stages.{i}." for i in range(encoder_stages)]
        elif part == "decoder" and encoder_stages is not None:
            random[part] = len(tensors)
            reasons[part] = "only the first encoder stages transfer"
            continue
        elif part == "decoder" and fresh_decoder_levels:
            prefix = model_prefixes["decoder"]
            kept, levels = _before_last_levels(tensors, prefix, fresh_decoder_levels, source)
            decoder_left_fresh = True
            random[part] = len(tensors) - len(kept)
            reasons[part] = f"its last {fresh_decoder_levels} of {levels} levels start random"
            if not kept:
                continue
            tensors = kept
            part_prefixes = [f"{prefix}levels.{i}." for i in range(levels - fresh_decoder_levels)]
        for name in tensors:
            updates.setdefault(name, pretrained[name])
        transferred[part] = len(tensors)
        prefixes += part_prefixes
    if fresh_decoder_levels and not decoder_left_fresh:
        raise CtxRestoreError(
            f"--fresh-decoder-levels {fresh_decoder_levels}: the task's network has no decoder "
            f"that takes {source}'s weights (only a U-Net task network after a U-Net "
            "pretraining does: segment, or localize --box-head mask or segment)"
        )
    with torch.no_grad():
        for name, value in updates.items():
            target[name].copy_(value.to(target[name].dtype))
    left_behind = {
        part: len(tensors) for part, tensors in source_parts.items() if part not in transferred
    }
    return TransferReport(transferred, random, reasons, adapted, left_behind, tuple(prefixes))


def _first_stages(
    tensors: dict[str, torch.Tensor], encoder_prefix: str, count: int, source: str
) -> dict[str, torch.Tensor]:
    """The tensors of the encoder's stages 0 .. count-1; refuses a count it does not have."""
    stage_of, _ = _numbered_blocks(
        tensors, encoder_prefix, "stages", count, "--transfer-stages", source
    )
    return {name: tensor for name, tensor in tensors.items() if stage_of[name] < count}


def _before_last_levels(
    tensors: dict[str, torch.Tensor], decoder_prefix: str, count: int, source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """The decoder tensors outside its last `count` levels, and its number of levels;
    refuses a count it does not have."""
    level_of, levels = _numbered_blocks(
        tensors, decoder_prefix, "levels", count, "--fresh-decoder-levels", source
    )
    return {name: t for name, t in tensors.items() if level_of[name] < levels - count}, levels


def _numbered_blocks(
    tensors: dict[str, torch.Tensor], prefix: str, kind: str, count: int, flag: str, source: str
) -> tuple[dict[str, int], int]:
    """Each tensor's block index under `<prefix><kind>.<i>.` and the number of blocks; refuses
    a tensor outside the blocks and a `count` (the value of option `flag`) outside 1..blocks."""
    part = prefix.rstrip(".")
    index_of = {}
    for name in tensors:
        rest = name[len(prefix) :].split(".")
        if rest[0] != kind or not rest[1].isdigit():
            raise CtxRestoreError(
                f"{source}: {part} tensor {name} is not in one of its {kind}; {flag} needs a "
                f"{part} made of {kind}"
            )
        index_of[name] = int(rest[1])
    blocks = max(index_of.values()) + 1
    if not 1 <= count <= blocks:
        raise CtxRestoreError(
            f"{flag} {count}: the {part} of {source} has {blocks} {kind}; use 1..{blocks}"
        )
    return index_of, blocks


def _difference(tensors: dict, pretrained: dict, shapes_differ: list[str]) -> str:
    missing = sorted(set(tensors) - set(pretrained))[:3]
    extra = sorted(set(pretrained) - set(tensors))[:3]
    shapes = [
        f"{n} {tuple(pretrained[n].shape)} vs {tuple(tensors[n].shape)}" for n in shapes_differ[:3]
    ]
    return f"missing {missing}, unexpected {extra}, shapes (pretrained vs task) {shapes}"
