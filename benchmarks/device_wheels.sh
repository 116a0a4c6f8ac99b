#!/usr/bin/env bash
# Download (here, where PyPI answers) the wheels that a lent GPU machine's image lacks, into
# .whl/ (git-ignored), for benchmarks/gpu_checks.sh: carry ".whl" with the device call. That
# image has Python 3.12 with torch, numpy, scipy, rich, typer, safetensors, matplotlib,
# scikit-image, einops, jaxtyping, humanize, tqdm and wrapt; not MONAI, the medical readers or
# TorchIO (the corruption benchmark's baseline). Versions: what this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    monai==1.6.1 nibabel==5.4.2 pydicom==3.0.2 simpleitk==2.5.7 torchio==1.2.1 \
    deprecated==1.3.1
du -sh .whl
