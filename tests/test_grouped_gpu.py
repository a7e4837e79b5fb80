"""Grouped GEMMs on the GPU: every group's rows equal the dense GEMM of that group."""
import dataclasses
import random

import pytest
import torch

import deep_gemm
from deep_gemm import plan
from deep_gemm.config import Layout, ceil_div, max_stages
from deep_gemm.ops import gemm as gemm_ops
from deep_gemm.reference import calc_diff, dequantize_lhs, dequantize_rhs, rel_error
from deep_gemm.runtime.launch import LaunchCache

pytestmark = pytest.mark.gpu
ALIGN = deep_gemm.get_m_alignment_for_contiguous_layout()


def check_close(out, ref):
    assert not torch.isnan(out).any(), "NaN in a valid row: it was not written"
    err, diff = rel_error(out, ref), calc_diff(out, ref)
    assert err < 4e-3 and diff < 1e-5, f"rel_error={err:.3e} calc_diff={diff:.3e}"


def weights(g, n, k):
    b = torch.randn(g, n, k, device="cuda", dtype=torch.bfloat16)
    return deep_gemm.per_block_cast_to_fp8(b)


def contiguous_inputs(sizes, n, k):
    """Each expert's rows padded to the alignment, padding rows marked -1."""
    padded = [(s + ALIGN - 1) // ALIGN * ALIGN for s in sizes]
    m = sum(padded)
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    m_indices = torch.full((m,), -1, device="cuda", dtype=torch.int32)
    start = 0
    for g, (s, p) in enumerate(zip(sizes, padded)):
        m_indices[start:start + s] = g
        start += p
    return deep_gemm.per_token_cast_to_fp8(a), m_indices


def check_contiguous(lhs, rhs, out, m_indices, num_groups):
    """Every expert's rows against that expert's dense product in float64."""
    a = dequantize_lhs(*lhs, dtype=torch.float64)
    for g in range(num_groups):
        rows = (m_indices == g).nonzero().flatten()
        if rows.numel():
            check_close(out[rows], a[rows] @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T)


@pytest.mark.parametrize("sizes,n,k", [
    ([300, 0, 1, 128, 77], 512, 1024),
    ([random.randint(0, 400) for _ in range(8)], 4096, 7168),
    ([256] * 4, 7168, 2048),
    ([5, 129], 576, 576),
    ([200, 5, 300], 640, 1408),     # 11 K blocks: an odd count in the pipelined loop
])
def test_contiguous_matches_per_group_dense(sizes, n, k):
    lhs, m_indices = contiguous_inputs(sizes, n, k)
    rhs = weights(len(sizes), n, k)
    out = torch.full((lhs[0].shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    check_contiguous(lhs, rhs, out, m_indices, len(sizes))
    # Whole padding blocks are skipped: their rows keep the poison.
    starts = torch.arange(0, m_indices.numel(), ALIGN, device="cuda")
    skipped = starts[m_indices[starts] < 0]
    for s in skipped.tolist():
        assert torch.isnan(out[s:s + ALIGN]).all()


def test_contiguous_bad_indices_are_skipped_not_crashing():
    lhs, m_indices = contiguous_inputs([128, 128, 128], 256, 512)
    rhs = weights(3, 256, 512)
    m_indices[128:256] = 7          # expert that does not exist
    m_indices[256:384] = -5
    out = torch.full((384, 256), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    torch.cuda.synchronize()
    assert torch.isnan(out[128:]).all()
    with pytest.raises(ValueError, match="m_indices"):
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices, check_indices=True)


def test_grouped_out_views_are_written_to_n_only():
    """Grouped outputs that are column slices of wider tensors, N not a multiple of 8."""
    n, k = 1001, 640
    lhs, m_indices = contiguous_inputs([300, 77, 129], n, k)
    rhs = weights(3, n, k)
    wide = torch.full((lhs[0].shape[0], n + 15), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, wide[:, :n], m_indices)
    a = dequantize_lhs(*lhs, dtype=torch.float64)
    for g in range(3):
        rows = (m_indices == g).nonzero().flatten()
        check_close(wide[rows, :n], a[rows] @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T)
    assert torch.isnan(wide[:, n:]).all(), "contiguous: columns past N were written"

    lhs, _ = masked_inputs(3, 256, n, k)
    masked_m = torch.tensor([256, 70, 0], device="cuda", dtype=torch.int32)
    wide = torch.full((3, 256, n + 7), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, wide[..., :n], masked_m, 128)
    check_masked(lhs, rhs, wide[..., :n], masked_m)
    assert torch.isnan(wide[..., n:]).all(), "masked: columns past N were written"


def masked_inputs(g, max_m, n, k):
    a = torch.randn(g, max_m, k, device="cuda", dtype=torch.bfloat16)
    return deep_gemm.per_token_cast_to_fp8(a), weights(g, n, k)


def check_masked(lhs, rhs, out, masked_m):
    a = dequantize_lhs(*lhs, dtype=torch.float64)
    for g, m in enumerate(masked_m.tolist()):
        m = max(0, min(m, out.shape[1]))
        if m:
            ref = a[g, :m] @ dequantize_rhs(rhs[0][g], rhs[1][g], dtype=torch.float64).T
            check_close(out[g, :m], ref)
        assert torch.isnan(out[g, m:]).all(), f"group {g}: rows past masked_m were written"


@pytest.mark.parametrize("g,max_m,expected_m,n,k,block_m", [
    (4, 256, 100, 4096, 7168, 128), (16, 256, 64, 7168, 2048, 64), (3, 200, 50, 576, 896, 64),
    (2, 4096, 1024, 2112, 1024, 128),
    (4, 256, 56, 4096, 7168, 128),      # few expected rows over a long K: 128-row blocks from 49 rows on
])
def test_masked_matches_per_group_dense(g, max_m, expected_m, n, k, block_m):
    # Both block heights of the masked kernel (as planned for 132 SMs).
    assert plan.plan_dense(expected_m, n, k, 132, layout=Layout.MASKED, num_groups=g).block_m == block_m
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([random.randint(0, max_m) for _ in range(g)], device="cuda", dtype=torch.int32)
    masked_m[0] = max_m
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    check_masked(lhs, rhs, out, masked_m)


def with_stage_k_blocks(config, stage_k_blocks):
    """config with stage_k_blocks K blocks a stage, and as many stages as keep about the same
    number of K blocks in flight (as shared memory allows)."""
    cap = max(1, ceil_div(config.num_stages * config.stage_k_blocks, stage_k_blocks))
    return dataclasses.replace(config, stage_k_blocks=stage_k_blocks, num_stages=max_stages(
        config.block_m, config.block_n, cap=cap, stage_k_blocks=stage_k_blocks))


def _force(monkeypatch, stage_k_blocks=1, **changes):
    """The GEMM pipeline (ops/gemm.run) plans as usual, then takes `changes` (and stage_k_blocks
    K blocks a stage); returns the configs used, to show the patch took effect."""
    planned = gemm_ops.plan_cached
    used = []
    # A call with the same pointers and shapes as an earlier one skips planning (the launch
    # cache): the test gets an empty cache of its own, dropped with the patch, so that it finds
    # no earlier launch and leaves no forced one behind.
    monkeypatch.setattr(gemm_ops, "_launches", LaunchCache())

    def patched(*args, **kwargs):
        config = with_stage_k_blocks(dataclasses.replace(planned(*args, **kwargs), **changes), stage_k_blocks)
        used.append(config)
        return config
    monkeypatch.setattr(gemm_ops, "plan_cached", patched)
    return used


def _force_loader_warp(monkeypatch, **changes):
    """Grouped calls copying A's scales with the loader warp (the planner keeps it to dense
    16-column tiles)."""
    return _force(monkeypatch, scale_loader_warp=True, **changes)


def test_contiguous_scales_by_loader_warp(monkeypatch):
    used = _force_loader_warp(monkeypatch, block_n=16, num_stages=max_stages(128, 16))
    sizes, n, k = [130, 7, 0, 250], 528, 1152
    lhs, m_indices = contiguous_inputs(sizes, n, k)
    rhs = weights(len(sizes), n, k)
    out = torch.full((lhs[0].shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    assert used and used[0].scale_loader_warp
    check_contiguous(lhs, rhs, out, m_indices, len(sizes))


def test_masked_scales_by_loader_warp(monkeypatch):
    """max_m = 198: each group's scales end 2 rows short of their 4-aligned stride (zero-filled)."""
    used = _force_loader_warp(monkeypatch)
    g, max_m, n, k = 3, 198, 592, 896
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([198, 61, 0], device="cuda", dtype=torch.int32)
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 100)
    assert used and used[0].scale_loader_warp
    check_masked(lhs, rhs, out, masked_m)


def test_contiguous_with_several_k_blocks_a_stage(monkeypatch):
    used = _force(monkeypatch, stage_k_blocks=2)
    sizes, n, k = [130, 7, 0, 250], 528, 1152     # 9 K blocks: the last stage half past K
    lhs, m_indices = contiguous_inputs(sizes, n, k)
    rhs = weights(len(sizes), n, k)
    out = torch.full((lhs[0].shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    assert used and used[0].stage_k_blocks == 2
    check_contiguous(lhs, rhs, out, m_indices, len(sizes))


@pytest.mark.parametrize("block_n", [192, 160])
def test_contiguous_wide_tiles_over_two_scale_blocks(monkeypatch, block_n):
    """128 x 192 / 128 x 160 tiles (the widths DeepGEMM picks for the large contiguous cases),
    unpipelined, whose columns straddle two scale blocks of B at a run-time split; N = 1000 has
    N blocks at every split and a partial last one."""
    used = _force(monkeypatch, block_n=block_n, pipelined=False, split_k=1, num_stages=max_stages(128, block_n))
    sizes, n, k = [130, 7, 0, 250], 1000, 1408
    lhs, m_indices = contiguous_inputs(sizes, n, k)
    rhs = weights(len(sizes), n, k)
    out = torch.full((lhs[0].shape[0], n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_contiguous(lhs, rhs, out, m_indices)
    assert used and used[0].block_n == block_n and not used[0].pipelined
    check_contiguous(lhs, rhs, out, m_indices, len(sizes))


def test_masked_wide_tiles_over_two_scale_blocks(monkeypatch):
    used = _force(monkeypatch, block_n=160, pipelined=False, split_k=1, num_stages=max_stages(128, 160))
    g, max_m, n, k = 3, 198, 1000, 1408
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([198, 61, 0], device="cuda", dtype=torch.int32)
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 100)
    assert used and used[0].block_n == 160 and used[0].block_m == 128
    check_masked(lhs, rhs, out, masked_m)


@pytest.mark.parametrize("loader_warp", [False, True], ids=["tma_scales", "loader_warp"])
def test_masked_with_several_k_blocks_a_stage(monkeypatch, loader_warp):
    """7 K blocks in stages of 4: a group's last stage reaches into the next group's scale rows
    (and, for the last group, past them), which the kernel must never use."""
    used = _force(monkeypatch, stage_k_blocks=4, scale_loader_warp=loader_warp)
    g, max_m, n, k = 3, 198, 592, 896
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([198, 61, 0], device="cuda", dtype=torch.int32)
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 100)
    assert used and used[0].stage_k_blocks == 4 and used[0].scale_loader_warp == loader_warp
    check_masked(lhs, rhs, out, masked_m)


# Compute-bound masked calls over a long K run a split-capable kernel, which splits the tiles of
# the last, partial wave that the real group sizes leave (on 132 SMs, N = 4096: 32 N blocks).
# Partial M blocks in split tiles, and graph replays whose new sizes change the split count.
MASKED_TAILS = [
    [384, 129],        # 5 M blocks, 160 tiles: 132 whole + 28 tail tiles split 4 ways
    [512, 129],        # 6 M blocks: 60 tail tiles split 2 ways
    [640, 384],        # 8 M blocks: 124 tail tiles, no split
    [640, 513, 0],     # 10 M blocks: 56 tail tiles split 2 ways, an empty group
    [77, 1, 200],      # 4 M blocks, 128 tiles: all in the last wave, none split
]


@pytest.mark.parametrize("counts", MASKED_TAILS, ids=str)
def test_masked_split_tail_matches_per_group_dense(counts):
    g, max_m, n, k, expected_m = len(counts), 640, 4096, 4352, 300
    assert plan.plan_dense(expected_m, n, k, 132, layout=Layout.MASKED, num_groups=g).split_k > 1
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor(counts, device="cuda", dtype=torch.int32)
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    check_masked(lhs, rhs, out, masked_m)


def test_masked_wide_tiles_split_their_tail(monkeypatch):
    """160-column tiles over two scale blocks of B, split-capable: 6 M blocks x 26 N blocks =
    132 whole tiles, then 24 tail tiles in 4 units each, summed into the accumulators (the wide
    tiles' reduction reads a unit's own partial back from the workspace)."""
    used = _force(monkeypatch, block_n=160, pipelined=False, num_stages=max_stages(128, 160))
    g, max_m, n, k, expected_m = 2, 640, 4096, 4352, 300
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([512, 129], device="cuda", dtype=torch.int32)
    out = torch.full((g, max_m, n), float("nan"), device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    assert used and used[0].split_k > 1 and used[0].block_n == 160
    check_masked(lhs, rhs, out, masked_m)


def test_masked_split_tail_in_a_cuda_graph_with_changing_counts():
    """The split count follows masked_m on every replay; each split tile's arrival counter is
    reset by its last unit, so replays with other tails stay right."""
    g, max_m, n, k, expected_m = 3, 640, 4096, 4352, 300
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.tensor([640, 513, 0], device="cuda", dtype=torch.int32)
    out = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m)
    for counts in ([384, 129, 0], [640, 640, 640], [1, 0, 300], [640, 513, 0]):
        masked_m.copy_(torch.tensor(counts, dtype=torch.int32))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_masked(lhs, rhs, out, masked_m)


def test_masked_cuda_graph_replay_with_new_counts():
    g, max_m, n, k = 6, 256, 2048, 1024
    lhs, rhs = masked_inputs(g, max_m, n, k)
    masked_m = torch.full((g,), 100, device="cuda", dtype=torch.int32)
    out = torch.empty(g, max_m, n, device="cuda", dtype=torch.bfloat16)
    deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 100)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        deep_gemm.m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, 100)
    fresh, _ = masked_inputs(g, max_m, n, k)
    lhs[0].copy_(fresh[0])
    lhs[1].copy_(fresh[1])
    masked_m.copy_(torch.tensor([0, 1, 255, 256, 64, 130], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    check_masked(lhs, rhs, out, masked_m)
