"""Throughput of ctxrestore's context-restoration corruption against TorchIO's RandomSwap.

Run: python benchmarks/corruption.py [--quick] [--repeats N] [--device cpu|cuda|auto]
     [--threads N] [--json PATH]

Both implementations do the same work in the same process: T = 20 swaps of 16-pixel (2D) or
16^3-voxel (3D) patches per image. ctxrestore corrupts the whole batch in one call; TorchIO's
RandomSwap is called once per image, as a DataLoader worker would. Their timed rounds are
interleaved (ctxrestore, TorchIO, ctxrestore, ...), so slow phases of a shared machine hit
both, and each ratio is the median of the per-round ratios.

Timing: one warm-up call, one timed call to size a round (enough calls for about
min_time / repeats seconds), then rounds until there are at least `repeats` of them and
`min_time` seconds per implementation; rates come from the median round. On CUDA the device
is synchronized before and after every round.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from ctxrestore import context_restoration

NUM_SWAPS = 20
PATCH = 16
ANCHOR_STEP_RATE = 2711.0  # img/s of a 2D U-Net pretraining step (the anchor)
GPU_TARGET_2D = 150_000.0  # img/s, goal for 2D corruption on the GPU
CPU_GOAL_RATIO = 10.0  # ctxrestore vs TorchIO on CPU
GPU_LARGE_BATCH = 512  # extra GPU line: how far launch overhead amortizes

try:
    import torchio
except ImportError:  # the ctxrestore rows still run
    torchio = None


@dataclass
class Row:
    case: str
    impl: str
    device: str
    dtype: str
    batch: int
    unit: str  # "img/s" or "vol/s"
    rate: float  # images (volumes) per second, from the median round
    spread: float  # (p75 - p25) / median of the round times
    rounds: int
    calls_per_round: int
    changed: float | None = None  # fraction of voxels that moved in the warm-up output
    ratio: float | None = None  # vs TorchIO on CPU, median of the per-round ratios
    notes: list[str] = field(default_factory=list)


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def measure(
    functions: dict[str, Callable[[], object]],
    *,
    sync: Callable[[], None],
    min_time: float,
    repeats: int,
    max_rounds: int = 200,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per call of each function, one entry per round (interleaved); calls per round."""
    calls: dict[str, int] = {}
    for name, function in functions.items():
        function()  # warm-up
        sync()
        start = time.perf_counter()
        function()
        sync()
        elapsed = max(time.perf_counter() - start, 1e-7)
        calls[name] = max(1, math.ceil(min_time / repeats / elapsed))
    per_call: dict[str, list[float]] = {name: [] for name in functions}
    spent = dict.fromkeys(functions, 0.0)
    for _ in range(max_rounds):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            for _ in range(calls[name]):
                function()
            sync()
            elapsed = time.perf_counter() - start
            spent[name] += elapsed
            per_call[name].append(elapsed / calls[name])
        rounds = len(per_call[next(iter(functions))])
        if rounds >= repeats and min(spent.values()) >= min_time:
            break
    return per_call, calls


def _row(case, impl, device, dtype, batch, unit, times, calls, changed=None) -> Row:
    median = statistics.median(times)
    spread = (_quantile(times, 0.75) - _quantile(times, 0.25)) / median
    return Row(
        case, impl, device, dtype, batch, unit, batch / median, spread, len(times), calls, changed
    )


def _changed_fraction(before: torch.Tensor, after: torch.Tensor) -> float:
    return float((before != after).float().mean())


def make_2d(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 1, size, size, generator=generator)


