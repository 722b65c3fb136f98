#!/usr/bin/env bash
# The GPU checks worth running when a GPU is lent: at most 5 minutes on an H100/H200, every step under its own
# time limit, at most 8 files in OUTDIR (the rest goes into OUTDIR/extra.tar.gz), the key figures on stdout.
#   bash tools/gpu_check.sh OUTDIR [TRAIN_PRODUCTS] [TEST_PRODUCTS]
# 1. a generated set (180x180 JPEGs) repacked: train (tune, training) and test (predict, >= 20,000 images);
# 2. `tools.bench tune`: real-data training steps of resnet50 (5,270 classes), in two passes: each input
#    setting at the first of TUNE_BATCHES and TUNE_MODES, then the winner at the other batch sizes and compile
#    modes, with synthetic data at each; a ranked table and the winning override line;
# 3. a short `train/run.sh resnet34` run (NCCL, the trainer end to end) whose checkpoint
# 4. predicts the test set (`tools.bench predict`); 5. the tests marked gpu (not the slow model sweep).
# PY (default python3) runs Python; TUNE_SECONDS (default 5) is the time per tune candidate; TUNE_RECIPE,
# RUN_RECIPE and RUN_ARGS change the models (a CPU dry run: TUNE_RECIPE=demo RUN_RECIPE=demo RUN_ARGS=...).
# TOTAL_SECONDS (default 540, under a 10-minute remote call) bounds the whole check: a step's limit is cut so
# that the steps after it keep their minimum share, scaled to TOTAL_SECONDS (a step left with under 10 s is
# skipped, and says so).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [TRAIN_PRODUCTS] [TEST_PRODUCTS]}
N=${2:-4000}
NT=${3:-12000}  # ~1.76 images per product: 12,000 test products are ~21,000 images
PY=${PY:-python3}
TUNE_SECONDS=${TUNE_SECONDS:-5}
TUNE_BUDGET=${TUNE_BUDGET:-210}  # no new tune candidate after this many seconds (the second pass keeps its share)
TUNE_BATCHES=${TUNE_BATCHES:-256 512}  # 384 too does not fit: each batch size and mode compiles anew (40-60 s)
TUNE_MODES=${TUNE_MODES:-default reduce-overhead}  # torch.compile modes (ignored by a recipe that does not compile)
TUNE_RECIPE=${TUNE_RECIPE:-resnet50}
RUN_RECIPE=${RUN_RECIPE:-resnet34}
RUN_ARGS=${RUN_ARGS:-train.max_steps=30 data.batch_size=256 model.compile=false}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=$(mktemp -d)
X="$W/extra"  # logs that do not make the 8 files
mkdir -p "$X"
log() { echo "== $(date +%T) $*"; }
TOTAL_SECONDS=${TOTAL_SECONDS:-540}
limit() {  # limit SECONDS KEEP: SECONDS, or less so that KEEP seconds (of 540; scaled) stay for the later steps
    local left=$((TOTAL_SECONDS - SECONDS - $2 * TOTAL_SECONDS / 540))
    echo $(($1 < left ? $1 : left))
}
step() {  # step SECONDS KEEP LOGNAME CMD...: run under limit SECONDS KEEP, log to $X/LOGNAME, say how it ended
    local t name=$3
    t=$(limit "$1" "$2"); shift 3
    if [ "$t" -lt 10 ]; then
        echo "   $name: skipped, $((TOTAL_SECONDS - SECONDS)) s of TOTAL_SECONDS=$TOTAL_SECONDS left"
        return 124
    fi
    local t0=$SECONDS
    timeout --kill-after=10 "$t" "$@" >"$X/$name.log" 2>&1
    local rc=$?
    echo "   $name: exit $rc after $((SECONDS - t0)) s$([ $rc = 124 ] && echo ' (time limit)')"
    [ $rc = 0 ] || tail -n 5 "$X/$name.log" | sed 's/^/   | /'
    return $rc
}
fig() { $PY - "$@" <<'EOF'
import json, sys
path, *keys = sys.argv[1:]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"   {path}: unreadable ({e})"); sys.exit(0)
def get(d, k):
    for p in k.split("."):
        d = d.get(p) if isinstance(d, dict) else None
    return d
