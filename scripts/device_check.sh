#!/usr/bin/env bash
# One device session: GPU tests, compute-sanitizer, benchmark; a short table last.
# Usage (GPU machine, repo root): bash scripts/device_check.sh [tests|sanitizer|bench ...]
set -u
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-/tmp/dg_cache}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-tests sanitizer host bench}
summary=()
for step in $steps; do
  case $step in
    tests)
      python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log" | tail -15
      summary+=("gpu tests: $(tail -1 "$OUT/pytest.log")") ;;
    sanitizer)
      python3 scripts/sanitizer_sweep.py > /dev/null 2>&1   # compile + load outside the sanitizer
      for tool in memcheck racecheck synccheck; do
        compute-sanitizer --tool $tool --report-api-errors no --error-exitcode 9 python3 scripts/sanitizer_sweep.py > "$OUT/sanitizer_$tool.log" 2>&1
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
      python3 -m deep_gemm bench --json "$OUT/bench.json" --plot "$OUT/bench.png" 2>&1 | tee "$OUT/bench.log" | tail -45
      summary+=("bench: $(grep geomean "$OUT/bench.log")") ;;
  esac
done
printf '%s\n' "" "== summary" "${summary[@]}"
