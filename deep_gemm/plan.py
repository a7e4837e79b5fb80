"""The planner: a problem's shape -> the KernelConfig that runs it.

Pure Python (no torch, no CUDA), deterministic, unit-tested on CPU. Every rule below is one the
benchmark measured; docs/design.md gives each rule's reason and current number.
DG_PRINT_CONFIGS=1 prints each new choice.
"""
from __future__ import annotations

import os
import threading

from .config import (BF16_BLOCK_K, BLOCK_K, MAX_PIPELINED_BLOCK_N, KernelConfig, Layout, ceil_div, max_stages,
                     store_chunk_cols, valid_block_n)

# Above this many rows per M block (expected rows per group, masked) a GEMM is compute-bound.
COMPUTE_BOUND_M = 128
# Widest tiles whose accumulators and temporary tile fit the math threads' registers.
MAX_BLOCK_N = {64: 160, 128: 160, 256: 128}
BLOCK_N_CANDIDATES = tuple(bn for bn in range(16, 257, 16) if valid_block_n(bn))
# A memory-bound tile costs its columns plus about this many columns' worth of fixed work
# (A's loads, promotion, epilogue) per wave.
TILE_FIXED_COST_COLUMNS = 48
# Narrow decode tiles over at least this many K blocks get a deep ring and pipelined promotion.
LONG_K_BLOCKS = 32
# Small masked groups take 128-row blocks from this many expected rows on, over a long K.
MASKED_TALL_FROM_ROWS = 49
# Dense tiles up to this width copy A's scales with a loader warp.
SCALE_LOADER_MAX_BLOCK_N = 16
# Split-K of the last wave: at most this many units a tile, of at least MIN_SPLIT_K_BLOCKS
# K blocks each, over a long K only, and only where it saves this share of the rounds.
MAX_SPLIT_K = 4
MIN_SPLIT_K_BLOCKS = 4
MIN_TAIL_SPLIT_K_BLOCKS = 32
MIN_TAIL_SPLIT_SAVING = 0.1
# 256-row tiles: over a long (>= 28 blocks) or very short (<= 4 blocks) K, at most 5% more rounds.
TALL_TILE_MIN_K_BLOCKS = 28
TALL_TILE_MAX_SHORT_K_BLOCKS = 4
TALL_TILE_ROUND_SLACK = 1.05