print("   " + "  ".join(f"{k}={get(d, k)}" for k in keys))
EOF
}

log "generate $N train and $NT test products; repack"
step 120 380 generate $PY -m tools.make_synthetic --out "$W/raw" --products "$N" --test-products "$NT" \
    --categories "${CATEGORIES:-5270}" --seed 0 --workers 14 || { rm -rf "$W"; exit 1; }
step 60 360 repack_train $PY -m tools.repack --bson "$W/raw/train.bson" --categories "$W/raw/category_names.csv" \
    --out "$W/data" --val-fraction 0.05 --workers 14 --quiet || { rm -rf "$W"; exit 1; }
step 60 340 repack_test $PY -m tools.repack --bson "$W/raw/test.bson" --unlabelled --out "$W/test" --workers 14 \
    --quiet || { rm -rf "$W"; exit 1; }

log "tune: $TUNE_RECIPE, real data per input setting vs synthetic"
TUNE_LIMIT=$(limit 270 200)  # its step gets this limit as it is (KEEP 0)
# minimum shares: tune 140 s, train_run 60, predict 20, the tests 120 (the KEEP column of each step)
TUNE_BUDGET=$((TUNE_BUDGET < TUNE_LIMIT - 60 ? TUNE_BUDGET : TUNE_LIMIT - 60))  # room for the last candidates
TUNE_BUDGET=$((TUNE_BUDGET > 10 ? TUNE_BUDGET : 10))
# shellcheck disable=SC2086
step "$TUNE_LIMIT" 0 tune $PY -m tools.bench tune --recipe "$TUNE_RECIPE" --data "$W/data" --seconds "$TUNE_SECONDS" \
    --warmup 3 --budget-s "$TUNE_BUDGET" --batches $TUNE_BATCHES --modes $TUNE_MODES --json "$OUT/tune.json"
sed -n "/^ranked/,/^override/p" "$X/tune.log"

log "train/run.sh $RUN_RECIPE $RUN_ARGS"
# shellcheck disable=SC2086
step 120 140 train_run train/run.sh "$RUN_RECIPE" --data "$W/data" --out "$W/run" $RUN_ARGS
grep -E "img/s|compil|error" "$X/train_run.log" | tail -n 3 | sed 's/^/   /'

log "predict $(($(wc -l <"$W/test/products.csv") - 1)) test products (>= 20,000 images)"
if [ -f "$W/run/last.pt" ]; then
    step 90 120 predict $PY -m tools.bench predict --data "$W/test" --checkpoint "$W/run/last.pt" --batch 512 \
        --threads 8 --tta flip --json "$OUT/predict.json"
    fig "$OUT/predict.json" images products images_per_s products_per_s forward_only.images_per_s end_to_end_over_forward_only end_to_end.data_wait_share end_to_end.loader_build_seconds
fi

log "tests marked gpu"
step "${TEST_SECONDS:-170}" 0 pytest_gpu $PY -m pytest -q -m "gpu and not gpu_slow" -p no:cacheprovider tests
cp "$X/pytest_gpu.log" "$OUT/pytest_gpu.log"
tail -n 3 "$OUT/pytest_gpu.log" | sed 's/^/   /'

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/gpu.csv" 2>&1
cp "$X/tune.log" "$OUT/tune.log" 2>/dev/null
tail -n 200 "$X/train_run.log" >"$OUT/train_run.log" 2>/dev/null
tar -C "$W" -czf "$OUT/extra.tar.gz" extra 2>/dev/null
rm -rf "$W"
log "done in $SECONDS s (aim: 300 s on an H100/H200): $(ls "$OUT" | wc -l) files in $OUT"
