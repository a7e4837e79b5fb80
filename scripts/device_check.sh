#!/usr/bin/env bash
# One device session: environment facts, GPU tests, sanitizer, benchmark.
# Usage (on the GPU machine, from the repo root): bash scripts/device_check.sh [pytest -k expr]
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/dg_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__)"
python3 -m pytest -q -m gpu tests ${1:+-k "$1"} -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -40
