#!/usr/bin/env bash
# The issue-10 measurements on one accelerator, in one go (about 10 minutes on a
# large GPU): the CIFAR-10 train step in bf16 at batch 128 and up to the largest that
# fits, then the three samplers at batch 256. Writes JSON lines to $OUT_DIR and the
# console; record them in docs/benchmarks.md with the device's name.
#
#   OUT_DIR=bench_out benchmarks/gpu_run.sh
#   BATCHES=8 SAMPLE_BATCHES=8 METHODS=ddim DTYPE=float32 benchmarks/gpu_run.sh  # a CPU dry run
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench_out}
BATCHES=${BATCHES:-128,256,512,1024,2048,4096}
SAMPLE_BATCHES=${SAMPLE_BATCHES:-256}
METHODS=${METHODS:-ancestral,ddim,dpm_solver++}
DTYPE=${DTYPE:-bfloat16}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
"$PYTHON" -c "import jax; print(jax.devices())"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PYTHON" benchmarks/model_bench.py --which=cifar10 --dtype="$DTYPE" --batches="$BATCHES" \
    --steps=10 | tee "$OUT_DIR/model_bench.jsonl"
"$PYTHON" benchmarks/sampler_bench.py --which=cifar10 --dtype="$DTYPE" \
    --batch_sizes="$SAMPLE_BATCHES" --methods="$METHODS" --repeats=3 \
    | tee "$OUT_DIR/sampler_bench.jsonl"
