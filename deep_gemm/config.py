"""The GEMM kernel on the host side: its compile-time configuration, geometry and parameter block.

KernelConfig lists the template parameters of `deep_gemm::GemmConfig` (kernels/gemm.cuh) in the
same order (a CPU test checks it). Pure Python: no torch, no CUDA.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, fields

BLOCK_K = 128                  # one scale block of K: one 128-byte swizzled row of fp8
BLOCK_K_BYTES = 128            # one K block in shared memory: a 128-byte swizzled row (128 fp8, 64 bf16)
BF16_BLOCK_K = 64              # elements of K a bf16 K block holds
SMEM_CAPACITY = 232448         # bytes of dynamic shared memory per block on sm_90
SMEM_RESERVED = 1024           # slack for aligning the tiles to 1024 bytes (128-byte swizzle)
M_ALIGNMENT_CONTIGUOUS = 128   # rows of one expert's block in the contiguous layout
MAX_PIPELINED_BLOCK_N = 128    # three fp32 register tiles fit the math threads' budget up to here


class Layout(enum.IntEnum):
    """How the rows of A (and D) map to groups of B (kernels/scheduler.cuh: deep_gemm::Layout)."""
    DENSE = 0
    CONTIGUOUS = 1
    MASKED = 2
    K_GROUPED = 3     # G problems [M, K_g] x [N, K_g] -> [G, M, N], each group its own K


def ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


def valid_block_n(block_n: int) -> bool:
    """A tile may span at most two 128-column scale blocks of B: BLOCK_N <= 128 + gcd(BLOCK_N, 128)."""
    return block_n % 16 == 0 and 16 <= block_n <= 256 and block_n <= 128 + math.gcd(block_n, 128)


def store_chunk_cols(block_n: int, out_bytes: int = 2) -> int:
    """Width in columns of one swizzled TMA-store chunk of the output tile: up to a 128-byte row,
    dividing block_n (gemm.cuh: kStoreChunkCols)."""
    return next(cols for cols in (128 // out_bytes, 64 // out_bytes, 32 // out_bytes) if block_n % cols == 0)


def out_stage_bytes(block_m: int, block_n: int, out_bytes: int = 2, out_buffers: int = 0) -> int:
    """Shared memory staging D (gemm.cuh: kOutStageBytes): the whole tile, or `out_buffers` buffers
    of one store chunk for 64 rows of each math warpgroup."""
    if out_buffers == 0:
        return block_m * block_n * out_bytes
    return out_buffers * min(block_m, 128) * store_chunk_cols(block_n, out_bytes) * out_bytes


def smem_bytes(block_m: int, block_n: int, num_stages: int, stage_k_blocks: int = 1, out_bytes: int = 2,
               row_scales_b: bool = False, bf16_operands: bool = False, out_buffers: int = 0) -> int:
    """Dynamic shared memory of a kernel (gemm.cuh: SharedStorage). A K block is a 128-byte row of
    either operand (fp8 or bf16); bf16 operands have no scales."""
    scales_b = ceil_div(stage_k_blocks * block_n, 32) * 32 * 4 if row_scales_b else 0       # 128-byte aligned
    scales_a = 0 if bf16_operands else block_m * 4
    per_stage = (block_m * BLOCK_K_BYTES + block_n * BLOCK_K_BYTES + scales_a) * stage_k_blocks + scales_b
    out_tile = out_stage_bytes(block_m, block_n, out_bytes, out_buffers)                 # D staging
    barriers = (num_stages * 2 + 2) * 8                                                  # full, empty; split-K flag
    return SMEM_RESERVED + out_tile + num_stages * per_stage + barriers


def max_stages(block_m: int, block_n: int, cap: int = 8, stage_k_blocks: int = 1, out_bytes: int = 2,
               row_scales_b: bool = False, bf16_operands: bool = False, out_buffers: int = 0) -> int:
    """Most stages (of stage_k_blocks K blocks each) that fit in shared memory, at most `cap`."""
    stages = cap
    while stages > 1 and smem_bytes(block_m, block_n, stages, stage_k_blocks, out_bytes, row_scales_b,
                                    bf16_operands, out_buffers) > SMEM_CAPACITY:
        stages -= 1
    return stages


@dataclass(frozen=True)
class KernelConfig:
    """Compile-time description of one GEMM kernel; M is always a run-time value."""
    shape_n: int                   # columns of D (rows of B)
    shape_k: int                   # reduction length
    block_m: int                   # 64 (one math warpgroup), 128 (two) or 256 (two, two waves each)
    block_n: int                   # multiple of 16 (valid_block_n)
    num_stages: int                # depth of the shared-memory ring
    stage_k_blocks: int = 1        # 128-K blocks a stage, loaded by one TMA operation per operand
    layout: Layout = Layout.DENSE
    num_groups: int = 1
    raster_group: int = 16         # tiles of this many M blocks sweep N together (L2 reuse)
    split_k: int = 1               # > 1: tiles of the last wave may be split into this many units over K
    pipelined: bool = False        # block k + 1's wgmmas run while block k is promoted
    stream_b: bool = False         # B is read once: its loads mark L2 lines evict-first
    scale_loader_warp: bool = False  # A's scales copied by a producer warp (cp.async), not by TMA
    row_scales_b: bool = False     # B scaled per row and 128-K block (recipe (1, 1, 128)), not per 128 x 128
    out_fp32: bool = False         # D is fp32 (else bf16)
    accumulate: bool = False       # D += A B (fp32 D, by TMA reduce-add)
    bf16_operands: bool = False    # bf16 A and B (K blocks of 64), no scales, no promotion
    a_mn_major: bool = False       # bf16 A held [K, M] (M contiguous), read in 64-column boxes
    b_mn_major: bool = False       # bf16 B held [K, N] (N contiguous), likewise
    out_buffers: int = 0           # D staged whole (0) or through this many one-chunk buffers in turn
    device_sizes: bool = False     # K_GROUPED: the groups' K read on the device (maps by kernels/group_maps.cuh)

    def __post_init__(self):
        object.__setattr__(self, "layout", Layout(self.layout))   # an int from a JSON record, say
        # The kernel's static_asserts, as errors that name the field, before any compiler runs.
        problems = []
        if self.block_m not in (64, 128, 256):
            problems.append(f"block_m must be 64, 128 or 256, got {self.block_m}")
        if not valid_block_n(self.block_n):
            problems.append(f"block_n must be a multiple of 16 in 16..256 spanning at most two scale blocks of B "
                            f"(block_n <= 128 + gcd(block_n, 128)), got {self.block_n}")
        if self.pipelined and self.block_n > MAX_PIPELINED_BLOCK_N:
            problems.append(f"pipelined needs block_n <= {MAX_PIPELINED_BLOCK_N}, got {self.block_n}")
        if self.block_m == 256 and (self.pipelined or self.split_k > 1 or self.layout != Layout.DENSE):
            problems.append("block_m = 256 runs dense GEMMs only, unpipelined and unsplit")
        if self.accumulate and not self.out_fp32:
            problems.append("accumulate needs out_fp32")
        if self.out_fp32 and self.layout == Layout.MASKED:
            problems.append("out_fp32 runs every layout but masked")
        if self.row_scales_b and (self.scale_loader_warp or self.layout not in (Layout.DENSE, Layout.K_GROUPED)):
            problems.append("row_scales_b runs dense and K-grouped GEMMs, without the scale loader warp")
        if self.layout == Layout.K_GROUPED and not ((self.row_scales_b or self.bf16_operands) and self.split_k == 1
                                                    and self.stage_k_blocks == 1 and self.block_m != 256):
            problems.append("K_GROUPED needs row_scales_b (FP8) or bf16_operands, split_k = 1, stage_k_blocks = 1 and "
                            "block_m 64 or 128")
        if self.bf16_operands and (self.block_m == 256 or (self.split_k > 1 and self.layout != Layout.DENSE)
                                   or self.stage_k_blocks > 1 or self.pipelined or self.scale_loader_warp
                                   or self.row_scales_b):
            problems.append("bf16_operands runs on 64- or 128-row tiles, split over K only when dense, one K block a "
                            "stage, without the FP8 options (pipelined, scale_loader_warp, row_scales_b)")
        if (self.a_mn_major or self.b_mn_major) and not (
                self.bf16_operands and self.layout in (Layout.DENSE, Layout.K_GROUPED)
                and (not self.b_mn_major or self.block_n % 64 == 0)):
            problems.append("a_mn_major and b_mn_major need bf16_operands, a dense or K_GROUPED layout and, for B, "
                            "block_n a multiple of 64")
        if self.device_sizes and self.layout != Layout.K_GROUPED:
            problems.append("device_sizes runs K_GROUPED GEMMs only")
        chunks = self.block_n // store_chunk_cols(self.block_n, self.out_bytes) if valid_block_n(self.block_n) else 0
        staging_ok = self.out_buffers == 0 or (0 < self.out_buffers < chunks and chunks % self.out_buffers == 0)
        if not staging_ok:
            problems.append(f"out_buffers must be 0 or fewer than the tile's {chunks} store chunks, dividing them; "
                            f"got {self.out_buffers}")
        if self.stage_k_blocks > 1 and self.shape_k % BLOCK_K:
            problems.append(f"stage_k_blocks > 1 needs K % {BLOCK_K} == 0, got K = {self.shape_k}")
        if min(self.shape_n, self.shape_k, self.num_stages, self.stage_k_blocks, self.num_groups,
               self.raster_group, self.split_k) < 1:
            problems.append("every size must be >= 1")
        if staging_ok and self.smem_bytes > SMEM_CAPACITY:   # (its size needs a valid D staging)
            problems.append(f"{self.smem_bytes} bytes of shared memory, more than the {SMEM_CAPACITY} a block can "
                            f"have: fewer num_stages or smaller tiles")
        if problems:
            raise ValueError("invalid KernelConfig: " + "; ".join(problems))

    @property
    def num_math_warpgroups(self) -> int:
        return 1 if self.block_m == 64 else 2

    @property
    def num_threads(self) -> int:
        return 128 * (1 + self.num_math_warpgroups)

    @property
    def block_k(self) -> int:
        """Elements of K a K block (one 128-byte row of shared memory) holds."""
        return BF16_BLOCK_K if self.bf16_operands else BLOCK_K

    @property
    def num_k_blocks(self) -> int:
        return ceil_div(self.shape_k, self.block_k)

    @property
    def out_bytes(self) -> int:
        return 4 if self.out_fp32 else 2

    @property
    def smem_bytes(self) -> int:
        return smem_bytes(self.block_m, self.block_n, self.num_stages, self.stage_k_blocks, self.out_bytes,
                          self.row_scales_b, self.bf16_operands, self.out_buffers)

    def split_k_workspace_floats(self, grid: int) -> int:
        """fp32 partial results a split-K launch on `grid` blocks may write: at most one tile per
        block, since only the last wave's tiles are split (0 without split-K)."""
        return grid * self.block_m * self.block_n if self.split_k > 1 else 0

    def template_args(self) -> str:
        """The arguments of deep_gemm::GemmConfig<...>, in field order."""
        return ", ".join(str(v).lower() if isinstance(v, bool) else str(int(v))
                         for v in (getattr(self, f.name) for f in fields(self)))

    @property
    def name(self) -> str:
        """A label for logs and cache folders."""
        flags = "".join(tag for tag, on in (("_p", self.pipelined), ("_sb", self.stream_b),
                                            ("_sl", self.scale_loader_warp), ("_rb", self.row_scales_b),
                                            ("_f32", self.out_fp32), ("_acc", self.accumulate),
                                            ("_bf16", self.bf16_operands), ("_amn", self.a_mn_major),
                                            ("_bmn", self.b_mn_major), ("_dev", self.device_sizes)) if on)
        return (f"gemm_{self.layout.name.lower()}_n{self.shape_n}_k{self.shape_k}_g{self.num_groups}"
                f"_bm{self.block_m}_bn{self.block_n}_s{self.num_stages}"
                + (f"x{self.stage_k_blocks}" if self.stage_k_blocks > 1 else "")
                + f"_r{self.raster_group}_sk{self.split_k}{flags}"
                + (f"_ob{self.out_buffers}" if self.out_buffers else ""))


