"""Phantom generation speed: 2,000 2D images of 128x128 per phantom (goal: < 30 s on 2 cores).

Generation is per image and independent, so a DataLoader with 2 workers (or `ctxrestore
phantoms`) uses both cores; this script times one process and a 2-process pool in the same run.

    python benchmarks/phantoms.py [--count 2000] [--size 128]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

from ctxrestore.data.phantoms import get_phantom, list_phantoms


def generate(name: str, start: int, stop: int, size: int) -> int:
    generator = get_phantom(name).generator
    for index in range(start, stop):
        generator(index, seed=0, spatial_size=(size, size))
    return stop - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    print(f"{'phantom':<12} {'1 process':>12} {'2 processes':>12}  goal < 30 s for {args.count}")
    for name in list_phantoms():
        started = time.perf_counter()
        generate(name, 0, args.count, args.size)
        single = time.perf_counter() - started
        started = time.perf_counter()
        half = args.count // 2
        with ProcessPoolExecutor(2) as pool:
            jobs = [
                pool.submit(generate, name, 0, half, args.size),
                pool.submit(generate, name, half, args.count, args.size),
            ]
            assert sum(job.result() for job in jobs) == args.count
        double = time.perf_counter() - started
        verdict = "PASS" if double < 30 else "FAIL"
        print(f"{name:<12} {single:>10.1f} s {double:>10.1f} s  {verdict}")


if __name__ == "__main__":
    main()
