"""Planner: problem shape -> KernelConfig.

Pure Python (no torch, no CUDA) so it can be unit-tested on any machine.
Everything that is a compile-time constant of the kernel lives in KernelConfig;
M (and for grouped layouts the per-group sizes) is always a run-time value.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, replace

BLOCK_K = 128                      # one scale block of K; a 128B-swizzled fp8 row
SMEM_CAPACITY = 232448             # bytes of dynamic shared memory per block on sm_90
SMEM_RESERVED = 1024               # alignment slack for the 1024-byte aligned tiles
M_ALIGNMENT_CONTIGUOUS = 128       # rows of one expert block in the contiguous layout
MAX_PIPELINED_BLOCK_N = 128        # three fp32 register tiles fit the consumers' budget up to here
SA_LOADER_MAX_BLOCK_N = 16         # A's scales by a loader warp up to this BLOCK_N (see plan_dense)

LAYOUT_DENSE = 0
LAYOUT_CONTIGUOUS = 1
LAYOUT_MASKED = 2
LAYOUT_NAMES = {LAYOUT_DENSE: "dense", LAYOUT_CONTIGUOUS: "contiguous", LAYOUT_MASKED: "masked"}


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time description of one GEMM kernel variant."""
    n: int                      # columns of the output (weights' rows)
    k: int                      # reduction length
    block_m: int                # 64 (one math warpgroup), 128 (two) or 256 (two, two waves each)
    block_n: int                # multiple of 16, <= 256
    num_stages: int             # depth of the shared-memory ring
    stage_k_blocks: int = 1     # 128-K blocks a stage, loaded by one TMA operation per operand
    layout: int = LAYOUT_DENSE
    num_groups: int = 1
    raster_group: int = 16      # tiles of this many M blocks sweep N together (L2 reuse)
    cluster_n: int = 1          # 2: two blocks share (multicast) the A tile of neighbouring N tiles
    split_k: int = 1            # >1: tiles of the last wave split into up to this many units over K
    pipeline: bool = True       # overlap block k+1's wgmma with block k's promotion (BLOCK_N <= 128)
    stream_b: bool = False      # B is read once: load it with an L2 evict-first policy
    sa_loader_warp: bool = False  # A's scales copied by a producer warp (cp.async), not by TMA
    fixed_scale_split: bool = False  # tiles over two scale blocks of B: a main loop per boundary
    pipeline_halves: bool = False  # pipelined promotion over two N halves of each block (any BLOCK_N)
    block_k: int = field(default=BLOCK_K)

    @property
    def num_math_warpgroups(self) -> int:
        return 1 if self.block_m == 64 else 2    # BLOCK_M = 256: two 128-row waves each

    @property
    def num_threads(self) -> int:
        return 128 * (1 + self.num_math_warpgroups)

    @property
    def num_k_blocks(self) -> int:
        return ceil_div(self.k, self.block_k)

    @property
    def cluster_size(self) -> int:
        return self.cluster_n

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.num_stages, self.stage_k_blocks)

    def split_k_workspace_floats(self, grid: int) -> int:
        """fp32 partial results a split-K launch on `grid` blocks may write: at most one tile per
        block, since only the last wave's tiles are split (0 without split-K)."""
        return grid * self.block_m * self.block_n if self.split_k > 1 else 0

    def constants(self) -> dict:
        """Values the kernel source sees as constexpr (see kernels/gemm.cuh)."""
        return {
            "SHAPE_N": self.n,
            "SHAPE_K": self.k,
            "BLOCK_M": self.block_m,
            "BLOCK_N": self.block_n,
            "BLOCK_K": self.block_k,
            "NUM_STAGES": self.num_stages,
            "STAGE_K_BLOCKS": self.stage_k_blocks,
            "LAYOUT": self.layout,
            "NUM_GROUPS": self.num_groups,
            "RASTER_GROUP": self.raster_group,
            "CLUSTER_N": self.cluster_n,
            "SPLIT_K": self.split_k,
            "PIPELINE_PROMOTION": int(self.pipeline and self.block_n <= MAX_PIPELINED_BLOCK_N
                                      and not self.pipeline_halves),
            "STREAM_B": int(self.stream_b),
            "SA_LOADER_WARP": int(self.sa_loader_warp),
            "FIXED_SCALE_SPLIT": int(self.fixed_scale_split),
            "PIPELINE_HALVES": int(self.pipeline_halves),
        }

    @property
    def name(self) -> str:
        return (f"gemm_{LAYOUT_NAMES[self.layout]}_n{self.n}_k{self.k}_g{self.num_groups}"
                f"_bm{self.block_m}_bn{self.block_n}_s{self.num_stages}"
                + (f"x{self.stage_k_blocks}" if self.stage_k_blocks > 1 else "") + f"_r{self.raster_group}"
                f"_c{self.cluster_n}_sk{self.split_k}_p{int(self.pipeline)}" + ("_sb" if self.stream_b else "")
                + ("_sl" if self.sa_loader_warp else "") + ("_fs" if self.fixed_scale_split else "")
                + ("_ph" if self.pipeline_halves else ""))