def make_3d(channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(1, channels, size, size, size, generator=generator)


def make_2d_with_background(batch: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Noise inside a centred disk of radius 0.35 * size (38% of the image), exactly 0 outside."""
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    disk = (axis[:, None] ** 2 + axis[None, :] ** 2) <= (0.35 * size) ** 2
    images = torch.rand(batch, 1, size, size, generator=generator) + 0.5
    return images * disk


def compare_cpu(
    case: str,
    images: torch.Tensor,
    unit: str,
    args: argparse.Namespace,
) -> list[Row]:
    """ctxrestore (whole batch per call) vs TorchIO (one call per image) on the CPU."""
    batch = images.shape[0]
    spatial_dims = images.dim() - 2
    generator = torch.Generator().manual_seed(0)

    def run_ctx() -> torch.Tensor:
        return context_restoration(images, NUM_SWAPS, PATCH, generator)

    buffer = torch.empty_like(images)

    def run_ctx_buffer() -> torch.Tensor:  # a loader that reuses its output buffer
        return context_restoration(images, NUM_SWAPS, PATCH, generator, out=buffer)

    working = images.clone()

    def run_ctx_in_place() -> torch.Tensor:  # a loader that corrupts its own batch
        return context_restoration(working, NUM_SWAPS, PATCH, generator, out=working)

    changed_ctx = _changed_fraction(images, run_ctx())
    functions: dict[str, Callable[[], object]] = {
        "ctx": run_ctx, "ctx_out": run_ctx_buffer, "ctx_inplace": run_ctx_in_place,
    }  # fmt: skip
    changed_tio = None
    if torchio is not None:
        # Own storage per image, as a DataLoader yields: TorchIO deep-copies its input, and
        # a view into the batch would copy the whole batch's storage every call.
        if spatial_dims == 2:  # TorchIO is 3D only: (C, H, W) -> (C, H, W, 1)
            per_image = [image.unsqueeze(-1).clone() for image in images]
            patch = (PATCH, PATCH, 1)
        else:
            per_image = [image.clone() for image in images]  # (C, D, H, W) as TorchIO's W, H, D
            patch = (PATCH, PATCH, PATCH)
        swap = torchio.RandomSwap(patch_size=patch, num_iterations=NUM_SWAPS)
        torch.manual_seed(0)  # TorchIO draws from torch's global generator

        def run_tio() -> list[torch.Tensor]:
            return [swap(image) for image in per_image]

        outputs = run_tio()
        changed_tio = statistics.fmean(_changed_fraction(a, b) for a, b in zip(per_image, outputs))
        functions["tio"] = run_tio

    # The least any out-of-place corruption must do: write one copy of the batch. Its ratio
    # to TorchIO is the ceiling for ctxrestore's ratio.
    functions["clone"] = images.clone

    times, calls = measure(
        functions, sync=lambda: None, min_time=args.min_time, repeats=args.repeats
    )
    rows = []
    for key, impl, changed in (
        ("ctx", "ctxrestore", changed_ctx),
        ("ctx_out", "ctxrestore out=", changed_ctx),
        ("ctx_inplace", "ctxrestore in place", changed_ctx),
        ("tio", "torchio", changed_tio),
        ("clone", "clone (floor)", 0.0),
    ):
        if key not in times:
            continue
        row = _row(case, impl, "cpu", "float32", batch, unit, times[key], calls[key], changed)
        if "tio" in times:
            row.ratio = statistics.median(t / c for c, t in zip(times[key], times["tio"]))
        rows.append(row)
    return rows


def ctx_only(
    case: str,
    images: torch.Tensor,
    unit: str,
    args: argparse.Namespace,
    *,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    foreground_threshold: float | None = None,
) -> Row:
    images = images.to(device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run() -> torch.Tensor:
        return context_restoration(
            images, NUM_SWAPS, PATCH, generator, foreground_threshold=foreground_threshold
        )

    changed = _changed_fraction(images, run())
    times, calls = measure({"ctx": run}, sync=sync, min_time=args.min_time, repeats=args.repeats)
    dtype_name = str(dtype).removeprefix("torch.")
    return _row(
        case,
        "ctxrestore",
        device.type,
        dtype_name,
        images.shape[0],
        unit,
        times["ctx"],
        calls["ctx"],
        changed,
    )


def compare_placements(
    case: str, images: torch.Tensor, args: argparse.Namespace, *, device: torch.device
) -> tuple[Row, float]:
    """Poisson-disc placement (every patch isolated, dart throwing) against the uniform one,
    rounds interleaved: its row, and its time per call over the uniform one's (median of the
    per-round ratios)."""
    images = images.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(placement: str) -> Callable[[], torch.Tensor]:
        return lambda: context_restoration(images, NUM_SWAPS, PATCH, generator, placement=placement)

    functions = {"uniform": run("uniform"), "poisson_disc": run("poisson_disc")}
    changed = _changed_fraction(images, functions["poisson_disc"]())
    times, calls = measure(functions, sync=sync, min_time=args.min_time, repeats=args.repeats)
    row = _row(case, "ctx poisson_disc", device.type, "float32", images.shape[0], "img/s",
               times["poisson_disc"], calls["poisson_disc"], changed)  # fmt: skip
    cost = statistics.median(p / u for p, u in zip(times["poisson_disc"], times["uniform"]))
    return row, cost


def print_table(rows: list[Row], tio_rates: dict[str, float]) -> None:
    header = (
        f"{'case':<24} {'implementation':<16} {'device':<6} {'dtype':<8} {'batch':>5} "
        f"{'rate':>15} {'IQR':>5} {'rounds':>9} {'moved':>6} {'vs TorchIO':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rate = f"{row.rate:,.0f} {row.unit}" if row.rate >= 100 else f"{row.rate:.2f} {row.unit}"
        rounds = f"{row.rounds}x{row.calls_per_round}"
        moved = "-" if row.changed is None else f"{100 * row.changed:.1f}%"
        if row.ratio is not None:
            ratio = f"{row.ratio:.1f}x"
        elif row.case in tio_rates and row.device != "cpu":
            ratio = f"({row.rate / tio_rates[row.case]:,.1f}x)"  # vs TorchIO on CPU
        else:
            ratio = "-"
        print(
            f"{row.case:<24} {row.impl:<16} {row.device:<6} {row.dtype:<8} {row.batch:>5} "
            f"{rate:>15} {100 * row.spread:>4.0f}% {rounds:>9} {moved:>6} {ratio:>10}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9, help="minimum timed rounds (9)")
    parser.add_argument(
        "--min-time", type=float, default=None, help="seconds per implementation (1.5; quick 0.3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: batch 16, 64^3 volume, 0.3 s per case"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="extra ctxrestore GPU cases: auto = when CUDA is available, cuda = required, "
        "cpu = skip (the CPU comparison with TorchIO always runs)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core; a DataLoader worker uses 1)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.min_time is None:
        args.min_time = 0.3 if args.quick else 1.5
    args.repeats = max(1, args.repeats)
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")

    batch_2d, size_2d = (16, 256) if args.quick else (64, 256)
    channels_3d, size_3d = (4, 64) if args.quick else (4, 128)
    case_2d = f"2D {batch_2d}x1x{size_2d}^2"
    case_3d = f"3D 1x{channels_3d}x{size_3d}^3"
    case_fg = f"2D {batch_2d}x1x{size_2d}^2 fg"

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"torchio {getattr(torchio, '__version__', 'not installed')}, "
        f"CPUs {os.cpu_count()} (usable {affinity}), torch threads {torch.get_num_threads()}"
    )
    gpu_name = torch.cuda.get_device_name() if use_cuda else None
    print(f"GPU: {gpu_name or 'none used'}")
    print(
        f"T={NUM_SWAPS} swaps of {PATCH}-voxel patches per image; min {args.min_time} s and "
        f">= {args.repeats} rounds per implementation; rates from the median round"
        + (" [--quick]" if args.quick else "")
    )
    print()

    data_generator = torch.Generator().manual_seed(1234)
    images_2d = make_2d(batch_2d, size_2d, data_generator)
    volume = make_3d(channels_3d, size_3d, data_generator)
    images_fg = make_2d_with_background(batch_2d, size_2d, data_generator)

    rows: list[Row] = []
    rows += compare_cpu(case_2d, images_2d, "img/s", args)
    rows += compare_cpu(case_3d, volume, "vol/s", args)
    fg_row = ctx_only(
        case_fg, images_fg, "img/s", args, device=torch.device("cpu"), foreground_threshold=0.0
    )
    fg_row.notes.append("foreground_threshold=0.0, disk foreground 38% of the image")
    rows.append(fg_row)
    placement_costs = {}
    pd_row, placement_costs["cpu"] = compare_placements(
        case_2d, images_2d, args, device=torch.device("cpu")
    )
    rows.append(pd_row)

    gpu_rows: dict[str, Row] = {}
    if use_cuda:
        cuda = torch.device("cuda")
        for key, case, images, unit, dtype in (
            ("2d", case_2d, images_2d, "img/s", torch.float32),
            ("2d_bf16", case_2d, images_2d, "img/s", torch.bfloat16),
            ("3d", case_3d, volume, "vol/s", torch.float32),
            ("3d_bf16", case_3d, volume, "vol/s", torch.bfloat16),
        ):
            gpu_rows[key] = ctx_only(case, images, unit, args, device=cuda, dtype=dtype)
        gpu_rows["2d_fg"] = ctx_only(
            case_fg, images_fg, "img/s", args, device=cuda, foreground_threshold=0.0
        )
        gpu_rows["2d_pd"], placement_costs["cuda"] = compare_placements(
            case_2d, images_2d, args, device=cuda
        )
        big = make_2d(GPU_LARGE_BATCH, size_2d, data_generator)
        gpu_rows["2d_large"] = ctx_only(
            f"2D {GPU_LARGE_BATCH}x1x{size_2d}^2", big, "img/s", args, device=cuda
        )
        rows += gpu_rows.values()

    tio_rates = {row.case: row.rate for row in rows if row.impl == "torchio"}
    print_table(rows, tio_rates)
    print()
    print("notes:")
    print(
        "  - 'moved': voxels that changed place in one warm-up output (same work check; later "
        "swaps may overlap earlier ones in both implementations)."
    )
    print(
        "  - TorchIO's RandomSwap only rejects a second patch with the same corner as the "
        "first, so partly overlapping pairs slip through; ctxrestore draws isolated "
        "(non-overlapping) pairs exactly. Not measured here."
    )
    print(
        "  - TorchIO runs once per image with its default copy=True and outputs are not "
        "collated into a batch (a DataLoader would also stack them)."
    )
    print(
        "  - vs TorchIO = median of per-round time ratios (rounds interleaved); IQR = spread "
        "of the round times; rounds = rounds x calls per round."
    )
    print(
        "  - clone (floor): one copy of the batch, the least an out-of-place corruption must "
        "write; its 'vs TorchIO' is the ceiling for ctxrestore's ratio on this machine."
    )
    print(
        "  - out=: the same call writing into a reused buffer (as a loader that owns its "
        "output); a fresh 32 MB tensor costs a page fault per 4 KB on first touch."
    )
    print(
        "  - in place: out= the input itself (a loader that corrupts the batch it owns, keeping "
        "a copy of the target only if it needs one): no copy, only the swaps."
    )
    print(
        "  - fg: foreground_threshold=0.0 on images that are 0 outside a centred disk (38% of "
        "the area); no TorchIO equivalent."
    )
    print(
        "  - ctx poisson_disc: placement='poisson_disc' (all 2T patches isolated, dart "
        "throwing), timed in rounds interleaved with the uniform placement's."
    )
    if gpu_rows:
        print("  - GPU rows: (Nx) compares with TorchIO on the CPU, one core-bound call per image.")
    print()

    goals: dict[str, dict[str, object]] = {}
    for device_type, cost in placement_costs.items():
        goals[f"poisson_disc_cost_{device_type}"] = {"ratio": cost}
        print(
            f"cost: poisson_disc placement on {device_type} takes {cost:.2f}x the time of the "
            f"uniform one ({case_2d}, same rounds)"
        )
    for key, case in (("2D", case_2d), ("3D", case_3d)):
        for impl, label in (
            ("ctxrestore", "new tensor"),
            ("ctxrestore out=", "out= buffer"),
            ("ctxrestore in place", "in place"),
        ):
            ctx_row = next(r for r in rows if r.case == case and r.impl == impl)
            goal = f"goal: {key} >= {CPU_GOAL_RATIO:.0f}x TorchIO on CPU ({label})"
            if ctx_row.ratio is None:
                print(f"{goal}: SKIPPED (no torchio)")
                continue
            passed = ctx_row.ratio >= CPU_GOAL_RATIO
            name = f"{key.lower()}_cpu_vs_torchio" + ("_out" if impl.endswith("=") else "")
            goals[name] = {"ratio": ctx_row.ratio, "pass": passed}
            print(f"{goal}: {'PASS' if passed else 'FAIL'} (ratio {ctx_row.ratio:.1f})")
    if gpu_rows:
        rate = gpu_rows["2d"].rate
        passed = rate >= GPU_TARGET_2D
        goals["2d_gpu_rate"] = {"rate": rate, "target": GPU_TARGET_2D, "pass": passed}
        print(
            f"goal: 2D GPU >= {GPU_TARGET_2D:,.0f} img/s (batch {batch_2d}, float32): "
            f"{'PASS' if passed else 'FAIL'} ({rate:,.0f} img/s)"
        )
        step_us = 1e6 / ANCHOR_STEP_RATE
        for key in ("2d", "2d_bf16", "2d_large"):
            row = gpu_rows[key]
            fraction = ANCHOR_STEP_RATE / row.rate
            goals[f"{key}_gpu_step_fraction"] = {"fraction": fraction}
            print(
                f"cost: {row.case} {row.dtype} GPU corruption {1e6 / row.rate:.2f} us/img = "
                f"{100 * fraction:.2f}% of a 2D U-Net step ({step_us:.0f} us/img at "
                f"{ANCHOR_STEP_RATE:.0f} img/s)"
            )
    else:
        print(
            f"GPU: not measured (CUDA {'unavailable' if not torch.cuda.is_available() else 'off'})"
            f"; target 2D GPU >= {GPU_TARGET_2D:,.0f} img/s and step-cost fraction not checked"
        )

    if args.json:
        payload = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchio": getattr(torchio, "__version__", None),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity,
            "torch_threads": torch.get_num_threads(),
            "gpu": gpu_name,
            "settings": {
                "quick": args.quick,
                "repeats": args.repeats,
                "min_time": args.min_time,
                "num_swaps": NUM_SWAPS,
                "patch": PATCH,
                "anchor_step_rate": ANCHOR_STEP_RATE,
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
