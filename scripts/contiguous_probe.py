"""Contiguous GEMMs of exact group sizes against dense calls of the same tiles (diagnostics).

    PYTHONPATH=. python3 scripts/contiguous_probe.py            # bench timing, one line per case
    PYTHONPATH=. python3 scripts/contiguous_probe.py --once CASE # three calls, for ncu

Separates what the contiguous layout costs from what the problem's size costs: one group of
4096 rows runs the same 128 x 128 kernel as a dense 4096-row call but fits in L2 (A and B:
58 MB), one group of 32768 rows does not, and 4 groups of 8192 rows add the experts. Cases are
G x rows-per-group x N x K; every group is full (no padding rows).
"""
from __future__ import annotations

import sys

import torch

import deep_gemm
from deep_gemm.bench import Timer
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs

CASES = ["1x4096x4096x7168", "1x32768x4096x7168", "4x8192x4096x7168", "8x4096x4096x7168",
         "4x8192x7168x2048"]


def build(case: str):
    groups, rows, n, k = (int(v) for v in case.split("x"))
    m = groups * rows
    a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    b_hi = torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16)
    b = [deep_gemm.per_block_cast_to_fp8(b_hi[g]) for g in range(groups)]
    del b_hi
    rhs = (torch.stack([x[0] for x in b]), torch.stack([x[1] for x in b]))
    m_indices = torch.arange(groups, device="cuda", dtype=torch.int32).repeat_interleave(rows)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

    def call():
        return deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(a, rhs, out, m_indices)

    def check():
        out.fill_(float("nan"))
        call()
        # One group is enough to catch a wrong kernel; all of them would need G float64 products.
        ref = dequantize_lhs(a[0][:rows], a[1][:rows], dtype=torch.float64) @ \
            dequantize_rhs(rhs[0][0], rhs[1][0], dtype=torch.float64).T
        return calc_diff(out[:rows], ref)

    return 2 * m * n * k, call, check


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--once":
        _, call, _ = build(sys.argv[2])
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        return
    timer = Timer("cuda", 20)
    cases = sys.argv[1:] or CASES
    print(f"{'case':>20} {'us':>9} {'TFLOPS':>7} {'diff':>9}")
    for case in cases:
        flops, call, check = build(case)
        diff = check()
        us, _ = timer.kernel_us(call)
        print(f"{case:>20} {us:9.1f} {flops / us / 1e6:7.0f} {diff:9.1e}", flush=True)
        del call, check
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
