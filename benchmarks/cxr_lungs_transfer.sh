#!/usr/bin/env bash
# Reproduce the README's cxr_lungs result: a Unet/resnet18 teacher labels the transferal split, an
# FPN/mobilenet_v2 student learns only from those labels; both are scored on the test split.
# Usage: bash benchmarks/cxr_lungs_transfer.sh [DATA_DIR] [WORK_DIR]
set -euo pipefail
DATA=${1:-../shared/data/cxr_lungs}
WORK=${2:-runs/cxr_lungs}
EPOCHS=${EPOCHS:-40}
NAKT=${NAKT:-.venv/bin/nakt}
S=$DATA/splits.json
mkdir -p "$WORK"
time $NAKT train --model smp:Unet/resnet18 --images $DATA/images --masks $DATA/masks --cases $S:teacher_train \
  --val-images $DATA/images --val-cases $S:teacher_val --size 128 --epochs $EPOCHS --out $WORK/teacher --overwrite
time $NAKT label --teacher $WORK/teacher --images $DATA/images --cases $S:transferal --out $WORK/labels --overwrite
time $NAKT train --model smp:FPN/mobilenet_v2 --images $DATA/images --masks $WORK/labels --cases $S:transferal \
  --size 128 --epochs $EPOCHS --lr 3e-3 --out $WORK/student --overwrite
for run in teacher student; do
  $NAKT evaluate --model $WORK/$run --images $DATA/images --masks $DATA/masks --cases $S:test --out $WORK/eval_$run --overwrite
done
# the numbers the README may cite come from this file (benchmarks/check_claims.py checks them against it)
python3 - "$WORK" "${RESULTS:-benchmarks/results/cxr_lungs_transfer.json}" "$EPOCHS" <<'PY'
import json, sys
w, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
t, s = (json.load(open(f"{w}/eval_{r}/summary.json"))["mean"] for r in ("teacher", "student"))
print(f"teacher test Dice {t['dice']:.4f} HD95 {t['hd95']:.2f}")
print(f"student test Dice {s['dice']:.4f} HD95 {s['hd95']:.2f}  ratio {s['dice'] / t['dice']:.4f}")
result = {"command": "bash benchmarks/cxr_lungs_transfer.sh", "epochs": epochs, "seed": 0,
          "teacher": t, "student": s, "ratio": s["dice"] / t["dice"]}
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(f"written: {out}")
PY
