#!/usr/bin/env bash
# The GPU checks worth running when a GPU is lent: about five minutes, JSON into OUTDIR.
#   bash tools/gpu_check.sh OUTDIR [PRODUCTS]
# 1. a generated set (180x180 JPEGs) repacked; 2. loader alone, dali-gpu; 3. resnet50 @160 bf16 channels_last
# batch 256: synthetic vs real data in one process; 4. predict; 5. the tests marked gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [PRODUCTS]}
N=${2:-6000}
PY=${PY:-python3}
mkdir -p "$OUT"
W=$(mktemp -d)
log() { echo "== $(date +%T) $*"; }
log "generate $N products"
$PY -m tools.make_synthetic --out "$W/raw" --products "$N" --test-products 2000 --categories 200 --seed 0 --workers 8 || exit 1
$PY -m tools.repack --bson "$W/raw/train.bson" --categories "$W/raw/category_names.csv" --out "$W/data" \
    --val-fraction 0.05 --workers 8 --quiet || exit 1
$PY -m tools.repack --bson "$W/raw/test.bson" --unlabelled --out "$W/test" --workers 8 --quiet || exit 1
$PY -m tools.bench repack --bson "$W/raw/train.bson" --categories "$W/raw/category_names.csv" --workers 1 8 \
    --json "$OUT/repack.json"
log "loader alone (dali-gpu)"
for b in 256 512; do
    $PY -m tools.bench loader --data "$W/data" --backend dali-gpu --batch $b --threads 8 --seconds 15 \
        --json "$OUT/loader_gpu_b$b.json"
done
$PY -m tools.bench loader --data "$W/data" --backend dali-cpu --batch 256 --threads 14 --seconds 10 \
    --json "$OUT/loader_cpu.json"
log "resnet50 train, synthetic vs real"
$PY -m tools.bench train --model resnet50 --data "$W/data" --synthetic --amp bf16 --batch 256 --channels-last \
    --threads 8 --steps 60 --warmup 15 --json "$OUT/train_resnet50.json"
log "predict"

timeout 120 train/run.sh resnet34 --data "$W/data" --out "$W/run" train.max_steps=30 data.batch_size=256 \
    >"$OUT/train_run.log" 2>&1
[ -f "$W/run/last.pt" ] && $PY -m tools.bench predict --data "$W/test" --checkpoint "$W/run/last.pt" --batch 256 \
    --threads 8 --json "$OUT/predict.json"
log "tests marked gpu"
$PY -m pytest -q -m gpu tests >"$OUT/pytest_gpu.log" 2>&1; echo "pytest gpu exit $?" >>"$OUT/pytest_gpu.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>&1
rm -rf "$W"
log "done: $OUT"
