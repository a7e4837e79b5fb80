"""GPU time and achieved bandwidth of the FP8 cast kernels.

    from deep_gemm.bench_cast import bench_casts
    rows = bench_casts()        # prints a table; returns one dict per case

Each case: median over `iters` calls of the GPU time between two CUDA events around one call
(the inputs are hundreds of MB, far past the 50 MB L2, so no flush is needed), and the
bandwidth counting the fewest bytes a cast must move: x read once, q and the scales written
once. Host overhead is measured apart, on a small input: CPU time per call for calls issued
back to back without synchronising. Every case's output is compared bit for bit with the torch
reference (deep_gemm.reference). `python -m deep_gemm bench` runs this after the GEMM suites
(`--suite casts` alone).
"""
from __future__ import annotations

import torch

from .bench import HBM_BYTES_PER_S, gpu_event_us, host_overhead_us   # HBM: device copy on the H100 (read + write)

CASES = (
    # name, kind, shape, dtype
    ("per_token [16384, 7168]", "per_token", (16384, 7168), torch.bfloat16),
    ("per_token masked [32, 4096, 7168]", "per_token", (32, 4096, 7168), torch.bfloat16),
    ("per_block [7168, 16384]", "per_block", (7168, 16384), torch.bfloat16),
    ("per_block [7168, 16384] fp32", "per_block", (7168, 16384), torch.float32),
)
HOST_SHAPE = (128, 7168)
HOST_CALLS = 200


def _moved_bytes(kind: str, x: torch.Tensor) -> int:
    k = x.shape[-1]
    kb = -(-k // 128)
    rows = x.numel() // k
    if kind == "per_token":
        num_scales = rows * kb
    else:
        groups = x.shape[0] if x.dim() == 3 else 1
        num_scales = groups * -(-x.shape[-2] // 128) * kb
    return x.numel() * x.element_size() + x.numel() + 4 * num_scales


def bench_casts(iters: int = 50, warmup: int = 3, verbose: bool = True,
                hbm_bytes_per_s: float = HBM_BYTES_PER_S) -> list:
    """Time every case in CASES on the current GPU; return rows of
    {name, kind, shape, dtype, us, gbps, pct_of_hbm, host_us}."""
    import deep_gemm
    from . import reference

    casts = {"per_token": (deep_gemm.per_token_cast_to_fp8, reference.per_token_cast_to_fp8),
             "per_block": (deep_gemm.per_block_cast_to_fp8, reference.per_block_cast_to_fp8)}
    rows = []
    for name, kind, shape, dtype in CASES:
        x = torch.randn(shape, device="cuda", dtype=dtype)
        fn, ref = casts[kind]
        q, s = fn(x)                 # compile and load; checked against the reference
        q_ref, s_ref = ref(x)
        exact = torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
        del q, s, q_ref, s_ref
        for _ in range(warmup):      # settle the allocator
            fn(x)
        us = gpu_event_us(lambda: fn(x), iters)
        small = torch.randn(HOST_SHAPE, device="cuda", dtype=dtype)
        fn(small)
        host = host_overhead_us(lambda: fn(small), HOST_CALLS)
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
              f"   (host: CPU time per call on {list(HOST_SHAPE)})")
        for r in rows:
            check = "bit-identical" if r["bit_identical"] else "DIFFERS from the reference"
            print(f"{r['name']:40} {r['us']:9.1f} {r['gbps']:8.1f} {r['pct_of_hbm']:14.1f} {r['host_us']:8.1f}  "
                  f"{check}")
    return rows


if __name__ == "__main__":
    bench_casts()
