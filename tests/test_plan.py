"""CPU unit tests of the planner (deep_gemm/plan.py) and of the kernel configuration it returns
(deep_gemm/config.py): pure Python, no torch, no CUDA."""
from __future__ import annotations

import dataclasses

import pytest

from deep_gemm import config as cfg
from deep_gemm import plan
from deep_gemm.config import (
    BLOCK_K,
    MAX_PIPELINED_BLOCK_N,
    SMEM_CAPACITY,
    KernelConfig,
    Layout,
    ceil_div,
    valid_block_n,
)
from deep_gemm.plan import plan_dense

LAYOUT_DENSE, LAYOUT_CONTIGUOUS, LAYOUT_MASKED = Layout.DENSE, Layout.CONTIGUOUS, Layout.MASKED

ANCHOR_NK = ((7168, 576), (2112, 7168), (24576, 1536), (32768, 512),
             (7168, 16384), (4096, 7168), (7168, 2048))
# Unaligned and tiny shapes beside the anchors: the planner must cope with any N, K >= 1.
ODD_NK = ((1, 1), (8, 16), (100, 200), (129, 130), (4095, 7167), (257, 129))
# Ms around every block boundary (64, 128, multiples of 128) and of one wave of tiles.
MS = sorted({0, 1, 2, 7, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 1024, 4096, 4097, 8192, 16384}
            | set(range(1, 2049, 37)))
SMS = (132, 114, 78, 1)  # H100 SXM, H100 PCIe, H20, and a degenerate set_num_sms(1)
LAYOUTS = ((LAYOUT_DENSE, 1), (LAYOUT_CONTIGUOUS, 8), (LAYOUT_CONTIGUOUS, 256),
           (LAYOUT_MASKED, 1), (LAYOUT_MASKED, 32))


def _all_plans():
    for n, k in ANCHOR_NK + ODD_NK:
        for layout, groups in LAYOUTS:
            for sms in SMS:
                for m in MS:
                    yield (m, n, k, sms, layout, groups), plan_dense(m, n, k, sms, layout=layout,
                                                                     num_groups=groups)


