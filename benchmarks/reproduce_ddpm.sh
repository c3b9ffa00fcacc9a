#!/usr/bin/env bash
# Reproduces the DDPM paper's CIFAR-10 FID/IS from the published checkpoint, then the
# DDIM and DPM-Solver++ rows of docs/reproduce.md. Needs network (once) and a GPU;
# prints one JSON line per evaluation (the report itself is $OUT/ddpm_cifar10/eval/report_*.json).
#
#   bash benchmarks/reproduce_ddpm.sh                  # everything (about 45 min, one H200)
#   ROWS="ddim50 dpm20" bash benchmarks/reproduce_ddpm.sh   # some rows only
#   NUM_SAMPLES=10000 bash benchmarks/reproduce_ddpm.sh     # a quicker, biased FID
#
# Steps: download the diffusers DDPM CIFAR-10 folder and pytorch-fid's Inception
# weights, convert both (the .pth needs torch, installed here if missing), prepare
# CIFAR-10 with TFDS, import the checkpoint, and run --mode=eval per row.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-reproduce_out}
DATA=${DATA:-$HOME/tensorflow_datasets}
NUM_SAMPLES=${NUM_SAMPLES:-50000}
BATCH=${BATCH:-1000}             # global sampling batch; must divide over the devices
DTYPE=${DTYPE:-float32}          # the paper's numbers are float32; bfloat16 is ~2x faster
ROWS=${ROWS:-"ancestral1000 ddim50 ddim100 dpm10 dpm20"}
REPO=${REPO:-google/ddpm-cifar10-32}
mkdir -p "$OUT"

if [ ! -d "$OUT/ddpm-cifar10-32" ]; then
  python -m pip install --quiet huggingface_hub
  python - "$REPO" "$OUT/ddpm-cifar10-32" <<'EOF'
import sys
from huggingface_hub import snapshot_download
snapshot_download(sys.argv[1], local_dir=sys.argv[2],
                  allow_patterns=["*.json", "*.safetensors", "*.bin"])
EOF
fi

INCEPTION="$OUT/inception_fid.npz"
if [ ! -f "$INCEPTION" ]; then
  URL=$(python -c "from diffusion_jax.evaluation import inception; print(inception.WEIGHTS_URL)")
  curl -L --fail -o "$OUT/pt_inception.pth" "$URL"
  python -c "import torch" 2>/dev/null || python -m pip install --quiet torch
  python -m diffusion_jax.evaluation.convert_inception_weights "$OUT/pt_inception.pth" "$INCEPTION"
fi

python -m diffusion_jax.datasets.prepare cifar10 --data_dir="$DATA"

W="$OUT/ddpm_cifar10"
if [ ! -f "$W/config.json" ]; then
  python -m diffusion_jax.convert import-diffusers --src="$OUT/ddpm-cifar10-32" \
    --workdir="$W" --config=configs/cifar10.py --config.data.data_dir="$DATA" \
    --config.model.dtype="$DTYPE"  # a model setting: fixed at import, like training
fi

evaluate() {  # name, then sample overrides
  local name=$1; shift
  python -m diffusion_jax.main --mode=eval --workdir="$W" \
    --config=configs/from_workdir.py:"$W" --config.data.data_dir="$DATA" \
    --config.sample.batch_size="$BATCH" --config.eval.batch_size="$BATCH" \
    --config.eval.num_samples="$NUM_SAMPLES" --config.eval.inception_weights="$INCEPTION" \
    --config.eval.reference_split=train "--config.eval.metrics=('fid','is')" "$@"
  python - "$W/eval" "$name" <<'EOF'
import glob, json, os, sys
path = max(glob.glob(os.path.join(sys.argv[1], "report_*.json")), key=os.path.getmtime)
r = json.load(open(path))  # the report eval mode just wrote
m = r["metrics"]
print(json.dumps(dict(row=sys.argv[2], report=path, fid=m["fid"],
                      inception_score=m["is"]["mean"], num_samples=r["num_samples"],
                      sampler=r["sampler"])))
EOF
}

for row in $ROWS; do
  case $row in
    # The paper: all 1000 steps, sigma_t^2 = beta_t (fixed_large), x0 clipped.
    ancestral1000) evaluate "$row" --config.sample.method=ancestral --config.sample.num_steps=0 \
        --config.sample.variance=fixed_large --config.sample.thresholding=static ;;
    # DDIM (eta 0) and DPM-Solver++(2M) on the project's own step grids.
    ddim*) evaluate "$row" --config.sample.method=ddim --config.sample.num_steps="${row#ddim}" \
        --config.sample.eta=0.0 --config.sample.timestep_spacing=uniform ;;
    dpm*) evaluate "$row" --config.sample.method=dpm_solver++ \
        --config.sample.num_steps="${row#dpm}" --config.sample.timestep_spacing=uniform ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
done