def store_chunk_cols(block_n: int) -> int:
    """Width (columns) of one swizzled TMA-store chunk of the output tile."""
    for cols in (64, 32, 16):
        if block_n % cols == 0:
            return cols
    raise ValueError(f"block_n={block_n} must be a multiple of 16")


def smem_bytes(block_m: int, block_n: int, num_stages: int, stage_k_blocks: int = 1) -> int:
    per_stage = (block_m * BLOCK_K + block_n * BLOCK_K + block_m * 4) * stage_k_blocks   # A, B, A's scales
    out_tile = block_m * block_n * 2                                   # bf16 epilogue buffer
    barriers = (num_stages * 2 + 2) * 8                                # full, empty; split-K's flag
    return SMEM_RESERVED + out_tile + num_stages * per_stage + barriers


# ---- choosing a config ------------------------------------------------------------------

def valid_block_n(block_n: int) -> bool:
    """BLOCK_N the kernel supports: a tile may span at most two 128-column scale blocks
    of B, which holds when BLOCK_N <= 128 + gcd(BLOCK_N, 128)."""
    if block_n % 16 or not 16 <= block_n <= 256:
        return False
    from math import gcd
    return block_n <= 128 + gcd(block_n, 128)


# Largest BLOCK_N whose two fp32 register tiles fit without spilling (checked by
# tests/test_compile.py for every variant the planner can return).
MAX_BLOCK_N = {64: 160, 128: 160, 256: 128}
BLOCK_N_CANDIDATES = tuple(bn for bn in range(16, 257, 16) if valid_block_n(bn))


def max_stages(block_m: int, block_n: int, capacity: int = SMEM_CAPACITY, cap: int = 8,
               stage_k_blocks: int = 1) -> int:
    """Most stages (of stage_k_blocks K blocks each) that fit, at most `cap` stages."""
    stages = cap
    while stages > 1 and smem_bytes(block_m, block_n, stages, stage_k_blocks) > capacity:
        stages -= 1
    return stages


def with_stage_k_blocks(config: KernelConfig, stage_k_blocks: int) -> KernelConfig:
    """config with stage_k_blocks K blocks a stage, and as many stages as keep about the same
    number of K blocks in flight (as shared memory allows)."""
    cap = max(1, ceil_div(config.num_stages * config.stage_k_blocks, stage_k_blocks))
    return replace(config, stage_k_blocks=stage_k_blocks,
                   num_stages=max_stages(config.block_m, config.block_n, cap=cap, stage_k_blocks=stage_k_blocks))


# Masked calls of at most COMPUTE_BOUND_M expected rows over at least MASKED_TALL_MIN_K_BLOCKS
# K blocks take 128-row blocks from MASKED_TALL_FROM_ROWS expected rows on; every masked call of
# at most COMPUTE_BOUND_M expected rows pipelines its promotion. See plan_dense.
MASKED_TALL_FROM_ROWS = 49
MASKED_TALL_MIN_K_BLOCKS = 32

# Above this many rows per M block the GEMM is compute-bound and the measured
# best tile is 128 x 128 with pipelined promotion (docs/perf-notes.md, "tile sweep").
COMPUTE_BOUND_M = 128


