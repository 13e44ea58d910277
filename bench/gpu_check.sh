#!/usr/bin/env bash
# One-shot GPU check of the Triton backend (issues 3 and 16): the Triton tests on the GPU (the
# gpu-marked ones included), then PSFT timed against the dense-GEMM floors measured in the same
# run, with the performance model's prediction beside each exact measurement.
#
#   bash bench/gpu_check.sh [all|tests|bench]      (from the repository root; default: all)
#
# Needs only torch, triton, pytest and numpy (torch 2.11 / triton 3.6 on the lent machine). Each
# step is capped at 8.5 minutes (`timeout`), so `tests` and `bench` each fit one 10-minute call;
# `all` runs both (two calls are safer). Logs and JSON go under $OUT (default ./gpu_check_out);
# CSV rows (device, versions, commit, date) are appended to bench/results/gpu_check.csv (the test
# step) and bench/results/gpu_quick.csv (the timings). Exits non-zero if the tests fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
RESULTS="${RESULTS:-$PWD/bench/results}"
mkdir -p "$OUT" "$RESULTS"
PY="${PYTHON:-python3}"
STEP="${1:-all}"
LIMIT="${STEP_LIMIT_S:-510}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels, not the interpreter
status=0

COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"
VERSIONS="$("$PY" -c "import torch, triton; print(torch.__version__ + ',' + triton.__version__)")"
{
  echo "$DATE"
  echo "$COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "$STEP" == all || "$STEP" == tests ]]; then
  echo "== tests/test_triton.py on the GPU (limit ${LIMIT}s) =="
  start=$SECONDS
  timeout "$LIMIT" "$PY" -m pytest -q -rs --durations=15 tests/test_triton.py 2>&1 | tee "$OUT/test_triton.log"
  status=${PIPESTATUS[0]}
  summary="$(tail -1 "$OUT/test_triton.log" | tr ',' ';')"
  [[ -f "$RESULTS/gpu_check.csv" ]] || echo "date,gpu,torch,triton,commit,step,exit_status,seconds,summary" > "$RESULTS/gpu_check.csv"
  echo "$DATE,$GPU,$VERSIONS,$COMMIT,tests/test_triton.py,$status,$((SECONDS - start)),$summary" >> "$RESULTS/gpu_check.csv"
fi

if [[ "$STEP" == all || "$STEP" == bench ]]; then
  echo "== PSFT forward+backward, N=8192 D=4096 V=131072 bf16, vs the dense GEMMs (limit ${LIMIT}s) =="
  timeout "$LIMIT" "$PY" bench/gpu_quick.py --tokens 8192 --dim 4096 --vocab 131072 --dtype bfloat16 \
    --out "$OUT/gpu_quick.json" --csv "$RESULTS/gpu_quick.csv" 2>&1 | tee "$OUT/gpu_quick.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
fi
exit "$status"
