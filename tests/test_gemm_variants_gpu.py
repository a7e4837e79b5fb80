"""Kernel features the planner does not pick today, forced through launch_gemm: multicast
clusters and split-K clusters (dense, plus masked/contiguous layouts), checked against float64.
They were correct in scripts/tune_sweep.py runs; this keeps them so."""
import dataclasses

import pytest
import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs
from deep_gemm.runtime.kernels import launch_gemm

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("m,n,k,changes", [
    (4096, 7168, 2048, dict(block_n=128, cluster_n=2)),
    (64, 2112, 7168, dict(block_n=16, cluster_n=2)),
    (333, 2112, 896, dict(block_n=144, cluster_n=2)),        # odd N-block count: phantom tile
    (64, 2112, 7168, dict(block_n=128, split_k=4)),
    (128, 2112, 7168, dict(block_n=64, split_k=2)),
    (77, 7168, 576, dict(block_n=32, split_k=8)),             # 5 K blocks for 8 splits
], ids=str)
def test_forced_variant_matches_float64(m, n, k, changes):
    base = plan.plan_dense(m, n, k, 132)
    config = dataclasses.replace(base, **changes, pipeline=False, num_stages=plan.max_stages(
        base.block_m, changes["block_n"], split_k=changes.get("split_k", 1)))
    lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    launch_gemm(config, a=lhs[0], a_rows=m, sa=lhs[1], sa_rows=m, sa_cols=lhs[1].shape[-1], b=rhs[0],
                b_rows=n, sb=rhs[1], out=out, out_rows=m, shape_m=m, group_info=None,
                num_sms=deep_gemm.get_num_sms())
    ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T
    assert not torch.isnan(out).any()
    assert calc_diff(out, ref) < 1e-5