def plan_dense(m: int, n: int, k: int, num_sms: int, layout: int = LAYOUT_DENSE,
               num_groups: int = 1) -> KernelConfig:
    """Choose the tile config for an (M, N, K) problem (M: rows, or expected rows per group).

    Compute-bound M (> 128): 128 x 128 tiles with pipelined promotion, or 256 x 128
    tiles where they take (almost) no more rounds over a long (or very short) K.
    Memory-bound M: the BLOCK_N that finishes in the fewest waves, weighting each tile by
    its columns plus a fixed share (A's loads, promotion, epilogue) worth about 48 columns; narrow
    tiles over a long K get a deeper ring and pipelined promotion; every M up to 64 gets M = 64's
    plan (a dense M's partial block loads only its rows, so fewer rows are never slower:
    docs/perf-notes.md, section 24); dense 16-column tiles copy A's scales with a loader warp, and
    narrow dense tiles over a long K load two K blocks a stage. Masked calls of at most 128
    expected rows pipeline their promotion, on 128-row blocks from 49 expected rows over a long K.
    The rasterisation band narrows to 8 M blocks when N has few tiles.
    Deterministic; DG_PRINT_CONFIGS=1 prints the choice.
    """
    # Masked groups of up to 128 expected rows are memory-bound. Their real sizes spread around
    # expected_m, so with 64-row blocks every group past 64 rows gets a second tile that streams
    # its weights again (16 x 64 expected rows: 26 M blocks of 64 rows against 16 of 128). Over a
    # long K such calls take 128-row blocks from MASKED_TALL_FROM_ROWS expected rows on (16x64
    # 4096x7168: 147 -> 133 us); over a short K the 128-row tile's own costs weigh more (16x64
    # 7168x2048: 72.5 against 70.4 us with 64-row blocks). docs/perf-notes.md, section 26.
    masked_small = layout == LAYOUT_MASKED and m <= COMPUTE_BOUND_M
    masked_tall = masked_small and m >= MASKED_TALL_FROM_ROWS and ceil_div(k, BLOCK_K) >= MASKED_TALL_MIN_K_BLOCKS
    block_m = 128 if m > 64 or masked_tall else 64
    if m > COMPUTE_BOUND_M:
        block_n = 128
    else:
        rows = max(m, 1)
        best = None
        for candidate in BLOCK_N_CANDIDATES:
            if candidate > MAX_BLOCK_N[block_m]:
                continue
            tiles = ceil_div(rows, block_m) * ceil_div(n, candidate) * (num_groups if layout == LAYOUT_MASKED else 1)
            key = (ceil_div(tiles, num_sms) * (candidate + 48), -candidate)
            if best is None or key < best[0]:
                best = (key, candidate)
        block_n = best[1]
    # Narrow decode tiles walking a long K: a deeper ring (their stages are small, up
    # to ~20 fit) and pipelined promotion, which hides each block's wgmma latency
    # (3-5% on 64x2112x7168, 64x4096x7168, 128x4096x7168; neutral or worse with wider
    # tiles or short K: docs/perf-notes.md, section 10).
    long_narrow = m <= COMPUTE_BOUND_M and block_n <= 32 and ceil_div(k, BLOCK_K) >= 32
    # Compute-bound tiles over a long K split the tiles of their last, partial wave over K
    # (the kernel picks the split count from the wave arithmetic; split_k caps it). A split-
    # capable kernel runs its whole tiles a few % slower (4096x4096x7168 in 128-row tiles: 177
    # -> 185 us with no tile split) and a split tile pays a reduction, so it is used only where
    # the last wave saves at least 10% of the rounds: 4096x2112x7168 -7%, 1000x2112x7168 -15%,
    # 300x2112x7168 -9%; with K = 2048 it lost 9-10% (docs/perf-notes.md, section 13). Decode
    # tiles are not split (split tied at best there, section 12).
    # A masked call's real group sizes stay on the GPU (m is only the expected rows per group),
    # so whether its last wave is partial depends on the draw: its kernel can split, and the
    # device splits whatever tail the real sizes leave. Over six draws each of the 1x1024,
    # 2x512 and 4x256 4096x7168 cases: -5% to -12% on draws that spill into one more round,
    # +1% to +4% on those that do not, -2% to -5% in total (section 17).
    split_k = 1
    rounds = ceil_div(ceil_div(m, block_m) * ceil_div(n, block_n), num_sms)   # of whole tiles
    long_k_compute_bound = m > COMPUTE_BOUND_M and ceil_div(k, BLOCK_K) >= MIN_TAIL_SPLIT_K_BLOCKS
    if long_k_compute_bound and layout == LAYOUT_MASKED:
        split_k = max_tail_splits(k)
    elif long_k_compute_bound:
        splits = tail_splits(m, n, k, block_m, block_n, num_sms)
        full_waves = ceil_div(m, block_m) * ceil_div(n, block_n) // num_sms
        if splits > 1 and (1 - 1 / splits) / (full_waves + 1) >= MIN_TAIL_SPLIT_SAVING:
            split_k = max_tail_splits(k)
            rounds = full_waves + 1 / splits
    if tall_tiles_pay(m, n, k, num_sms, layout, rounds):
        block_m, split_k = 256, 1
    # Decode (one M block): every B tile is read exactly once, so B's loads mark their L2 lines
    # evict-first. They then recycle each other's lines instead of evicting what earlier kernels
    # left in L2, which costs a write-back when that data is dirty: 3-14% on every dense decode
    # row after the bench's write flush, neutral after a read flush. Not used where B tiles are
    # re-read (4096-row dense and contiguous calls lost up to 10%), nor for masked calls, where
    # it measured -4% to +4% (docs/perf-notes.md, section 14).
    stream_b = layout == LAYOUT_DENSE and m <= block_m
    # Rasterisation band: 8 M blocks when N has at most 64 tiles (a wave then spans most
    # of N: +3-6% on 4096 x {2112, 4096, 7168} x K), 16 for very wide N (8 lost 5% on
    # 4096x32768x512); docs/perf-notes.md, section 10.
    raster_group = 8 if ceil_div(n, block_n) <= 64 else 16
    # The narrowest dense tiles (BLOCK_N = 16, decode) stream so few bytes per stage that the
    # producer thread's TMA operations set the pace: their A scales come from a loader warp
    # instead (64x2112x7168 11.3 -> 10.2 us, 128x2112x7168 12.4 -> 11.9). Wider tiles lost 1-9%
    # with it; grouped calls rarely get 16-column tiles and were not measured on them
    # (docs/perf-notes.md, section 23).
    sa_loader_warp = layout == LAYOUT_DENSE and block_n <= SA_LOADER_MAX_BLOCK_N
    # The same narrow dense tiles take two K blocks a stage (one 3-D TMA load per operand, half
    # the operations and barrier rounds per byte): 64x2112x7168 10.3 -> 9.6 us, 128x4096x7168
    # 14.3 -> 13.7, 1x2112x7168 10.1 -> 9.6; ties on 128x2112x7168 and 64x4096x7168, 1x4096x7168
    # 11.8 -> 12.1 (its tail box grows from 1 to 8 rows). Four a stage and wider or grouped tiles
    # lost (2-30%: fewer, coarser stages); K must be whole 128-blocks (docs/perf-notes.md, section 25).
    stage_k_blocks = 2 if long_narrow and layout == LAYOUT_DENSE and k % BLOCK_K == 0 else 1
    # Small masked groups pipeline their promotion too: 16x64 4096x7168 on 64-row blocks 147 ->
    # 144 us, 16x64 7168x2048 71.9 -> 70.4; 32x32 rows tied (docs/perf-notes.md, section 26).
    config = KernelConfig(n=n, k=k, block_m=block_m, block_n=block_n,
                          num_stages=max_stages(block_m, block_n, cap=(32 if long_narrow else 8) // stage_k_blocks,
                                                stage_k_blocks=stage_k_blocks),
                          stage_k_blocks=stage_k_blocks,
                          layout=layout, num_groups=num_groups, raster_group=raster_group, split_k=split_k,
                          pipeline=(m > COMPUTE_BOUND_M or long_narrow or masked_small) and block_m != 256,
                          stream_b=stream_b,
                          sa_loader_warp=sa_loader_warp)
    if os.environ.get("DG_PRINT_CONFIGS"):
        print(f"deep_gemm: M={m} N={n} K={k} -> {config.name} ({config.smem_bytes} B smem)")
    return config


