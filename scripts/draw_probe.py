"""How much the random group sizes move a grouped bench row (its "vs DG" is a TFLOPS ratio).

    PYTHONPATH=. python3 scripts/draw_probe.py [draws]
The bench draws each group's rows from 0.7-1.3 x the expected M with one fixed seed per case, and
DeepGEMM's ANCHORS.md times come from its own draw. This times our masked and contiguous calls on
several other draws of the same cases (same method as the bench: L2 written over before each call,
median of the profiler's kernel times) and prints TFLOPS per draw against DeepGEMM's.
"""
import statistics
import sys

import torch

import deep_gemm
from deep_gemm.bench import DEEPGEMM_CONTIGUOUS, DEEPGEMM_MASKED, Timer, _cast_pair, _draw_counts

MASKED = [(2, 512, 4096, 7168), (32, 32, 7168, 2048), (32, 32, 4096, 7168), (1, 1024, 4096, 7168)]
CONTIGUOUS = [(4, 8192, 4096, 7168), (8, 4096, 4096, 7168)]


def masked_tflops(groups, expected_m, n, k, seed, timer):
    max_m = 4096 if expected_m >= 256 else 256
    counts = [min(c, max_m) for c in _draw_counts(groups, expected_m, seed)]
    lhs, rhs = _cast_pair(torch.randn(groups, max_m, k, device="cuda", dtype=torch.bfloat16),
                          torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
    masked_m = torch.tensor(counts, dtype=torch.int32, device="cuda")
    out = torch.empty((groups, max_m, n), dtype=torch.bfloat16, device="cuda")
    call = lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    call()
    us, _ = timer.kernel_us(call)
    return counts, us, 2 * sum(counts) * n * k / us / 1e6


def contiguous_tflops(groups, m_per_group, n, k, seed, timer):
    align = deep_gemm.get_m_alignment_for_contiguous_layout()
    counts = _draw_counts(groups, m_per_group, seed)
    padded = [(c + align - 1) // align * align for c in counts]
    lhs, rhs = _cast_pair(torch.randn(sum(padded), k, device="cuda", dtype=torch.bfloat16),
                          torch.randn(groups, n, k, device="cuda", dtype=torch.bfloat16))
    m_indices = torch.full((sum(padded),), -1, dtype=torch.int32)
    start = 0
    for g, (c, p) in enumerate(zip(counts, padded)):
        m_indices[start:start + c] = g
        start += p
    m_indices = m_indices.cuda()
    out = torch.empty((sum(padded), n), dtype=torch.bfloat16, device="cuda")
    call = lambda: deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    call()
    us, _ = timer.kernel_us(call)
    return counts, us, 2 * sum(counts) * n * k / us / 1e6


def main():
    draws = int(sys.argv[1]) if len(sys.argv) > 1 else 6
    timer = Timer("cuda", 20)
    cases = [("masked", c, masked_tflops, DEEPGEMM_MASKED[c]) for c in MASKED]
    cases += [("contiguous", c, contiguous_tflops, DEEPGEMM_CONTIGUOUS[c]) for c in CONTIGUOUS]
    for suite, case, fn, (_, dg_tflops) in cases:   # DeepGEMM's TFLOPS on its own draw (ANCHORS.md)
        groups, m, n, k = case
        ratios = []
        print(f"{suite} {groups}x{m} {n}x{k} (DeepGEMM {dg_tflops} TFLOPS):")
        for seed in range(draws):
            counts, us, tflops = fn(groups, m, n, k, 1000 + seed, timer)
            ratios.append(tflops / dg_tflops)
            shown = counts if len(counts) <= 8 else f"{sum(counts)} rows in {len(counts)} groups"
            print(f"  draw {seed}: {shown}  {us:8.1f} us  {tflops:6.0f} TFLOPS  {tflops / dg_tflops:5.2f}x DG")
        print(f"  median over draws: {statistics.median(ratios):.2f}x DG "
              f"(min {min(ratios):.2f}, max {max(ratios):.2f})", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
