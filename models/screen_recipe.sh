#!/usr/bin/env bash
# Screens training recipes for the embedded model: every recipe with seeds 0 and 1, all trained side by side
# on one GPU, then each base model's passkey accuracy at 1×, 4× and 8× the training length (50 samples per
# length) on SCREEN_DATA, which must be books that neither training nor calibration reads (e.g. train-02),
# never the eval books.
#   bash models/screen_recipe.sh DATA_DIR SCREEN_DATA OUT_DIR "TRAIN_FLAGS 1" ["TRAIN_FLAGS 2" ...]
# Each TRAIN_FLAGS adds to or overrides the shipped recipe of models/train_embedded.sh.
# Then `bash models/train_embedded.sh SEED DATA_DIR OUT_DIR/rK-sSEED "bank eval"` builds and scores a chosen
# model's bank.
set -uo pipefail
data=$1 screen=$2 out=$3; shift 3
mkdir -p "$out"
k=0
for flags in "$@"; do
  for seed in 0 1; do
    echo "r$k-s$seed: $flags" >> "$out/recipes"
    TRAIN_FLAGS="$flags" bash models/train_embedded.sh $seed "$data" "$out/r$k-s$seed" train > "$out/r$k-s$seed.train.log" 2>&1 &
  done
  k=$((k + 1))
done
wait
for run in "$out"/r*-s?; do
  python3 -m extend.evaluate --model "$run/model" --task passkey --lengths 512,2k,4k --data "$screen" --samples 50 \
    --batch-size 10 --out "$run/screen" > "$run.screen.log" 2>&1 &
done
wait
python3 - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for line in (out / "recipes").read_text().splitlines():
    run, flags = line.split(": ", 1)
    try:
        rows = {r["length"]: r["base"] for r in json.loads((out / run / "screen/results.json").read_text())}
        print(f"{run:8} {flags:60} " + " / ".join(f"{rows[n]:.0%}" for n in (512, 2048, 4096)))
    except (OSError, KeyError, ValueError) as error:
        print(f"{run:8} {flags:60} no screen: {error}")
PY