def max_tail_splits(k: int) -> int:
    return max(1, min(MAX_SPLIT_K, ceil_div(k, BLOCK_K) // MIN_SPLIT_K_BLOCKS))


def tail_splits(m: int, n: int, k: int, block_m: int, block_n: int, grid: int) -> int:
    """Units each tile of the last wave is split into (kernels/scheduler.cuh computes the same on
    the device): the last wave's tiles spread over the idle blocks."""
    tiles = ceil_div(m, block_m) * ceil_div(n, block_n)
    tail = tiles % grid
    return max(1, min(max_tail_splits(k), grid // tail)) if tail else 1


def memory_bound_block_n(m: int, n: int, block_m: int, num_sms: int, layout: Layout, num_groups: int,
                         widths: tuple = BLOCK_N_CANDIDATES) -> int:
    """The tile width (of `widths`) that finishes in the fewest waves, each tile weighted by its
    columns plus the fixed share; ties go to the wider tile."""
    best = None
    for block_n in widths:
        if block_n > MAX_BLOCK_N[block_m]:
            continue
        tiles = ceil_div(max(m, 1), block_m) * ceil_div(n, block_n) * (num_groups if layout == Layout.MASKED else 1)
        key = (ceil_div(tiles, num_sms) * (block_n + TILE_FIXED_COST_COLUMNS), -block_n)
        if best is None or key < best[0]:
            best = (key, block_n)
    return best[1]


def tall_tiles_pay(m: int, n: int, k: int, num_sms: int, layout: Layout, rounds_128: float,
                   out_fp32: bool = False) -> bool:
    """Whether a dense problem of more than COMPUTE_BOUND_M rows runs on 256 x 128 tiles rather than
    128 x 128: long or very short K, and at most 5% more rounds of work than the 128 x 128 plan's
    `rounds_128`. Not with an fp32 D, whose 128 KB tile would leave two stages."""
    if layout != Layout.DENSE or out_fp32:
        return False
    k_blocks = ceil_div(k, BLOCK_K)
    if TALL_TILE_MAX_SHORT_K_BLOCKS < k_blocks < TALL_TILE_MIN_K_BLOCKS:
        return False
    rounds_256 = ceil_div(ceil_div(m, 256) * ceil_div(n, 128), num_sms)
    return 2 * rounds_256 <= rounds_128 * TALL_TILE_ROUND_SLACK


# Dense inference GEMMs over more than 128 rows take 64-wide tiles where those make no more rounds
# than 128-wide ones: half the width fills twice the SMs for the same number of rounds.
NARROW_MID_M_BLOCK_N = 64


def mid_m_block_n(m: int, n: int, num_sms: int, layout: Layout, training: bool) -> int:
    """The width of 128-row tiles above COMPUTE_BOUND_M rows: NARROW_MID_M_BLOCK_N for a dense
    problem (bf16 D, B per 128 x 128 block) whose narrow tiles take as few rounds as 128-wide ones,
    else 128."""
    if layout != Layout.DENSE or training:
        return 128
    m_blocks = ceil_div(m, 128)
    narrow_rounds = ceil_div(m_blocks * ceil_div(n, NARROW_MID_M_BLOCK_N), num_sms)
    return NARROW_MID_M_BLOCK_N if narrow_rounds <= ceil_div(m_blocks * ceil_div(n, 128), num_sms) else 128


# Dense weight gradients (fp32 D accumulated, B scaled per row) over more than 128 rows take
# 192-wide tiles, their D staged through one store-chunk buffer (the whole fp32 tile would leave
# too few stages), where those take no more column-rounds (rounds x width) than the 128-wide plan
# and need no split of the last wave: less of A's loading per column for the same work. (Split
# 192-wide tiles were not measured.)
WIDE_WGRAD_BLOCK_N = 192
WIDE_WGRAD_OUT_BUFFERS = 1


def wgrad_block_n(m: int, n: int, k: int, num_sms: int) -> int:
    """The width of a dense weight gradient's 128-row tiles above COMPUTE_BOUND_M rows."""
    wide = WIDE_WGRAD_BLOCK_N
    _, rounds = plan_split_k(m, n, k, 128, 128, num_sms, Layout.DENSE)   # (a split last wave counts its share)
    wide_split, wide_rounds = plan_split_k(m, n, k, 128, wide, num_sms, Layout.DENSE)
    return wide if wide_split == 1 and wide_rounds * wide <= rounds * 128 else 128


# Dense inference decode tiles (one M block) over a long K that leave more than half the SMs idle
# (few, narrow columns: DeepSeek-V3's kv_a, 576 x 7168) are at least DECODE_SPLIT_MIN_BLOCK_N wide and
# split over K: the device splits each into up to MAX_SPLIT_K units, as many as the idle SMs allow.
DECODE_SPLIT_MIN_K_BLOCKS = 56
DECODE_SPLIT_MIN_BLOCK_N = 32


def decode_split_tiles(n: int, k: int, block_n: int, num_sms: int, layout: Layout, training: bool) -> tuple:
    """(block_n, split_k) of a one-M-block problem planned `block_n` wide: wider and split over K for
    a dense inference problem over >= DECODE_SPLIT_MIN_K_BLOCKS K blocks whose tiles fill at most half
    the SMs, else as planned and unsplit."""
    if layout != Layout.DENSE or training or ceil_div(k, BLOCK_K) < DECODE_SPLIT_MIN_K_BLOCKS \
            or 2 * ceil_div(n, block_n) > num_sms:
        return block_n, 1
    return max(block_n, DECODE_SPLIT_MIN_BLOCK_N), MAX_SPLIT_K


def plan_split_k(m: int, n: int, k: int, block_m: int, block_n: int, num_sms: int, layout: Layout):
    """(split_k, rounds) of a problem of more than COMPUTE_BOUND_M rows: how many units a last-wave
    tile may be split into, and the plan's rounds of work (whole rounds, or full waves plus a split
    last wave). Decode tiles split by decode_split_tiles' rule instead."""
    rounds = ceil_div(ceil_div(m, block_m) * ceil_div(n, block_n), num_sms)
    if ceil_div(k, BLOCK_K) < MIN_TAIL_SPLIT_K_BLOCKS:
        return 1, rounds
    if layout == Layout.MASKED:   # the real group sizes stay on the device, which splits whatever tail they leave
        return max_tail_splits(k), rounds
    splits = tail_splits(m, n, k, block_m, block_n, num_sms)
    full_waves = ceil_div(m, block_m) * ceil_div(n, block_n) // num_sms
    if splits > 1 and (1 - 1 / splits) / (full_waves + 1) >= MIN_TAIL_SPLIT_SAVING:
        return max_tail_splits(k), full_waves + 1 / splits
    return 1, rounds


def plan_dense(m: int, n: int, k: int, num_sms: int, layout: Layout = Layout.DENSE,
               num_groups: int = 1, row_scales_b: bool = False, out_fp32: bool = False,
               accumulate: bool = False) -> KernelConfig:
    """The config for an (M, N, K) problem; M is the rows (dense, contiguous, K-grouped) or the
    expected rows per group (masked). Every M up to 64 gets M = 64's plan (a partial block loads
    only its rows). Per-row B scales, an fp32 D and accumulation change what fits in shared memory
    and registers, not the tile rules; K-grouped problems plan like dense ones of the largest K."""
    layout = Layout(layout)
    if layout == Layout.K_GROUPED:
        return plan_k_grouped(m, n, num_sms, num_groups, accumulate)
    long_k = ceil_div(k, BLOCK_K) >= LONG_K_BLOCKS
    masked_small = layout == Layout.MASKED and m <= COMPUTE_BOUND_M
    masked_tall = masked_small and m >= MASKED_TALL_FROM_ROWS and long_k
    block_m = 128 if m > 64 or masked_tall else 64
    weight_gradient = layout == Layout.DENSE and row_scales_b and out_fp32
    if m > COMPUTE_BOUND_M:
        block_n = (wgrad_block_n(m, n, k, num_sms) if weight_gradient
                   else mid_m_block_n(m, n, num_sms, layout, row_scales_b or out_fp32))
        split_k, rounds = plan_split_k(m, n, k, block_m, block_n, num_sms, layout)
        if block_n == 128 and tall_tiles_pay(m, n, k, num_sms, layout, rounds, out_fp32):
            block_m, split_k = 256, 1
    else:
        block_n, split_k = decode_split_tiles(n, k, memory_bound_block_n(m, n, block_m, num_sms, layout, num_groups),
                                              num_sms, layout, row_scales_b or out_fp32)
    long_narrow = m <= COMPUTE_BOUND_M and block_n <= 32 and long_k
    out_buffers = WIDE_WGRAD_OUT_BUFFERS if weight_gradient and block_n == WIDE_WGRAD_BLOCK_N else 0
    stage_k_blocks = 2 if long_narrow and layout == Layout.DENSE and k % BLOCK_K == 0 else 1
    config = KernelConfig(
        shape_n=n, shape_k=k, block_m=block_m, block_n=block_n,
        num_stages=max_stages(block_m, block_n, cap=(32 if long_narrow else 8) // stage_k_blocks,
                              stage_k_blocks=stage_k_blocks, out_bytes=4 if out_fp32 else 2,
                              row_scales_b=row_scales_b, out_buffers=out_buffers),
        stage_k_blocks=stage_k_blocks, layout=layout, num_groups=num_groups,
        raster_group=8 if ceil_div(n, block_n) <= 64 else 16,
        split_k=split_k,
        pipelined=((m > COMPUTE_BOUND_M or long_narrow or masked_small) and block_m != 256
                   and block_n <= MAX_PIPELINED_BLOCK_N),
        stream_b=layout == Layout.DENSE and m <= block_m,
        scale_loader_warp=layout == Layout.DENSE and block_n <= SCALE_LOADER_MAX_BLOCK_N and not row_scales_b,
        row_scales_b=row_scales_b, out_fp32=out_fp32, accumulate=accumulate, out_buffers=out_buffers)
    if os.environ.get("DG_PRINT_CONFIGS"):
        print(f"deep_gemm: M={m} N={n} K={k} -> {config.name} ({config.smem_bytes} B smem)")
    return config


def plan_k_grouped(m: int, n: int, num_sms: int, num_groups: int, accumulate: bool) -> KernelConfig:
    """K-grouped weight gradients: every group an [M, N] problem of its own K. The kernel takes the
    groups' K at run time, so one kernel serves every k_sizes (shape_k is a placeholder); tiles
    as a dense problem of M rows would take them."""
    block_m = 128 if m > 64 else 64
    block_n = 128 if m > COMPUTE_BOUND_M else memory_bound_block_n(m, n, block_m, num_sms, Layout.DENSE, 1)
    return KernelConfig(
        shape_n=n, shape_k=BLOCK_K, block_m=block_m, block_n=block_n,
        num_stages=max_stages(block_m, block_n, out_bytes=4, row_scales_b=True),
        layout=Layout.K_GROUPED, num_groups=num_groups, raster_group=8 if ceil_div(n, block_n) <= 64 else 16,
        pipelined=block_n <= MAX_PIPELINED_BLOCK_N, row_scales_b=True, out_fp32=True, accumulate=accumulate)


# plan_dense walks every tile candidate (a loop in Python); the GEMMs ask the same few
# questions over and over, so they go through this bounded memo (plan_dense is a pure function).
PLAN_CACHE_SIZE = 4096
_plan_cache: dict = {}
_plan_lock = threading.Lock()


def plan_cached(m: int, n: int, k: int, num_sms: int, layout: Layout = Layout.DENSE,
                num_groups: int = 1, row_scales_b: bool = False, out_fp32: bool = False,
                accumulate: bool = False) -> KernelConfig:
    key = (m, n, k, num_sms, int(layout), num_groups, row_scales_b, out_fp32, accumulate)
    config = _plan_cache.get(key)
    if config is None:
        config = plan_dense(m, n, k, num_sms, layout=layout, num_groups=num_groups, row_scales_b=row_scales_b,
                            out_fp32=out_fp32, accumulate=accumulate)
        with _plan_lock:   # eviction must not race with another thread's insert
            while len(_plan_cache) >= PLAN_CACHE_SIZE:
                del _plan_cache[next(iter(_plan_cache))]
            _plan_cache[key] = config
    return config


def clear_plan_cache() -> None:
    """Forget memoised plans (after changing the planner's tables, e.g. in a tuning run)."""
    with _plan_lock:
        _plan_cache.clear()


# BF16 operands. Dense calls run the kernel up to BF16_DENSE_KERNEL_MAX_M rows (memory-bound tiles,
# where it beats cuBLAS); larger dense M stays with cuBLAS. The M-grouped layouts run the kernel at
# every M: compute-bound tiles of 128 rows and one of BF16_COMPUTE_BLOCK_N's widths.
BF16_DENSE_KERNEL_MAX_M = COMPUTE_BOUND_M
BF16_STAGES = 16   # a bf16 K block holds half an FP8 block's K: a deeper ring keeps as many bytes in flight
BF16_COMPUTE_BLOCK_N = (128, 192, 256)   # an fp32 D wider than 128 only through compact staging
MN_MAJOR_BLOCK_N = (64, 128)         # memory-bound widths of an MN-major B: whole 64-column boxes
# A compute-bound tile costs its columns plus about this many columns' worth of fixed work (the
# ring's first fill, the epilogue's part that does not overlap the next tile).
BF16_TILE_FIXED_COST_COLUMNS = 32


def bf16_dense_kernel_pays(m: int, n: int, k: int, b_mn_major: bool, num_sms: int) -> bool:
    """Whether a dense BF16 call runs the kernel rather than cuBLAS: M up to BF16_DENSE_KERNEL_MAX_M,
    and with an MN-major B over more than 64 rows, at least half the SMs' worth of its 64-column
    tiles or a K long enough to split them over (a B of few such tiles is streamed by too few SMs)."""
    if not 0 < m <= BF16_DENSE_KERNEL_MAX_M:
        return False
    few_tiles = b_mn_major and m > 64 and ceil_div(n, 64) < num_sms // 2
    return not few_tiles or ceil_div(k, BF16_BLOCK_K) >= BF16_SPLIT_MIN_K_BLOCKS


# Memory-bound 128-row BF16 tiles of a long K that leave at least half the SMs idle are split over K
# (the device splits each into up to MAX_SPLIT_K units, as many as the idle SMs allow), at least
# BF16_SPLIT_MIN_BLOCK_N wide: four tiles of a 128-row A fill the SMs better than one of 16 columns.
BF16_SPLIT_MIN_K_BLOCKS = 64     # bf16 K blocks (K >= 4096)
BF16_SPLIT_MIN_BLOCK_N = 32


def bf16_memory_bound_tiles(m: int, n: int, k: int, block_m: int, num_sms: int, layout: Layout, num_groups: int,
                            widths: tuple) -> tuple:
    """(block_n, split_k) of memory-bound BF16 tiles: memory_bound_block_n's width; for a dense M of
    128-row tiles over a long K, at least BF16_SPLIT_MIN_BLOCK_N wide and split over K when those
    tiles fill at most half the SMs."""
    block_n = memory_bound_block_n(m, n, block_m, num_sms, layout, num_groups, widths)
    if layout != Layout.DENSE or block_m != 128 or ceil_div(k, BF16_BLOCK_K) < BF16_SPLIT_MIN_K_BLOCKS:
        return block_n, 1
    block_n = max(block_n, BF16_SPLIT_MIN_BLOCK_N)
    return block_n, MAX_SPLIT_K if 2 * ceil_div(n, block_n) <= num_sms else 1


def bf16_rows(m: int, layout: Layout, num_groups: int) -> int:
    """Rows per group that decide memory- against compute-bound tiles: M (dense), expected rows
    (masked), M / G (contiguous: each group's rows)."""
    return ceil_div(m, num_groups) if layout == Layout.CONTIGUOUS else m


# Compact D staging (KernelConfig.out_buffers): the epilogue waits, once per tile, for its stores to
# have read a buffer before writing it again, and the bytes it saves buy a stage (bf16 D, 256 wide:
# 4 instead of 3) or make an fp32 D wider than 128 possible at all.
BF16_COMPACT_MIN_K_BLOCKS = 64   # a tile's K blocks from which the stage outweighs the wait
BF16_COMPACT_MAX_ROUNDS = 2      # or rounds of tiles up to which the wait is paid too rarely to matter


def bf16_tiles(m: int, n: int, block_n: int, layout: Layout, num_groups: int) -> int:
    """128-row compute-bound tiles of a BF16 problem (masked and K-grouped: every group's)."""
    groups = num_groups if layout in (Layout.MASKED, Layout.K_GROUPED) else 1
    return ceil_div(m, 128) * ceil_div(n, block_n) * groups


def bf16_compute_block_n(m: int, n: int, num_sms: int, layout: Layout, num_groups: int, out_fp32: bool) -> int:
    """The width of 128-row compute-bound tiles that finishes in the fewest rounds, each round
    weighted by its tile's columns plus the fixed share; ties go to the wider tile. 256-wide tiles
    that would make a single round give way to 192-wide ones (a 256-wide tile alone on its SM ran at
    about half the rate it reaches over several rounds)."""
    def cost(block_n: int) -> tuple:
        return (ceil_div(bf16_tiles(m, n, block_n, layout, num_groups), num_sms)
                * (block_n + BF16_TILE_FIXED_COST_COLUMNS), -block_n)
    best = min(BF16_COMPUTE_BLOCK_N, key=cost)
    if best == 256 and bf16_tiles(m, n, best, layout, num_groups) <= num_sms:
        return 192
    return best


def bf16_out_buffers(m: int, n: int, k: int, block_n: int, num_sms: int, layout: Layout, num_groups: int,
                     out_fp32: bool) -> int:
    """D's staging for a compute-bound BF16 tile: the whole tile (0), or two one-chunk buffers (one
    where a tile has an odd number of chunks: 192 bf16 columns) where that buys a stage and an fp32
    D is wider than 128 (the whole tile would leave 2-3 stages), or a tile's K is long (K-grouped:
    the groups' K, the tokens, is), or the tiles make few rounds."""
    out_bytes = 4 if out_fp32 else 2
    chunks = block_n // store_chunk_cols(block_n, out_bytes)
    buffers = 2 if chunks % 2 == 0 and chunks > 2 else 1
    if chunks == 1 or max_stages(128, block_n, BF16_STAGES, out_bytes=out_bytes, bf16_operands=True,
                                 out_buffers=buffers) <= max_stages(128, block_n, BF16_STAGES, out_bytes=out_bytes,
                                                                    bf16_operands=True):
        return 0
    if out_fp32:
        return buffers if block_n > 128 else 0
    long_k = layout == Layout.K_GROUPED or ceil_div(k, BF16_BLOCK_K) >= BF16_COMPACT_MIN_K_BLOCKS
    few_rounds = ceil_div(bf16_tiles(m, n, block_n, layout, num_groups), num_sms) <= BF16_COMPACT_MAX_ROUNDS
    return buffers if long_k or few_rounds else 0


def plan_bf16(m: int, n: int, k: int, num_sms: int, out_fp32: bool = False, accumulate: bool = False,
              layout: Layout = Layout.DENSE, num_groups: int = 1, a_mn_major: bool = False,
              b_mn_major: bool = False) -> KernelConfig:
    """The config of a BF16 GEMM D[M, N] (+)= A[M, K] B[N, K]^T; M is the rows (dense, contiguous,
    K-grouped: of each group's D) or the expected rows per group (masked). Up to COMPUTE_BOUND_M rows
    per group the FP8 planner's memory-bound tiles (64 rows up to M = 64, widths that spread N, and
    masked the groups, over the SMs), B streamed past L2 where dense; above, 128-row tiles of the
    width bf16_compute_block_n picks (contiguous: always 128 rows, each group's rows start aligned
    to them). An MN-major B (dense b_mn_major; K-grouped operands are both MN-major) takes widths of
    whole 64-column boxes. K-grouped: fp32 D, and K is each group's own at run time (shape_k a
    placeholder). Split over K only as bf16_memory_bound_tiles says; no promotion (the loop keeps the
    next block's wgmmas queued while it waits), one K block of 64 a stage, as many stages as fit up to
    BF16_STAGES."""
    layout = Layout(layout)
    if m < 1:
        raise ValueError(f"plan_bf16 plans M >= 1, got M = {m}")
    if layout == Layout.K_GROUPED:
        a_mn_major = b_mn_major = out_fp32 = True
        k = BF16_BLOCK_K
    memory_bound = bf16_rows(m, layout, num_groups) <= COMPUTE_BOUND_M
    block_m = 128 if m > 64 or layout == Layout.CONTIGUOUS else 64
    widths = MN_MAJOR_BLOCK_N if b_mn_major else BLOCK_N_CANDIDATES
    out_buffers, split_k = 0, 1
    if memory_bound:
        block_n, split_k = bf16_memory_bound_tiles(m, n, k, block_m, num_sms, layout, num_groups, widths)
    else:
        block_n = bf16_compute_block_n(m, n, num_sms, layout, num_groups, out_fp32)
        out_buffers = bf16_out_buffers(m, n, k, block_n, num_sms, layout, num_groups, out_fp32)
    return KernelConfig(
        shape_n=n, shape_k=k, block_m=block_m, block_n=block_n,
        num_stages=max_stages(block_m, block_n, cap=BF16_STAGES, out_bytes=4 if out_fp32 else 2, bf16_operands=True,
                              out_buffers=out_buffers),
        layout=layout, num_groups=num_groups, raster_group=8 if ceil_div(n, block_n) <= 64 else 16, split_k=split_k,
        stream_b=layout == Layout.DENSE and memory_bound, out_fp32=out_fp32, accumulate=accumulate,
        bf16_operands=True, a_mn_major=a_mn_major, b_mn_major=b_mn_major, out_buffers=out_buffers)
