"""Development sweep: time planner variants of the dense GEMM on the GPU.

    python scripts/tune_sweep.py                 # ANCHORS dense shapes x variants
Each variant replaces fields of the planner's config (dataclasses.replace);
timing is the bench's (profiler kernel time, L2 flushed, median).
"""
import dataclasses
import itertools
import sys

import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.bench import Timer
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
from deep_gemm.runtime.kernels import launch_gemm

SHAPES = [(m, n, k) for m in (64, 128) for n, k in (
    (7168, 576), (2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))]


def variants(m, n, k):
    base = plan.plan_dense(m, n, k, 132)
    yield "planner", base
    if base.block_n <= plan.MAX_PIPELINED_BLOCK_N:
        yield f"pipeline={not base.pipeline}", dataclasses.replace(base, pipeline=not base.pipeline)


def main():
    timer = Timer("cuda", 30)
    print(f"{'shape':>18} {'variant':>12} {'us':>8} {'TFLOPS':>7} {'diff':>9}")
    for m, n, k in SHAPES:
        a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        ref = dequantize_lhs(*a, dtype=torch.float64) @ dequantize_rhs(*b, dtype=torch.float64).T
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        for name, cfg in variants(m, n, k):
            def call():
                launch_gemm(cfg, a=a[0], a_rows=m, sa=a[1], sa_rows=m, sa_cols=a[1].shape[-1], b=b[0], b_rows=n,
                            sb=b[1], out=out, out_rows=m, shape_m=m, group_info=None, num_sms=132)
            try:
                out.fill_(float("nan"))
                call()
                diff = calc_diff(out, ref)
                us, _ = timer.kernel_us(call)
            except Exception as e:  # report and keep sweeping
                print(f"{m}x{n}x{k:>6} {name:>12} failed: {str(e)[:80]}")
                continue
            print(f"{f'{m}x{n}x{k}':>18} {name:>12} {us:8.1f} {2*m*n*k/us/1e6:7.0f} {diff:9.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
