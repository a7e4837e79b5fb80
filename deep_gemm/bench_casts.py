"""`bench --suite casts`: the FP8 casts' GPU time and achieved bandwidth.

Each case: median over `iters` calls of the GPU time between two CUDA events around one call (the
inputs are hundreds of MB, far past L2, so no flush is needed), and the bandwidth counting the
fewest bytes a cast must move: x read once, q and the scales written once. Host overhead is
measured apart, on a small input. Every output is compared bit for bit with the torch reference.
bench.py runs it and hands itself over (its timing helpers), so this module does not import bench back.
"""
from __future__ import annotations

from typing import Optional

import torch

CAST_CASES = (
    # name, kind, shape, dtype
    ("per_token [16384, 7168]", "per_token", (16384, 7168), torch.bfloat16),
    ("per_token masked [32, 4096, 7168]", "per_token", (32, 4096, 7168), torch.bfloat16),
    ("per_block [7168, 16384]", "per_block", (7168, 16384), torch.bfloat16),
    ("per_block [7168, 16384] fp32", "per_block", (7168, 16384), torch.float32),
    # x [T, H] -> e4m3 x.T per 1x128 along T (weight-gradient operands), dense and K-grouped
    ("transposed [8192, 7168]", "transposed", (8192, 7168), torch.bfloat16),
    ("transposed [16384, 4096]", "transposed", (16384, 4096), torch.bfloat16),
    ("transposed [4096, 2048]", "transposed", (4096, 2048), torch.bfloat16),
    ("k_grouped transposed [8x~1024, 7168]", "k_grouped_transposed", (8192, 7168), torch.bfloat16),
)
# Tokens per expert of the K-grouped case: ~1024 each, multiples of 16, most with a partial last 128-block.
CAST_K_SIZES = (976, 1072, 1024, 1008, 1040, 960, 1088, 1024)
CAST_HOST_SHAPE = (128, 7168)
CAST_HOST_CALLS = 200


def _cast_k_sizes(tokens: int) -> list:
    """CAST_K_SIZES for its token count, else 8 equal groups (multiples of 16) of `tokens`."""
    if tokens == sum(CAST_K_SIZES):
        return list(CAST_K_SIZES)
    return [tokens // 8] * 8


def _moved_bytes(kind: str, x: torch.Tensor) -> int:
    k = x.shape[-1]
    kb = -(-k // 128)
    rows = x.numel() // k
    if kind == "transposed":        # one scale per column and 128 tokens
        num_scales = k * -(-rows // 128)
    elif kind == "k_grouped_transposed":
        num_scales = k * sum(-(-g // 128) for g in _cast_k_sizes(rows))
    elif kind == "per_token":
        num_scales = rows * kb
    else:
        groups = x.shape[0] if x.dim() == 3 else 1
        num_scales = groups * -(-x.shape[-2] // 128) * kb
    return x.numel() * x.element_size() + x.numel() + 4 * num_scales


def bench_casts(bench, iters: int = 50, warmup: int = 3, verbose: bool = True,
                hbm_bytes_per_s: Optional[float] = None) -> list:
    """Time every case in CAST_CASES on the current GPU (hbm_bytes_per_s: bench's HBM_BYTES_PER_S
    unless given); return rows of {name, kind, shape, dtype, us, gbps, pct_of_hbm, host_us}."""
    hbm_bytes_per_s = hbm_bytes_per_s or bench.HBM_BYTES_PER_S
    import deep_gemm
    from . import reference

    casts = {"per_token": (deep_gemm.per_token_cast_to_fp8, reference.per_token_cast_to_fp8),
             "per_block": (deep_gemm.per_block_cast_to_fp8, reference.per_block_cast_to_fp8),
             "transposed": (deep_gemm.per_token_cast_to_fp8_transposed, reference.per_token_cast_to_fp8_transposed),
             "k_grouped_transposed": (
                 lambda x: deep_gemm.k_grouped_per_token_cast_to_fp8_transposed(x, _cast_k_sizes(x.shape[0])),
                 lambda x: reference.k_grouped_per_token_cast_to_fp8_transposed(x, _cast_k_sizes(x.shape[0])))}
    rows = []
    for name, kind, shape, dtype in CAST_CASES:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        fn, ref = casts[kind]
        q, s = fn(x)                 # compile and load; checked against the reference
        q_ref, s_ref = ref(x)
        exact = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        del q, s, q_ref, s_ref
        for _ in range(warmup):      # settle the allocator
            fn(x)
        us = bench.gpu_event_us(lambda: fn(x), iters)
        small = torch.randn(CAST_HOST_SHAPE, device="cuda", dtype=dtype)
        fn(small)
        host = bench.host_overhead_us(lambda: fn(small), CAST_HOST_CALLS)
        moved = _moved_bytes(kind, x)
        gbps = moved / (us * 1e-6) / 1e9
        rows.append({"name": name, "kind": kind, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "us": round(us, 1), "gbps": round(gbps, 1),
                     "pct_of_hbm": round(100 * gbps * 1e9 / hbm_bytes_per_s, 1), "host_us": round(host, 1),
                     "bit_identical": exact})
        del x
        torch.cuda.empty_cache()
    if verbose:
        pct_head = f"% of {hbm_bytes_per_s / 1e12:.1f} TB/s"
        print(f"{'cast':40} {'GPU us':>9} {'GB/s':>8} {pct_head:>14} {'host us':>8}  check"
              f"   (host: CPU time per call on {list(CAST_HOST_SHAPE)})")
        for r in rows:
            check = "bit-identical" if r["bit_identical"] else "DIFFERS from the reference"
            print(f"{r['name']:40} {r['us']:9.1f} {r['gbps']:8.1f} {r['pct_of_hbm']:14.1f} {r['host_us']:8.1f}  "
                  f"{check}")
    return rows
