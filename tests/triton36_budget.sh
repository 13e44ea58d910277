#!/usr/bin/env bash
# The static resource budget (tests/test_triton_budget.py) under Triton 3.6, the GPU machine's
# version, beside the environment's own Triton: the 3.6 wheel goes into a --target directory that
# is put first on PYTHONPATH for this one command (torch and everything else stay as installed).
#
#   bash tests/triton36_budget.sh [DIR] [triton_aot.py options]   (default DIR: ../triton36)
#
# Default options: every variant on sm_90 in bf16 and the heaviest variant of each kernel and
# loop kind for sm_90 / sm_80 / sm_89 in bf16, fp16, fp32 and TF32. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-$PWD/../triton36}"
shift || true
if [[ ! -f "$DIR/triton/__init__.py" ]]; then
    python -m pip install -q --no-deps --target "$DIR" triton==3.6.0
fi
unset TRITON_INTERPRET
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$DIR/.cache}"
PYTHONPATH="$DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}" python -c "import triton; assert triton.__version__.startswith('3.6'), triton.__version__"
PYTHONPATH="$DIR:$PWD${PYTHONPATH:+:$PYTHONPATH}" python tests/triton_aot.py --budget 90,80,89 \
    --dtypes bf16,fp16,fp32,tf32 "$@" > "${OUT:-/tmp}/triton36_budget.jsonl"
