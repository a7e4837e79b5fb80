#!/usr/bin/env bash
# Session 15's A/B of STAGE_K_BLOCKS (several 128-K blocks a ring stage, one 3-D TMA load per
# operand): forced-variant GPU tests, then dense and grouped sweeps (planner = 1 block a stage,
# then 2 and 4 blocks with the same K blocks in flight, then 1 again for the run-to-run spread).
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1 DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/dg_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_gemm_variants_gpu.py tests/test_grouped_gpu.py \
  -k "several or forced" 2>&1 | tee "$OUT/tests.log" | tail -4
DECODE="64x2112x7168,128x2112x7168,64x4096x7168,128x4096x7168,64x7168x2048,128x7168x2048,64x24576x1536,128x24576x1536,64x32768x512,128x32768x512,64x7168x16384,128x7168x16384"
ODD="1x2112x7168,7x4096x7168,1x7168x16384,16x7168x2048,200x2112x7168"
BIG="4096x2112x7168,4096x7168x2048,4096x24576x1536,1000x2112x7168"
export SWEEP_EXACT=1 SWEEP_CONFIGS="stage_k_blocks=2;stage_k_blocks=4;stage_k_blocks=1" SWEEP_SHAPES="$DECODE,$ODD,$BIG"
# Every sweep kernel compiled first, on all cores (the sweep then loads them from the disk cache).
(cd scripts && python3 -c "
import os, tune_sweep
from deep_gemm.jit import precompile
from deep_gemm.jit.kernel_source import GEMM_KERNEL_NAME, gemm_source
shapes = [tuple(int(v) for v in s.split('x')) for s in os.environ['SWEEP_SHAPES'].split(',')]
configs = list(dict.fromkeys(c for m, n, k in shapes for _, c in tune_sweep.variants(m, n, k)))
precompile([(c.name, gemm_source(c), GEMM_KERNEL_NAME, 'sm_90a') for c in configs], workers=16, progress=False)
print(len(configs), 'kernels precompiled')" 2>&1 | tail -2)
timeout 240 python3 scripts/tune_sweep.py 2>&1 | tee "$OUT/sweep.log"
GROUPED_CONFIGS="stage_k_blocks=2" timeout 150 python3 scripts/tune_grouped.py masked contiguous 2>&1 | tee "$OUT/grouped.log"
