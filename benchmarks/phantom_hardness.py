"""How hard is each phantom when labels are few? Every task from random initialisation.

For each task phantom (ultrasound -> classify, abdomen -> localize, brain -> segment), label
fraction and seed, runs `ctxrestore.finetune(task, init="random", fraction=F, seed=S)` with
one recipe, and prints the task metric on the fixed test split (mean and standard deviation
over seeds) as a Markdown table. Finished runs (metrics.json present) are skipped, so the
script can be interrupted and started again.

    python benchmarks/phantom_hardness.py --out runs/hardness [--tasks classify,segment]
        [--fractions 0.05,0.1,0.25,0.5,1.0] [--seeds 3] [--threads 1]

Each task has its recipe (RECIPES: labelled pool, step cap, image size); --num-images, --steps
and --image-size override it for every task. A run trains 30 epochs of at least 20 steps, at
most the step cap, with early stopping on the validation split: small fractions stop early.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import ctxrestore

METRICS = {  # task -> the metrics to report (the first is the headline)
    "classify": ("macro_f1", "accuracy"),
    "localize": ("iou/mean", "wall_mm/mean", "detection_rate/mean"),
    "segment": ("global_dice/mean", "global_dice/whole_tumour", "global_dice/tumour_core",
                "global_dice/enhancing_tumour"),
}  # fmt: skip


# task -> labelled phantom cases, step cap, image size. Classification and localisation need
# the larger pool: on 420 training images "all labels" does not do well however long it trains
# (macro-F1 near 0.6; box IoU 0.36 at the 600-step cap), experiments 9 and 12 in
# docs/experiments.md; localisation also needs 128x128 (experiment 3).
RECIPES = {
    "classify": {"num_images": 2000, "steps": 3000, "image_size": 64},
    "localize": {"num_images": 2000, "steps": 3000, "image_size": 128},
    "segment": {"num_images": 600, "steps": 600, "image_size": 64},
}


def recipe(task: str, args) -> dict:
    """The task's recipe with the command line's overrides."""
    return {key: getattr(args, key) or value for key, value in RECIPES[task].items()}


def run(task: str, fraction: str, seed: int, args) -> dict | None:
    out = Path(args.out) / task / f"fraction_{fraction}" / f"seed_{seed}"
    if args.table_only and not (out / "metrics.json").is_file():
        return None
    if not (out / "metrics.json").is_file():
        settings = recipe(task, args)
        ctxrestore.finetune(
            task,
            out=out,
            init="random",
            fraction=fraction,
            seed=seed,
            num_images=settings["num_images"],
            image_size=settings["image_size"],
            width=args.width,
            max_steps=settings["steps"],
            device="cpu",
            log_every=50,
            resume=out.is_dir(),
        )
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/hardness")
    parser.add_argument("--tasks", default="classify,localize,segment")
    parser.add_argument("--fractions", default="0.05,0.1,0.25,0.5,1.0")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, help="step cap (default: the task's recipe)")
    parser.add_argument("--num-images", type=int, help="labelled cases (the task's recipe)")
    parser.add_argument("--image-size", type=int, help="image side (the task's recipe)")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument(
        "--table-only", action="store_true", help="tabulate the finished runs, train nothing"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fractions = args.fractions.split(",")
    started = time.perf_counter()
    for task in args.tasks.split(","):
        names = METRICS[task]
        settings = ", ".join(f"{key} {value}" for key, value in recipe(task, args).items())
        print(f"\n### {task} (random initialisation; mean ± sd over {args.seeds} seeds)\n")
        print(f"{settings}\n")
        print("| fraction | train cases | seeds | " + " | ".join(names) + " |")
        print("| --- | --- | --- |" + " --- |" * len(names))
        for fraction in fractions:
            results = [run(task, fraction, seed, args) for seed in range(args.seeds)]
            results = [result for result in results if result is not None]
            if not results:
                continue
            cells = []
            for name in names:
                values = [r["test"][name] for r in results]
                spread = statistics.stdev(values) if len(values) > 1 else float("nan")
                cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
            cases = results[0]["split"]["train"]["cases"]
            row = f"| {float(fraction):.0%} | {cases} | {len(results)} | " + " | ".join(cells)
            print(row + " |", flush=True)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
