"""How the L2 flush before each timed call shapes the memory-bound (decode) times.

    PYTHONPATH=. python3 scripts/flush_probe.py
The bench (like ANCHORS.md) overwrites 256 MB before every call: L2 is then full of dirty lines,
and every line the GEMM brings in first evicts one, which must be written back to HBM. This
times the same calls after a flush that only reads 256 MB (L2 full of clean lines) and with
no flush at all (whatever of the operands L2 still holds), next to the roofline floor.
"""
import statistics

import torch

import deep_gemm
from deep_gemm.bench import Timer, _profile, roofline_floor_s

SHAPES = [(64, 2112, 7168), (64, 4096, 7168), (64, 7168, 2048), (64, 32768, 512), (64, 7168, 16384),
          (128, 2112, 7168), (4096, 7168, 2048)]


def main():
    timers = {flush: Timer("cuda", 30, flush=flush) for flush in ("write", "read")}
    print(f"{'shape':>18} {'floor':>7} {'write-flush':>12} {'read-flush':>11} {'no flush':>9}  (us)")
    for m, n, k in SHAPES:
        lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        call = lambda: deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs, out)
        call()
        times = [timers["write"].kernel_us(call)[0], timers["read"].kernel_us(call)[0], no_flush_us(call)]
        floor = roofline_floor_s(2 * m * n * k, m * k + n * k + 2 * m * n) * 1e6
        print(f"{f'{m}x{n}x{k}':>18} {floor:7.1f} {times[0]:12.1f} {times[1]:11.1f} {times[2]:9.1f}", flush=True)


def no_flush_us(call, iters=30):
    events = _profile(call, iters)
    return statistics.median(dur for _, dur, _ in events)


if __name__ == "__main__":
    main()
