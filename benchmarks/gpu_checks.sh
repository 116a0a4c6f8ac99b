#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine (see benchmarks/README.md):
#   here:    bash benchmarks/device_wheels.sh            # once: wheels the GPU image lacks -> .whl/
#   there:   bash benchmarks/gpu_checks.sh [--quick]     # carry .whl; results land in $OUT
# It installs the carried wheels (if any), then runs, each with its own time limit so one slow
# check cannot eat the others' time: the CUDA-only tests, the corruption benchmark (GPU rates
# against the 150k img/s target), the data-loading benchmark (CUDA model steps: fp32, bf16,
# channels_last, compile), a pretraining run's throughput in bf16, `probe` on CUDA, and a
# torchrun (DDP) run.
# Everything printed is also written to $OUT/gpu_checks.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
QUICK=${1:-}
exec > >(tee "$OUT/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}

if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, ctxrestore; print('torch', torch.__version__, 'ctxrestore',
ctxrestore.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name())" \
    || exit 1

step() {  # step NAME SECONDS COMMAND...: run one check with a time limit, report its status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@"
    echo "=== $name: exit $? after $((SECONDS - start)) s"
}

if [ "$QUICK" = "--quick" ]; then
    STEPS=30 LOADING=(--quick) CORRUPTION=(--quick)
else
    STEPS=300 LOADING=(--compile) CORRUPTION=()
fi
# Most important first (the issue's 150k img/s goal), the slowest (two compiles) last; the limits
# add up to 560 s, inside one device call.
step "corruption benchmark" 110 python3 benchmarks/corruption.py "${CORRUPTION[@]}" \
    --json "$OUT/corruption.json"
step "GPU tests" 110 python3 -m pytest -q -p no:cacheprovider -m gpu tests
# Pretraining as a user runs it: 2D U-Net on the brain phantom at 128x128, bf16, batch 64.
step "pretraining throughput" 100 python3 -m ctxrestore --quiet pretrain --phantom brain \
    --image-size 128 --batch-size 64 --num-images 4096 --max-steps "$STEPS" --device cuda \
    --precision bf16 --out /tmp/gpu_pretrain
cp /tmp/gpu_pretrain/log.csv "$OUT/pretrain_log.csv" 2>/dev/null
tail -n 3 /tmp/gpu_pretrain/log.csv 2>/dev/null  # images_per_second is the 5th column
# The probe on the GPU: that pretraining against random weights, as fine-tuning would start.
step "probe on CUDA" 30 python3 -m ctxrestore --quiet probe segment --init /tmp/gpu_pretrain \
    --init random --image-size 128 --num-images 400 --fraction 0.25 --device cuda \
    --out "$OUT/probe"
# The same through torchrun on one GPU: the launcher and the rank-0 writes. One process is
# world size 1 (no process group); NCCL between ranks needs two GPUs (tests/test_distributed.py
# runs two ranks on gloo, including a whole benchmark).
step "torchrun (DDP, 1 GPU)" 60 python3 -m torch.distributed.run --standalone \
    --nproc_per_node 1 -m ctxrestore --quiet pretrain --phantom brain --image-size 64 \
    --batch-size 32 --num-images 512 --max-steps 20 --device cuda --out /tmp/gpu_ddp
ls /tmp/gpu_ddp
step "data-loading benchmark" 150 python3 benchmarks/data_loading.py "${LOADING[@]}" \
    --json "$OUT/data_loading.json"
