"""Run one dense GEMM shape a few times (for `ncu --launch-skip 2 --launch-count 1`).

    ncu --kernel-name deep_gemm_fp8_gemm --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python scripts/ncu_probe.py 64 2112 7168
"""
import sys

import torch

import deep_gemm

m, n, k = (int(v) for v in sys.argv[1:4])
lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
for _ in range(3):
    deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
torch.cuda.synchronize()