def _problems(args, c: KernelConfig) -> list:
    m, n, k, sms, layout, groups = args
    bad = []
    if (c.shape_n, c.shape_k, c.layout, c.num_groups) != (n, k, layout, groups):
        bad.append("does not describe the requested problem")
    if not isinstance(c.layout, Layout):
        bad.append(f"layout {c.layout!r} is not a config.Layout")
    if c.block_m not in (64, 128, 256):
        bad.append(f"block_m {c.block_m} not 64/128/256")
    if c.block_m == 256 and (layout != Layout.DENSE or c.pipelined or c.split_k != 1):
        bad.append("256-row tiles outside their kernel's limits (dense, unpipelined, unsplit)")
    if c.pipelined and c.block_n > MAX_PIPELINED_BLOCK_N:
        bad.append(f"pipelined with block_n {c.block_n} > {MAX_PIPELINED_BLOCK_N}")
    if c.stage_k_blocks > 1 and c.shape_k % BLOCK_K:
        bad.append(f"{c.stage_k_blocks} K blocks a stage with K % {BLOCK_K} != 0")
    if not valid_block_n(c.block_n) or c.block_n > plan.MAX_BLOCK_N[c.block_m]:
        bad.append(f"block_n {c.block_n} invalid for block_m {c.block_m}")
    if c.block_n not in plan.BLOCK_N_CANDIDATES:
        bad.append(f"block_n {c.block_n} not a candidate")
    if c.num_stages < 2:
        bad.append(f"{c.num_stages} stages: no load/compute overlap")
    if c.smem_bytes > SMEM_CAPACITY:
        bad.append(f"{c.smem_bytes} B of shared memory > {SMEM_CAPACITY}")
    if c.num_k_blocks != ceil_div(k, BLOCK_K):
        bad.append(f"{c.num_k_blocks} K blocks for K = {k} (scales are per 128 K)")
    if not 1 <= c.split_k <= plan.MAX_SPLIT_K:
        bad.append(f"split_k {c.split_k}")
    if c.split_k > c.num_k_blocks:
        bad.append(f"split_k {c.split_k} > {c.num_k_blocks} K blocks")
    if c.num_threads != 128 * (1 + min(c.block_m // 64, 2)):
        bad.append(f"{c.num_threads} threads")
    return bad


def test_every_config_is_valid():
    failures = []
    for args, config in _all_plans():
        problems = _problems(args, config)
        if problems:
            failures.append(f"plan_dense{args} -> {config.name}: {'; '.join(problems)}")
    assert not failures, f"{len(failures)} invalid plans, e.g.\n" + "\n".join(failures[:20])


def test_deterministic():
    first = list(_all_plans())
    second = list(_all_plans())
    assert first == second
    # Same inputs give equal (hashable) configs: the in-process kernel caches key on them.
    for (args, a), (_, b) in zip(first[:500], second[:500]):
        assert a == b and hash(a) == hash(b) and a.name == b.name, args


def _template_args(c: KernelConfig) -> dict:
    """The C++ template arguments of a config by field name."""
    return dict(zip((f.name for f in dataclasses.fields(KernelConfig)), c.template_args().split(", ")))


def test_config_is_a_value():
    c = plan_dense(4096, 7168, 2048, 132)
    assert c.name.startswith("gemm_dense_n7168_k2048_g1_")
    with pytest.raises(Exception):  # frozen: a shared config must never change under a cache
        c.block_n = 16
    # The C++ template arguments (deep_gemm::GemmConfig<...>) are the fields, in field order.
    args = [a.strip() for a in c.template_args().split(",")]
    assert len(args) == len(dataclasses.fields(KernelConfig))
    assert args[:5] == [str(v) for v in (7168, 2048, c.block_m, c.block_n, c.num_stages)]
    named = _template_args(c)
    assert named["layout"] == str(int(Layout.DENSE))
    assert [named[f] for f in ("pipelined", "stream_b", "scale_loader_warp", "row_scales_b", "out_fp32",
                               "accumulate")] == [str(getattr(c, f)).lower() for f in
                                                  ("pipelined", "stream_b", "scale_loader_warp", "row_scales_b",
                                                   "out_fp32", "accumulate")]
    assert KernelConfig(**{f.name: getattr(c, f.name) for f in dataclasses.fields(c)}) == c


def test_config_names_are_distinct():
    # The name labels cache folders and logs: every field that changes the kernel changes it.
    base = KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=64, num_stages=4)
    variants = [base, dataclasses.replace(base, shape_n=4097), dataclasses.replace(base, shape_k=7040),
                dataclasses.replace(base, block_m=64), dataclasses.replace(base, block_n=96),
                dataclasses.replace(base, num_stages=3), dataclasses.replace(base, stage_k_blocks=2, num_stages=2),
                dataclasses.replace(base, layout=Layout.MASKED), dataclasses.replace(base, num_groups=2),
                dataclasses.replace(base, raster_group=8), dataclasses.replace(base, split_k=2),
                dataclasses.replace(base, pipelined=True), dataclasses.replace(base, stream_b=True),
                dataclasses.replace(base, scale_loader_warp=True)]
    assert len({v.name for v in variants}) == len(variants)
    assert len({v.template_args() for v in variants}) == len(variants)


def test_config_geometry():
    c = KernelConfig(shape_n=2112, shape_k=7168, block_m=64, block_n=16, num_stages=10, stage_k_blocks=2)
    assert (c.num_math_warpgroups, c.num_threads, c.num_k_blocks) == (1, 256, 56)
    assert c.smem_bytes == cfg.smem_bytes(64, 16, 10, 2) <= SMEM_CAPACITY
    assert c.split_k_workspace_floats(132) == 0
    tall = KernelConfig(shape_n=7168, shape_k=16384, block_m=256, block_n=128, num_stages=3)
    assert (tall.num_math_warpgroups, tall.num_threads) == (2, 384)
    split = dataclasses.replace(plan_dense(4096, 2112, 7168, 132))
    assert split.split_k > 1 and split.split_k_workspace_floats(132) == 132 * split.block_m * split.block_n
    assert [cfg.store_chunk_cols(bn) for bn in (16, 32, 48, 64, 96, 128, 144, 160)] == [16, 32, 16, 64, 32, 64, 16, 32]


# (changes to a valid config, field the error must name)
INVALID_CONFIGS = [
    (dict(block_m=96), "block_m"),
    (dict(block_m=32), "block_m"),
    (dict(block_n=176), "block_n"),
    (dict(block_n=8), "block_n"),
    (dict(block_n=160, pipelined=True), "pipelined"),
    (dict(block_m=256, split_k=2), "block_m = 256"),
    (dict(block_m=256, pipelined=True), "block_m = 256"),
    (dict(block_m=256, layout=Layout.CONTIGUOUS, num_groups=4), "block_m = 256"),
    (dict(stage_k_blocks=2, shape_k=7000), "stage_k_blocks"),
    (dict(num_stages=12), ("shared memory", "stages")),
    (dict(block_m=64, block_n=16, stage_k_blocks=4, num_stages=16), ("shared memory", "stages")),
    (dict(num_stages=0), ">= 1"),
    (dict(split_k=0), ">= 1"),
]


@pytest.mark.parametrize("changes, needle", INVALID_CONFIGS,
                         ids=[",".join(f"{k}={v}" for k, v in c.items()) for c, _ in INVALID_CONFIGS])
def test_invalid_config_is_a_value_error_naming_the_field(changes, needle):
    # The kernel's static_asserts, raised on the host with the field's name (a forced config of a
    # tuning run or a test fails here, not in the compiler).
    valid = KernelConfig(shape_n=4096, shape_k=7168, block_m=128, block_n=128, num_stages=3)
    with pytest.raises(ValueError, match="invalid KernelConfig") as info:
        dataclasses.replace(valid, **changes)
    for word in (needle,) if isinstance(needle, str) else needle:
        assert word in str(info.value)


def test_config_checks_match_the_planner_limits():
    # Every candidate tile the planner may pick is a valid config at its planned depth; the
    # deepest ring that fits is accepted and one more stage is refused.
    for block_m in (64, 128, 256):
        for block_n in plan.BLOCK_N_CANDIDATES:
            if block_n > plan.MAX_BLOCK_N[block_m]:
                continue
            for skb in (1, 2):
                stages = cfg.max_stages(block_m, block_n, cap=32, stage_k_blocks=skb)
                KernelConfig(shape_n=4096, shape_k=7168, block_m=block_m, block_n=block_n, num_stages=stages,
                             stage_k_blocks=skb)
                with pytest.raises(ValueError, match="shared memory"):
                    KernelConfig(shape_n=4096, shape_k=7168, block_m=block_m, block_n=block_n,
                                 num_stages=stages + 1, stage_k_blocks=skb)


def test_valid_block_n():
    assert [bn for bn in range(0, 300) if valid_block_n(bn)] == list(plan.BLOCK_N_CANDIDATES)
    for bn in (16, 64, 112, 128, 144, 160, 192, 256):
        assert valid_block_n(bn), bn
    for bn in (0, 8, 24, 100, 176, 208, 240, 272):
        assert not valid_block_n(bn), bn


def test_max_stages_fits_capacity():
    for block_m in (64, 128, 256):
        for block_n in plan.BLOCK_N_CANDIDATES:
            s = cfg.max_stages(block_m, block_n)
            assert cfg.smem_bytes(block_m, block_n, s) <= SMEM_CAPACITY
            if s < 8:  # one more stage would not fit
                assert cfg.smem_bytes(block_m, block_n, s + 1) > SMEM_CAPACITY


def test_print_configs(monkeypatch, capsys):
    monkeypatch.delenv("DG_PRINT_CONFIGS", raising=False)
    plan_dense(128, 2112, 7168, 132)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("DG_PRINT_CONFIGS", "1")
    c = plan_dense(128, 2112, 7168, 132)
    out = capsys.readouterr().out
    assert "M=128" in out and "N=2112" in out and "K=7168" in out
    assert c.name in out


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (24, 4096, 7168), (128, 2112, 4096)])
def test_narrow_long_k_decode_tiles_get_a_deep_pipelined_ring(m, n, k):
    # Two K blocks a stage (docs/design.md, planner rules): more than 8 K blocks in flight, as many
    # stages as shared memory holds up to 32 K blocks.
    c = plan_dense(m, n, k, 132)
    assert c.block_n <= 32 and c.pipelined and c.stage_k_blocks == 2
    assert c.num_stages * 2 > 8 and c.num_stages == cfg.max_stages(c.block_m, c.block_n, cap=16, stage_k_blocks=2)