# 256-row tiles (two 128-row waves per math warpgroup on one B tile) read 25% fewer bytes from
# L2 per flop than 128 x 128 tiles, and the 128 x 128 kernel at M = 4096 moves ~10 TB/s from L2,
# its limit (docs/perf-notes.md, section 15). They run unpipelined and cannot split the last
# wave, so they pay only where the main loop is long and they need no more rounds: measured
# 4096x7168x16384 750 -> 675 us, 4096x4096x7168 181 -> 172, 1000x4096x7168 46.2 -> 44.6, and
# 4096x32768x512 141 -> 133 (short K: half the tiles, half the per-tile costs); ties or losses
# at K = 576-2048 and wherever the rounds grow (4096x2112x7168 114 -> 127).
TALL_TILE_MIN_K_BLOCKS = 32
TALL_TILE_ROUND_SLACK = 1.03


def tall_tiles_pay(m: int, n: int, k: int, num_sms: int, layout: int, rounds_128: float) -> bool:
    """Whether a dense problem runs on 256 x 128 tiles rather than 128 x 128 ones: long K
    (>= 32 blocks) or very short K (<= 4 blocks), and at most 3% more rounds of work than the
    128 x 128 plan's `rounds_128` (whole rounds, or full waves plus a split last wave)."""
    if layout != LAYOUT_DENSE or m <= COMPUTE_BOUND_M:
        return False
    k_blocks = ceil_div(k, BLOCK_K)
    if not (k_blocks >= TALL_TILE_MIN_K_BLOCKS or k_blocks <= 4):
        return False
    rounds_256 = ceil_div(ceil_div(m, 256) * ceil_div(n, 128), num_sms)
    # A few % more rounds are paid back (each 256-row tile is 5-10% cheaper per flop).
    return 2 * rounds_256 <= rounds_128 * TALL_TILE_ROUND_SLACK


