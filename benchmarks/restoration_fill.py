"""Does a context-restoration network put swapped patches back, or paint them over?

For each pretraining folder (method `context_restoration`), its own held-out images (the
phantom images its report scores, or a folder's first images) are corrupted with its own
patch size, T and placement, and three fills of the swapped voxels are scored by their squared
error there, as the share of the corrupted input's error they remove:

- `restored`: the network's output (it must also find which voxels were swapped);
- `mean_fill_Npx`: told which voxels were swapped, paints each with the mean of the unswapped
  voxels in an N-voxel window around it (knows where, not what). N is one patch, two patches
  and four patches wide;
- putting every patch back would remove 100%.

A network that removes about what a mean fill removes restores a blurred neighbourhood, not
the content (docs/experiments.md 36). Also printed: the network's error on the voxels that
were not swapped, where the right answer is the input itself.

    python benchmarks/restoration_fill.py PRETRAINING [PRETRAINING ...] [--images 64]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ctxrestore.corruption.swap import context_restoration
from ctxrestore.errors import CtxRestoreError
from ctxrestore.files import read_json
from ctxrestore.pretext.training import PretrainConfig, evaluation_images, load_pretrained

CHUNK = 16  # images per forward pass


def local_mean_fill(corrupted: torch.Tensor, swapped: torch.Tensor, window: int) -> torch.Tensor:
    """Each swapped voxel painted with the mean of the unswapped voxels in a `window`-wide
    cube around it (channel by channel); unswapped voxels kept. `swapped` is (B, 1, *S)."""
    dims = corrupted.ndim - 2
    conv = (F.conv2d, F.conv3d)[dims - 2]
    kernel = corrupted.new_ones((1, 1) + (window,) * dims)
    keep = (~swapped).to(corrupted.dtype)
    counts = conv(keep, kernel, padding=window // 2)
    # every channel through the one-channel kernel: (B * C, 1, *S) and back
    sums = conv((corrupted * keep).flatten(0, 1).unsqueeze(1), kernel, padding=window // 2).view_as(
        corrupted
    )
    return torch.where(swapped, sums / counts.clamp_min(1), corrupted)


def measure(folder: Path, count: int, seed: int) -> dict:
    options = read_json(folder / "config.json")
    if options.get("method") != "context_restoration":
        raise CtxRestoreError(
            f"{folder}: method {options.get('method')!r}; this measures context_restoration "
            "pretraining runs only"
        )
    config = PretrainConfig(**options)
    # the images the pretraining report scores (more of them, for phantoms)
    held_out = evaluation_images(config, count=count)
    images = torch.stack([held_out[i]["image"] for i in range(len(held_out))])
    corrupted, permutation = context_restoration(
        images.clone(),
        config.swaps,
        config.patch_size,
        torch.Generator().manual_seed(seed),
        foreground_threshold=config.foreground_threshold,
        return_permutation=True,
    )
    voxels = images[0, 0].numel()
    swapped = (permutation != torch.arange(voxels)).view(len(images), 1, *images.shape[2:])
    model = load_pretrained(folder)
    with torch.no_grad():
        restored = torch.cat(
            [model(corrupted[i : i + CHUNK]).float() for i in range(0, len(images), CHUNK)]
        )
    in_swapped = swapped.expand_as(images)

    def error(filled: torch.Tensor) -> float:
        return float(((filled - images) ** 2)[in_swapped].mean())

    corrupted_error = error(corrupted)
    row = {
        "run": str(folder),
        "patch_size": config.patch_size,
        "swaps": config.swaps,
        "foreground_threshold": config.foreground_threshold,
        "images": len(images),
        "swapped_share": round(float(swapped.float().mean()), 3),
        "corrupted_mse_swapped": round(corrupted_error, 5),
        "restored_removes": round(1 - error(restored) / corrupted_error, 3),
    }
    for width in (1, 2, 4):
        window = width * config.patch_size + 1  # odd, so the window is centred
        filled = local_mean_fill(corrupted, swapped, window)
        row[f"mean_fill_{window}px_removes"] = round(1 - error(filled) / corrupted_error, 3)
    row["restored_mse_unswapped"] = round(float(((restored - images) ** 2)[~in_swapped].mean()), 6)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="context_restoration pretrainings")
    parser.add_argument("--images", type=int, default=64, help="held-out images to corrupt")
    parser.add_argument("--seed", type=int, default=0, help="seed of the corruption")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for folder in args.runs:
        try:
            print(json.dumps(measure(folder, args.images, args.seed)), flush=True)
        except CtxRestoreError as error:
            parser.error(str(error))


if __name__ == "__main__":
    main()