# The kernel's one parameter, `deep_gemm::GemmParams`, field by field: tensor maps (128 bytes,
# 64-byte aligned), pointers, int32s. The launch packs it from this list (runtime/launch.py) and the
# generated source checks every offset against the C++ struct (jit/kernel_source.py).
MAP, PTR, I32 = "map", "ptr", "i32"
GEMM_PARAMS = (
    ("tma_a", MAP), ("tma_b", MAP), ("tma_sa", MAP), ("tma_out", MAP), ("tma_a_tail", MAP), ("tma_sa_tail", MAP),
    ("tma_sb", MAP), ("sa", PTR), ("sb", PTR), ("out", PTR),
    ("out_ld_bytes", I32), ("shape_m", I32), ("sa_rows", I32), ("sa_ld", I32), ("a_tail_rows", I32),
    ("group_info", PTR), ("workspace", PTR), ("tile_counters", PTR),
)
PARAM_SIZE_ALIGN = {MAP: (128, 64), PTR: (8, 8), I32: (4, 4)}


def param_layout(params=GEMM_PARAMS) -> tuple:
    """({name: byte offset}, total size) of a parameter struct laid out by C++'s rules; a field
    (name, kind, count) is an array of `count` elements."""
    offsets, end, align_max = {}, 0, 1
    for name, kind, *count in params:
        size, align = PARAM_SIZE_ALIGN[kind]
        end = ceil_div(end, align) * align
        offsets[name] = end
        end += size * (count[0] if count else 1)
        align_max = max(align_max, align)
    return offsets, ceil_div(end, align_max) * align_max


