"""Pure tensor corruptions: batched tensor in, tensor out, on any device, seeded by a Generator."""

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
    "context_restoration",
    "invert_permutation",
    "sample_swap_plan",
    "swap_permutation",
    "undo_swap_plan",
]
