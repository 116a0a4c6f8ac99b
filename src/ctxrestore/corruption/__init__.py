"""Pure tensor corruptions: batched tensor in, tensor out, on any device, seeded by a Generator."""

from ctxrestore.corruption.genesis import (
    in_painting,
    local_pixel_shuffle,
    models_genesis,
    nonlinear_intensity,
    out_painting,
)
from ctxrestore.corruption.inpainting import box_mask, mask_regions, sample_box_corners
from ctxrestore.corruption.patch_pairs import neighbour_offsets, sample_patch_pairs
from ctxrestore.corruption.sampling import SwapPlan, sample_swap_plan
from ctxrestore.corruption.swap import (
    apply_permutation,
    apply_swap_plan,
    context_restoration,
    invert_permutation,
    swap_permutation,
    undo_swap_plan,
)
from ctxrestore.corruption.transforms import ContextRestoration, ContextRestorationd

__all__ = [
    "ContextRestoration",
    "ContextRestorationd",
    "SwapPlan",
    "apply_permutation",
    "apply_swap_plan",
    "box_mask",
    "context_restoration",
    "in_painting",
    "invert_permutation",
    "local_pixel_shuffle",
    "mask_regions",
    "models_genesis",
    "neighbour_offsets",
    "nonlinear_intensity",
    "out_painting",
    "sample_box_corners",
    "sample_patch_pairs",
    "sample_swap_plan",
    "swap_permutation",
    "undo_swap_plan",
]
