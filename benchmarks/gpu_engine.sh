#!/usr/bin/env bash
# models/s of `cnn` reference models on CIFAR-10 on one GPU: the sequential engine (a few models,
# timed, extrapolating to any count) vs the ensemble engine (K at once, vmap), bf16 autocast and
# channels_last, the images resident on the device for the ensemble
# (needs crl installed with a CUDA build of torch; sized for 6 minutes of one H200; not yet run
# on one: no GPU was lent to the work that wrote it, see docs/performance.md).
#
#   benchmarks/gpu_engine.sh [CIFAR10_ARCHIVE]
#
# Each model trains on a random half of the audit's CIFAR-10 target pool (15000 images), batch
# 128, lr 0.05, EPOCHS epochs (default 2); SEQ models sequentially (default 3), K at once
# (default 32). The first decode of the archive into CRL_CACHE takes about a minute; the run is
# stopped after BUDGET_S seconds (default 330). Environment: EPOCHS, SEQ, K, DEVICE, BUDGET_S,
# SAMPLES (images per model; 0: 15000). CPU check of the script:
#   DEVICE=cpu EPOCHS=1 SEQ=1 K=2 SAMPLES=256 BUDGET_S=3600 benchmarks/gpu_engine.sh
set -euo pipefail
source "$(dirname "$0")/_cifar10.sh"
DATA=$(cifar10_archive "${1:-}") || exit 2
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
if [[ $DEVICE == cuda* ]]; then
    python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        { echo "gpu_engine: no CUDA device (set DEVICE=cpu for a check of the script)" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi
start=$(date +%s)
set +e
timeout "${BUDGET_S:-330}" python benchmarks/engine.py --cifar "$DATA" --device "$DEVICE" \
    --cifar-epochs "${EPOCHS:-2}" --seq-models "${SEQ:-3}" --ensemble-models "${K:-32}" \
    --cifar-samples "${SAMPLES:-0}"
rc=$?
set -e
if [[ $rc -eq 124 ]]; then
    echo "gpu_engine: stopped after BUDGET_S=${BUDGET_S:-330} s; lower EPOCHS or K" >&2
fi
[[ $rc -eq 0 ]] || exit "$rc"
echo "gpu_engine: $(( $(date +%s) - start )) s wall (device $DEVICE)"
