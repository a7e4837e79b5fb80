#!/usr/bin/env bash
# One device session: GPU tests, compute-sanitizer, benchmark, grouped A/B probe; a short table last.
# Usage (GPU machine, repo root): bash scripts/device_check.sh [tests|probe|sanitizer|host|warmup|bench ...]
# Env: OUT (logs), TEST_WORKERS (pytest -n, default 8), SANITIZER_TOOLS (default: memcheck racecheck
# synccheck), STEP_TIMEOUT (seconds per step or per sanitizer tool, default 240).
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/dg_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LIMIT=${STEP_TIMEOUT:-240}
steps=${*:-tests sanitizer host bench}
# GPU, driver and the JIT compiler's version (the kernels' SASS depends on it: perf-notes 28).
summary=("$(python3 -m deep_gemm info 2>&1 | grep -E '^(GPU|driver|NVRTC|torch)' | tr -s ' ')")
start=$(date +%s)
for step in $steps; do
  case $step in
    tests)
      timeout "$LIMIT" python3 -m pytest -q -m gpu -n "${TEST_WORKERS:-8}" tests -p no:cacheprovider > "$OUT/pytest.log" 2>&1
      summary+=("gpu tests (exit $?): $(tail -1 "$OUT/pytest.log")")
      summary+=("$(grep -E '^(FAILED|ERROR)' "$OUT/pytest.log" | head -12 | cut -c1-200)") ;;
    probe)
      timeout "$LIMIT" python3 scripts/grouped_probe.py > "$OUT/probe.log" 2>&1
      summary+=("grouped probe (exit $?):" "$(grep -v '^\[' "$OUT/probe.log" | cut -c1-150)") ;;
    sanitizer)
      python3 scripts/sanitizer_sweep.py > "$OUT/sweep.log" 2>&1   # compile + load outside the sanitizer
      summary+=("sweep without sanitizer: $(tail -1 "$OUT/sweep.log")")
      for tool in ${SANITIZER_TOOLS:-memcheck racecheck synccheck}; do
        timeout "$LIMIT" compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 scripts/sanitizer_sweep.py > "$OUT/sanitizer_$tool.log" 2>&1
        summary+=("compute-sanitizer $tool: exit $? / $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|sanitizer sweep' "$OUT/sanitizer_$tool.log" | tr '\n' ' ')")
        # The first reports themselves, in the summary: a run returns only a few files.
        summary+=("$(grep -m 12 -E 'Error|Warning|Write|Read|at 0x|in deep_gemm' "$OUT/sanitizer_$tool.log" | cut -c1-200)")
      done ;;
    host)
      python3 scripts/host_overhead.py 2>&1 | tee "$OUT/host.log" | tail -30
      summary+=("host overhead: $(grep -i median "$OUT/host.log" | tr '\n' ' ')") ;;
    warmup)
      python3 scripts/warmup_check.py 2>&1 | tee "$OUT/warmup.log" | tail -12
      summary+=("warm-up: $(head -1 "$OUT/warmup.log")") ;;
    bench)
      timeout "$LIMIT" python3 -m deep_gemm bench --json "$OUT/bench.json" --plot "$OUT/bench.png" > "$OUT/bench.log" 2>&1
      summary+=("bench (exit $?):" "$(grep -E '^(dense|odd|contig|masked)|geomean|^per_' "$OUT/bench.log" | cut -c1-110)") ;;
  esac
  summary+=("  [$step done at $(( $(date +%s) - start )) s]")
done
printf '%s\n' "" "== summary" "${summary[@]}"