MAX_SPLIT_K = 4            # a split tile's last unit reads the others' partials one at a time
MIN_SPLIT_K_BLOCKS = 4     # K blocks per unit at least, so a unit is worth its reduction
MIN_TAIL_SPLIT_K_BLOCKS = 32   # measured gains at K = 7168 only; K = 2048 lost
MIN_TAIL_SPLIT_SAVING = 0.1    # share of the rounds the split last wave must save


def max_tail_splits(k: int) -> int:
    return max(1, min(MAX_SPLIT_K, ceil_div(k, BLOCK_K) // MIN_SPLIT_K_BLOCKS))


def tail_splits(m: int, n: int, k: int, block_m: int, block_n: int, grid: int) -> int:
    """How many units each tile of the last wave would be split into (kernels/scheduler.cuh
    computes the same on the device): the last wave's tiles spread over the idle blocks."""
    tiles = ceil_div(m, block_m) * ceil_div(n, block_n)
    tail = tiles % grid
    return max(1, min(max_tail_splits(k), grid // tail)) if tail else 1


# ---- the per-call path ------------------------------------------------------------------
# plan_dense walks every tile candidate (about 10 µs of Python); the public GEMMs ask the
# same few questions over and over, so they go through this memo. plan_dense must stay a
# pure function of its arguments for that to hold (DG_PRINT_CONFIGS then prints a choice
# once per distinct problem rather than on every call).
PLAN_CACHE_SIZE = 4096
_plan_cache: dict = {}
_plan_lock = threading.Lock()


def plan_cached(m: int, n: int, k: int, num_sms: int, layout: int = LAYOUT_DENSE,
                num_groups: int = 1) -> KernelConfig:
    """plan_dense(m, n, k, num_sms, layout, num_groups), memoised in a bounded dict."""
    key = (m, n, k, num_sms, layout, num_groups)
    config = _plan_cache.get(key)
    if config is None:
        config = plan_dense(m, n, k, num_sms, layout=layout, num_groups=num_groups)
        with _plan_lock:   # eviction must not race with another thread's insert
            while len(_plan_cache) >= PLAN_CACHE_SIZE:
                del _plan_cache[next(iter(_plan_cache))]   # the oldest entry
            _plan_cache[key] = config
    return config


def clear_plan_cache() -> None:
    """Forget memoised plans (after changing the planner's tables, e.g. in a tuning sweep)."""
    with _plan_lock:
        _plan_cache.clear()
