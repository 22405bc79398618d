#!/usr/bin/env bash
# Teachers from three frameworks on ../shared/data/cxr_lungs at 128 px: an nnU-Net trained with nnU-Net's own CLI,
# a nakt run, and a nakt run exported to ONNX label the transferal split together (STAPLE); an smp student learns
# from the fused labels only; every model is scored on the test split. Results: $WORK/interop.json and a table.
# Usage: bash benchmarks/interop.sh   (env: WORK=runs/interop EPOCHS=40 NNUNET_TRAINER=nnUNetTrainer_1epoch)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cxr_lungs}
WORK=${WORK:-runs/interop}
EPOCHS=${EPOCHS:-40}
TRAINER=${NNUNET_TRAINER:-nnUNetTrainer_1epoch}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
NAKT="$PY -m nakt"
mkdir -p "$WORK"
export nnUNet_raw=$WORK/nnUNet_raw nnUNet_preprocessed=$WORK/nnUNet_preprocessed nnUNet_results=$WORK/nnUNet_results
D=$WORK/data128
S=$D/splits.json
secs() { date +%s; }
declare -A WALL

# 0. one 128-px grey copy of the data for every framework (nnU-Net trains at the resolution it is given)
t=$(secs)
$PY - "$DATA" "$D" <<'PY'
import json, shutil, sys
from pathlib import Path
from PIL import Image
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for sub in ("images", "masks"):
    (dst / sub).mkdir(parents=True, exist_ok=True)
for p in sorted((src / "images").iterdir()):
    Image.open(p).convert("L").resize((128, 128), Image.BILINEAR).save(dst / "images" / f"{p.stem}.png")
for p in sorted((src / "masks").iterdir()):
    Image.open(p).convert("L").resize((128, 128), Image.NEAREST).save(dst / "masks" / f"{p.stem}.png")
shutil.copy(src / "splits.json", dst / "splits.json")
PY
WALL[prepare]=$(( $(secs) - t ))

# 1. nnU-Net teacher: the true teacher_train masks as a label set (a masks: teacher), exported to nnU-Net's raw
#    format by nakt, planned, trained and later run by nnU-Net's own code
t=$(secs)
$NAKT label --teacher masks:$D/masks --images $D/images --cases $S:teacher_train --out $WORK/truth_train --overwrite --no-progress
$NAKT export-nnunet --labels $WORK/truth_train --images $D/images --out $nnUNet_raw/Dataset501_CxrLungs --overwrite
# as nnU-Net datasets are usually made: labels 0/1 named in dataset.json, nothing of nakt's 0/255 left in it, so
# step 4 fuses an nnU-Net on 0/1 with nakt runs on the original 0/255 masks (nakt maps them: one foreground each)
$PY - "$nnUNet_raw/Dataset501_CxrLungs/dataset.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data.pop("nakt_label_values", None)
data["labels"] = {"background": 0, "lungs": 1}
json.dump(data, open(sys.argv[1], "w"), indent=1)
PY
$BIN/nnUNetv2_plan_and_preprocess -d 501 -c 2d -np 2 --verify_dataset_integrity
$BIN/nnUNetv2_train 501 2d all -tr $TRAINER -device cpu
NNUNET=nnunet:$nnUNet_results/Dataset501_CxrLungs/${TRAINER}__nnUNetPlans__2d?folds=all
WALL[nnunet_teacher]=$(( $(secs) - t ))

# 2. a nakt teacher, and 3. a nakt teacher of another architecture exported to ONNX (checked against the run)
common="--images $D/images --masks $D/masks --cases $S:teacher_train --val-images $D/images --val-cases $S:teacher_val --size 128 --epochs $EPOCHS --overwrite --no-progress"
t=$(secs); $NAKT train --model smp:Unet/resnet18 $common --out $WORK/nakt_teacher; WALL[nakt_teacher]=$(( $(secs) - t ))
t=$(secs)
$NAKT train --model monai:UNet $common --lr 3e-3 --out $WORK/onnx_source
$NAKT export --model $WORK/onnx_source --format onnx --out $WORK/teacher.onnx --images $D/images --overwrite
WALL[onnx_teacher]=$(( $(secs) - t ))

# 4. the three frameworks label the transferal split together; 5. a student learns from the fused labels only
t=$(secs)
$NAKT label --teacher "$NNUNET" --teacher $WORK/nakt_teacher --teacher onnx:$WORK/teacher.onnx --images $D/images \
  --cases $S:transferal --fusion staple --out $WORK/labels --overwrite --no-progress
WALL[label]=$(( $(secs) - t ))
t=$(secs)
$NAKT train --model smp:FPN/mobilenet_v2 --images $D/images --masks $WORK/labels --cases $S:transferal --size 128 \
  --epochs $EPOCHS --lr 3e-3 --out $WORK/student --overwrite --no-progress
WALL[student]=$(( $(secs) - t ))

# 6. every model, and the fused labels themselves, scored against the true masks
for row in "nnunet|$NNUNET|test" "nakt|$WORK/nakt_teacher|test" "onnx|onnx:$WORK/teacher.onnx|test" \
           "student|$WORK/student|test" "fused_labels|probs:$WORK/labels|transferal"; do
  IFS='|' read -r name spec split <<< "$row"
  $NAKT evaluate --model "$spec" --images $D/images --masks $D/masks --cases $S:$split --out $WORK/eval_$name --overwrite --no-progress
done
for k in "${!WALL[@]}"; do echo "$k ${WALL[$k]}"; done > $WORK/wall_seconds.txt
$PY - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
wall = dict(line.split() for line in (work / "wall_seconds.txt").read_text(encoding="utf-8").splitlines())
rows = {}
for name in ("nnunet", "nakt", "onnx", "student", "fused_labels"):
    mean = json.loads((work / f"eval_{name}" / "summary.json").read_text(encoding="utf-8"))["mean"]
    rows[name] = {"dice": round(mean["dice"], 4), "hd95": None if mean["hd95"] is None else round(mean["hd95"], 2)}
manifest = json.loads((work / "labels" / "manifest.json").read_text(encoding="utf-8"))
sens = [c["staple"]["sensitivity"] for c in manifest["cases"].values()]
rows["staple_mean_sensitivity"] = [round(sum(s[k] for s in sens) / len(sens), 4) for k in range(3)]
result = {"rows": rows, "wall_seconds": {k: int(v) for k, v in wall.items()},
          "label_values": manifest["label_values"], "label_mapping": manifest.get("label_mapping")}
(work / "interop.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
