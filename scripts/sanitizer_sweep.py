"""A small sweep of every kernel variant for compute-sanitizer (memcheck, racecheck, synccheck).

    compute-sanitizer --tool racecheck python scripts/sanitizer_sweep.py [planner forced grouped training bf16 k_grouped]
Each call is checked against the float64 reference, so a race that corrupts data also fails here.
Every kernel is compiled and loaded by a first run without the sanitizer (scripts/device_check.sh).
"""
import dataclasses
import sys

import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.bench_bf16 import contiguous_layout
from deep_gemm.config import max_stages
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, k_grouped_operand
from deep_gemm.runtime.kernels import prepare_gemm


def check(name, out, ref):
    diff = calc_diff(out, ref)
    ok = not torch.isnan(out).any() and diff < 1e-5
    print(f"{name:48s} calc_diff={diff:.2e} {'ok' if ok else 'WRONG'}", flush=True)
    return ok


def operands(m, n, k, groups=None):
    lead = (groups,) if groups else ()
    lhs = deep_gemm.per_token_cast_to_fp8(torch.randn(*lead, m, k, device="cuda", dtype=torch.bfloat16))
    rhs = deep_gemm.per_block_cast_to_fp8(torch.randn(*lead, n, k, device="cuda", dtype=torch.bfloat16))
    return lhs, rhs


def reference(lhs, rhs):
    return dequantize_lhs(*lhs, dtype=torch.float64) @ dequantize_rhs(*rhs, dtype=torch.float64).T


