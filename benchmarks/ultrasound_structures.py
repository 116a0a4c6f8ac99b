"""Write the ultrasound phantom with the mask of every structure, in the segmentation layout.

A diagnostic, not a pretext: a network trained to segment all 29 structures of the fetal
planes (skull, stomach, heart chambers, vessels...) from these masks knows every structure
that tells the planes apart. Fine-tuning the plane classifier from it bounds what any
pretraining of the encoder could give classification on this phantom (docs/experiments.md 27):

    python benchmarks/ultrasound_structures.py --out us_structures --count 4000 --seed 7
    ctxrestore pretrain --phantom ultrasound --network sononet_unet --width 8 --max-steps 1 \
        --out sononet_unet_random        # a SonoNet-encoder U-Net checkpoint, barely trained
    ctxrestore finetune segment us_structures --modality us --init sononet_unet_random \
        --fraction 1.0 --image-size 64 --max-steps 2000 --patience 0 --out oracle
    ctxrestore finetune classify --init oracle --fraction 0.1 --num-images 2000 ...

Use a --seed other than the classification pool's (0): masks of the test images must not
reach the encoder. Images are the phantom's values in [0, 1] (read them with --modality us).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.progress import track

from ctxrestore.data.layouts import write_dataset_json, write_segmentation_case
from ctxrestore.data.phantoms.registry import get_phantom
from ctxrestore.data.phantoms.ultrasound_planes import ULTRASOUND_STRUCTURES
from ctxrestore.errors import CtxRestoreError


def write_structures(out: Path, count: int, image_size: int, seed: int) -> Path:
    info = get_phantom("ultrasound")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CtxRestoreError(f"{out} is not empty; choose a new folder")
    cases = []
    for index in track(range(count), description="writing ultrasound structures"):
        sample = info.generator(index, seed=seed, spatial_size=(image_size, image_size))
        stem = f"ultrasound_{index:05d}"
        cases.append(write_segmentation_case(out, stem, sample.image, sample.mask, sample.spacing))
    labels = {0: "background", **{value: name for name, value in ULTRASOUND_STRUCTURES.items()}}
    write_dataset_json(out, cases, info.channel_names, labels, name="phantom:ultrasound")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    write_structures(args.out, args.count, args.image_size, args.seed)
    print(f"wrote {args.count} cases to {args.out}")


if __name__ == "__main__":
    main()
