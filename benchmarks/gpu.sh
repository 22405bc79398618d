#!/usr/bin/env bash
# GPU speed: labelling (benchmarks/throughput.py) and training (benchmarks/training_throughput.py) with
# --device cuda on ../shared/data/cxr_lungs at 256 px, sized to finish in under 8 minutes on one H100 (an estimate
# from the work done; not yet timed on one). Writes throughput_cuda.{json,md} and training_throughput_cuda.{json,md}
# into $OUT (default benchmarks/results): the CPU results beside them are never overwritten.
#
#   bash benchmarks/gpu.sh                    # PYTHON=... picks the interpreter (default .venv/bin/python)
#   OUT=/tmp/gpu WORK=/tmp/gpu-work bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-runs/gpu}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "benchmarks/gpu.sh: no GPU here (nvidia-smi not found); nothing was run" >&2
  exit 1
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "benchmarks/gpu.sh: no CUDA GPU for torch here (torch.cuda.is_available() is false); nothing was run" >&2
  exit 1
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
started=$SECONDS
# labelling: three teachers trained 2 epochs at 256 px, 96 X-rays labelled by each arm (naive loop, nakt fp32,
# nakt auto = bf16), 2 interleaved repeats; the torchrun and scale parts are CPU measures and are skipped on cuda
"$PY" benchmarks/throughput.py --device cuda --size 256 --epochs 2 --images 96 --repeats 2 \
  --work "$WORK/throughput" --out "$OUT"
echo "benchmarks/gpu.sh: throughput.py done after $((SECONDS - started)) s"
# training: nakt.train (auto = bf16, and fp32) against the plain loop, 80 training cases, 3 epochs, one seed
"$PY" benchmarks/training_throughput.py --device cuda --size 256 --epochs 3 --seeds 0 \
  --work "$WORK/training_throughput" --out "$OUT"
echo "benchmarks/gpu.sh: done in $((SECONDS - started)) s; results in $OUT/throughput_cuda.{json,md} and" \
  "$OUT/training_throughput_cuda.{json,md}"
