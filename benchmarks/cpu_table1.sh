#!/usr/bin/env bash
# The CIFAR-10 `cnn` comparison on CPU, on the paper's split (15,000 members and 15,000
# non-members per target): the plan of docs/benchmarks.md, about 3-4 hours of 2 CPU cores.
#
#   benchmarks/cpu_table1.sh [main|lira|baselines|all] [CIFAR10_ARCHIVE] [extra crl audit flags]
#
#   main       CE, RelaxLoss, CRL on seeds 0, 1, 2: loss, confidence, entropy, m-entropy,
#              Grad-x and the NN attack on 1 shadow model (adaptive: the shadow uses the defense)
#   lira       CE, RelaxLoss, CRL on seed 0: LiRA and RMIA on 8 reference models (the seed-0
#              targets come from the model cache when `main` ran first)
#   baselines  label smoothing, confidence penalty, early stopping, AdvReg, DMP, DP-SGD and CE
#              (cached) on seed 0, with main's attacks
# The cnn's per-dataset recipe (docs/models.md: 30 epochs, batch 128, lr 0.05, x0.1 at epochs
# 15 and 25; the numbers in docs/benchmarks.md predate the decay: constant lr 0.05) and every
# defense's default parameters (`crl list`; CRL's from docs/tuning.md); bf16 and channels_last.
# Each stage writes OUT/<stage>/ (OUT default runs/cpu_table1); add --resume to continue one.
set -euo pipefail
source "$(dirname "$0")/_cifar10.sh"
STAGE=${1:-all}
[[ $# -gt 0 ]] && shift
case $STAGE in main|lira|baselines|all) ;; *)
    echo "cpu_table1: stage '$STAGE': expected main, lira, baselines or all" >&2; exit 2;;
esac
ARG=
if [[ $# -gt 0 && $1 != --* ]]; then
    ARG=$1
    shift
fi
DATA=$(cifar10_archive "$ARG") || exit 2
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/cpu_table1}
export PYTHONUNBUFFERED=1
COMMON=(--dataset "imagefolder:$DATA" --model cnn --bf16 --channels-last --quiet)
THRESHOLD_NN=(--attacks loss,confidence,entropy,mentr,gradx,nn --shadows 1)

stage() {   # NAME FLAGS...: one crl audit, timed
    local name=$1 start
    shift
    start=$(date +%s)
    echo "== cpu_table1 $name: crl audit ${COMMON[*]} $* --out $OUT/$name"
    crl audit "${COMMON[@]}" "$@" --out "$OUT/$name"
    echo "== cpu_table1 $name: $(( $(date +%s) - start )) s"
}

if [[ $STAGE == main || $STAGE == all ]]; then
    stage main --defenses ce,relaxloss,crl "${THRESHOLD_NN[@]}" --seeds 0,1,2 "$@"
fi
if [[ $STAGE == lira || $STAGE == all ]]; then
    stage lira --defenses ce,relaxloss,crl --attacks lira,rmia --references 8 --seeds 0 "$@"
fi
if [[ $STAGE == baselines || $STAGE == all ]]; then
    stage baselines --defenses ce,label_smoothing,confidence_penalty,early_stopping,advreg,dmp,dpsgd \
        "${THRESHOLD_NN[@]}" --seeds 0 "$@"
fi
