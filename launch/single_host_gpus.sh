#!/usr/bin/env bash
# Train on one host with all its GPUs: one process, every local GPU in the mesh.
#
#   WORKDIR=workdir/cifar10 launch/single_host_gpus.sh [--config.x=y ...]
#
# Needs: `pip install -e .` and `jax[cuda12]` (as JAX documents) in the active
# Python. CONFIG defaults to configs/cifar10.py. CUDA_VISIBLE_DEVICES limits the
# GPUs used; the global batch must be a multiple of their number.
#
# One process needs no jax.distributed. SIGTERM (docker stop, Kubernetes, a
# scheduler) makes it checkpoint after the current step and exit 0; `exec`
# makes Python the process that receives it. Run the same command to resume.
set -euo pipefail
: "${WORKDIR:?set WORKDIR}"
CONFIG="${CONFIG:-configs/cifar10.py}"
cd "$(dirname "$0")/.."
exec python -m diffusion_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