def forced(m, n, k, **changes):
    """A dense call on a config the planner would not pick for it (every variant it picks elsewhere)."""
    lhs, rhs = operands(m, n, k)
    base = dataclasses.replace(plan.plan_dense(m, n, k, deep_gemm.get_num_sms()), split_k=1, stage_k_blocks=1)
    config = dataclasses.replace(base, **changes, num_stages=1)
    config = dataclasses.replace(config, num_stages=max_stages(config.block_m, config.block_n,
                                                                cap=8 // config.stage_k_blocks,
                                                                stage_k_blocks=config.stage_k_blocks))
    out = torch.full((m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    prepare_gemm(config, a=lhs[0], a_rows=m, sa=lhs[1], sa_rows=m, b=rhs[0], b_rows=n, sb=rhs[1], out=out,
                 out_rows=m, shape_m=m, group_info=None, num_sms=deep_gemm.get_num_sms()).fire()
    return check(f"dense {config.name.split('_g1_')[1]} {m}x{n}x{k}", out, reference(lhs, rhs))


def training():
    """Weight gradients: per-row B scales from the stage, fp32 out added by TMA reduce-add (a
    partial last M block and N block, a split last wave, 192-wide tiles through one D buffer), and
    k_grouped()."""
    ok = True
    for m, n, k in [(200, 260, 1000), (4096, 2112, 7168), (4096, 1536, 512), (64, 384, 4096)]:
        a = deep_gemm.per_token_cast_to_fp8(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
        b = deep_gemm.per_token_cast_to_fp8(torch.randn(n, k, device="cuda", dtype=torch.bfloat16))
        out = torch.randn(m, n, device="cuda")
        want = out.double() + dequantize_lhs(*a, dtype=torch.float64) @ dequantize_lhs(*b, dtype=torch.float64).T
        deep_gemm.wgrad_gemm_fp8_fp8_fp32_nt(a, b, out)
        ok &= check(f"wgrad {m}x{n}x{k}", out, want)
    return ok and k_grouped()


def k_grouped():
    """K-grouped weight gradients: an empty group, a K that is not a multiple of 128, a partial M
    block, each group's own tensor maps; the sizes read on the device, also past the operands."""
    ok = True
    ks, m, n = [384, 0, 1040, 256], 200, 192
    xs = [deep_gemm.per_token_cast_to_fp8(torch.randn(rows, kk, device="cuda", dtype=torch.bfloat16))
          for rows in (m, n) for kk in ks if kk]
    a_parts, b_parts = xs[:3], xs[3:]
    lhs, rhs = k_grouped_operand(a_parts), k_grouped_operand(b_parts)
    out = torch.randn(len(ks), m, n, device="cuda")
    before = out.clone()
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(lhs, rhs, out, ks)
    ok &= check("k-grouped empty group", out[1], before[1])
    for g, (pa, pb) in zip((0, 2, 3), zip(a_parts, b_parts)):
        want = before[g].double() + dequantize_lhs(*pa, dtype=torch.float64) @ dequantize_lhs(*pb, dtype=torch.float64).T
        ok &= check(f"k-grouped g{g}", out[g], want)
    # The same groups with their sizes on the device, in operands with spare capacity (512 more
    # tokens, never read); then sizes that overflow it: NaN from that group on, no read past it.
    sizes = torch.tensor(ks, dtype=torch.int32, device="cuda")
    spare_a = (torch.cat([lhs[0], torch.zeros(512 * m, dtype=lhs[0].dtype, device="cuda")]),
               torch.cat([lhs[1], torch.zeros(4, m, device="cuda")]))
    spare_b = (torch.cat([rhs[0], torch.zeros(512 * n, dtype=rhs[0].dtype, device="cuda")]),
               torch.cat([rhs[1], torch.zeros(4, n, device="cuda")]))
    device_out = before.clone()
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(spare_a, spare_b, device_out, sizes)
    ok &= check("k-grouped, sizes on the device", device_out, out)
    sizes[2] = 1040 + 1024   # 384 + 2064 > 1680 + 512 tokens
    deep_gemm.k_grouped_wgrad_gemm_fp8_fp8_fp32_nt(spare_a, spare_b, device_out, sizes)
    nan_from_2 = not torch.isnan(device_out[:2]).any() and torch.isnan(device_out[2:]).all()
    print(f"{'k-grouped, device sizes past the operands':48s} {'ok' if nan_from_2 else 'WRONG'}", flush=True)
    return ok and nan_from_2


def main():
    # `python scripts/sanitizer_sweep.py [planner] [forced] [grouped] [training] [bf16] [k_grouped]`: those parts
    # only (k_grouped: training's K-grouped half, small enough for racecheck in a minute).
    parts = set(sys.argv[1:]) or {"planner", "forced", "grouped", "training", "bf16"}
    ok = True
    if "planner" in parts:
        ok &= planner_kernels()
    if "forced" in parts:
        ok &= forced_variants()
    if "grouped" in parts:
        ok &= grouped()
    if "training" in parts:
        ok &= training()
    elif "k_grouped" in parts:
        ok &= k_grouped()
    if "bf16" in parts:
        ok &= bf16()
    torch.cuda.synchronize()
    print("sanitizer sweep:", "ok" if ok else "WRONG")
    return 0 if ok else 1


def planner_kernels():
    ok = True
    # Planner kernels. Over 32 K blocks: B's scales in 32-block chunks, a deep-ring pipelined decode
    # tile with two K blocks a stage and the scale loader warp (64 x 2112 x 7168, whose ring wraps).
    # N = 1001: the last N block stored row by row. M % BLOCK_M != 0: short tail boxes. K = 1000:
    # A and B padded to K = 1008 by the padding kernel first. Decode tiles split over K (few tiles):
    # 64 and 128 rows, shares of 57 K blocks ending inside a two-block stage, N = 1001.
    for m, n, k in [(1, 256, 512), (65, 576, 896), (200, 2112, 576), (300, 384, 1024), (64, 256, 8320),
                    (300, 256, 4352), (77, 1001, 640), (5, 1000, 4352), (200, 384, 1000), (64, 2112, 7168),
                    (7, 576, 7168), (33, 520, 7296), (100, 1001, 7168)]:
        lhs, rhs = operands(m, n, k)
        ok &= check(f"dense {m}x{n}x{k}", deep_gemm.gemm_fp8_fp8_bf16_nt(lhs, rhs), reference(lhs, rhs))
    return ok


def forced_variants():
    ok = True
    # Forced variants: split-K (partial tiles through the workspace, shares with no K block at all,
    # wide tiles summing into the accumulators); 256-row tiles (a partial second M block, > 32 K
    # blocks); the scale loader warp (zero-filled past M, ring wrapping); several K blocks a stage
    # (tail rows rounded up to 8, an odd K-block count, split shares ending inside a stage); an odd
    # number of K blocks in the pipelined loop.
    ok &= forced(64, 2112, 1024, block_n=64, split_k=4)
    ok &= forced(77, 512, 384, block_n=32, split_k=5)
    ok &= forced(1000, 2112, 2048, block_n=128, split_k=4, pipelined=True)
    ok &= forced(1200, 2112, 4224, block_n=160, split_k=4, pipelined=False)
    ok &= forced(300, 384, 4352, block_m=256, block_n=128, pipelined=False)
    ok &= forced(77, 512, 4352, block_n=16, scale_loader_warp=True)
    ok &= forced(300, 384, 1024, block_m=256, block_n=128, pipelined=False, scale_loader_warp=True)
    ok &= forced(5, 1000, 4480, block_n=16, pipelined=True, scale_loader_warp=True, stage_k_blocks=2)
    ok &= forced(77, 512, 4352, block_n=32, split_k=5, stage_k_blocks=4)
    ok &= forced(1000, 2112, 1408, block_n=128, pipelined=True, split_k=2)
    return ok


def grouped():
    ok = True
    # Contiguous, K = 4096: the call's 6 tiles are split over K by the planner (tail wave).
    g, n, k, align = 3, 256, 4096, deep_gemm.get_m_alignment_for_contiguous_layout()
    lhs, rhs = operands(3 * align, n, k)[0], operands(n, n, k, groups=g)[1]
    m_indices = torch.tensor([0] * 100 + [-1] * 28 + [2] * align + [-1] * align, device="cuda", dtype=torch.int32)
    out = torch.zeros(3 * align, n, device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    a64 = dequantize_lhs(*lhs, dtype=torch.float64)
    for gi, rows in ((0, slice(0, 100)), (2, slice(128, 256))):
        ok &= check(f"contiguous g{gi}", out[rows], a64[rows] @ dequantize_rhs(rhs[0][gi], rhs[1][gi],
                                                                               dtype=torch.float64).T)

    # Masked, expected M 40 (64-row blocks), 64 and 100 (128-row blocks, pipelined, partial tiles
    # stored row by row) and 150 (compute-bound over K = 4096: the split-capable kernel).
    max_m = 192
    lhs = operands(max_m, n, k, groups=g)[0]
    masked_m = torch.tensor([0, 70, 192], device="cuda", dtype=torch.int32)
    a64 = dequantize_lhs(*lhs, dtype=torch.float64)
    for expected_m in (40, 64, 100, 150):
        out = torch.zeros(g, max_m, n, device="cuda", dtype=torch.bfloat16)
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
        for gi, rows in enumerate(masked_m.tolist()):
            if rows:
                ok &= check(f"masked e{expected_m} g{gi}", out[gi, :rows],
                            a64[gi, :rows] @ dequantize_rhs(rhs[0][gi], rhs[1][gi], dtype=torch.float64).T)
    return ok


def bf16():
    """The BF16 kernel: 64- and 128-row tiles, a partial M block, K not a multiple of 64, fp32 D
    accumulated, tiles split over K (bf16 and fp32 D accumulated); masked, with an empty, a partial and
    a full group, 64- and 128-row tiles."""
    ok = True
    for m, n, k, fp32 in ((1, 256, 520, False), (100, 2112, 1024, False), (128, 512, 4104, False),
                          (64, 1000, 200, True), (96, 1000, 4160, False), (128, 520, 4104, True)):
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        d = torch.randn(m, n, device="cuda") if fp32 else torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        want = (d.double() if fp32 else 0) + a.double() @ b.double().T
        deep_gemm.bf16_gemm_nt(a, b, d, c=d if fp32 else None)
        ok &= check(f"bf16 {m}x{n}x{k}{' fp32 +=' if fp32 else ''}", d, want)
    g, max_m, k = 3, 150, 1032
    a = torch.randn(g, max_m, k, device="cuda", dtype=torch.bfloat16)
    masked_m = torch.tensor([0, 70, 150], device="cuda", dtype=torch.int32)
    # 300 rows: compact D staging, one buffer (192 columns) and two (256), partial groups row by row.
    for n, expected_m in ((520, 40), (520, 100), (520, 300), (7168, 300)):
        b = torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16)
        d = torch.zeros(g, max_m, n, device="cuda", dtype=torch.bfloat16)
        deep_gemm.m_grouped_bf16_gemm_nt_masked(a, b, d, masked_m, expected_m)
        for gi, rows in enumerate(masked_m.tolist()):
            if rows:
                ok &= check(f"bf16 masked {n} e{expected_m} g{gi}", d[gi, :rows], a[gi, :rows].double() @ b[gi].double().T)
    return ok & bf16_other_layouts()


def bf16_other_layouts():
    """The BF16 kernel's contiguous layout (a memory- and a compute-bound plan), MN-major operands
    (tn: both) and the K-grouped weight gradient (a group of K 0, one not a multiple of 64)."""
    ok = True
    for counts, n, k in (([100, 0, 30], 520, 1032), ([300, 260], 2112, 1024)):
        m_indices, rows = contiguous_layout(counts, deep_gemm.get_m_alignment_for_contiguous_layout(), "cuda")
        a = torch.randn(m_indices.numel(), k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(len(counts), n, k, device="cuda", dtype=torch.bfloat16)
        d = torch.zeros(m_indices.numel(), n, device="cuda", dtype=torch.bfloat16)
        deep_gemm.m_grouped_bf16_gemm_nt_contiguous(a, b, d, m_indices)
        want = torch.einsum("mk,mnk->mn", a[rows].double(), b.double()[m_indices[rows].long()])
        ok &= check(f"bf16 contiguous {counts} {n}x{k}", d[rows], want)
    a = torch.randn(1032, 64, device="cuda", dtype=torch.bfloat16)   # [K, M]
    b = torch.randn(1032, 264, device="cuda", dtype=torch.bfloat16)  # [K, N]
    d = torch.empty(64, 264, device="cuda", dtype=torch.bfloat16)
    deep_gemm.bf16_gemm_tn(a, b, d)
    ok &= check("bf16 tn 64x264x1032", d, a.double().T @ b.double())
    ks, m, n = [256, 0, 200], 136, 264
    a = torch.randn(sum(ks), m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(sum(ks), n, device="cuda", dtype=torch.bfloat16)
    d = torch.randn(len(ks), m, n, device="cuda")
    product = torch.zeros(len(ks), m, n, device="cuda", dtype=torch.float64)
    start = 0
    for gi, kg in enumerate(ks):
        product[gi] = a[start:start + kg].double().T @ b[start:start + kg].double()
        start += kg
    want = d.double() + product
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(a, b, d, ks, torch.tensor(ks, dtype=torch.int32, device="cuda"), d)
    ok &= check(f"bf16 k-grouped {ks} {m}x{n} +=", d, want)
    # The same with the sizes read on the device, a and b holding 64 spare rows (never read).
    spare_a = torch.cat([a, torch.zeros(64, m, device="cuda", dtype=torch.bfloat16)])
    spare_b = torch.cat([b, torch.zeros(64, n, device="cuda", dtype=torch.bfloat16)])
    deep_gemm.k_grouped_bf16_gemm_tn_contiguous(spare_a, spare_b, d, None,
                                                torch.tensor(ks, dtype=torch.int32, device="cuda"), d)
    ok &= check(f"bf16 k-grouped {ks} {m}x{n} +=, sizes on the device", d, want + product)
    return ok


if __name__ == "__main__":
    sys.exit(main())
