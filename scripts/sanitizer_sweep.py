"""A small sweep of every kernel family for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool memcheck python scripts/sanitizer_sweep.py
Each call is checked against the float64 reference so a race that corrupts data also fails here.
"""
import dataclasses
import sys

import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.runtime.kernels import launch_gemm
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs


def check(name, out, ref):
    diff = calc_diff(out, ref)
    ok = not torch.isnan(out).any() and diff < 1e-5
    print(f"{name:40s} calc_diff={diff:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def main():
    ok = True
    # The last two walk more than 32 K blocks (B's scales come in 32-block chunks), one on the
    # deep-ring pipelined decode tile, one on the pipelined 128 x 128 tile.
    # N = 1001: the last N block is stored row by row, its last columns one at a time.
    # 5 x 1000 x 4352: 5 rows through short boxes on a deep-ring decode tile.
    # M % BLOCK_M != 0 (most of them): the last M block loads through the short tail boxes.
    # K = 1000: A and B padded to K = 1008 by the padding kernel first.
    for m, n, k in [(1, 256, 512), (65, 576, 896), (200, 2112, 576), (300, 384, 1024), (64, 256, 8320),
                    (300, 256, 4352), (77, 1001, 640), (5, 1000, 4352), (200, 384, 1000)]:
        lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        out = deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs)
        ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T
        ok &= check(f"dense {m}x{n}x{k}", out, ref)

    # Forced variants. Split-K: partial tiles through the workspace, and shares with no K block
    # at all. 256-row tiles (two waves per warpgroup): a partial second M block, > 32 K blocks.
    # Two copy A's scales with the loader warp (cp.async, zero-filled past M).
    for m, n, k, changes in [(64, 2112, 1024, dict(block_n=64, split_k=4)), (77, 512, 384, dict(block_n=32, split_k=5)),
                             (1000, 2112, 2048, dict(block_n=128, split_k=4)),
                             (300, 384, 4352, dict(block_m=256, block_n=128, pipeline=False)),
                             (77, 512, 4352, dict(block_n=16, sa_loader_warp=True)),
                             (300, 384, 1024, dict(block_m=256, block_n=128, pipeline=False, sa_loader_warp=True)),
                             # Several K blocks a stage (3-D boxes): tail rows rounded up to 8, an
                             # odd K-block count, split shares ending inside a stage.
                             (5, 1000, 4480, dict(block_n=16, pipeline=True, sa_loader_warp=True, stage_k_blocks=2)),
                             (77, 512, 4352, dict(block_n=32, split_k=5, stage_k_blocks=4)),
                             # A main loop per scale split of B (FIXED_SCALE_SPLIT): 192-column
                             # tiles split at 128 / 64, 160-column ones at 128 / 96 / 64 / 32.
                             (333, 2112, 896, dict(block_n=192, pipeline=False, fixed_scale_split=True)),
                             (200, 1000, 1408, dict(block_n=160, pipeline=False, fixed_scale_split=True)),
                             # ... split-capable: 140 tiles, 8 of them in 4 units summed into acc.
                             (1200, 2112, 4224, dict(block_n=160, pipeline=False, fixed_scale_split=True,
                                                     split_k=4)),
                             # Pipelined halves: wide tiles, and split-capable ones summing into acc.
                             (333, 2112, 896, dict(block_n=192, pipeline=False, fixed_scale_split=True,
                                                   pipeline_halves=True)),
                             (1200, 2112, 4224, dict(block_n=160, pipeline=False, fixed_scale_split=True,
                                                     split_k=4, pipeline_halves=True)),
                             # 11 K blocks (odd) in the pipelined loop, whole tiles and split shares.
                             (1000, 2112, 1408, dict(block_n=128, pipeline=True, split_k=2))]:
        lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        base = plan.plan_dense(m, n, k, deep_gemm.get_num_sms())
        config = dataclasses.replace(base, **{"split_k": 1, "stage_k_blocks": 1, **changes})
        config = dataclasses.replace(config, num_stages=plan.max_stages(
            config.block_m, config.block_n, cap=8 // config.stage_k_blocks, stage_k_blocks=config.stage_k_blocks))
        out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
        launch_gemm(config, a=lhs[0], a_rows=m, sa=lhs[1], sa_rows=m, b=rhs[0],
                    b_rows=n, sb=rhs[1], out=out, out_rows=m, shape_m=m, group_info=None,
                    num_sms=deep_gemm.get_num_sms())
        ref = dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T
        ok &= check(f"dense {config.name.split('_g1_')[1]} {m}x{n}x{k}", out, ref)

    # K = 4096: the contiguous call's 6 tiles are split over K by the planner (tail wave).
    g, n, k, align = 3, 256, 4096, deep_gemm.get_m_alignment_for_contiguous_layout()
    a = torch.randn(3 * align, k, device="cuda", dtype=torch.bfloat16)
    m_indices = torch.tensor([0] * 100 + [-1] * 28 + [2] * align + [-1] * align, device="cuda", dtype=torch.int32)
    lhs = deep_gemm.per_token_cast_to_fp8(a)
    rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16))
    out = torch.zeros(3 * align, n, device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    a64 = dequantize_lhs(*lhs, dtype=torch.float64)
    ok &= check("contiguous g0", out[:100], a64[:100] @ dequantize_rhs(rhs[0][0], rhs[1][0], dtype=torch.float64).T)
    ok &= check("contiguous g2", out[128:256],
                a64[128:256] @ dequantize_rhs(rhs[0][2], rhs[1][2], dtype=torch.float64).T)

    # Masked, expected M 40 (64-row blocks), 64 and 100 (128-row blocks, pipelined, partial tiles
    # stored row by row) and 150 (compute-bound over K = 4096: the split-capable kernel, whose 6
    # tiles all fall in the last wave and are split over K).
    max_m = 192
    lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(g, max_m, k, device="cuda", dtype=torch.bfloat16))
    masked_m = torch.tensor([0, 70, 192], device="cuda", dtype=torch.int32)
    a64 = dequantize_lhs(*lhs, dtype=torch.float64)
    for expected_m in (40, 64, 100, 150):
        out = torch.zeros(g, max_m, n, device="cuda", dtype=torch.bfloat16)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
        for gi, rows in enumerate(masked_m.tolist()):
            if rows:
                ok &= check(f"masked e{expected_m} g{gi}", out[gi, :rows],
                            a64[gi, :rows] @ dequantize_rhs(rhs[0][gi], rhs[1][gi], dtype=torch.float64).T)
    torch.cuda.synchronize()
    print("sanitizer sweep:", "ok" if ok else "WRONG")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
