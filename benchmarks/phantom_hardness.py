"""How hard is each phantom when labels are few? Every task from random initialisation.

For each task phantom (ultrasound -> classify, abdomen -> localize, brain -> segment), label
fraction and seed, runs `ctxrestore.finetune(task, init="random", fraction=F, seed=S)` with
one recipe, and prints the task metric on the fixed test split (mean and standard deviation
over seeds) as a Markdown table. Finished runs (metrics.json present) are skipped, so the
script can be interrupted and started again.

    python benchmarks/phantom_hardness.py --out runs/hardness [--tasks classify,segment]
        [--fractions 0.05,0.1,0.25,0.5,1.0] [--seeds 3] [--steps 600] [--threads 1]
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


def run(task: str, fraction: str, seed: int, args) -> dict | None:
    out = Path(args.out) / task / f"fraction_{fraction}" / f"seed_{seed}"
    if args.table_only and not (out / "metrics.json").is_file():
        return None
    if not (out / "metrics.json").is_file():
        ctxrestore.finetune(
            task,
            out=out,
            init="random",
            fraction=fraction,
            seed=seed,
            num_images=args.num_images,
            image_size=args.image_size,
            width=args.width,
            max_steps=args.steps,
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
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--num-images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
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
        print(f"\n### {task} (random initialisation; mean ± sd over {args.seeds} seeds)\n")
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
