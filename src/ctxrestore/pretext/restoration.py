"""What every image-restoration pretext shares (context restoration, auto-encoder, context
encoder, Models Genesis): the network as chosen, MSE against the clean image, held-out
restoration error against leaving the input as it is, and original / input / output rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def restoration_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(outputs.float(), targets.float())


def restoration_metrics(
    inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor
) -> dict[str, float]:
    """MSE of the restored images, and of the network input left as it is: a network that
    learned nothing about the images scores no better than the latter."""
    return {
        "restoration_mse": float(restoration_loss(outputs, targets)),
        "identity_mse": float(restoration_loss(inputs, targets)),
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