@pytest.mark.parametrize("m,n,k,layout", [
    (64, 7168, 16384, LAYOUT_DENSE),      # 64-column tiles: one K block a stage won
    (4096, 4096, 7168, LAYOUT_DENSE),
    (64, 4096, 7168, LAYOUT_MASKED),      # grouped tiles: lost 2-30%
    (24, 4096, 4160, LAYOUT_DENSE),       # K not whole 128-blocks: no 3-D view
])
def test_one_k_block_a_stage_elsewhere(m, n, k, layout):
    assert plan_dense(m, n, k, 132, layout=layout, num_groups=4 if layout == LAYOUT_MASKED else 1).stage_k_blocks == 1


@pytest.mark.parametrize("m,n,k,layout", [
    (64, 2112, 7168, LAYOUT_DENSE),         # decode: split-K tied at best
    (1, 2112, 7168, LAYOUT_DENSE),          # M < 64: M = 64's plan
    (7, 4096, 7168, LAYOUT_DENSE),
    (17, 2112, 7168, LAYOUT_DENSE),
    (1, 7168, 2048, LAYOUT_DENSE),
    (1, 7168, 16384, LAYOUT_DENSE),
    (128, 2112, 7168, LAYOUT_DENSE),
    (64, 2112, 7168, LAYOUT_MASKED),        # masked decode-sized groups: memory-bound
    (512, 7168, 2048, LAYOUT_MASKED),       # masked, K = 2048
    (4096, 7168, 16384, LAYOUT_DENSE),      # last wave 76 of 132 tiles: more than half full
    (4096, 4096, 7168, LAYOUT_DENSE),       # last wave 100 of 132
    (4096, 32768, 512, LAYOUT_DENSE),       # short K
    (2176, 7168, 2048, LAYOUT_DENSE),       # K = 2048: the split lost 9%
    (300, 7168, 2048, LAYOUT_DENSE),
    (300, 384, 1024, LAYOUT_DENSE),
    (8192, 2112, 7168, LAYOUT_DENSE),       # 1088 tiles: 8 full waves, the tail saves < 10%
])
def test_planner_does_not_split_k(m, n, k, layout):
    assert plan_dense(m, n, k, 132, layout=layout, num_groups=4 if layout else 1).split_k == 1


@pytest.mark.parametrize("m,n,k,block_m", [
    (1, 576, 7168, 64),       # DeepSeek-V3 kv_a: 36 tiles of 16 columns
    (64, 576, 7168, 64),
    (65, 576, 7168, 128),
    (128, 576, 7168, 128),
    (64, 512, 7168, 64),
    (64, 1024, 8192, 64),     # 64 tiles of 16 columns: at most half the SMs
    (128, 1024, 8192, 128),
])
def test_decode_tiles_filling_few_sms_split_over_k(m, n, k, block_m):
    c = plan_dense(m, n, k, 132)
    assert (c.block_m, c.block_n, c.split_k, c.stage_k_blocks) == (block_m, 32, plan.MAX_SPLIT_K, 2)
    assert c.pipelined and c.stream_b and not c.scale_loader_warp


@pytest.mark.parametrize("m,n,k,layout,training", [
    (16, 1024, 4096, LAYOUT_DENSE, False),    # 32 K blocks: the split lost 12%
    (64, 2112, 7168, LAYOUT_DENSE, False),    # 132 tiles fill the SMs
    (64, 1536, 7168, LAYOUT_DENSE, False),    # 96 tiles: more than half
    (64, 576, 7168, LAYOUT_MASKED, False),    # grouped: not measured
    (64, 576, 7168, LAYOUT_DENSE, True),      # training GEMMs: not measured
])
def test_decode_tiles_not_split(m, n, k, layout, training):
    c = plan_dense(m, n, k, 132, layout=layout, num_groups=4 if layout == LAYOUT_MASKED else 1,
                   row_scales_b=training, out_fp32=training)
    assert c.split_k == 1
    assert plan.decode_split_tiles(n, k, 16, 132, layout, training) == (16, 1)


