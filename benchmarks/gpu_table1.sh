#!/usr/bin/env bash
# Table 1a's ResNet18 / CIFAR-10 row (CE, RelaxLoss, CRL) on a short schedule for one GPU
# (needs crl installed with a CUDA build of torch)
# (sized, not measured, for 6 minutes of one H200; not yet completed on one: see
# docs/benchmarks.md).
#
#   benchmarks/gpu_table1.sh [CIFAR10_ARCHIVE] [extra crl audit flags...]
#
# The recipe is experiments/cifar10_resnet18.yaml (lr 0.01, batch 256, the paper's defense
# settings) with a 20-epoch schedule (milestones at 50% / 80% as in the 100-epoch recipe), one
# seed, the paper's attacks (NN on 1 shadow model instead of 5, entropy, m-entropy, Grad-x) and
# the loss threshold; bf16 autocast and channels_last. The default engine (auto) trains each
# defense's target and shadow together on CUDA (vmap ensemble, in the default memory layout);
# ENGINE=sequential trains them one after another, each batch copied from host memory to the
# GPU (uint8, 0.8 MB per step). The audit runs under `timeout $BUDGET_S` (default 340 s), so an
# overrun fails loudly, printing the epochs each model finished; rerun with `--resume` to
# finish it. Environment: EPOCHS, DEVICE (default cuda), OUT, ENGINE, BUDGET_S.
# CPU check of the flags:
#   DEVICE=cpu EPOCHS=1 BUDGET_S=3600 benchmarks/gpu_table1.sh ../shared/data/cifar10-jpeg.tar.gz \
#       --subset 400 --no-cache
set -euo pipefail
source "$(dirname "$0")/_cifar10.sh"
ARG=
if [[ $# -gt 0 && $1 != --* ]]; then
    ARG=$1
    shift
fi
DATA=$(cifar10_archive "$ARG") || exit 2
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-20}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/gpu_table1}
BUDGET_S=${BUDGET_S:-340}
M1=$(( EPOCHS / 2 > 0 ? EPOCHS / 2 : 1 ))
M2=$(( EPOCHS * 4 / 5 > M1 ? EPOCHS * 4 / 5 : M1 + 1 ))
export PYTHONUNBUFFERED=1

if [[ $DEVICE == cuda* ]]; then
    python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        { echo "gpu_table1: no CUDA device (set DEVICE=cpu for a flag check)" >&2; exit 2; }
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

start=$(date +%s)
set +e
timeout "$BUDGET_S" crl audit --config experiments/cifar10_resnet18.yaml \
    --dataset "imagefolder:$DATA" --defenses ce,relaxloss,crl \
    --attacks loss,entropy,mentr,gradx,nn --seeds 0 --shadows 1 \
    --epochs "$EPOCHS" --milestones "$M1,$M2" --bf16 --channels-last \
    --device "$DEVICE" --out "$OUT" --quiet ${ENGINE:+--engine "$ENGINE"} "$@"
rc=$?
set -e
if [[ $rc -eq 124 ]]; then
    echo "gpu_table1: the audit ran past BUDGET_S=$BUDGET_S s and was stopped; rerun with" \
         "--resume to finish it (or lower EPOCHS)" >&2
    # sequential training logs every epoch of each target; the ensemble logs at the end
    for m in "$OUT"/models/*/seed*/metrics.jsonl; do
        if [[ -f $m ]]; then
            echo "gpu_table1: ${m#"$OUT"/models/}: $(wc -l < "$m") of $EPOCHS epochs" >&2
        fi
    done
fi
[[ $rc -eq 0 ]] || exit "$rc"
echo "gpu_table1: $(( $(date +%s) - start )) s wall for the audit (epochs $EPOCHS, device $DEVICE)"
cat <<'EOF'
The paper's row (Table 1a, ResNet18, 100 epochs, 5 shadows, mean of 5 runs; AUC %):
| method    | train / test %  | NN    | entropy | m-entropy | Grad-x |
| CE        | 100 / 70.31     | 88.09 | 85.91   | 86.44     | 86.32  |
| RelaxLoss | 91.56 / 69.25   | 77.32 | 71.51   | 72.25     | 73.51  |
| CRL       | 86.73 / 71.53   | 60.21 | 63.70   | 65.15     | 65.34  |
EOF
