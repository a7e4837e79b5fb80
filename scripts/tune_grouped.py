"""Development sweep: planner variants of the grouped GEMMs (ANCHORS cases) on the GPU.

    python scripts/tune_grouped.py [masked|contiguous ...]   (GROUPED_STREAM_ONLY=1: planner and
                                                           B's L2 policy flipped, nothing else;
                                                           GROUPED_CONFIGS="block_n=64;..." the
                                                           planner and these variants only;
                                                           GROUPED_PLANNER_ONLY=1 the planner alone)

Builds each case exactly as `python -m deep_gemm bench` does (same random group sizes), then
times the public function with the planner's config replaced field by field
(dataclasses.replace, through a patched plan_cached); every variant is checked against float64.
"""
import dataclasses
import os
import sys

import torch

from deep_gemm import bench, plan
from deep_gemm.ops import grouped
from tune_sweep import exact, parse_configs


def variants(base):
    yield "planner", base
    if os.environ.get("GROUPED_PLANNER_ONLY"):
        return
    if os.environ.get("GROUPED_CONFIGS"):   # explicit variants, as tune_sweep's SWEEP_CONFIGS
        for name, changes in parse_configs(os.environ["GROUPED_CONFIGS"]):
            yield name, exact(base, **changes)
        return
    yield ("normal B" if base.stream_b else "stream B"), dataclasses.replace(base, stream_b=not base.stream_b)
    if os.environ.get("GROUPED_STREAM_ONLY"):   # just the L2 policy of B's loads, both ways
        return
    if base.block_m == 128:
        for bn in (144, 160):
            yield f"bn{bn}", dataclasses.replace(base, block_n=bn, pipeline=False,
                                                num_stages=plan.max_stages(128, bn))
        yield "bm64 bn128", dataclasses.replace(base, block_m=64, num_stages=plan.max_stages(64, 128))
        yield "bm64 bn160", dataclasses.replace(base, block_m=64, block_n=160, pipeline=False,
                                               num_stages=plan.max_stages(64, 160))
        for raster in (4, 8, 16, 32):
            if raster != base.raster_group:
                yield f"raster{raster}", dataclasses.replace(base, raster_group=raster)
    else:
        yield f"bn{base.block_n * 2}", dataclasses.replace(base, block_n=base.block_n * 2,
                                                          num_stages=plan.max_stages(64, base.block_n * 2))


def main():
    suites = sys.argv[1:] or ["masked", "contiguous"]
    timer = bench.Timer("cuda", 20)
    print(f"{'case':>28} {'variant':>12} {'us':>8} {'TFLOPS':>7} {'diff':>9}  config")
    for suite in suites:
        for build in bench.suite_cases(suite, quick=False, shapes=[]):
            problem = build("cuda")
            base = grouped.plan_cached(*_plan_args(problem))
            for name, cfg in variants(base):
                try:
                    us, diff = timed_with_plan(problem, timer, lambda *args, cfg=cfg: cfg)
                except Exception as e:  # report and keep sweeping
                    print(f"{problem.label:>28} {name:>12} failed: {str(e)[:90]}")
                    continue
                print(f"{problem.label:>28} {name:>12} {us:8.1f} {problem.flops / us / 1e6:7.0f} {diff:9.1e}  "
                      f"{cfg.name}", flush=True)
            del problem
            torch.cuda.empty_cache()


def timed_with_plan(problem, timer, plan_cached=None):
    """(us, calc_diff) of our call on a bench problem, planned by `plan_cached` (a stand-in for
    ops/grouped.py's plan_cached; None: the planner's own) and checked against float64."""
    original = grouped.plan_cached
    grouped.plan_cached = plan_cached or original
    grouped._contiguous_launches.clear()
    grouped._masked_launches.clear()
    try:
        fn = problem.peers["ours"]()
        problem.poison()
        diff = problem.check(fn())
        us, _ = timer.kernel_us(fn)
    finally:
        grouped.plan_cached = original
        grouped._contiguous_launches.clear()
        grouped._masked_launches.clear()
    return us, diff


def _plan_args(problem):
    """plan_cached's arguments for a bench problem, as ops/grouped.py computes them."""
    s = problem.shape
    if problem.suite == "masked":
        return (min(s["expected_m"], s["max_m"]), s["n"], s["k"], 132, plan.LAYOUT_MASKED, s["groups"])
    return (s["m_total"], s["n"], s["k"], 132, plan.LAYOUT_CONTIGUOUS, s["groups"])


if __name__ == "__main__":
    sys.exit(main())
