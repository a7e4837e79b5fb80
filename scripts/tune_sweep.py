"""Development sweep: time planner variants of the dense GEMM on the GPU.

    python scripts/tune_sweep.py [M,M,...]       # ANCHORS dense shapes (of these M) x variants
Each variant replaces fields of the planner's config (dataclasses.replace);
timing is the bench's (profiler kernel time, L2 flushed, median).
Environment: SWEEP_SHAPES="64x2112x7168,..." other shapes; SWEEP_CONFIGS="split_k=1;block_n=64,
split_k=4" explicit variants instead of the built-in list; SWEEP_FLUSH=read a clean-L2 flush
(bench.Timer); SWEEP_PLANNER_ONLY=1 the planner's choice alone; SWEEP_EXACT=1 applies SWEEP_CONFIGS
without deepening the ring (a new stage_k_blocks keeps the planner's K blocks in flight).
"""
import dataclasses
import itertools
import os
import sys

import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.bench import Timer
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
from deep_gemm.runtime.kernels import launch_gemm

SHAPES = [(m, n, k) for m in (64, 128, 4096) for n, k in (
    (7168, 576), (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]


def deep(cfg, **changes):
    """cfg with `changes` and as many ring stages as shared memory holds (up to 32 K blocks)."""
    cfg = dataclasses.replace(cfg, **changes)
    kbs = cfg.stage_k_blocks
    return dataclasses.replace(cfg, num_stages=plan.max_stages(cfg.block_m, cfg.block_n, cap=-(-32 // kbs),
                                                               stage_k_blocks=kbs))


def exact(cfg, **changes):
    """cfg with `changes`; a new stage_k_blocks keeps about as many K blocks in flight."""
    kbs = changes.pop("stage_k_blocks", cfg.stage_k_blocks)
    return plan.with_stage_k_blocks(dataclasses.replace(cfg, **changes), kbs)


def parse_configs(text):
    """SWEEP_CONFIGS="block_n=32,split_k=2;block_n=64,split_k=4": explicit variants (int fields)."""
    for spec in filter(None, text.split(";")):
        yield spec, {field: int(value) for field, value in (item.split("=") for item in spec.split(","))}


def variants(m, n, k):
    base = plan.plan_dense(m, n, k, 132)
    yield "planner", base
    if os.environ.get("SWEEP_PLANNER_ONLY"):  # repeat runs of the planner's choice (run-to-run spread)
        return
    if os.environ.get("SWEEP_CONFIGS"):
        # SWEEP_EXACT=1: the fields replaced as given, the ring depth left as the planner chose.
        change = exact if os.environ.get("SWEEP_EXACT") else deep
        for name, changes in parse_configs(os.environ["SWEEP_CONFIGS"]):
            name = name.replace("block_n=", "bn").replace("split_k=", "sk").replace("stage_k_blocks=", "kb")
            yield name, change(base, **changes)
        return
    if m > plan.COMPUTE_BOUND_M:
        yield "c2", dataclasses.replace(base, cluster_n=2)
        return
    yield f"deep s{deep(base).num_stages}", deep(base)
    yield "deep pipeline", deep(base, pipeline=True)
    yield "deep c2", deep(base, cluster_n=2)
    if base.block_m == 128 and plan.valid_block_n(base.block_n * 2) and base.block_n * 2 <= 160:
        yield f"deep bm64 bn{base.block_n * 2}", deep(base, block_m=64, block_n=base.block_n * 2)
    for factor in (2, 4):
        bn = base.block_n * factor
        if plan.valid_block_n(bn) and bn <= plan.MAX_BLOCK_N[base.block_m]:
            yield f"deep bn{bn} sk{factor}", deep(base, block_n=bn, split_k=factor)


def main():
    only_m = {int(v) for v in sys.argv[1].split(",")} if len(sys.argv) > 1 else None
    timer = Timer("cuda", 30, flush=os.environ.get("SWEEP_FLUSH", "write"))  # or "read": see bench.Timer
    print(f"{'shape':>18} {'variant':>16} {'us':>8} {'TFLOPS':>7} {'diff':>9}")
    shapes = SHAPES
    if os.environ.get("SWEEP_SHAPES"):  # e.g. "64x2112x7168,128x4096x7168"
        shapes = [tuple(int(v) for v in s.split("x")) for s in os.environ["SWEEP_SHAPES"].split(",")]
    for m, n, k in shapes:
        if only_m is not None and m not in only_m:
            continue
        a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        ref = dequantize_lhs(*a, dtype=torch.float64) @ dequantize_rhs(*b, dtype=torch.float64).T
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        for name, cfg in variants(m, n, k):
            def call():
                launch_gemm(cfg, a=a[0], a_rows=m, sa=a[1], sa_rows=m, b=b[0], b_rows=n,
                            sb=b[1], out=out, out_rows=m, shape_m=m, group_info=None, num_sms=132)
            try:
                out.fill_(float("nan"))
                call()
                diff = calc_diff(out, ref)
                us, _ = timer.kernel_us(call)
            except Exception as e:  # report and keep sweeping
                print(f"{m}x{n}x{k:>6} {name:>16} failed: {str(e)[:80]}")
                continue
            print(f"{f'{m}x{n}x{k}':>18} {name:>16} {us:8.1f} {2*m*n*k/us/1e6:7.0f} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
