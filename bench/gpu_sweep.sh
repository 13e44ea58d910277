#!/usr/bin/env bash
# One slice of the GPU sweep, for a lent GPU machine (docs/GPU.md, bench/README.md):
#   bash bench/gpu_sweep.sh PRESET [more python -m bench options]
# Installs the carried peer wheels (.whl/, pure Python: liger-kernel, cut-cross-entropy), runs the
# benchmark on CUDA and leaves <gpu>.csv, <gpu>.inputs.csv and a log under $OUT (bench/results
# when OUT is unset). Plot back on the CPU machine after `python -m bench merge`. Each slice is
# capped at STEP_LIMIT_S (510 s) so one call stays under 9 minutes: choose slices (presets, N
# lists, modes) that finish in that time; a slice cut short keeps the rows it had written.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:?usage: bash bench/gpu_sweep.sh PRESET [python -m bench options]}"
shift
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv || true
timeout "${STEP_LIMIT_S:-510}" python3 -m bench --device cuda --preset "$preset" --results-dir "$out" --no-progress "$@" 2>&1 | tee "$out/bench-$preset.log"
