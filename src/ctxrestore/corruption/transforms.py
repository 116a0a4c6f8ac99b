"""MONAI-style transforms over `context_restoration`, for users' own MONAI pipelines.

Unlike MONAI's `RandCoarseShuffled`, the dictionary form draws ONE plan and applies it to every
key, so co-registered images (or an image and its label) move together.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor

from ctxrestore.corruption.sampling import (
    SwapPlan,
    check_placement,
    normalize_num_swaps,
    sample_swap_plan,
)
from ctxrestore.corruption.swap import apply_swap_plan
from ctxrestore.errors import CtxRestoreError


class _SwapSampler(Randomizable):
    """Shared randomness: a torch plan drawn from MONAI's seeded numpy state (`self.R`)."""

    def __init__(
        self,
        num_swaps: int | Sequence[int],
        patch_size: int | Sequence[int],
        foreground_threshold: float | None,
        placement: str,
    ) -> None:
        normalize_num_swaps(num_swaps)  # fail at construction, not at the first image
        self.num_swaps = num_swaps
        self.patch_size = patch_size
        self.foreground_threshold = foreground_threshold
        self.placement = check_placement(placement)
        self._seed = 0

    def randomize(self, data: object = None) -> None:
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def _plan(self, image: torch.Tensor) -> SwapPlan:
        """image: (C, *spatial) tensor -> a plan for a batch of one."""
        if image.dim() not in (3, 4):
            raise CtxRestoreError(
                f"expected a channel-first image (C, H, W) or (C, D, H, W), got shape "
                f"{tuple(image.shape)}"
            )
        generator = torch.Generator(device=image.device).manual_seed(self._seed)
        foreground = None
        if self.foreground_threshold is not None:
            foreground = (image > self.foreground_threshold).any(dim=0)[None]
        return sample_swap_plan(
            image.shape[1:],
            1,
            self.num_swaps,
            self.patch_size,
            generator=generator,
            foreground=foreground,
            placement=self.placement,
        )


def _swap(image: np.ndarray | torch.Tensor, plan: SwapPlan) -> np.ndarray | torch.Tensor:
    tensor = convert_to_tensor(image, track_meta=False)
    swapped = apply_swap_plan(tensor[None], plan)[0]
    return convert_to_dst_type(swapped, image)[0]


class ContextRestoration(_SwapSampler, Transform):
    """Swap `num_swaps` isolated patch pairs of a channel-first image, all channels alike.

    Args:
        num_swaps: T, or a (min, max) range drawn per call.
        patch_size: one int or one per spatial axis.
        foreground_threshold: avoid patches lying wholly at or below this value in all channels.
        placement: "uniform" (the paper's) or "poisson_disc" (all patches isolated and spread).

    Seed with `set_random_state(seed)` (or MONAI's `set_determinism`).
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(
        self,
        num_swaps: int | Sequence[int] = 20,
        patch_size: int | Sequence[int] = 16,
        foreground_threshold: float | None = None,
        placement: str = "uniform",
    ) -> None:
        _SwapSampler.__init__(self, num_swaps, patch_size, foreground_threshold, placement)

    def __call__(
        self, img: np.ndarray | torch.Tensor, randomize: bool = True
    ) -> np.ndarray | torch.Tensor:
        if randomize:
            self.randomize()
        return _swap(img, self._plan(convert_to_tensor(img, track_meta=False)))


class ContextRestorationd(_SwapSampler, MapTransform):
    """Dictionary form: one plan per call, applied to every key.

    Args:
        keys: items to swap; they must share their spatial shape.
        foreground_key: the item whose intensities decide foreground (default: the first key).
        allow_missing_keys: skip keys that are absent.

    To keep the clean image as the restoration target, copy it first, e.g.
    `CopyItemsd(keys="image", names="target")`, then `ContextRestorationd(keys="image")`.
    """

    backend = ContextRestoration.backend

    def __init__(
        self,
        keys: KeysCollection,
        num_swaps: int | Sequence[int] = 20,
        patch_size: int | Sequence[int] = 16,
        foreground_threshold: float | None = None,
        foreground_key: Hashable | None = None,
        allow_missing_keys: bool = False,
        placement: str = "uniform",
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        _SwapSampler.__init__(self, num_swaps, patch_size, foreground_threshold, placement)
        self.foreground_key = foreground_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        out = dict(data)
        present = list(self.key_iterator(out))
        if not present:
            return out
        self.randomize()
        reference_key = self.foreground_key if self.foreground_key is not None else present[0]
        reference = convert_to_tensor(out[reference_key], track_meta=False)
        plan = self._plan(reference)
        for key in present:
            spatial = tuple(out[key].shape[1:])
            if spatial != plan.spatial_shape:
                raise CtxRestoreError(
                    f"ContextRestorationd: item '{key}' has spatial shape {spatial}, but "
                    f"'{reference_key}' has {plan.spatial_shape}; all keys must match"
                )
            out[key] = _swap(out[key], plan)
        return out