def k_grouped_params(num_groups: int) -> tuple:
    """`deep_gemm::KGroupedParams<G>`, the K-grouped kernel's second parameter: each group's tensor
    maps of A and B, its K blocks and its first row of the scale tensors."""
    return (("tma_a", MAP, num_groups), ("tma_b", MAP, num_groups), ("k_blocks", I32, num_groups),
            ("kb_offset", I32, num_groups))


# A kernel's parameters may take 32,764 bytes (CUDA 12.1 and later): GemmParams and, K-grouped, a
# group's 264 bytes each.
MAX_PARAM_BYTES = 32764
K_GROUPED_MAX_GROUPS = (MAX_PARAM_BYTES - param_layout()[1]) // (2 * 128 + 2 * 4) // 8 * 8
# K-grouped GEMMs with the groups' sizes on the device keep their maps in global memory; the kernel
# that writes them holds the sizes in shared memory (kernels/group_maps.cuh: kGroupMapsMaxGroups).
K_GROUPED_DEVICE_MAX_GROUPS = 1024

# `deep_gemm::KGroupedDeviceParams`, the second parameter of a K-grouped GEMM with sizes on the device:
# where the kernel of kernels/group_maps.cuh left the groups' maps and K blocks.
K_GROUPED_DEVICE_PARAMS = (("tma_a", PTR), ("tma_b", PTR), ("k_blocks", PTR))

# `deep_gemm::GroupMapsParams`, the parameter of kernels/group_maps.cuh (int64 fields as PTR: 8 bytes).
GROUP_MAPS_PARAMS = (
    ("map_a", MAP), ("map_b", MAP), ("maps_a", PTR), ("maps_b", PTR), ("k_blocks", PTR), ("out", PTR),
    ("k_sizes", PTR), ("a_base", PTR), ("b_base", PTR), ("a_bytes_per_k", PTR), ("b_bytes_per_k", PTR),
    ("k_capacity", PTR), ("out_group_floats", PTR), ("kb_capacity", I32), ("num_groups", I32),
    ("k_multiple", I32), ("block_k", I32),
)
