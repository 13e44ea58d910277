#!/usr/bin/env bash
# One-shot GPU check of the Triton backend (issue 3): the Triton tests on the GPU (the
# gpu-marked ones included), then a quick timing against the dense-GEMM floor.
#
#   bash bench/gpu_check.sh [all|tests|bench]      (from the repository root; default: all)
#
# Everything goes under $OUT (default ./gpu_check_out): env.txt, test_triton.log,
# gpu_quick.log, gpu_quick.json. Each step stays well inside 10 minutes on an H100; run
# `tests` and `bench` as two calls if one call must be shorter. Exits non-zero if the tests fail.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
STEP="${1:-all}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # the real kernels, not the interpreter
status=0

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || echo "commit: unknown (no .git here)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [[ "$STEP" == all || "$STEP" == tests ]]; then
  echo "== tests/test_triton.py on the GPU =="
  "$PY" -m pytest -q -rs --durations=15 tests/test_triton.py 2>&1 | tee "$OUT/test_triton.log"
  status=${PIPESTATUS[0]}
fi

if [[ "$STEP" == all || "$STEP" == bench ]]; then
  echo "== PSFT forward+backward, N=8192 D=4096 V=131072 bf16, vs the three dense GEMMs =="
  "$PY" bench/gpu_quick.py --tokens 8192 --dim 4096 --vocab 131072 --dtype bfloat16 \
    --out "$OUT/gpu_quick.json" 2>&1 | tee "$OUT/gpu_quick.log"
fi
exit "$status"
