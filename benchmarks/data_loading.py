"""Images per second of the pretraining loader alone against the model step alone.

Run: python benchmarks/data_loading.py [--quick] [--data DIR] [--workers 0,2] [--no-3d]
     [--image-size 256] [--patch 64] [--batch 64] [--device cpu|cuda|auto] [--json PATH]

The loader is `ctxrestore.data.unlabelled.UnlabelledDataset` (what `pretrain` reads) behind a
`torch.utils.data.DataLoader(batch_size, shuffle=True, num_workers=W, drop_last=True)`, with
and without the batched context-restoration corruption (`pretext.make_batch`, T=20 swaps of
16-pixel patches) applied to every batch in the main process, as the training loop does. The
model step is forward + MSE + backward + AdamW of the 2D U-Net (channels 32..512) on random
tensors in the same run: on the CPU in fp32, on CUDA also with bf16 autocast, channels_last
and optionally torch.compile. A loader/model ratio above 1 means the loader keeps up.

Stages:
  - cold build: decode + preprocess + write the on-disk cache (empty cache folder; the files
    themselves may be in the OS page cache, as they just were written);
  - warm build: the same dataset again, every case a cache hit (asserted);
  - loader: whole epochs as the training loop runs them (persistent workers, started once);
    'steady' leaves out each epoch's wait for its first batch.

Data: by default N synthetic CT-like int16 NIfTI volumes (HU: air around a body ellipse with
lungs and a spine) written to a temporary folder; --data DIR reads your own folder instead (any
layout `UnlabelledDataset` reads), with the cache in a temporary folder so the first build is
cold. Timing: rates over at least --min-time seconds per loader row; the model step runs a
warm-up step, then --model-steps timed steps (CUDA: synchronized). On a CPU the model step is
so slow that it uses a smaller batch (--model-batch); its images/s hardly depends on it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import rich
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ctxrestore.data.cache import ArrayCache
from ctxrestore.data.nifti import write_nifti
from ctxrestore.data.preprocess import Preprocessing
from ctxrestore.data.unlabelled import UnlabelledDataset
from ctxrestore.models import build_model, model_spec
from ctxrestore.pretext import create_pretext

NUM_SWAPS = 20
PATCH = 16
# DESIGN.md "Performance anchors": one H200, 2D U-Net batch 64 of 1x256x256 (img/s) and
# 3D U-Net batch 2 of 4x128^3 (vol/s).
ANCHORS_2D = {"fp32": 638.0, "bf16": 684.0, "bf16+channels_last": 1764.0, "+compile": 2711.0}
ANCHORS_3D = {"fp32": 20.0, "bf16": 28.0, "+compile": 37.0}
ANCHOR_VOXELS = {"2D": 256**2, "3D": 4 * 128**3}  # per image / volume of the anchors
CHANNELS_2D = (32, 64, 128, 256, 512)
CHANNELS_3D = (32, 64, 128, 256, 320)


@dataclass
class Row:
    dims: str  # "2D" or "3D"
    stage: str
    unit: str  # "img/s" or "vol/s"
    rate: float
    processes: int | None = None  # CPU processes producing batches (workers, or 1)
    steady: float | None = None  # rate without each epoch's first-batch wait
    first_batch: float | None = None  # seconds, median over epochs
    seconds: float | None = None  # build stages: wall time
    items: int | None = None
    ratio: float | None = None  # rate / model step rate of the same dims
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- data


def ct_volume(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """(z, y, x) int16 HU: -1000 air, a soft-tissue body ellipse (tapering at both ends, so
    the outermost slices are air), two lungs, a spine, and noise."""
    depth, height, width = shape
    z = np.linspace(-1, 1, depth)[:, None, None]
    y = np.linspace(-1, 1, height)[None, :, None]
    x = np.linspace(-1, 1, width)[None, None, :]
    taper = np.clip(1.15 - np.abs(z) ** 4, 0, 1)  # the last slices hold little or no body
    body = (x / (0.85 * taper + 1e-6)) ** 2 + (y / (0.6 * taper + 1e-6)) ** 2 <= 1
    lungs = (((np.abs(x) - 0.4) / 0.25) ** 2 + ((y + 0.05) / 0.35) ** 2 <= 1) & (z > -0.2)
    spine = (x / 0.1) ** 2 + ((y - 0.4) / 0.1) ** 2 <= 1
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[body] = 40.0
    hu[body & lungs] = -820.0
    hu[body & spine] = 700.0
    hu += rng.normal(0.0, 15.0, shape).astype(np.float32)
    return np.clip(hu, -1024, 3071).astype(np.int16)


def write_dataset(folder: Path, count: int, shape: tuple[int, int, int], suffix: str) -> None:
    rng = np.random.default_rng(0)
    for index in range(count):
        write_nifti(folder / f"ct_{index:03d}{suffix}", ct_volume(shape, rng), (2.5, 0.8, 0.8))


# ----------------------------------------------------------------------------- stages


def build(data, spatial_size, preprocessing, cache_root, *, expect_warm: bool):
    cache = ArrayCache(cache_root)
    start = time.perf_counter()
    dataset = UnlabelledDataset(
        data, preprocessing=preprocessing, spatial_size=spatial_size, cache=cache
    )
    seconds = time.perf_counter() - start
    if expect_warm and cache.misses:
        raise SystemExit(f"warm build: {cache.misses} cache misses (expected 0), {cache.hits} hits")
    if not expect_warm and cache.hits:
        raise SystemExit(f"cold build: {cache.hits} cache hits in an empty cache folder")
    return dataset, seconds, cache


def time_loader(dataset, *, batch, workers, corrupt, pretext, min_time, pin_memory):
    """(rate, steady rate, median first-batch seconds, images) over whole epochs."""
    loader = DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
    if len(loader) == 0:
        raise SystemExit(f"{len(dataset)} items make no batch of {batch}; lower --batch")
    generator = torch.Generator().manual_seed(0)
    images, epochs, first_waits = 0, 0, []
    start = time.perf_counter()
    while True:
        epoch_start = time.perf_counter()
        for index, item in enumerate(loader):
            if index == 0:
                first_waits.append(time.perf_counter() - epoch_start)
            clean = item["image"]
            if corrupt:
                inputs, _ = pretext.make_batch(clean, generator)
                assert inputs.shape == clean.shape
            images += clean.shape[0]
        epochs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            break
    first_images = epochs * batch
    steady = (images - first_images) / max(elapsed - sum(first_waits), 1e-9)
    steady = steady if images > first_images else None
    return images / elapsed, steady, statistics.median(first_waits), images


def time_items(dataset, min_time: float) -> float:
    """Items per second of dataset[i] alone, in order, in this process (no collate)."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        dataset[count % len(dataset)]
        count += 1
    return count / (time.perf_counter() - start)