@pytest.mark.parametrize("n,k", [(2112, 7168), (4096, 7168), (4096, 4096), (7168, 2048), (24576, 1536), (576, 16384)])
def test_every_dense_m_up_to_64_gets_the_m64_plan(n, k):
    # With short boxes for a partial M block, M = 64's plan ran M = 1, 7, 16 as fast as M = 64
    # or faster than any other measured plan (docs/design.md, planner rules).
    want = plan_dense(64, n, k, 132)
    assert all(plan_dense(m, n, k, 132) == want for m in range(1, 64))


@pytest.mark.parametrize("m,n,k,layout,splits", [
    (4096, 2112, 7168, LAYOUT_DENSE, 4),    # 544 tiles: 4 waves + 16 tiles, each split 4 ways
    (4097, 2112, 7168, LAYOUT_DENSE, 4),    # 561 tiles: 4 waves + 33
    (768, 3072, 7168, LAYOUT_DENSE, 4),     # 144 tiles: 1 wave + 12
    (1024, 3072, 7168, LAYOUT_DENSE, 2),    # 192 tiles: 1 wave + 60
    (256, 1536, 7168, LAYOUT_DENSE, 2),     # 48 tiles of 64 columns, one partial wave
    (256, 2112, 7168, LAYOUT_CONTIGUOUS, 3),  # 34 tiles: 3 x 34 <= 132
    (4096, 2112, 7168, LAYOUT_CONTIGUOUS, 4),
])
def test_last_wave_of_compute_bound_tiles_is_split_over_k(m, n, k, layout, splits):
    c = plan_dense(m, n, k, 132, layout=layout, num_groups=4 if layout else 1)
    assert c.split_k == plan.max_tail_splits(k)
    assert plan.tail_splits(m, n, k, c.block_m, c.block_n, 132) == splits


@pytest.mark.parametrize("m,n,k,block_n", [
    (256, 2112, 7168, 64),     # 66 tiles of 64 columns against 34 of 128: both one round
    (300, 2112, 7168, 64),     # 99 against 51
    (1000, 2112, 7168, 64),    # 264 against 136: two rounds either way
    (200, 4096, 2048, 64),     # 128 against 64
    (384, 3072, 7168, 128),    # 144 tiles of 64 would make a second round
    (1000, 1536, 7168, 128),
    (4096, 2112, 7168, 128),
])
def test_dense_tiles_over_128_rows_narrow_where_they_add_no_round(m, n, k, block_n):
    assert plan_dense(m, n, k, 132).block_n == block_n
    # Contiguous, masked and the training GEMMs keep 128 columns (measured on dense inference GEMMs;
    # a weight gradient's 192-wide tiles would add column-rounds on these shapes or split).
    assert plan_dense(m, n, k, 132, layout=LAYOUT_CONTIGUOUS, num_groups=4).block_n == 128
    assert plan_dense(m, n, k, 132, row_scales_b=True, out_fp32=True).block_n == 128
    assert plan_dense(m, n, k, 132, row_scales_b=True).block_n == 128


@pytest.mark.parametrize("m,n,k,block_n", [
    (7168, 2112, 4096, 192),    # 5 rounds of 192 columns against 8 of 128: 960 against 1024
    (1536, 24576, 8192, 192),   # 12 rounds of 192 against 18 of 128: 2304 either way
    (512, 32768, 4096, 128),    # 6 x 192 = 1152 against 8 x 128 = 1024
    (16384, 7168, 4096, 128),   # 37 x 192 = 7104 against 55 x 128 = 7040
    (7168, 4096, 8192, 128),
    (2048, 7168, 4096, 128),
    (128, 2112, 4096, 16),      # decode: memory-bound widths
])
def test_weight_gradients_take_wide_tiles_where_they_add_no_column_rounds(m, n, k, block_n):
    c = plan_dense(m, n, k, 132, row_scales_b=True, out_fp32=True, accumulate=True)
    assert c.block_n == block_n
    if block_n == plan.WIDE_WGRAD_BLOCK_N:
        # Unpipelined (the registers), D staged through one chunk buffer for five stages.
        assert (c.block_m, c.pipelined, c.split_k, c.out_buffers, c.num_stages) == (128, False, 1, 1, 5)
    else:
        assert c.out_buffers == 0
    # The K-grouped kernel keeps 128 columns (its wide tiles were not measured).
    assert plan_dense(m, n, k, 132, layout=Layout.K_GROUPED, num_groups=4, row_scales_b=True, out_fp32=True,
                      accumulate=True).block_n <= 128


@pytest.mark.parametrize("expected_m,groups", [(1024, 1), (512, 2), (256, 4), (129, 8), (4096, 2)])
def test_masked_long_k_compute_bound_kernels_can_split(expected_m, groups):
    """The real group sizes are known only on the device, which splits whatever tail they leave:
    every compute-bound masked kernel over a long K gets the split capability."""
    c = plan_dense(expected_m, 4096, 7168, 132, layout=LAYOUT_MASKED, num_groups=groups)
    assert c.split_k == plan.max_tail_splits(7168) > 1
    assert c.block_m == 128


@pytest.mark.parametrize("expected_m,groups,block_m", [(1, 8, 64), (32, 32, 64), (48, 4, 64), (49, 4, 128),
                                                       (64, 16, 128), (100, 8, 128), (128, 2, 128)])
