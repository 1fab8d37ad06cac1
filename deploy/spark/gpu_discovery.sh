#!/usr/bin/env bash
# Spark resource discovery script for GPUs (spark.{executor,worker,driver}.resource.gpu.discoveryScript).
# Prints {"name":"gpu","addresses":["0","1",...]} from nvidia-smi. With ERS_GPU_ADDRESS=uuid it reports
# GPU UUIDs instead of indices (match what your resource manager puts in CUDA_VISIBLE_DEVICES).
# Exits non-zero with a message when nvidia-smi is missing or fails, so Spark refuses to start the
# executor instead of running a "GPU" job on no GPU.
set -euo pipefail
field=index
if [ "${ERS_GPU_ADDRESS:-index}" = "uuid" ]; then field=uuid; fi
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_discovery.sh: nvidia-smi not found on $(hostname); no NVIDIA driver on this node" >&2
  exit 1
fi
ids=$(nvidia-smi --query-gpu="$field" --format=csv,noheader) || {
  echo "gpu_discovery.sh: nvidia-smi failed on $(hostname)" >&2
  exit 1
}
addresses=$(printf '%s\n' "$ids" | sed 's/^[[:space:]]*//; s/[[:space:]]*$//' | grep -v '^$' | sed 's/.*/"&"/' | paste -sd, -)
printf '{"name":"gpu","addresses":[%s]}\n' "$addresses"
