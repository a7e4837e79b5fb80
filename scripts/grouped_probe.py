"""Development A/B of tile configs on the grouped bench cases, each side timed ROUNDS times, interleaved.

    PYTHONPATH=. python3 scripts/grouped_probe.py [label-prefix ...]

Each case is built exactly as `python -m deep_gemm bench` builds it (same group sizes); every
variant is the planner's config with some fields replaced (tune_sweep.deep: the deepest ring that
fits; the two-tile pipeline only up to BLOCK_N = 128, the halves at any width). A case's variants
are compiled up front in a process pool, checked against float64 and timed the bench's way (write
flush, profiler, median of 20) in rounds A B C .. A B C .., so that drift along the run shows as a
spread, not as a difference.
"""
import sys

import torch

from deep_gemm import bench
from deep_gemm.jit import precompile
from deep_gemm.jit.kernel_source import GEMM_KERNEL_NAME, gemm_source
from deep_gemm.ops import grouped
from tune_grouped import _plan_args, timed_with_plan
from tune_sweep import deep

# The planner's config is the first side of every case; these are the others. Not yet run
# (written in session 17, which had no device; docs/perf-notes.md, section 27).
# WIDE: 128 x 160 / 128 x 192 tiles, DeepGEMM's choice for the large grouped cases (its heuristic
# picks the tile with the fewest waves), unpipelined as theirs, with a main loop per scale split
# (fs: the split known at compile time, ~100 fewer instructions per K block and warp at
# BLOCK_N = 192; bn192 without it separates the tile from the instruction count).
# HALVES: promotion pipelined over the two N halves of each block (ph), at the registers of the
# unpipelined loop, so wide tiles pipeline too; on the planner's 128 x 128 tile it is an A/B of
# the two ways to pipeline.
WIDE = dict(pipeline=0, split_k=1, fixed_scale_split=1)
HALVES = dict(pipeline=0, split_k=1, pipeline_halves=1)
SESSION_15 = dict(block_m=64, pipeline=0)    # what the planner chose for 16 x 64 before section 26
LARGE = [HALVES, dict(WIDE, block_n=160), dict(HALVES, block_n=160, fixed_scale_split=1),
         dict(HALVES, block_n=192, fixed_scale_split=1)]
CASES = [
    # DeepGEMM's own config here: 128 x 160 with A multicast to two N neighbours.
    (bench.make_contiguous, (4, 8192, 4096, 7168),
     LARGE + [dict(WIDE, block_n=192), dict(WIDE, block_n=192, fixed_scale_split=0), dict(WIDE, block_n=160, cluster_n=2)]),
    (bench.make_contiguous, (8, 4096, 4096, 7168), LARGE),
    (bench.make_contiguous, (4, 8192, 7168, 2048), LARGE),
    (bench.make_contiguous, (8, 4096, 7168, 2048), LARGE),
    # Masked calls over a long K would deploy these split-capable (the tail is known on the device
    # only); on this draw (9 M blocks) 128 x 144-192 tiles do not split: 198 / 234 / 261 tiles.
    (bench.make_masked, (2, 512, 4096, 7168), [dict(HALVES, split_k=4), dict(WIDE, block_n=144, split_k=4),
                                               dict(HALVES, block_n=144, fixed_scale_split=1, split_k=4),
                                               dict(WIDE, block_n=160, split_k=4),
                                               dict(HALVES, block_n=160, fixed_scale_split=1, split_k=4)]),
    # Memory-bound: the draw's 26 M blocks x 56 N blocks are 11 rounds and 4 tiles, and those 4
    # run alone (one 64-row tile is ~2.3 us of one SM's tensor work at K = 2048): split them.
    (bench.make_masked, (16, 64, 7168, 2048), [SESSION_15, dict(split_k=4), dict(split_k=2),
                                               dict(block_n=160, pipeline=0, fixed_scale_split=1), dict(HALVES)]),
    # The planner's 160-column tiles here pick their scales at run time (memory-bound: 89%).
    (bench.make_masked, (32, 32, 7168, 2048), [dict(fixed_scale_split=1), dict(HALVES, fixed_scale_split=1)]),
]
ROUNDS = 3


SHORT = {"block_m": "bm", "block_n": "bn", "pipeline": "p", "split_k": "sk", "fixed_scale_split": "fs",
         "cluster_n": "c", "pipeline_halves": "ph"}


def label(changes):
    return " ".join(f"{SHORT.get(k, k)}{int(v)}" for k, v in changes.items())


def probe(make, shape, changes, timer):
    problem = make(*shape, "cuda")
    base = grouped.plan_cached(*_plan_args(problem))
    # tune_sweep.deep: the changed tile with the deepest ring that fits.
    sides = [("planner", base)] + [(label(c), deep(base, **c)) for c in changes]
    precompile([(cfg.name, gemm_source(cfg), GEMM_KERNEL_NAME, "sm_90a") for _, cfg in sides], progress=False)
    times = {name: [] for name, _ in sides}
    diffs = {}
    for _ in range(ROUNDS):
        for name, cfg in sides:
            try:
                us, diff = timed_with_plan(problem, timer, lambda *args, cfg=cfg: cfg)
            except Exception as e:  # report and keep sweeping
                times[name].append(float("nan"))
                diffs[name] = str(e)[:60]
                continue
            times[name].append(us)
            diffs[name] = f"{diff:9.1e}"
    for name, cfg in sides:
        ts = times[name]
        best = min((t for t in ts if t == t), default=float("nan"))
        print(f"{problem.label:>24} {name:>22} {' / '.join(f'{t:.1f}' for t in ts):>17} "
              f"{problem.flops / best / 1e6:7.0f} {diffs[name]}  {cfg.name}", flush=True)


def main():
    keep = sys.argv[1:]
    timer = bench.Timer("cuda", 20)
    print(f"{'case':>24} {'variant':>22} {'us (rounds)':>17} {'TFLOPS':>7} {'diff':>9}  config", flush=True)
    for make, shape, changes in CASES:
        groups, m, n, k = shape
        if keep and not any(f"{groups}x{m} {n}x{k}".startswith(p) for p in keep):
            continue
        try:
            probe(make, shape, changes, timer)
        except Exception as e:  # a case that cannot be built or compiled: say so, go on
            print(f"{groups}x{m} {n}x{k}: failed ({type(e).__name__}: {str(e)[:100]})", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
