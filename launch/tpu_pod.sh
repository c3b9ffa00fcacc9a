#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one host or a pod slice of many) with gcloud.
#
#   launch/tpu_pod.sh create    # the TPU VM(s)
#   launch/tpu_pod.sh setup     # on every worker: gcsfuse, the bucket mounted, code, pip install
#   launch/tpu_pod.sh run [--config.x=y ...]   # main.py on every worker, in the background
#   launch/tpu_pod.sh logs      # follow worker 0's log (the only one that logs progress)
#   launch/tpu_pod.sh stop      # SIGTERM on every worker: checkpoint at one step, exit 0
#   launch/tpu_pod.sh delete    # the TPU VM(s)
#
# Environment (required: TPU_NAME, ZONE, BUCKET; the rest have defaults):
#   TPU_NAME, ZONE          the slice and its zone
#   ACCELERATOR_TYPE        e.g. v4-32 (4 hosts), v5litepod-16; default v4-32
#   RUNTIME_VERSION         TPU software image; default tpu-ubuntu2204-base (v4);
#                           v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
#   BUCKET                  a gs:// bucket name (no gs://) in the slice's region
#   CONFIG                  config file in this repository; default configs/cifar10.py
#   RUN                     run name; the workdir is gs://$BUCKET/runs/$RUN
#                           (/gcs/$BUCKET/runs/$RUN on the workers); default $TPU_NAME
#   CREATE_FLAGS            extra flags for `tpu-vm create`, e.g. "--spot"
#
# The bucket is mounted with Cloud Storage FUSE at /gcs/$BUCKET on every worker,
# because the workdir is read and written with ordinary file operations; every
# worker writes its checkpoint shards there. Data: prepare it once into
# gs://$BUCKET/tensorflow_datasets (`python -m diffusion_jax.datasets.prepare
# cifar10 --data_dir=...` on any machine with network, then `gcloud storage cp -r`).
#
# On the workers JAX detects the slice itself (main.py calls
# jax.distributed.initialize() on any TPU VM): no coordinator flags. A TPU
# maintenance event sends SIGTERM; every host then stops at the same step,
# checkpoints and exits 0. `run` again (same RUN) resumes from the workdir.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (no gs://)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
CONFIG="${CONFIG:-configs/cifar10.py}"
RUN="${RUN:-$TPU_NAME}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
MOUNT="/gcs/$BUCKET"
CODE="gs://$BUCKET/code/diffusion_jax"

on_all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$1"
}

case "${1:-}" in
  create)
    # shellcheck disable=SC2086  # CREATE_FLAGS is a list of flags
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" $CREATE_FLAGS
    ;;
  setup)
    # The code goes through the bucket so every worker runs the same version.
    gcloud storage rsync --recursive --delete-unmatched-destination-objects \
      --exclude='(^|/)(\.git|\.venv|venv|workdir[^/]*|__pycache__)(/|$)' "$REPO" "$CODE"
    on_all_workers "set -e
      if ! command -v gcsfuse >/dev/null; then
        echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
        curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
        sudo apt-get update -q && sudo apt-get install -yq gcsfuse
      fi
      sudo mkdir -p $MOUNT && sudo chown \$USER $MOUNT
      mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT
      mkdir -p ~/diffusion_jax && gcloud storage rsync --recursive --delete-unmatched-destination-objects $CODE ~/diffusion_jax
      cd ~/diffusion_jax && python3 -m pip install -q -U 'jax[tpu]' && python3 -m pip install -q -e ."
    ;;
  run)
    shift
    # nohup: the run outlives this ssh session. The PID file lets `stop` signal
    # exactly this process.
    on_all_workers "cd ~/diffusion_jax && mkdir -p $MOUNT/runs/$RUN && \
      nohup python3 -m diffusion_jax.main --config=$CONFIG --workdir=$MOUNT/runs/$RUN \
        --config.data.data_dir=$MOUNT/tensorflow_datasets $* \
        > ~/train_$RUN.log 2>&1 < /dev/null & echo \$! > ~/train_$RUN.pid"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=0 \
      --command="tail -n 100 -f ~/train_$RUN.log"
    ;;
  stop)
    on_all_workers "kill -TERM \$(cat ~/train_$RUN.pid) 2>/dev/null || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet
    ;;
  *)
    sed -n '2,9p' "$0"
    exit 2
    ;;
esac
