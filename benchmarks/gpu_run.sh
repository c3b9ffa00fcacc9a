#!/usr/bin/env bash
# The accelerator measurements (docs/benchmarks.md, "GPU"). Each part has its own time
# limit, so one slow part cannot take the rest with it; every part writes JSON lines to
# $OUT_DIR and the console. On an H200 each CIFAR-10 train step compiles in about 50 s,
# so all parts take about 12 minutes: run them as two calls where one is capped at 10
# (PARTS=train,samplers then PARTS=remat,multistep). The parts:
#   1. versions and the device;
#   2. the CIFAR-10 train step in $DTYPE at batch 128 up to the largest that fits,
#      without and with rematerialisation (model_bench.py: step time, images/s, share
#      of the matmul rate measured in the same process, peak memory);
#   3. k = 1, 4, 16 train steps per call (a lax.scan) on the digits default and on
#      CIFAR-10 (multistep_bench.py);
#   4. 256 CIFAR-10 samples by ancestral 1000, DDIM 50 and DPM-Solver++ 20 steps,
#      compile time and seconds (sampler_bench.py).
#
# On a machine without the project's dependencies (an image with jax, flax and optax
# but no network), carry wheels of: ml_collections, tensorboardX, tensorflow-datasets,
# grain, array_record, dm-tree, promise, simple-parsing, tensorflow-metadata, termcolor,
# toml, immutabledict, docstring_parser, portpicker (model_bench and sampler_bench need
# only ml_collections; multistep_bench imports the trainer, hence the data stack).
#
#   OUT_DIR=bench_out benchmarks/gpu_run.sh
#   BATCHES=8 REMAT_BATCHES=8 SAMPLE_BATCHES=8 CIFAR_MULTI_BATCH=8 METHODS=ddim \
#     DTYPE=float32 MATMUL_N=512 benchmarks/gpu_run.sh        # a CPU dry run
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT_DIR:-bench_out}
PARTS=${PARTS:-train,remat,multistep,samplers}
BATCHES=${BATCHES:-128,1024,4096}
REMAT_BATCHES=${REMAT_BATCHES:-128,8192}
SAMPLE_BATCHES=${SAMPLE_BATCHES:-256}
CIFAR_MULTI_BATCH=${CIFAR_MULTI_BATCH:-128}
METHODS=${METHODS:-ancestral,ddim,dpm_solver++}
DTYPE=${DTYPE:-bfloat16}
# 8192^3 saturates a large GPU (2048^3 reached only 119 of its ~790 bf16 TFLOP/s).
MATMUL_N=${MATMUL_N:-8192}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1

wanted() { [[ ",$PARTS," == *",$1,"* ]]; }

part() {  # part NAME SECONDS COMMAND...: run with a time limit, tee to NAME.jsonl
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>"$OUT_DIR/$name.err" | tee "$OUT_DIR/$name.jsonl"
  local rc=${PIPESTATUS[0]}
  echo "{\"part\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - start))}" \
    | tee -a "$OUT_DIR/parts.jsonl"
  [ "$rc" = 0 ] || tail -n 5 "$OUT_DIR/$name.err"
}

"$PYTHON" -c "
import json, jax, flax, optax
print(json.dumps(dict(bench='versions', jax=jax.__version__, flax=flax.__version__,
                      optax=optax.__version__, backend=jax.default_backend(),
                      devices=[d.device_kind for d in jax.devices()])))" | tee "$OUT_DIR/versions.jsonl"
command -v nvidia-smi > /dev/null && nvidia-smi \
  --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$OUT_DIR/versions.jsonl"
if wanted train; then
  part train_step 300 "$PYTHON" benchmarks/model_bench.py --which=cifar10 --dtype="$DTYPE" \
    --batches="$BATCHES" --steps=5 --matmul_n="$MATMUL_N"
fi
if wanted remat; then
  part train_step_remat 200 "$PYTHON" benchmarks/model_bench.py --which=cifar10 \
    --dtype="$DTYPE" --remat --batches="$REMAT_BATCHES" --steps=5 --matmul_n="$MATMUL_N"
fi
if wanted multistep; then
  part steps_per_call_digits 90 "$PYTHON" benchmarks/multistep_bench.py \
    --config=configs/digits.py --ks=1,4,16 --steps=64
  part steps_per_call_cifar10 200 "$PYTHON" benchmarks/multistep_bench.py \
    --config=configs/cifar10.py --dtype="$DTYPE" --batch="$CIFAR_MULTI_BATCH" --ks=1,4 \
    --steps=16
fi
if wanted samplers; then
  part samplers 120 "$PYTHON" benchmarks/sampler_bench.py --which=cifar10 --dtype="$DTYPE" \
    --batch_sizes="$SAMPLE_BATCHES" --methods="$METHODS" --repeats=2
fi
