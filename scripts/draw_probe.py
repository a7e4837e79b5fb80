"""How much the random group sizes move a grouped bench row (its "vs DG" is a TFLOPS ratio).

    PYTHONPATH=. python3 scripts/draw_probe.py [draws]
The bench draws each group's rows from 0.7-1.3 x the expected M with one fixed seed per case, and
DeepGEMM's ANCHORS.md times come from its own draw. This builds the same cases as the bench with
other seeds, times our call the bench's way (L2 written over before each call, median of the
profiler's kernel times), checks it against float64, and prints TFLOPS per draw against DeepGEMM's.

Environment: DRAW_CONFIGS="split_k=4;block_n=144,pipeline=0" also times, on every draw, the
planner's config with those fields replaced (int values); DRAW_CASES="2x512,1x1024" keeps the
cases whose label starts with one of these.
"""
import dataclasses
import os
import statistics
import sys

import torch

from deep_gemm import bench
from deep_gemm.ops import grouped
from tune_grouped import timed_with_plan   # scripts/ is on sys.path when run as a script

CASES = [(bench.make_masked, (2, 512, 4096, 7168)), (bench.make_masked, (32, 32, 7168, 2048)),
         (bench.make_masked, (32, 32, 4096, 7168)), (bench.make_masked, (1, 1024, 4096, 7168)),
         (bench.make_masked, (4, 256, 4096, 7168)),
         (bench.make_contiguous, (4, 8192, 4096, 7168)), (bench.make_contiguous, (8, 4096, 4096, 7168))]


def variant_specs():
    """[(name, field changes)]: the planner's config first, then DRAW_CONFIGS."""
    specs = [("planner", {})]
    for spec in filter(None, os.environ.get("DRAW_CONFIGS", "").split(";")):
        specs.append((spec, {f: int(v) for f, v in (item.split("=") for item in spec.split(","))}))
    return specs


def main():
    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    keep = [c for c in os.environ.get("DRAW_CASES", "").split(",") if c]
    timer = bench.Timer("cuda", 20)
    specs = variant_specs()
    planner = grouped.plan_cached
    for make, case in CASES:
        ratios = {name: [] for name, _ in specs}
        for seed in range(1000, 1000 + draws):
            problem = make(*case, "cuda", seed=seed)
            if keep and not any(problem.label.startswith(c) for c in keep):
                break
            if seed == 1000:
                print(f"{problem.suite} {problem.label} (DeepGEMM {problem.deepgemm_tflops} TFLOPS):")
            for name, changes in specs:
                override = ((lambda *args, c=changes: dataclasses.replace(planner(*args), **c))
                            if changes else None)
                us, diff = timed_with_plan(problem, timer, override)
                tflops = problem.flops / us / 1e6
                ratios[name].append(tflops / problem.deepgemm_tflops)   # DeepGEMM's TFLOPS on its own draw
                print(f"  draw {seed - 1000}: {problem.shape['valid_m']:6d} rows  {name:>12} {us:8.1f} us"
                      f"  {tflops:6.0f} TFLOPS  {ratios[name][-1]:5.2f}x DG  (calc_diff {diff:.1e})")
            del problem
            torch.cuda.empty_cache()
        for name, values in ratios.items():
            if values:
                print(f"  {name}: median over draws {statistics.median(values):.2f}x DG "
                      f"(min {min(values):.2f}, max {max(values):.2f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
