"""What every image-restoration pretext shares (context restoration, auto-encoder, context
encoder, Models Genesis): the network as chosen, a loss against the clean image (MSE unless
chosen otherwise), held-out restoration MSE against leaving the input as it is, and original /
input / output rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ctxrestore.errors import CtxRestoreError


def mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.float(), targets.float())


def l1(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(outputs.float(), targets.float())


def gradient_difference(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mathieu et al. 2016's gradient difference loss (alpha 1), averaged over the spatial
    axes: the mean gap between the sizes of neighbouring-pixel differences in output and
    target. A blurred output has smaller differences than a sharp target, so every edge it
    smooths costs here, however little it costs in MSE."""
    outputs, targets = outputs.float(), targets.float()
    axes = [axis for axis in range(2, outputs.ndim) if outputs.shape[axis] > 1]
    gaps = [(outputs.diff(dim=a).abs() - targets.diff(dim=a).abs()).abs().mean() for a in axes]
    return torch.stack(gaps).mean() if gaps else outputs.new_zeros(())


def l1_gradient(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L1 plus gradient difference: both in intensity units, so neither swamps the other."""
    return l1(outputs, targets) + gradient_difference(outputs, targets)


# The paper's L2 restores the conditional mean, which is blurred wherever the network is
# unsure where a swapped patch belongs; L1 (the median) and an edge term reward sharpness.
RESTORATION_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": mse,
    "l1": l1,
    "l1_gradient": l1_gradient,
}


def check_restoration_loss(name: str) -> None:
    if name not in RESTORATION_LOSSES:
        raise CtxRestoreError(
            f"unknown restoration loss '{name}'; losses: {', '.join(RESTORATION_LOSSES)}"
        )


def restoration_metrics(
    inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
) -> dict[str, float]:
    """MSE of the restored images, and of the network input left as it is: a network that
    learned nothing about the images scores no better than the latter."""
    return {
        "restoration_mse": float(mse(outputs, targets)),
        "identity_mse": float(mse(inputs, targets)),
    }


def restoration_summary(metrics: dict[str, float]) -> str:
    restored, identity = metrics["restoration_mse"], metrics["identity_mse"]
    if identity == 0:
        return f"The input equals the target (an auto-encoder); restoration MSE {restored:.5f}."
    gain = identity / max(restored, 1e-12)
    if gain > 1:
        return (
            f"Held-out restoration MSE {restored:.5f} against {identity:.5f} for the corrupted "
            f"input left as it is: the network removes {100 * (1 - 1 / gain):.1f}% of the "
            f"corruption's error ({gain:.2f}x lower)."
        )
    return (
        f"Held-out restoration MSE {restored:.5f} is no better than the corrupted input left as "
        f"it is ({identity:.5f}): the network has not learned yet (train longer, or check the "
        "data)."
    )


def restoration_rows(
    inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
) -> list[tuple[str, torch.Tensor]]:
    return [("original", targets), ("network input", inputs), ("restored", outputs)]