def time_corruption(shape, pretext, min_time: float) -> float:
    images = torch.rand(shape)
    generator = torch.Generator().manual_seed(0)
    pretext.make_batch(images, generator)
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_time:
        pretext.make_batch(images, generator)
        calls += 1
    return calls * shape[0] / (time.perf_counter() - start)


def time_model_step(
    spatial_dims, channels, shape, device, *, bf16=False, channels_last=False, compile=False,
    steps=2, warmup=1,
) -> float:  # fmt: skip
    spec = model_spec(
        "unet", spatial_dims=spatial_dims, in_channels=shape[1], channels=list(channels)
    )
    model = build_model(spec).to(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train_model = torch.compile(model) if compile else model
    inputs = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    targets = torch.randn(shape, device=device).contiguous(memory_format=memory_format)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.mse_loss(train_model(inputs).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return steps * shape[0] / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- report


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.2f}" if value < 10 else f"{value:.1f}"


def print_table(rows: list[Row]) -> None:
    header = (
        f"{'':<3} {'stage':<50} {'procs':>5} {'rate':>15} {'steady':>9} {'1st batch':>9} "
        f"{'loader/model':>12}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rate = f"{_rate(row.rate)} {row.unit}"
        if row.seconds is not None:
            rate = f"{row.seconds:.2f} s"
        first = "-" if row.first_batch is None else f"{row.first_batch:.2f} s"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        procs = "-" if row.processes is None else str(row.processes)
        print(
            f"{row.dims:<3} {row.stage:<50} {procs:>5} {rate:>15} {_rate(row.steady):>9} "
            f"{first:>9} {ratio:>12}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test (under 30 s)")
    parser.add_argument("--data", type=Path, help="your own folder (default: synthetic CT)")
    parser.add_argument("--modality", default="ct", help="preprocessing modality (ct)")
    parser.add_argument("--volumes", type=int, help="synthetic volumes (8; quick 3)")
    parser.add_argument("--volume-shape", help="synthetic z,y,x (64,256,256; quick 24,128,128)")
    parser.add_argument(
        "--format", choices=("nii.gz", "nii"), default="nii.gz", help="synthetic files (nii.gz)"
    )
    parser.add_argument("--image-size", type=int, help="2D side (256; quick 128)")
    parser.add_argument("--patch", type=int, help="3D patch side (64; quick 32)")
    parser.add_argument("--batch", type=int, help="2D loader batch (64; quick 16)")
    parser.add_argument("--batch-3d", type=int, default=2, help="3D loader batch (2)")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers to try (0,2)")
    parser.add_argument("--no-3d", action="store_true", help="skip the 3D patch loader")
    parser.add_argument(
        "--model-batch",
        type=int,
        help="model-step batch (CUDA: the loader's; CPU: 2 for 2D, 1 for 3D; quick 1)",
    )
    parser.add_argument("--model-steps", type=int, help="timed model steps (CPU 2, CUDA 20)")
    parser.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="auto", help="model step device"
    )
    parser.add_argument("--compile", action="store_true", help="CUDA: also a torch.compile row")
    parser.add_argument("--min-time", type=float, help="seconds per loader row (3; quick 0.5)")
    parser.add_argument("--threads", type=int, help="torch threads in the main process")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    rich.get_console().quiet = True  # UnlabelledDataset's progress bars would mix into the table
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    quick = args.quick
    volumes = args.volumes or (3 if quick else 8)
    shape = tuple(
        int(n) for n in (args.volume_shape or ("24,128,128" if quick else "64,256,256")).split(",")
    )
    size = args.image_size or (128 if quick else 256)
    patch = args.patch or (32 if quick else 64)
    batch = args.batch or (16 if quick else 64)
    min_time = args.min_time if args.min_time is not None else (0.5 if quick else 3.0)
    workers = [int(w) for w in args.workers.split(",")]
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    device = torch.device("cuda" if use_cuda else "cpu")
    model_steps = args.model_steps or (20 if use_cuda else 2 if not quick else 1)
    model_batch_2d = args.model_batch or (batch if use_cuda else 1 if quick else 2)
    model_batch_3d = args.model_batch or (args.batch_3d if use_cuda else 1)
    pretext = create_pretext("context_restoration", num_swaps=NUM_SWAPS, patch_size=PATCH)
    preprocessing = Preprocessing(modality=args.modality)

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, CPUs {os.cpu_count()} "
        f"(usable {affinity}), torch threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"
    )
    gpu_name = torch.cuda.get_device_name() if use_cuda else None
    print(f"model step device: {gpu_name or 'cpu'}" + (" [--quick]" if quick else ""))

    workdir = Path(tempfile.mkdtemp(prefix="ctxrestore-loading-"))
    rows: list[Row] = []
    try:
        if args.data is None:
            data = workdir / "data"
            data.mkdir()
            start = time.perf_counter()
            write_dataset(data, volumes, shape, "." + args.format)
            print(
                f"data: {volumes} synthetic CT volumes {shape[0]}x{shape[1]}x{shape[2]} int16 "
                f".{args.format}, spacing (2.5, 0.8, 0.8) mm, written in "
                f"{time.perf_counter() - start:.1f} s"
            )
        else:
            data = args.data
            print(f"data: {data}")
        print(
            f"2D: slices resized to {size}x{size}, batch {batch}; 3D: "
            + ("skipped" if args.no_3d else f"{patch}^3 patches, batch {args.batch_3d}")
            + f"; corruption T={NUM_SWAPS} swaps of {PATCH}-pixel patches; "
            f"loader rows >= {min_time} s; workers {workers}"
        )
        print()

        cases = [("2D", (size, size), batch, "img/s")]
        if not args.no_3d:
            cases.append(("3D", (patch,) * 3, args.batch_3d, "vol/s"))
        model_rates: dict[str, float] = {}
        model_names: dict[str, str] = {}
        item_shapes: dict[str, tuple[int, ...]] = {}
        for dims, spatial, loader_batch, unit in cases:
            cache_root = workdir / f"cache_{dims}"  # each cold build starts from an empty cache
            dataset, seconds, cache = build(
                data, spatial, preprocessing, cache_root, expect_warm=False
            )
            per_case = seconds / max(len(dataset.cases), 1)
            rows.append(
                Row(dims, f"cold build ({len(dataset.cases)} cases, {per_case:.2f} s/case)",
                    "s", 0.0, seconds=seconds, items=len(dataset))
            )  # fmt: skip
            dataset, seconds, cache = build(
                data, spatial, preprocessing, cache_root, expect_warm=True
            )
            rows.append(
                Row(dims, f"warm build ({cache.hits} hits, 0 misses, {len(dataset)} items)",
                    "s", 0.0, seconds=seconds, items=len(dataset))
            )  # fmt: skip
            item_shape = item_shapes[dims] = tuple(dataset[0]["image"].shape)
            channels = item_shape[0]
            rows.append(
                Row(dims, f"dataset[i] alone {item_shape} (no collate)", unit,
                    time_items(dataset, min_time / 2), processes=1)
            )  # fmt: skip
            for w in workers:
                for corrupt in (False, True):
                    rate, steady, first, images = time_loader(
                        dataset,
                        batch=loader_batch,
                        workers=w,
                        corrupt=corrupt,
                        pretext=pretext,
                        min_time=min_time,
                        pin_memory=use_cuda,
                    )
                    stage = f"loader W={w}, batch {loader_batch}" + (
                        " + corruption" if corrupt else ""
                    )
                    rows.append(
                        Row(dims, stage, unit, rate, processes=max(w, 1), steady=steady,
                            first_batch=first, items=images)
                    )  # fmt: skip
            rows.append(
                Row(dims, f"corruption alone, batch {loader_batch} (main process)", unit,
                    time_corruption((loader_batch, *item_shape), pretext, min_time / 2),
                    processes=1)
            )  # fmt: skip
            if dims == "2D":  # the same cache entries, slices resized on every item
                small = UnlabelledDataset(
                    data,
                    preprocessing=preprocessing,
                    spatial_size=(size // 2, size // 2),
                    cache=ArrayCache(cache_root),
                )
                rate, steady, first, images = time_loader(
                    small, batch=batch, workers=0, corrupt=False, pretext=pretext,
                    min_time=min_time, pin_memory=use_cuda,
                )  # fmt: skip
                rows.append(
                    Row(dims, f"loader W=0, resized to {size // 2}^2 (antialias)", unit, rate,
                        processes=1, steady=steady, first_batch=first, items=images)
                )  # fmt: skip
            del dataset

            # The model step alone, on random tensors of the loader's item shape.
            spatial_dims = len(spatial)
            channel_list = CHANNELS_2D if dims == "2D" else CHANNELS_3D
            model_batch = model_batch_2d if dims == "2D" else model_batch_3d
            step_shape = (model_batch, channels, *spatial)
            variants = [("fp32", {})]
            if use_cuda:
                variants.append(("bf16", {"bf16": True}))
                if dims == "2D":
                    variants.append(("bf16+channels_last", {"bf16": True, "channels_last": True}))
                if args.compile:
                    extra = {"channels_last": True} if dims == "2D" else {}
                    variants.append(("+compile", {"bf16": True, "compile": True, **extra}))
            label = "x".join(str(n) for n in step_shape)
            for name, options in variants:
                rate = time_model_step(
                    spatial_dims, channel_list, step_shape, device, steps=model_steps,
                    warmup=3 if use_cuda else 1, **options,
                )  # fmt: skip
                rows.append(
                    Row(dims, f"model step {device.type} {name}, {label}", unit, rate,
                        items=model_steps * model_batch)
                )  # fmt: skip
                if rate > model_rates.get(dims, 0.0):
                    model_rates[dims], model_names[dims] = rate, name
        for row in rows:
            if row.seconds is None and row.dims in model_rates:
                row.ratio = row.rate / model_rates[row.dims]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print_table(rows)
    print()
    print("notes:")
    print(
        "  - loader/model = the row's rate / the fastest model step of the same dims measured "
        f"here ({', '.join(f'{d} {model_names[d]}' for d in model_names)} on {device.type}); "
        "> 1 means the loader keeps up with that step."
    )
    print(
        "  - loader rows: whole epochs, workers kept across epochs (persistent, as the training "
        "loop); steady = without each epoch's first-batch wait; procs = CPU "
        "processes making batches (the corruption runs in the main process)."
    )
    if not use_cuda:
        print(
            "  - CPU model step: forward + backward + AdamW in fp32 with a small batch; its "
            "images/s is what a CPU-only run trains at, not what a GPU needs."
        )
    print()

    print(
        "vs DESIGN.md H200 anchors (the training loop corrupts on the step's device, so with a "
        "GPU the CPU loader only reads, resizes and collates; '+ corruption' = on the CPU too):"
    )
    goals: dict[str, dict] = {}
    for (dims, anchors), corrupted in itertools.product(
        (("2D", ANCHORS_2D), ("3D", ANCHORS_3D)), (False, True)
    ):
        loader_rows = [
            r
            for r in rows
            if r.dims == dims
            and r.stage.startswith("loader W=")
            and "resized" not in r.stage
            and r.stage.endswith("+ corruption") == corrupted
        ]
        if not loader_rows:
            continue
        best = max(loader_rows, key=lambda r: r.rate)
        top = next(reversed(anchors.values()))
        low_name, low = next(iter(anchors.items()))
        # Loading cost grows with the voxels: other sizes are compared per anchor-sized item.
        scale = math.prod(item_shapes[dims]) / ANCHOR_VOXELS[dims]
        rate = best.rate * scale
        anchor_item = "1x256^2" if dims == "2D" else "4x128^3"
        scaled = f" (= {_rate(rate)} {best.unit} of {anchor_item} by voxels)" if scale != 1 else ""
        per_process = rate / best.processes
        needed = math.ceil(top / per_process) if per_process > 0 else None
        top_name = "bf16+compile" if dims == "3D" else "bf16+channels_last+compile"
        print(
            f"  {dims} loader{' + corruption' if corrupted else ''}: {_rate(best.rate)} "
            f"{best.unit} on {best.processes} CPU process{'es' if best.processes > 1 else ''}"
            f"{scaled} = {rate / top:.2f}x the H200 {top_name} step rate ({top:,.0f} "
            f"{best.unit}), {rate / low:.2f}x its {low_name} rate ({low:,.0f}); about {needed} "
            f"such process(es) to keep up with {top:,.0f}"
        )
        goals[f"{dims}{'_corruption' if corrupted else ''}"] = {
            "loader_rate": best.rate,
            "stage": best.stage,
            "processes": best.processes,
            "anchor_scaled_rate": rate,
            "vs_top_anchor": rate / top,
            "vs_fp32_anchor": rate / low,
            "processes_needed_for_top_anchor": needed,
            "keeps_up": rate >= top,
        }

    if args.json:
        payload = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity,
            "torch_threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "gpu": gpu_name,
            "settings": {
                "quick": quick,
                "data": str(args.data) if args.data else None,
                "volumes": volumes,
                "volume_shape": shape,
                "format": args.format,
                "image_size": size,
                "patch": patch,
                "batch": batch,
                "batch_3d": args.batch_3d,
                "workers": workers,
                "min_time": min_time,
                "model_batch_2d": model_batch_2d,
                "model_batch_3d": model_batch_3d,
                "model_steps": model_steps,
                "anchors_2d": ANCHORS_2D,
                "anchors_3d": ANCHORS_3D,
            },
            "results": [asdict(row) for row in rows],
            "goals": goals,
        }
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
