"""How hard is a phantom when labels are few? Brain-tumour segmentation from random init.

Trains a small U-Net from scratch on a fraction of a fixed training pool, for each fraction
and seed, and reports the global test Dice (all test voxels pooled; mean and standard
deviation over seeds) on a fixed test set drawn from another phantom seed. Issue 3 asks for
this table for every phantom; the classification and localisation rows wait for their tasks.

    python benchmarks/phantom_hardness.py [--pool 400] [--steps 300] [--seeds 3] [--size 64]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Subset

from ctxrestore.data.phantoms import phantom_dataset
from ctxrestore.data.phantoms.brain import BRATS_LABELS, BRATS_REGIONS
from ctxrestore.engine.distributed import DistributedContext
from ctxrestore.engine.loop import LoopConfig, fit
from ctxrestore.models import create_model, model_spec
from ctxrestore.tasks import SegmentationTask

TASK = SegmentationTask(tuple(BRATS_LABELS), tuple(BRATS_LABELS.values()), regions=BRATS_REGIONS)
FRACTIONS = (0.05, 0.10, 0.25, 0.50, 1.00)
TEST_SEED = 1_000  # test images come from another phantom seed than the training pool


def train_and_test(train, test, *, steps: int, seed: int, batch_size: int) -> dict[str, float]:
    spec = model_spec("unet", in_channels=4, out_channels=4, channels=(8, 16, 32, 64))
    torch.manual_seed(seed)
    model = create_model(spec["name"], **spec["kwargs"])
    config = LoopConfig(
        max_steps=steps,
        batch_size=min(batch_size, len(train)),
        learning_rate=2e-3,
        warmup_steps=steps // 10,
        log_every=max(1, steps // 4),
        checkpoint_every=steps,
        seed=seed,
    )
    context = DistributedContext(0, 0, 1, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model=model, dataset=train, task=TASK, config=config, context=context,
            run_dir=run_dir, spec={"model": spec})  # fmt: skip
    return TASK.evaluate(model, DataLoader(test, batch_size=32), context.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pool", type=int, default=400, help="training images at 100%%")
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    logging.disable(logging.INFO)
    size = (args.size, args.size)
    pool = phantom_dataset("brain", args.pool, spatial_size=size)
    test = phantom_dataset("brain", args.test, seed=TEST_SEED, spatial_size=size)
    print(f"brain phantom {size}, pool {args.pool}, test {args.test}, {args.steps} steps, "
          f"U-Net 8..64 from random init, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'fraction':>8} {'images':>6} {'whole tumour':>14} {'tumour core':>14} "
          f"{'enhancing':>14} {'seconds':>8}")  # fmt: skip
    for fraction in FRACTIONS:
        count = max(2, round(fraction * args.pool))
        scores: dict[str, list[float]] = {}
        started = time.perf_counter()
        for seed in range(args.seeds):
            chosen = torch.randperm(args.pool, generator=torch.Generator().manual_seed(seed))
            train = Subset(pool, chosen[:count].tolist())
            metrics = train_and_test(
                train, test, steps=args.steps, seed=seed, batch_size=args.batch_size
            )
            for region in BRATS_REGIONS:
                scores.setdefault(region, []).append(metrics[f"global_dice/{region}"])
        cells = [
            f"{statistics.mean(v):.3f}±{statistics.stdev(v) if len(v) > 1 else 0:.3f}"
            for v in scores.values()
        ]
        elapsed = time.perf_counter() - started
        print(f"{fraction:>8.0%} {count:>6} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} "
              f"{elapsed:>8.0f}")  # fmt: skip


if __name__ == "__main__":
    main()
