#!/usr/bin/env bash
# The main job end to end on generated data (CPU is fine): generate, repack, train, predict, score.
#   bash tools/demo.sh [OUT]        (what `make demo` runs; OUT defaults to demo_out)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=${PY:-python3}
rm -rf "$OUT"
mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*"; }

step "1/4 generate a Cdiscount-format set (train.bson, test.bson, category_names.csv)"
$PY -m tools.make_synthetic --out "$OUT/raw" --products 2000 --test-products 300 --categories 20 --seed 0
step "2/4 repack train.bson into indexed TFRecord shards"
$PY -m tools.repack --bson "$OUT/raw/train.bson" --categories "$OUT/raw/category_names.csv" \
    --out "$OUT/data" --val-fraction 0.1 --quiet
step "3/4 train (train/run.sh demo)"
t0=$(date +%s)
train/run.sh demo --data "$OUT/data" --out "$OUT/run"
train_s=$(( $(date +%s) - t0 ))
step "4/4 predict the test set"
$PY -m tools.predict --bson "$OUT/raw/test.bson" --checkpoint "$OUT/run/best.pt" --tta flip \
    --out "$OUT/submission.csv" --labels "$OUT/raw/test_answers.csv" --quiet

cat <<MSG

Done. Where things are:
  submission   $OUT/submission.csv   (report: $OUT/submission.report.csv)
  checkpoints  $OUT/run/best.pt, $OUT/run/last.pt
  curves       $OUT/run/curves.png   metrics: $OUT/run/metrics.jsonl
  data         $OUT/data (manifest.json, quarantine.csv)
MSG
acc=$($PY -c "import sys; from tools.predict import read_answers; from train.predict import score
print(f'{score(sys.argv[1], read_answers(sys.argv[2]), sys.argv[2]):.4f}')" "$OUT/submission.csv" "$OUT/raw/test_answers.csv")
printf '\nTest-set product accuracy: %s (300 products, 20 categories: chance is 0.05); training took %ss.\n' \
    "$acc" "$train_s"