@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048), (7168, 4096)])
def test_memory_bound_masked_tiles_fit_the_groups_and_pipeline(expected_m, groups, block_m, n, k):
    """Masked groups spread around expected_m: over a long K (>= 32 blocks), from 49 expected rows
    on, one 128-row block holds a group where 64-row blocks would stream its weights twice; a
    short K keeps 64-row blocks up to 64 rows. Every such tile is pipelined."""
    c = plan_dense(expected_m, n, k, 132, layout=LAYOUT_MASKED, num_groups=groups)
    assert c.block_m == (block_m if k >= 32 * 128 or expected_m > 64 else 64) and c.split_k == 1
    # Pipelined wherever the kernel can pipeline (tiles up to MAX_PIPELINED_BLOCK_N wide).
    assert c.pipelined == (c.block_n <= MAX_PIPELINED_BLOCK_N)
    # The dense decode plan of the same rows is not touched by the rule.
    dense = plan_dense(expected_m, n, k, 132)
    assert dense.block_m == (64 if expected_m <= 64 else 128)


def test_tail_splits_matches_the_device_scheduler():
    """Simulate kernels/scheduler.cuh: every tile is covered exactly once (whole, or by all its
    splits), split tiles fit the workspace (one slot per block), and the planner's count agrees."""
    for m, n, k, grid in [(4096, 2112, 7168, 132), (300, 384, 1024, 132), (77, 512, 576, 132),
                          (64, 2112, 7168, 16), (4097, 2112, 7168, 132), (128, 128, 8192, 132)]:
        block_m, block_n, cap = 128, 128, plan.max_tail_splits(k)
        tiles = ceil_div(m, block_m) * ceil_div(n, block_n)
        grid = min(grid, tiles * cap)                          # the host's grid (runtime/kernels.py)
        tail = tiles % grid
        splits = max(1, min(cap, grid // tail)) if tail else 1
        whole = tiles - tail
        units = whole + tail * splits
        assert tail * splits <= grid                           # workspace: one slot per block
        covered = {}
        for unit in range(units):
            t = unit if unit < whole else whole + (unit - whole) // splits
            covered[t] = covered.get(t, 0) + 1
        assert sorted(covered) == list(range(tiles))
        assert all(covered[t] == (1 if t < whole else splits) for t in covered)
        if grid == 132:
            assert plan.tail_splits(m, n, k, block_m, block_n, grid) == splits


@pytest.mark.parametrize("m,n,k", [(64, 7168, 16384), (64, 2112, 2048), (128, 32768, 512)])
def test_other_decode_tiles_keep_the_default_ring(m, n, k):
    c = plan_dense(m, n, k, 132)
    assert not c.pipelined and c.num_stages == cfg.max_stages(c.block_m, c.block_n)


@pytest.mark.parametrize("n,raster", [(2112, 8), (4096, 8), (7168, 8), (8192, 8), (8320, 16), (24576, 16),
                                      (32768, 16)])
def test_raster_band_narrows_when_n_has_few_tiles(n, raster):
    c = plan_dense(4096, n, 7168, 132)
    assert c.block_m in (128, 256) and c.block_n == 128
    assert c.pipelined == (c.block_m == 128)   # 256-row tiles run unpipelined
    assert c.raster_group == raster


@pytest.mark.parametrize("m", [1, 7, 64, 65, 100, 128])
def test_dense_decode_streams_b_through_l2(m):
    c = plan_dense(m, 7168, 2048, 132)
    assert c.stream_b and "_sb" in c.name
    assert _template_args(c)["stream_b"] == "true"   # kStreamB_


@pytest.mark.parametrize("m,layout,groups", [(129, LAYOUT_DENSE, 1), (4096, LAYOUT_DENSE, 1),
                                             (64, LAYOUT_MASKED, 16), (32, LAYOUT_MASKED, 32),
                                             (512, LAYOUT_MASKED, 2), (8192, LAYOUT_CONTIGUOUS, 4)])
def test_b_tiles_read_more_than_once_keep_the_normal_l2_policy(m, layout, groups):
    c = plan_dense(m, 4096, 7168, 132, layout=layout, num_groups=groups)
    assert not c.stream_b and "_sb" not in c.name
    assert _template_args(c)["stream_b"] == "false"   # kStreamB_


@pytest.mark.parametrize("m,n,k", [(64, 2112, 7168), (128, 2112, 7168), (64, 4096, 7168), (128, 4096, 7168),
                                   (4096, 7168, 2048), (7, 4096, 7168), (64, 7168, 576)])
def test_only_the_narrowest_tiles_load_a_scales_by_warp(m, n, k):
    c = plan_dense(m, n, k, 132)
    assert c.scale_loader_warp == (c.block_n <= plan.SCALE_LOADER_MAX_BLOCK_N)
    assert _template_args(c)["scale_loader_warp"] == str(c.scale_loader_warp).lower()   # kScaleLoaderWarp_
    assert c.name.endswith("_sl") == c.scale_loader_warp
    if (m, n) in ((64, 2112), (128, 2112)):   # the decode rows it was measured to help
        assert c.block_n == 16 and c.scale_loader_warp


@pytest.mark.parametrize("layout,groups", [(LAYOUT_MASKED, 1), (LAYOUT_CONTIGUOUS, 1)])
def test_grouped_calls_keep_tma_for_a_scales(layout, groups):
    c = plan_dense(64, 2112, 7168, 132, layout=layout, num_groups=groups)
    assert c.block_n == 16 and not c.scale_loader_warp    # the loader warp was not measured on grouped calls


@pytest.mark.parametrize("m,n,k", [(4096, 7168, 16384), (4096, 4096, 7168), (1000, 4096, 7168), (8192, 7168, 7168),
                                   (4096, 32768, 512),
                                   (4096, 37888, 3584),    # 28 K blocks: 36 tall rounds against 72
                                   (6000, 8192, 8192)])    # 12 tall rounds against 23 (5% slack)
def test_tall_tiles_where_they_need_no_more_rounds(m, n, k):
    c = plan_dense(m, n, k, 132)
    assert (c.block_m, c.block_n, c.pipelined, c.split_k) == (256, 128, False, 1)
    assert c.num_stages == cfg.max_stages(256, 128) == 3 and c.num_threads == 384


@pytest.mark.parametrize("m,n,k,layout", [
    (4096, 2112, 7168, LAYOUT_DENSE),    # 272 tall tiles: 3 rounds of 2 against 4 + a split one
    (257, 7168, 7168, LAYOUT_DENSE),     # the 128-row plan splits its last wave
    (4097, 7168, 16384, LAYOUT_DENSE),   # 17 tall M blocks: 8 rounds of 2 against 14
    (4096, 7168, 2048, LAYOUT_DENSE),    # 16 K blocks: measured a tie
    (6000, 7168, 2048, LAYOUT_DENSE),    # 16 K blocks: measured slower
    (6000, 4608, 3584, LAYOUT_DENSE),    # 7 tall rounds against 13: 8% more
    (4096, 5760, 2880, LAYOUT_DENSE),    # 23 K blocks
    (4096, 24576, 1536, LAYOUT_DENSE),
    (128, 7168, 16384, LAYOUT_DENSE),    # decode
    (8192, 4096, 7168, LAYOUT_CONTIGUOUS),
    (1024, 4096, 7168, LAYOUT_MASKED),
])
def test_tall_tiles_not_used(m, n, k, layout):
    assert plan_dense(m, n, k, 132, layout=layout, num_groups=4).block_m <= 128


def test_a_config_over_the_shared_memory_budget_is_a_clear_error():
    # The driver would refuse the launch attribute with a bare "invalid argument": the config
    # itself refuses to exist (before any compile or load).
    decode = plan_dense(64, 2112, 7168, 132)
    assert decode.stage_k_blocks == 2 and decode.smem_bytes <= SMEM_CAPACITY
    assert cfg.smem_bytes(decode.block_m, decode.block_n, decode.num_stages, 4) > SMEM_CAPACITY
    with pytest.raises(ValueError, match="shared memory"):
        dataclasses.replace(decode, stage_k_blocks=4)


def test_plan_cached_is_plan_dense():
    plan.clear_plan_cache()
    args = [(64, 2112, 7168, 132, LAYOUT_DENSE, 1), (4096, 4096, 7168, 132, LAYOUT_CONTIGUOUS, 8),
            (64, 7168, 2048, 78, LAYOUT_MASKED, 32)]
    first = [plan.plan_cached(*a) for a in args]
    assert first == [plan_dense(m, n, k, sms, layout=layout, num_groups=g) for m, n, k, sms, layout, g in args]
    assert all(plan.plan_cached(*a) is c for a, c in zip(args, first))   # memoised
    plan.clear_plan_cache()
    assert plan.plan_cached(*args[0]) == first[0]


def _bench_suite_plans(num_sms=132):
    """The config the public GEMMs plan for every case of the benchmark's dense, odd, contiguous and
    masked suites (deep_gemm/bench.py): K padded to 16 as ops/gemm.py runs it; a contiguous case's
    M is its groups x M per group rows, a masked case's its expected M."""
    from deep_gemm import bench
    from deep_gemm.jit.pad_source import padded_k
    plans = [plan_dense(m, n, k, num_sms) for m in bench.DENSE_MS for n, k in bench.DENSE_NKS]
    plans += [plan_dense(m, n, padded_k(k), num_sms) for m in bench.ODD_MS for n, k in bench.ODD_NKS]
    plans += [plan_dense(g * m, n, k, num_sms, layout=LAYOUT_CONTIGUOUS, num_groups=g)
              for g, m, n, k in bench.DEEPGEMM_CONTIGUOUS]
    plans += [plan_dense(m, n, k, num_sms, layout=LAYOUT_MASKED, num_groups=g)
              for g, m, n, k in bench.DEEPGEMM_MASKED]
    plans += [plan_dense(m, n, k, num_sms, row_scales_b=True, out_fp32=True, accumulate=True)
              for m, n, k in bench.DEEPGEMM_WGRAD_US]
    k_grouped = [plan_dense(m, n, k, num_sms, layout=Layout.K_GROUPED, num_groups=g, row_scales_b=True,
                            out_fp32=True, accumulate=True) for g, m, n, k in bench.DEEPGEMM_K_GROUPED_US]
    # (each K-grouped row twice: sizes on the host, and on the device)
    plans += k_grouped + [dataclasses.replace(c, device_sizes=True) for c in k_grouped]
    return plans


def _bf16_suite_plans(num_sms=132):
    """The BF16 kernel's configs for the rows of `bench --suite bf16` it runs: every layout (bf16 out)
    over the dense grid up to plan.BF16_DENSE_KERNEL_MAX_M, NT fp32 out over bench_bf16's decode
    rows, contiguous, masked and K-grouped over the FP8 grouped tables' shapes."""
    from deep_gemm import bench, bench_bf16
    from deep_gemm.plan import BF16_DENSE_KERNEL_MAX_M, plan_bf16
    plans = [plan_bf16(m, n, k, num_sms) for m in bench.DENSE_MS for n, k in bench.DENSE_NKS
             if m <= BF16_DENSE_KERNEL_MAX_M]
    plans += [plan_bf16(m, n, k, num_sms, out_fp32=True) for m in bench_bf16.FP32_MS for n, k in bench_bf16.FP32_NKS]
    plans += [plan_bf16(g * m, n, k, num_sms, layout=Layout.CONTIGUOUS, num_groups=g)
              for g, m, n, k in bench.DEEPGEMM_CONTIGUOUS]
    plans += [plan_bf16(m, n, k, num_sms, layout=Layout.MASKED, num_groups=g) for g, m, n, k in bench.DEEPGEMM_MASKED]
    plans += [plan_bf16(m, n, k, num_sms, a_mn_major=lay[0] == "t", b_mn_major=lay[1] == "n")
              for lay in ("nn", "tn", "tt") for m in bench.DENSE_MS for n, k in bench.DENSE_NKS
              if m <= BF16_DENSE_KERNEL_MAX_M]
    plans += [plan_bf16(m, n, 0, num_sms, layout=Layout.K_GROUPED, num_groups=g)
              for g, m, n, _ in bench.DEEPGEMM_K_GROUPED_US]
    return plans


def test_every_compile_time_option_is_chosen_for_some_benchmark_shape():
    """Each kernel option the planner can choose does get chosen by the shapes the benchmark
    measures (both ways for flags, every value for enumerations): an option the planner never picks
    for a benchmarked shape is dead code, or a rule nobody measures any more."""
    plans = _bench_suite_plans()
    assert len(plans) == 21 + 14 + 6 + 10 + 12 + 6 + 6
    bf16_plans = _bf16_suite_plans()
    assert len(bf16_plans) == 14 + 6 + 6 + 10 + 42 + 6 and all(c.bf16_operands for c in bf16_plans)
    plans += bf16_plans
    seen = {
        "pipelined": {c.pipelined for c in plans},
        "stream_b": {c.stream_b for c in plans},
        "scale_loader_warp": {c.scale_loader_warp for c in plans},
        "stage_k_blocks > 1": {c.stage_k_blocks > 1 for c in plans},
        "split_k > 1": {c.split_k > 1 for c in plans},
        "block_m": {c.block_m for c in plans},
        "layout": {c.layout for c in plans},
        "row_scales_b": {c.row_scales_b for c in plans},
        "out_fp32": {c.out_fp32 for c in plans},
        "accumulate": {c.accumulate for c in plans},
        "bf16_operands": {c.bf16_operands for c in plans},
        "a_mn_major": {c.a_mn_major for c in plans},
        "b_mn_major": {c.b_mn_major for c in plans},
        "device_sizes": {c.device_sizes for c in plans},
    }
    want = {
        "pipelined": {False, True}, "stream_b": {False, True}, "scale_loader_warp": {False, True},
        "stage_k_blocks > 1": {False, True}, "split_k > 1": {False, True}, "block_m": {64, 128, 256},
        "layout": set(Layout), "row_scales_b": {False, True}, "out_fp32": {False, True}, "accumulate": {False, True},
        "bf16_operands": {False, True}, "a_mn_major": {False, True}, "b_mn_major": {False, True},
        "device_sizes": {False, True},
    }
    assert seen == want
    # The boolean fields of the config are exactly the flags above: a new one must be added here.
    flags = {f.name for f in dataclasses.fields(KernelConfig) if f.type in ("bool", bool)}
    assert flags == {"pipelined", "stream_b", "scale_loader_warp", "row_scales_b", "out_fp32", "accumulate",
                     "bf16_operands", "a_mn_major", "b_mn_major", "device_sizes"}


def test_bf16_plans_memory_and_compute_bound_tiles():
    """plan_bf16: up to 128 rows per group the FP8 decode widths (B streamed where dense); above, 128-row
    tiles of the width with the fewest weighted rounds (2112 columns: 11 tiles of 192, not 9 of 256
    with one mostly empty; 192 where 256 would make a single round); contiguous tiles are 128 rows
    (the layout's alignment) at any M; K-grouped operands are MN-major (fp32 D); an MN-major B takes
    64-column boxes."""
    from deep_gemm.plan import plan_bf16
    dense = plan_bf16(64, 7168, 2048, 132)
    assert dense.block_m == 64 and dense.stream_b and dense.block_n <= 160
    assert plan_bf16(4096, 2112, 7168, 132).block_n == 192
    wide = plan_bf16(4096, 7168, 2048, 132)
    assert (wide.block_m, wide.block_n, wide.stream_b) == (128, 256, False) and wide.num_stages == 3
    assert plan_bf16(4096, 7168, 2048, 132, out_fp32=True).block_n == 256
    few_rows = plan_bf16(4 * 32, 4096, 7168, 132, layout=Layout.CONTIGUOUS, num_groups=4)
    assert few_rows.block_m == 128 and few_rows.block_n < 128 and not few_rows.stream_b
    many_rows = plan_bf16(4 * 8192, 4096, 7168, 132, layout=Layout.CONTIGUOUS, num_groups=4)
    assert (many_rows.block_m, many_rows.block_n) == (128, 256)
    assert plan_bf16(512, 4096, 7168, 132, layout=Layout.MASKED, num_groups=2).block_n == 192   # 128 tiles of 256
    assert plan_bf16(512, 7168, 2048, 132, layout=Layout.MASKED, num_groups=2).block_n == 256   # 224 tiles of 256
    for c in (dense, wide, few_rows, many_rows):
        assert c.bf16_operands and c.split_k == 1 and not c.pipelined
    grouped = plan_bf16(7168, 4096, 0, 132, layout=Layout.K_GROUPED, num_groups=4, accumulate=True)
    assert grouped.a_mn_major and grouped.b_mn_major and grouped.out_fp32 and grouped.block_n == 256
    assert plan_bf16(64, 7168, 576, 132, b_mn_major=True).block_n % 64 == 0
    with pytest.raises(ValueError, match="M >= 1"):
        plan_bf16(0, 256, 256, 132)


def test_bf16_dense_calls_run_the_kernel_where_it_pays():
    """Dense BF16: the kernel up to 128 rows; an MN-major B over 65-128 rows needs at least half the
    SMs' worth of 64-column tiles (N = 2112: 33 tiles) or a K long enough to split them over
    (K = 7168: yes; K = 2048: cuBLAS); K-major B at any N."""
    from deep_gemm.plan import bf16_dense_kernel_pays
    assert bf16_dense_kernel_pays(128, 2112, 2048, False, 132) and bf16_dense_kernel_pays(64, 2112, 2048, True, 132)
    assert not bf16_dense_kernel_pays(128, 2112, 2048, True, 132) and bf16_dense_kernel_pays(128, 4224, 2048, True, 132)
    assert bf16_dense_kernel_pays(128, 2112, 7168, True, 132) and bf16_dense_kernel_pays(65, 4096, 4096, True, 132)
    assert not bf16_dense_kernel_pays(65, 4096, 4032, True, 132)
    assert not bf16_dense_kernel_pays(129, 7168, 7168, False, 132) and not bf16_dense_kernel_pays(0, 7168, 7168, False, 132)


def test_bf16_memory_bound_tiles_split_over_a_long_k():
    """128-row memory-bound BF16 tiles over K >= 4096 that fill at most half the SMs are split over K,
    at least 32 columns wide (N = 2112: 66 tiles of 32 K-major columns, 33 of 64 MN-major ones); not
    64-row tiles, short K, enough tiles, or a grouped layout."""
    from deep_gemm.plan import MAX_SPLIT_K, plan_bf16
    def tiles(m, n, k, **kw):
        c = plan_bf16(m, n, k, 132, **kw)
        return c.block_n, c.split_k
    assert tiles(128, 2112, 7168) == (32, MAX_SPLIT_K)
    assert tiles(128, 2112, 7168, b_mn_major=True) == (64, MAX_SPLIT_K)
    assert tiles(128, 4096, 7168, b_mn_major=True, a_mn_major=True) == (64, MAX_SPLIT_K)
    assert tiles(100, 2112, 4096, out_fp32=True, accumulate=True) == (32, MAX_SPLIT_K)
    assert tiles(128, 4096, 7168) == (32, 1)          # 128 tiles: enough
    assert tiles(128, 7168, 16384, b_mn_major=True) == (64, 1)
    assert tiles(128, 2112, 4032)[1] == 1             # 63 K blocks: short
    assert tiles(64, 2112, 7168) == (16, 1) and tiles(64, 2112, 7168, b_mn_major=True)[1] == 1   # 64-row tiles
    assert plan_bf16(128, 2112, 7168, 132, layout=Layout.MASKED, num_groups=4).split_k == 1
    assert plan_bf16(4096, 2112, 7168, 132).split_k == 1


def test_bf16_compact_d_staging_where_it_pays():
    """Compact D staging (two one-chunk buffers; one for 192 bf16 columns, three chunks): compute-bound
    tiles with a long K or few rounds, and every fp32 D wider than 128 (K-grouped included); the whole
    tile otherwise and on memory-bound tiles. The bytes it saves become stages."""
    from deep_gemm.plan import plan_bf16
    long_k = plan_bf16(4 * 8192, 4096, 7168, 132, layout=Layout.CONTIGUOUS, num_groups=4)
    assert (long_k.block_n, long_k.out_buffers, long_k.num_stages) == (256, 2, 4)
    short_k = plan_bf16(4 * 8192, 7168, 2048, 132, layout=Layout.CONTIGUOUS, num_groups=4)
    assert (short_k.block_n, short_k.out_buffers, short_k.num_stages) == (256, 0, 3)
    few_rounds = plan_bf16(512, 7168, 2048, 132, layout=Layout.MASKED, num_groups=2)
    assert few_rounds.out_buffers == 2 and few_rounds.num_stages == 4
    narrow = plan_bf16(1024, 4096, 7168, 132, layout=Layout.MASKED, num_groups=1)
    assert (narrow.block_n, narrow.out_buffers, narrow.num_stages) == (192, 1, 5)
    grouped = plan_bf16(7168, 4096, 0, 132, layout=Layout.K_GROUPED, num_groups=8, accumulate=True)
    assert (grouped.block_n, grouped.out_buffers, grouped.num_stages) == (256, 2, 4)
    assert plan_bf16(4096, 7168, 2048, 132, out_fp32=True).out_buffers == 2
    assert plan_bf16(64, 7168, 7168, 132).out_buffers == 0
    for c in (long_k, short_k, few_rounds, narrow, grouped):
        assert c.smem_bytes <= SMEM_CAPACITY
        assert cfg.smem_bytes(128, c.block_n, c.num_stages + 1, out_bytes=c.out_bytes, bf16_operands=True,
                              out_buffers=c.out_buffers) > SMEM_CAPACITY


def test_out_buffers_must_divide_the_store_chunks():
    """out_buffers: 0 (the whole tile) or fewer buffers than the tile's store chunks, dividing them."""
    base = dict(shape_n=4096, shape_k=7168, block_m=128, block_n=256, num_stages=2, bf16_operands=True)
    assert KernelConfig(**base, out_buffers=2).smem_bytes < KernelConfig(**base).smem_bytes
    assert cfg.out_stage_bytes(128, 256, 2, 2) == 2 * 128 * 64 * 2 and cfg.out_stage_bytes(64, 256, 4, 1) == 64 * 32 * 4
    for bad in (3, 4, -1):
        with pytest.raises(ValueError, match="out_buffers"):
            KernelConfig(**base, out_buffers=bad)
