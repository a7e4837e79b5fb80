#!/usr/bin/env bash
# One call on a GPU machine: GPU tests, compute-sanitizer, benchmark, A/B against another build;
# a short summary last (the device tool returns the end of the output).
# Usage (repo root): bash scripts/device_check.sh [tests|sanitizer|bench|ab|cu12|suite:NAME ...]
# Env: OUT (logs, default /tmp/out), TEST_WORKERS (pytest -n, default 8), SANITIZER_TOOLS (default
# memcheck racecheck synccheck), STEP_TIMEOUT (seconds per step or sanitizer tool, default 240),
# BASE (ab: the other build's repository root), AB_ROUNDS (ab: runs of each side, default 2),
# BENCH_ARGS (bench and ab: extra arguments of `python -m deep_gemm bench`).
set -u
export PYTHONUNBUFFERED=1 DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/dg_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LIMIT=${STEP_TIMEOUT:-240}
HERE=$PWD
steps=${*:-tests sanitizer bench}
# GPU, driver and the JIT compiler's version (the kernels' code depends on it).
summary=("$(PYTHONPATH=$HERE python3 -m deep_gemm info 2>&1 | grep -E '^(GPU|driver|NVRTC|torch)' | tr -s ' ')")
start=$(date +%s)
for step in $steps; do
  case $step in
    tests)
      PYTHONPATH=$HERE timeout "$LIMIT" python3 -m pytest -q -m gpu -n "${TEST_WORKERS:-8}" tests -p no:cacheprovider \
        > "$OUT/pytest.log" 2>&1
      summary+=("gpu tests (exit $?): $(tail -1 "$OUT/pytest.log")")
      summary+=("$(grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -12 | cut -c1-200)") ;;
    sanitizer)
      PYTHONPATH=$HERE python3 scripts/sanitizer_sweep.py > "$OUT/sweep.log" 2>&1   # compile + load outside the tool
      summary+=("sweep without sanitizer: $(tail -1 "$OUT/sweep.log")")
      for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
        PYTHONPATH=$HERE timeout "$LIMIT" compute-sanitizer --tool "$tool" --report-api-errors no --error-exitcode 9 \
          python3 scripts/sanitizer_sweep.py > "$OUT/sanitizer_$tool.log" 2>&1
        summary+=("compute-sanitizer $tool: exit $? / $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitizer sweep' \
          "$OUT/sanitizer_$tool.log" | tr '\n' ' ')")
        summary+=("$(grep -m 8 -E 'Error|Warning|Write|Read|in .*\.cuh' "$OUT/sanitizer_$tool.log" | cut -c1-200)")
      done ;;
    bench)
      PYTHONPATH=$HERE timeout "$LIMIT" python3 -m deep_gemm bench ${BENCH_ARGS:-} --json "$OUT/bench.json" \
        --plot "$OUT/bench.png" > "$OUT/bench.log" 2>&1
      summary+=("bench (exit $?):" "$(grep -E '^(dense|odd|contig|masked)|geomean|^per_' "$OUT/bench.log" | cut -c1-110)") ;;
    cu12)
      # CUDA 12 stacks: cuda-bindings 12.x, cuda-pathfinder and NVRTC 12.4 wheels carried in .whl/
      # (python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      # --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "cuda-bindings==12.9.*"
      # "nvidia-cuda-nvrtc-cu12==12.4.*" cuda-pathfinder), first on the path, with libnvrtc.so.12 loaded
      # before the bindings look for an NVRTC (else they find the CUDA 13 one beside torch); the
      # DeepGEMM 2.x, training, dense and cheap-path GPU tests, serially (xdist workers would not preload it).
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site12 .whl/*.whl > "$OUT/cu12.log" 2>&1
      run12() {
        PYTHONPATH=/tmp/site12:$HERE DG_JIT_CACHE_DIR=/tmp/dg_cache12 python3 -c "import ctypes, glob, runpy, sys
ctypes.CDLL(glob.glob('/tmp/site12/nvidia/cuda_nvrtc/lib/libnvrtc.so.12*')[0], mode=ctypes.RTLD_GLOBAL)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)" "$@"
      }
      run12 deep_gemm info 2>&1 | grep -E "^(NVRTC|driver)" >> "$OUT/cu12.log"
      timeout "$LIMIT" bash -c "$(declare -f run12); HERE=$HERE run12 pytest -q -m gpu tests/test_api_v2.py \
        tests/test_training.py tests/test_gemm_gpu.py tests/test_cheap_path.py -p no:cacheprovider" >> "$OUT/cu12.log" 2>&1
      summary+=("cu12 gpu tests (exit $?): $(grep -E '^NVRTC' "$OUT/cu12.log" | tr -s ' ') / $(tail -1 "$OUT/cu12.log")")
      # and the benchmark's inference suites on the same stack (ours; the peers do not use NVRTC)
      timeout "$LIMIT" bash -c "$(declare -f run12); HERE=$HERE run12 deep_gemm bench --peers ours ${BENCH_ARGS:-} \
        --json $OUT/bench_cu12.json --plot /tmp/bench_cu12.png" > "$OUT/bench_cu12.log" 2>&1
      summary+=("cu12 bench (exit $?):" "$(grep -E 'geomean|^per_' "$OUT/bench_cu12.log" | cut -c1-110)") ;;
    suite:*)
      # One bench suite by name (wgrad, host, train_step, chain, sweep, ...), ours and the peers.
      name=${step#suite:}
      PYTHONPATH=$HERE timeout "$LIMIT" python3 -m deep_gemm bench --suite "$name" ${BENCH_ARGS:-} \
        --json "$OUT/$name.json" --plot "$OUT/$name.png" > "$OUT/$name.log" 2>&1
      summary+=("bench --suite $name (exit $?):" "$(tail -25 "$OUT/$name.log" | cut -c1-140)") ;;
    ab)
      # Interleaved runs of each build's bench (ours only), then the row-by-row comparison.
      base_runs=() new_runs=()
      for round in $(seq "${AB_ROUNDS:-2}"); do
        for side in base new; do
          root=$HERE; [ "$side" = base ] && root=$BASE
          (cd "$root" && PYTHONPATH=$root DG_JIT_CACHE_DIR=/tmp/dg_cache_$side timeout "$LIMIT" python3 -m deep_gemm \
            bench --peers ours ${BENCH_ARGS:-} --json "$OUT/ab_${side}_$round.json" --plot "/tmp/ab_${side}_$round.png") \
            > "$OUT/ab_${side}_$round.log" 2>&1
          [ "$side" = base ] && base_runs+=("$OUT/ab_base_$round.json") || new_runs+=("$OUT/ab_new_$round.json")
        done
      done
      python3 scripts/compare_bench.py "$(IFS=,; echo "${base_runs[*]}")" "$(IFS=,; echo "${new_runs[*]}")" \
        > "$OUT/ab.txt" 2>&1
      summary+=("A/B (exit $?):" "$(cat "$OUT/ab.txt")") ;;
  esac
  summary+=("  [$step done at $(( $(date +%s) - start )) s]")
done
printf '%s\n' "" "== summary" "${summary[@]}"
