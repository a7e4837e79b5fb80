// The GEMM, D[m, n] (+)= sum_k A[m, k] B[n, k] sa[m, k / 128] sb[n / 128 or n, k / 128] (FP8) or
// sum_k A[m, k] B[n, k] (BF16), every layout: one persistent, warp-specialised kernel over a
// GemmConfig, in roles: Scheduler (work units), Producer (TMA into a ring of stages), Fp8Math
// (wgmma, promotion with both scales) or Bf16Math (wgmma straight into the accumulators), Epilogue
// (bf16 or fp32 stores, TMA reduce-add for D += A B, split-K). A GEMM kind is a set of
// GemmConfig options, each read with `if constexpr` in the piece it concerns (docs/design.md).
#pragma once
#include "ptx.cuh"
#include "scheduler.cuh"
#include "wgmma.cuh"

namespace deep_gemm {

// Every compile-time choice of a kernel; deep_gemm/config.py's KernelConfig lists the same fields
// in the same order. M is always a run-time value.
template <int kShapeN_, int kShapeK_, int kBlockM_, int kBlockN_, int kNumStages_, int kStageKBlocks_, int kLayout_,
          int kNumGroups_, int kRasterGroup_, int kSplitK_, bool kPipelined_, bool kStreamB_, bool kScaleLoaderWarp_,
          bool kRowScalesB_, bool kOutFp32_, bool kAccumulate_, bool kBf16Operands_, bool kAMnMajor_, bool kBMnMajor_,
          int kOutBuffers_, bool kDeviceSizes_>
struct GemmConfig {
    static constexpr int kShapeN = kShapeN_, kShapeK = kShapeK_, kBlockM = kBlockM_, kBlockN = kBlockN_;
    // A K block is one 128-byte swizzled row of shared memory: kBlockK is in *bytes* (every tile and
    // stage size below stays a byte count); kBlockKElems elements of K (128 fp8, 64 bf16).
    static constexpr int kBlockK = 128;
    static constexpr bool kBf16Operands = kBf16Operands_;  // bf16 A and B: no scales, no promotion
    static constexpr int kElemBytes = kBf16Operands ? 2 : 1;
    static constexpr int kBlockKElems = kBlockK / kElemBytes;
    // A bf16 operand held MN-major ([K][M or N], a transposed view) lands as boxes of 64 columns,
    // each a K block's rows of 128 bytes; wgmma reads it through its transpose bit.
    static constexpr bool kAMnMajor = kAMnMajor_, kBMnMajor = kBMnMajor_;
    static constexpr int kMnBoxBytes = kBlockKElems * kBlockK;
    static constexpr int kNumStages = kNumStages_;
    static constexpr int kStageKBlocks = kStageKBlocks_;  // K blocks a stage, one TMA load per operand
    static constexpr int kLayout = kLayout_, kNumGroups = kNumGroups_;
    // K-grouped with the groups' sizes on the device: their maps and K blocks as a previous kernel
    // wrote them (KGroupedDeviceParams), for CUDA graphs whose routing changes between replays.
    static constexpr bool kDeviceSizes = kDeviceSizes_;
    static constexpr int kRasterGroup = kRasterGroup_;  // M blocks of a rasterisation band
    static constexpr int kSplitK = kSplitK_;            // > 1: the last wave's tiles may be split over K
    static constexpr bool kPipelined = kPipelined_;     // block k + 1's wgmmas run while block k is promoted
    static constexpr bool kStreamB = kStreamB_;         // B is read once: its L2 lines are evicted first
    static constexpr bool kScaleLoaderWarp = kScaleLoaderWarp_;  // A's scales copied by a warp, not TMA
    static constexpr bool kRowScalesB = kRowScalesB_;   // B scaled per row and 128-K block (not 128 x 128)
    static constexpr bool kOutFp32 = kOutFp32_;         // D is fp32 (else bf16)
    static constexpr bool kAccumulate = kAccumulate_;   // D += A B (fp32, by TMA reduce-add)
    // BLOCK_M = 256: each math warpgroup covers two 64-row slices ("waves") on one B tile.
    static constexpr int kNumMathWarpgroups = kBlockM == 64 ? 1 : 2;
    static constexpr int kMWaves = kBlockM / (64 * kNumMathWarpgroups);
    static constexpr int kNumMathThreads = 128 * kNumMathWarpgroups;
    static constexpr int kNumThreads = 128 + kNumMathThreads;
    static constexpr int kNumKBlocks = (kShapeK + kBlockKElems - 1) / kBlockKElems;
    static constexpr int kAccRegs = kBlockN / 2;  // fp32 accumulators per thread and wave
    static constexpr int kTileBytesA = kBlockM * kBlockK, kTileBytesB = kBlockN * kBlockK;  // bytes, one K block
    static constexpr int kStageBytesA = kStageKBlocks * kTileBytesA, kStageBytesB = kStageKBlocks * kTileBytesB;
    static constexpr int kStageScales = kBf16Operands ? 0 : kStageKBlocks * kBlockM;  // floats (bf16: none)
    // B's per-row scales of a stage, rounded to 128 bytes (a TMA destination's alignment).
    static constexpr int kStageScalesB = kRowScalesB ? (kStageKBlocks * kBlockN + 31) / 32 * 32 : 0;
    static constexpr int kOutBytes = kOutFp32 ? 4 : 2;
    // Columns of one TMA store: up to a 128-byte row, dividing BLOCK_N.
    static constexpr int kStoreChunkCols = kBlockN % (128 / kOutBytes) == 0 ? 128 / kOutBytes
                                           : kBlockN % (64 / kOutBytes) == 0 ? 64 / kOutBytes : 32 / kOutBytes;
    static constexpr int kTileBytesOut = kBlockM * kBlockN * kOutBytes;
    // D's staging in shared memory: the whole tile (0), or this many buffers of one store chunk for
    // each warpgroup's 64 rows, taken in turn (fewer bytes: room for another stage or a wider tile).
    static constexpr int kOutBuffers = kOutBuffers_;
    static constexpr int kNumStoreChunks = kBlockN / kStoreChunkCols;
    static constexpr int kOutBufferBytes = kNumMathWarpgroups * 64 * kStoreChunkCols * kOutBytes;
    static constexpr int kOutStageBytes = kOutBuffers == 0 ? kTileBytesOut : kOutBuffers * kOutBufferBytes;
    static_assert(kOutBuffers == 0 || (kOutBuffers < kNumStoreChunks && kNumStoreChunks % kOutBuffers == 0),
                  "D's buffers must be fewer than a tile's store chunks and divide them");
    // A tile spans at most two 128-column scale blocks of B; when BLOCK_N divides 128, one.
    static constexpr bool kOneScaleB = 128 % kBlockN == 0;
    static constexpr int kNumScaleBRows = (kShapeN + 127) / 128;
    // The loader warp's share: BLOCK_M floats in 16-byte cp.async pieces, at most two per lane.
    static constexpr int kScalePieces = kBlockM / 4;
    static constexpr int kScaleLanes = kScalePieces < 32 ? kScalePieces : 32;
    // Full: the TMA thread's arrive (with its bytes) and each loader lane's; empty: one arrive per
    // math warp, or per math thread where each reads a stage's scales itself (KLoop::release).
    static constexpr bool kEveryThreadReleases = kScaleLoaderWarp || kRowScalesB;
    static constexpr uint32_t kFullArrivals = kScaleLoaderWarp ? 1 + kScaleLanes : 1;
    static constexpr uint32_t kEmptyArrivals = kEveryThreadReleases ? kNumMathThreads : kNumMathWarpgroups * 4;
    // Registers: the producer needs few; the math threads hold the accumulators and one or two tiles.
    static constexpr uint32_t kProducerRegs = 40;
    static constexpr uint32_t kMathRegs = kNumMathWarpgroups == 2 ? 232 : 248;
    static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 256, "BLOCK_M must be 64, 128 or 256");
    static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "BLOCK_N must be a multiple of 16 up to 256");
    static_assert(kBlockN <= 128 + (kBlockN & -kBlockN), "a tile may span at most two scale blocks of B");
    static_assert(!kPipelined || kBlockN <= 128, "three fp32 register tiles fit up to BLOCK_N = 128");
    static_assert(kMWaves == 1 || (!kPipelined && kSplitK == 1 && kLayout == kDense),
                  "BLOCK_M = 256 runs dense GEMMs only, unpipelined and unsplit");
    static_assert(kStageKBlocks == 1 || kShapeK % kBlockK == 0, "several K blocks a stage need K % 128 == 0");
    static_assert(!kAccumulate || kOutFp32, "D += A B accumulates in fp32");
    static_assert(!kOutFp32 || kLayout != kMasked, "fp32 D: every layout but masked");
    static_assert(!kRowScalesB || (!kScaleLoaderWarp && (kLayout == kDense || kLayout == kKGrouped)),
                  "per-row B scales: dense or K-grouped, by TMA (A's scales with them)");
    static_assert(kLayout != kKGrouped ||
                      ((kRowScalesB || kBf16Operands) && kSplitK == 1 && kStageKBlocks == 1 && kMWaves == 1),
                  "K-grouped GEMMs: FP8 with B scaled per row, or bf16; unsplit, one K block a stage, 64 or 128 "
                  "rows a tile");
    static_assert(!kDeviceSizes || kLayout == kKGrouped, "sizes on the device: K-grouped GEMMs only");
    static_assert(!kBf16Operands || (kMWaves == 1 && (kSplitK == 1 || kLayout == kDense) && kStageKBlocks == 1 &&
                                     !kPipelined && !kScaleLoaderWarp && !kRowScalesB),
                  "bf16 operands: 64 or 128 rows a tile, split over K only when dense, one K block a stage, no FP8 "
                  "options (pipelined, scale loader warp, per-row B scales)");
    static_assert((!kAMnMajor && !kBMnMajor) || (kBf16Operands && (kLayout == kDense || kLayout == kKGrouped) &&
                                                 (!kBMnMajor || kBlockN % 64 == 0)),
                  "MN-major operands: bf16, dense or K-grouped, B in tiles of whole 64-column boxes");
};

// The kernel's one parameter; deep_gemm/config.py's GEMM_PARAMS describes it (the generated source
// checks every offset). Tensor maps are passed by value (grid constants).
struct GemmParams {
    TmaDescriptor tma_a, tma_b, tma_sa, tma_out;  // A, B, A's scales, D
    TmaDescriptor tma_a_tail, tma_sa_tail;        // A and its scales for a partial last M block
    TmaDescriptor tma_sb;                         // B's per-row scales, [K / 128][N]
    const float* sa;                              // A's scales (read by the loader warp)
    const float* sb;                              // B's block scales, [G][N / 128][K / 128]
    uint8_t* out;                                 // D, for stores that TMA cannot make
    int32_t out_ld_bytes, shape_m, sa_rows, sa_ld, a_tail_rows;
    const int32_t* group_info;                    // m_indices (contiguous) or masked_m (masked)
    float* workspace;                             // split-K: one fp32 partial tile per block
    int32_t* tile_counters;                       // split-K: arrivals per split tile
};

// The K-grouped kernel's second parameter: each group's own tensor maps of A [M, K_g] and B
// [N, K_g] (their row strides differ), its K blocks, and where its blocks start in the scales'
// rows [sum of K blocks][M or N]. k_blocks and kb_offset are adjacent: the scheduler reads both
// through one pointer.
template <int kGroups>
struct KGroupedParams {
    TmaDescriptor tma_a[kGroups], tma_b[kGroups];
    int32_t k_blocks[kGroups], kb_offset[kGroups];
};

// The same, for group sizes held on the device (CUDA-graph safe): the maps and [K blocks][first
// scale rows] in global memory, as kernels/group_maps.cuh writes them just before this kernel
// runs; a group with K blocks < 0 (invalid sizes) is skipped, its D left as that kernel filled it.
struct KGroupedDeviceParams {
    const TmaDescriptor* tma_a;
    const TmaDescriptor* tma_b;
    const int32_t* k_blocks;  // [2][G]: K blocks, then first scale rows
};

// What the scheduler reads per group: m_indices or masked_m in global memory, or the K-grouped
// parameter's K blocks and offsets.
template <class C, class Groups>
DG_DEVICE const int32_t* group_info(const GemmParams& p, const Groups* groups) {
    if constexpr (C::kLayout == kKGrouped) return groups->k_blocks;
    return p.group_info;
}

// K blocks [begin, end) of a unit of work (all of K for a whole tile).
template <class C>
DG_DEVICE int32_t k_block_begin(const Tile& t) { return C::kSplitK == 1 ? 0 : t.split * C::kNumKBlocks / t.num_splits; }
template <class C>
DG_DEVICE int32_t k_block_end(const Tile& t) {
    if constexpr (C::kLayout == kKGrouped) return t.k_blocks;
    return C::kSplitK == 1 ? C::kNumKBlocks : (t.split + 1) * C::kNumKBlocks / t.num_splits;
}

// A dense M's partial last block loads A and its scales through boxes of p.a_tail_rows rows (full
// boxes zero-filled past M cost time); rows past them only feed output rows that are not stored.
template <class C>
DG_DEVICE bool is_tail_tile(const Tile& t, const GemmParams& p) {
    return C::kLayout == kDense && p.a_tail_rows > 0 && t.row_begin + C::kBlockM > p.shape_m;
}

// Shared memory: [D tile][A ring][B ring][A-scale ring][B-scale ring][full barriers][empty
// barriers][split-K flag]. Stage addresses are computed: a run-time index into a pointer array
// would be local memory.
template <class C>
struct SharedStorage {
    uint8_t *out, *ring_a, *ring_b;  // out: chunks (whole tile) or buffers of [rows][kStoreChunkCols] of D
    float *ring_sa, *ring_sb;
    uint64_t *full, *empty;
    int32_t* last_unit;  // split-K: thread 0's verdict, read by every math thread
    DG_DEVICE explicit SharedStorage(uint8_t* raw) {
        // The 128-byte swizzle works on absolute address bits: 1024-byte alignment.
        out = reinterpret_cast<uint8_t*>((reinterpret_cast<uint64_t>(raw) + 1023) & ~uint64_t(1023));
        ring_a = out + C::kOutStageBytes;
        ring_b = ring_a + C::kNumStages * C::kStageBytesA;
        ring_sa = reinterpret_cast<float*>(ring_b + C::kNumStages * C::kStageBytesB);
        ring_sb = ring_sa + C::kNumStages * C::kStageScales;
        full = reinterpret_cast<uint64_t*>(ring_sb + C::kNumStages * C::kStageScalesB);
        empty = full + C::kNumStages;
        last_unit = reinterpret_cast<int32_t*>(empty + C::kNumStages);
    }
    DG_DEVICE uint8_t* a(int32_t stage) const { return ring_a + stage * C::kStageBytesA; }
    DG_DEVICE uint8_t* b(int32_t stage) const { return ring_b + stage * C::kStageBytesB; }
    DG_DEVICE float* sa(int32_t stage) const { return ring_sa + stage * C::kStageScales; }
    DG_DEVICE float* sb(int32_t stage) const { return ring_sb + stage * C::kStageScalesB; }
};

// Position in the ring: stage, the parity of its fill and (math role) the K block in the stage. A
// tile's K blocks fill its stages from slot 0; the next tile starts a new stage.
template <class C>
struct RingCursor {
    int32_t stage = 0;
    uint32_t phase = 0;
    int32_t slot = 0;
    DG_DEVICE void advance() {
        if (++stage == C::kNumStages) stage = 0, phase ^= 1;
    }
    DG_DEVICE void advance_k_block() {
        if (C::kStageKBlocks == 1) {  // (touching `slot` here changed ptxas' schedule of the main loop)
            advance();
        } else if (++slot == C::kStageKBlocks) {
            slot = 0, advance();
        }
    }
    DG_DEVICE void end_tile() {
        if (C::kStageKBlocks > 1 && slot != 0) slot = 0, advance();
    }
};

// ---- producer -------------------------------------------------------------------------------------
template <class C>
struct Producer {
    // Bytes a stage's TMA loads bring (A's box of rows_a rows, B, A's scales in 16-byte boxes).
    static DG_DEVICE uint32_t stage_bytes(int32_t rows_a) {
        constexpr bool kScalesByTma = !C::kScaleLoaderWarp && !C::kBf16Operands;
        return C::kStageKBlocks * (rows_a * C::kBlockK + C::kTileBytesB + (kScalesByTma ? (rows_a + 3) / 4 * 16 : 0) +
                                   (C::kRowScalesB ? C::kBlockN * 4 : 0));
    }
    // One stage's K blocks of a K-major operand from `row` on: a 2-D box, or a 3-D box over the view
    // [K / 128][rows][128] with several blocks a stage; kHinted: under the L2 cache policy `policy`.
    template <bool kHinted = false>
    static DG_DEVICE void load_k_blocks(void* dst, const TmaDescriptor* map, uint64_t* bar, int32_t kb, int32_t row,
                                        uint64_t policy = 0) {
        if (C::kStageKBlocks == 1) {
            if (kHinted) ptx::tma_load_2d_hinted(dst, map, bar, kb * C::kBlockKElems, row, policy);
            else ptx::tma_load_2d(dst, map, bar, kb * C::kBlockKElems, row);
        } else {
            if (kHinted) ptx::tma_load_3d_hinted(dst, map, bar, 0, row, kb, policy);
            else ptx::tma_load_3d(dst, map, bar, 0, row, kb);
        }
    }
    // One K block of an MN-major operand from column `col` on: kCols / 64 boxes side by side.
    template <int kCols, bool kHinted = false>
    static DG_DEVICE void load_mn_boxes(uint8_t* dst, const TmaDescriptor* map, uint64_t* bar, int32_t kb, int32_t col,
                                        uint64_t policy = 0) {
#pragma unroll
        for (int i = 0; i < kCols / 64; ++i) {
            uint8_t* box = dst + i * C::kMnBoxBytes;
            if (kHinted) ptx::tma_load_2d_hinted(box, map, bar, col + i * 64, kb * C::kBlockKElems, policy);
            else ptx::tma_load_2d(box, map, bar, col + i * 64, kb * C::kBlockKElems);
        }
    }
    // The TMA thread: for every unit of work, every stage of its K blocks.
    template <class Groups>
    static DG_DEVICE void load_tiles(const GemmParams& p, const Groups* groups, SharedStorage<C>& smem) {
        Scheduler<C> scheduler(p.shape_m, group_info<C>(p, groups));
        RingCursor<C> ring;
        Tile tile;
        const uint64_t b_policy = C::kStreamB ? ptx::l2_evict_first_policy() : 0;
        constexpr bool kGrouped = C::kLayout == kKGrouped;
        int32_t acquired_group = -1;
        while (scheduler.next(tile)) {
            const bool tail = is_tail_tile<C>(tile, p);
            const TmaDescriptor* map_a = kGrouped ? &groups->tma_a[tile.group] : tail ? &p.tma_a_tail : &p.tma_a;
            const TmaDescriptor* map_b = kGrouped ? &groups->tma_b[tile.group] : &p.tma_b;
            // Maps another grid wrote (none for a group without K): read fresh.
            if (C::kDeviceSizes && tile.group != acquired_group && tile.k_blocks > 0) {
                ptx::tensormap_acquire(map_a);
                ptx::tensormap_acquire(map_b);
                acquired_group = tile.group;
            }
            const TmaDescriptor* map_sa = tail ? &p.tma_sa_tail : &p.tma_sa;
            const uint32_t bytes = stage_bytes(tail ? p.a_tail_rows : C::kBlockM);
            const int32_t n0 = tile.n_block * C::kBlockN;
            const int32_t b_row = kGrouped ? n0 : tile.group * C::kShapeN + n0;
            const int32_t sa_row = C::kLayout == kMasked ? tile.m_block * C::kBlockM : tile.row_begin;
            const int32_t sa_kb_base = C::kLayout == kMasked ? tile.group * C::kNumKBlocks : kGrouped ? tile.kb_offset : 0;
            // Not unrolled: the producer runs on few registers and gains nothing from it.
            const int32_t kb_end = ptx::opaque(k_block_end<C>(tile));
#pragma unroll 1
            for (int32_t kb = k_block_begin<C>(tile); kb < kb_end; kb += C::kStageKBlocks) {
                // First pass over the ring: the parity trick makes this wait return at once.
                ptx::mbarrier_wait(&smem.empty[ring.stage], ring.phase ^ 1);
                uint64_t* full = &smem.full[ring.stage];
                ptx::mbarrier_arrive_expect_tx(full, bytes);
                uint8_t* a = smem.a(ring.stage);
                if constexpr (C::kAMnMajor) load_mn_boxes<C::kBlockM>(a, map_a, full, kb, tile.row_begin);
                else load_k_blocks(a, map_a, full, kb, tile.row_begin);
                if (!C::kScaleLoaderWarp && !C::kBf16Operands)
                    ptx::tma_load_2d(smem.sa(ring.stage), map_sa, full, sa_row, sa_kb_base + kb);
                if (C::kRowScalesB) ptx::tma_load_2d(smem.sb(ring.stage), &p.tma_sb, full, n0, sa_kb_base + kb);
                uint8_t* b = smem.b(ring.stage);
                if constexpr (C::kBMnMajor) load_mn_boxes<C::kBlockN, C::kStreamB>(b, map_b, full, kb, b_row, b_policy);
                else load_k_blocks<C::kStreamB>(b, map_b, full, kb, b_row, b_policy);
                ring.advance();
            }
        }
    }
    // The loader warp: A's scales by cp.async, sparing the TMA thread a third operation per stage
    // (its pace on the narrowest tiles). p.sa: [groups x K blocks][p.sa_ld] floats, zeros from
    // p.sa_rows on (as a TMA box).
    static DG_DEVICE void load_a_scales(const GemmParams& p, SharedStorage<C>& smem) {
        const int32_t lane = ptx::lane_index();
        if (lane >= C::kScaleLanes) return;
        Scheduler<C> scheduler(p.shape_m, p.group_info);  // never K-grouped (no loader warp there)
        RingCursor<C> ring;
        Tile tile;
        while (scheduler.next(tile)) {
            const int32_t row0 = C::kLayout == kMasked ? tile.m_block * C::kBlockM : tile.row_begin;
            const float* kb_row = p.sa + int64_t(C::kLayout == kMasked ? tile.group * C::kNumKBlocks : 0) * p.sa_ld;
            const int32_t kb_end = ptx::opaque(k_block_end<C>(tile));
#pragma unroll 1
            for (int32_t kb = k_block_begin<C>(tile); kb < kb_end; kb += C::kStageKBlocks) {
                ptx::mbarrier_wait(&smem.empty[ring.stage], ring.phase ^ 1);
#pragma unroll
                for (int32_t slot = 0; slot < C::kStageKBlocks; ++slot) {
                    // A stage's blocks past K (an odd number of K blocks) read as zeros.
                    const bool in_k = C::kStageKBlocks == 1 || kb + slot < C::kNumKBlocks;
#pragma unroll
                    for (int32_t piece = lane; piece < C::kScalePieces; piece += C::kScaleLanes) {
                        const int32_t row = row0 + piece * 4;
                        const int32_t bytes = in_k ? max(0, min(16, (p.sa_rows - row) * 4)) : 0;
                        const float* src = kb_row + (in_k ? int64_t(kb + slot) * p.sa_ld : 0) + (bytes > 0 ? row : 0);
                        ptx::cp_async_16(ptx::smem_addr(smem.sa(ring.stage) + slot * C::kBlockM + piece * 4), src,
                                         bytes);
                    }
                }
                ptx::cp_async_mbarrier_arrive_noinc(&smem.full[ring.stage]);
                ring.advance();
            }
        }
    }
};

// ---- math -----------------------------------------------------------------------------------------
// FP8 operands, A scaled per row and 128-K block, B per 128 x 128 block (its scales read from
// global memory a chunk ahead) or per row and 128-K block (kRowScalesB: from the stage, as TMA
// lands them). Fp8Math holds what lives across tiles (this thread's addresses, the accumulators);
// Fp8Math::KLoop one unit's main loop.
template <class C>
struct Fp8Math {
    // Where one K block is in the ring, and the scales its promotion applies (A's rows r / r + 8,
    // B's scale blocks 0 / 1); retiring the stage's last block frees the stage.
    struct BlockScales {
        float sa0, sa1, sb0, sb1;
        int32_t stage, slot;
        bool last_of_stage;
    };
    // Per-row B scales are read from the stage while promoting, so it is released after.
    static constexpr bool kReleaseBeforePromote = !C::kRowScalesB;
    // B's scale rows of a tile: columns from `split` on take `second`'s scales.
    struct BScaleRows {
        const float *first, *second;
        int32_t split;
    };
    struct ScalePair {  // B's scales of blocks 0 and 1 of a tile, for one lane's K block
        float b0 = 0.f, b1 = 0.f;
    };
    // B's scales come in chunks of 32 K blocks (lane i: block chunk + i), loaded a chunk ahead and
    // shuffled out per block: a scale loaded just before its use stalled the wgmma issue on L2.
    static constexpr bool kManyChunks = !C::kRowScalesB && C::kNumKBlocks > 32;
    const float* sb;
    SharedStorage<C>& smem;
    RingCursor<C>& ring;
    uint32_t lane;
    uint32_t desc_a_ring, desc_b_ring, sa_ring_addr;  // stage 0's wgmma descriptors and this row's scale
    uint32_t sb_ring_addr;                            // kRowScalesB: stage 0's scale of this thread's column 0
    float acc[C::kMWaves][C::kAccRegs];
    float part[C::kAccRegs];
    float part_next[C::kAccRegs];  // pipelined promotion's second tile (free otherwise)
    DG_DEVICE Fp8Math(const float* sb_, SharedStorage<C>& smem_, RingCursor<C>& ring_)
        : sb(sb_), smem(smem_), ring(ring_) {
        const uint32_t wg = threadIdx.x / 128 - 1, warp = (threadIdx.x % 128) / 32;
        lane = threadIdx.x % 32;
        // Rows r and r + 8 are this thread's (wgmma's layout); warp_index() keeps descriptors uniform.
        const uint32_t r = wg * 64 + warp * 16 + lane / 4;
        const uint32_t wg_uniform = ptx::warp_index() / 4 - 1;
        desc_a_ring = ptx::smem_desc_low(ptx::smem_addr(smem.a(0) + wg_uniform * 64 * C::kBlockK));
        desc_b_ring = ptx::smem_desc_low(ptx::smem_addr(smem.b(0)));
        sa_ring_addr = ptx::smem_addr(smem.sa(0) + r);
        sb_ring_addr = ptx::smem_addr(smem.sb(0) + (lane % 4) * 2);
    }
    DG_DEVICE BScaleRows b_scale_rows(const Tile& t) const {
        const int32_t n0 = t.n_block * C::kBlockN;
        const int32_t sb_row = min(n0 / 128, C::kNumScaleBRows - 1);
        BScaleRows rows;
        rows.first = sb + (int64_t(t.group) * C::kNumScaleBRows + sb_row) * C::kNumKBlocks;
        rows.split = C::kOneScaleB ? C::kBlockN : min(128 - n0 % 128, C::kBlockN);
        rows.second = rows.split < C::kBlockN && sb_row + 1 < C::kNumScaleBRows ? rows.first + C::kNumKBlocks
                                                                               : rows.first;
        return rows;
    }
    // This lane's K block in chunk c of [begin, end), clamped into it (an empty share: begin).
    DG_DEVICE int32_t chunk_kb(int32_t begin, int32_t end, int32_t c) const {
        return max(begin, min(begin + c * 32 + int32_t(lane), end - 1));
    }
    static DG_DEVICE ScalePair load_scales(const BScaleRows& rows, int32_t kb) {
        ScalePair s;
        s.b0 = ptx::ldg_float(rows.first + kb);
        s.b1 = C::kOneScaleB ? s.b0 : ptx::ldg_float(rows.second + kb);
        return s;
    }
    DG_DEVICE ScalePair first_chunk(const Tile& t) const {
        if constexpr (C::kRowScalesB) return ScalePair();
        return load_scales(b_scale_rows(t), chunk_kb(k_block_begin<C>(t), k_block_end<C>(t), 0));
    }
    // One unit's main loop into `acc`. kWholeTile: all of K, compile-time bounds (run-time ones were slower).
    template <bool kWholeTile>
    DG_DEVICE void run(const Tile& tile, const ScalePair& first, const GemmParams& p) {
        KLoop loop(*this, tile, first, p, kWholeTile);
#pragma unroll
        for (int w = 0; w < C::kMWaves; ++w)
#pragma unroll
            for (int i = 0; i < C::kAccRegs; ++i) acc[w][i] = 0.f;
        if constexpr (C::kPipelined) {
            loop.pipelined();
        } else if constexpr (C::kMWaves == 1) {
            loop.serial();
        } else {
            loop.two_waves();
        }
    }
    struct KLoop {
        Fp8Math& m;
        const BScaleRows rows;
        const int32_t kb_begin, kb_end;
        uint32_t a_slot_desc, sa_slot_bytes;
        ScalePair chunk, next_chunk;
        DG_DEVICE KLoop(Fp8Math& math, const Tile& tile, const ScalePair& first, const GemmParams& p, bool whole)
            : m(math),
              rows(math.b_scale_rows(tile)),
              kb_begin(whole ? 0 : k_block_begin<C>(tile)),
              kb_end(whole ? kNumKBlocksHidden() : k_block_end<C>(tile)),
              chunk(first) {
            // A stage's slots of A (and of its scales by TMA) are its box's rows apart.
            const bool tail = C::kStageKBlocks > 1 && is_tail_tile<C>(tile, p);
            const uint32_t a_slot_rows = tail ? p.a_tail_rows : C::kBlockM;
            a_slot_desc = a_slot_rows * C::kBlockK >> 4;
            sa_slot_bytes = (C::kScaleLoaderWarp ? C::kBlockM : a_slot_rows) * 4;
            if (kManyChunks) next_chunk = load_scales(rows, m.chunk_kb(kb_begin, kb_end, 1));
        }
        // A compile-time odd count made ptxas serialise the pipelined loop's wgmmas (C7514).
        static DG_DEVICE int32_t kNumKBlocksHidden() {
            return C::kPipelined && C::kNumKBlocks % 2 == 1 ? ptx::opaque(C::kNumKBlocks) : C::kNumKBlocks;
        }
        // Waits for K block kb's stage, reads its scales and issues its 4 wgmmas into `tile`.
        DG_DEVICE void issue(float (&tile)[C::kAccRegs], int32_t kb, BlockScales& scales) {
            const int32_t step = kb - kb_begin;
            if (kManyChunks && step % 32 == 0 && step > 0) {  // a new chunk: rotate, load the one after
                chunk = next_chunk;
                next_chunk = load_scales(rows, m.chunk_kb(kb_begin, kb_end, step / 32 + 1));
            }
            if constexpr (!C::kRowScalesB) {
                scales.sb0 = __shfl_sync(0xffffffffu, chunk.b0, step % 32);
                scales.sb1 = C::kOneScaleB ? scales.sb0 : __shfl_sync(0xffffffffu, chunk.b1, step % 32);
            }
            RingCursor<C>& ring = m.ring;
            if (C::kStageKBlocks == 1 || ring.slot == 0) ptx::mbarrier_wait(&m.smem.full[ring.stage], ring.phase);
            scales.stage = ring.stage;
            scales.slot = ring.slot;
            scales.last_of_stage = ring.slot == C::kStageKBlocks - 1 || kb == kb_end - 1;
            issue_slice(tile, scales, 0);
            ring.advance_k_block();
        }
        // A 64-row slice's wgmmas (wave 1: rows 128.. of a 256-row tile), after its A scales.
        DG_DEVICE void issue_slice(float (&tile)[C::kAccRegs], BlockScales& scales, int wave) {
            const int32_t stage = scales.stage, slot = scales.slot;
            const uint32_t sa_addr =
                m.sa_ring_addr + stage * (C::kStageScales * 4) + slot * sa_slot_bytes + wave * (128 * 4);
            scales.sa0 = ptx::lds_float(sa_addr);
            scales.sa1 = ptx::lds_float(sa_addr + 8 * 4);
            const uint32_t desc_a = m.desc_a_ring + stage * (C::kStageBytesA >> 4) + slot * a_slot_desc +
                                    wave * (128 * C::kBlockK >> 4);
            const uint32_t desc_b = m.desc_b_ring + stage * (C::kStageBytesB >> 4) + slot * (C::kTileBytesB >> 4);
            ptx::fence_registers(tile);
            ptx::wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < C::kBlockK / 32; ++kk)  // 32 fp8 = 32 bytes of the swizzled row
                ptx::WgmmaFp8<C::kBlockN>::mma(tile, ptx::smem_desc(desc_a + kk * (32 >> 4)),
                                               ptx::smem_desc(desc_b + kk * (32 >> 4)), kk > 0);
            ptx::wgmma_commit();
        }
        // With the loader warp (or B's per-row scales) every thread releases its own reads of the
        // scales that the next fill overwrites (racecheck did not follow __syncwarp + one lane's arrive).
        DG_DEVICE void release(int32_t stage) {
            if (C::kEveryThreadReleases || m.lane == 0) ptx::mbarrier_arrive(&m.smem.empty[stage]);
        }
        DG_DEVICE void promote(float (&into)[C::kAccRegs], const float (&tile)[C::kAccRegs], const BlockScales& s) {
            if constexpr (C::kRowScalesB) {
                // Column group i: this thread's columns 8 i + 2 (lane % 4) + {0, 1}, one scale each.
                const uint32_t sb_addr = m.sb_ring_addr + (s.stage * C::kStageScalesB + s.slot * C::kBlockN) * 4;
#pragma unroll
                for (int i = 0; i < C::kAccRegs / 4; ++i) {
                    const float2 b = ptx::lds_float2(sb_addr + i * 8 * 4);
                    into[4 * i + 0] += tile[4 * i + 0] * (s.sa0 * b.x);
                    into[4 * i + 1] += tile[4 * i + 1] * (s.sa0 * b.y);
                    into[4 * i + 2] += tile[4 * i + 2] * (s.sa1 * b.x);
                    into[4 * i + 3] += tile[4 * i + 3] * (s.sa1 * b.y);
                }
                return;
            }
            const float top0 = s.sa0 * s.sb0, top1 = s.sa0 * s.sb1;
            const float bottom0 = s.sa1 * s.sb0, bottom1 = s.sa1 * s.sb1;
#pragma unroll
            for (int i = 0; i < C::kAccRegs / 4; ++i) {
                // split is a multiple of 16, so a whole 8-column group shares one scale.
                const bool second = !C::kOneScaleB && i * 8 >= rows.split;
                const float top = second ? top1 : top0;
                const float bottom = second ? bottom1 : bottom0;
                into[4 * i + 0] += tile[4 * i + 0] * top;
                into[4 * i + 1] += tile[4 * i + 1] * top;
                into[4 * i + 2] += tile[4 * i + 2] * bottom;
                into[4 * i + 3] += tile[4 * i + 3] * bottom;
            }
        }
        // A block's wgmmas have completed: free its stage if it was the stage's last, promote it
        // (per-row B scales: after promoting, which reads them from the stage).
        DG_DEVICE void retire(float (&tile)[C::kAccRegs], const BlockScales& scales) {
            ptx::fence_registers(tile);
            if (kReleaseBeforePromote && scales.last_of_stage) release(scales.stage);
            promote(m.acc[0], tile, scales);
            if (!kReleaseBeforePromote && scales.last_of_stage) release(scales.stage);
        }
        // One block at a time: issue, wait, promote.
        DG_DEVICE void serial() {
            for (int32_t kb = kb_begin; kb < kb_end; ++kb) {
                BlockScales scales;
                issue(m.part, kb, scales);
                ptx::wgmma_wait<0>();
                retire(m.part, scales);
            }
        }
        // Block kb + 1's wgmmas run while block kb is promoted. Each half issues the next block or
        // waits for all and leaves, so ptxas keeps two groups in flight (other shapes: C7517,
        // C7514); folded into one half, it scheduled worse.
        DG_DEVICE void pipelined() {
            BlockScales scales0, scales1;
            int32_t kb = kb_begin;
            if (kb < kb_end) {
                issue(m.part, kb, scales0);
                while (true) {
                    if (kb + 1 < kb_end) {
                        issue(m.part_next, kb + 1, scales1);
                        ptx::wgmma_wait<1>();
                        retire(m.part, scales0);
                    } else {
                        ptx::wgmma_wait<0>();
                        retire(m.part, scales0);
                        break;
                    }
                    ++kb;
                    if (kb + 1 < kb_end) {
                        issue(m.part, kb + 1, scales0);
                        ptx::wgmma_wait<1>();
                        retire(m.part_next, scales1);
                    } else {
                        ptx::wgmma_wait<0>();
                        retire(m.part_next, scales1);
                        break;
                    }
                    ++kb;
                }
            }
        }
        // 256-row tiles: two waves per K block on one stage, released once both have read it.
        DG_DEVICE void two_waves() {
            for (int32_t kb = kb_begin; kb < kb_end; ++kb) {
                BlockScales scales;
                issue(m.part, kb, scales);
                ptx::wgmma_wait<0>();
                ptx::fence_registers(m.part);
                promote(m.acc[0], m.part, scales);
#pragma unroll
                for (int w = 1; w < C::kMWaves; ++w) {
                    issue_slice(m.part, scales, w);
                    ptx::wgmma_wait<0>();
                    ptx::fence_registers(m.part);
                    const bool release_now = w == C::kMWaves - 1 && scales.last_of_stage;
                    if (kReleaseBeforePromote && release_now) release(scales.stage);
                    promote(m.acc[w], m.part, scales);
                    if (!kReleaseBeforePromote && release_now) release(scales.stage);
                }
            }
        }
    };
};

// BF16 operands (kBf16Operands): no scales, no promotion: per K block (a 128-byte row,
// 64 bf16), 4 wgmmas of K = 16 accumulate straight into `acc` (an MN-major operand: 16 of its
// 128-byte rows each, its 64-column boxes kMnBoxBytes apart). Block kb + 1's wgmmas are issued
// before waiting for block kb's (wgmma_wait<1>), whose stage is then released: the tensor cores
// always have the next block queued. Same interface as Fp8Math for consume().
template <class C>
struct Bf16Math {
    static constexpr bool kManyChunks = false;  // no B scales to fetch: the next tile is looked up early
    struct ScalePair {};
    SharedStorage<C>& smem;
    RingCursor<C>& ring;
    uint32_t lane;
    uint32_t desc_a_ring, desc_b_ring;  // stage 0's wgmma descriptors (this warpgroup's 64 rows of A)
    float acc[C::kMWaves][C::kAccRegs];
    // Descriptor steps (16-byte units) from one wgmma's K = 16 to the next: 32 bytes of a row, or 16 rows.
    static constexpr uint32_t kStepA = (C::kAMnMajor ? 16 * C::kBlockK : 32) >> 4;
    static constexpr uint32_t kStepB = (C::kBMnMajor ? 16 * C::kBlockK : 32) >> 4;
    static constexpr uint32_t kLeadA = C::kAMnMajor ? C::kMnBoxBytes >> 4 : 1;  // next 64 columns (MN-major)
    static constexpr uint32_t kLeadB = C::kBMnMajor ? C::kMnBoxBytes >> 4 : 1;
    DG_DEVICE Bf16Math(const float*, SharedStorage<C>& smem_, RingCursor<C>& ring_) : smem(smem_), ring(ring_) {
        lane = threadIdx.x % 32;
        // 64 rows of K-major A, or one box of MN-major A: the same 8 KB either way.
        static_assert(C::kMnBoxBytes == 64 * C::kBlockK, "a warpgroup's share of A is one box");
        const uint32_t wg_uniform = ptx::warp_index() / 4 - 1;  // keeps the descriptors uniform
        desc_a_ring = ptx::smem_desc_low(ptx::smem_addr(smem.a(0) + wg_uniform * 64 * C::kBlockK), kLeadA);
        desc_b_ring = ptx::smem_desc_low(ptx::smem_addr(smem.b(0)), kLeadB);
    }
    DG_DEVICE ScalePair first_chunk(const Tile&) const { return ScalePair(); }
    // Waits for the stage of the ring's current K block and issues its 4 wgmmas into acc; returns the stage.
    DG_DEVICE int32_t issue() {
        const int32_t stage = ring.stage;
        ptx::mbarrier_wait(&smem.full[stage], ring.phase);
        const uint32_t desc_a = desc_a_ring + stage * (C::kStageBytesA >> 4);
        const uint32_t desc_b = desc_b_ring + stage * (C::kStageBytesB >> 4);
        ptx::wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < C::kBlockK / 32; ++kk)  // K = 16: 32 bytes of a K-major row
            ptx::wgmma_bf16<C::kBlockN, C::kAMnMajor, C::kBMnMajor>(
                acc[0], ptx::smem_desc(desc_a + kk * kStepA), ptx::smem_desc(desc_b + kk * kStepB), true);
        ptx::wgmma_commit();
        ring.advance_k_block();
        return stage;
    }
    DG_DEVICE void release(int32_t stage) {
        if (lane == 0) ptx::mbarrier_arrive(&smem.empty[stage]);
    }
    // One unit's main loop into `acc` (zeroed first: a unit without K blocks stores zeros).
    template <bool kWholeTile>
    DG_DEVICE void run(const Tile& tile, const ScalePair&, const GemmParams&) {
        const int32_t kb_begin = kWholeTile ? 0 : k_block_begin<C>(tile);
        const int32_t kb_end = kWholeTile ? C::kNumKBlocks : k_block_end<C>(tile);
#pragma unroll
        for (int i = 0; i < C::kAccRegs; ++i) acc[0][i] = 0.f;
        ptx::fence_registers(acc[0]);
        if (kb_begin >= kb_end) return;
        int32_t prev = issue();
#pragma unroll 1
        for (int32_t kb = kb_begin + 1; kb < kb_end; ++kb) {
            const int32_t stage = issue();
            ptx::wgmma_wait<1>();  // block kb - 1's wgmmas are done: its stage may be refilled
            release(prev);
            prev = stage;
        }
        ptx::wgmma_wait<0>();
        ptx::fence_registers(acc[0]);
        release(prev);
    }
};

// The math policy of a config: FP8 operands with promotion, or BF16 operands straight into acc.
template <class C, bool kBf16>
struct MathOf {
    using type = Fp8Math<C>;
};
template <class C>
struct MathOf<C, true> {
    using type = Bf16Math<C>;
};

// ---- epilogue -------------------------------------------------------------------------------------
// bf16 or fp32 output: through swizzled shared memory and TMA stores (reduce-adds for D += A B);
// split-K through a global workspace.
template <class C>
struct Epilogue {
    static constexpr int kChunkBytesPerRow = C::kStoreChunkCols * C::kOutBytes;
    static constexpr int kNumChunks = C::kNumStoreChunks;
    // Named barriers: 0 is __syncthreads, 1 + warpgroup store_tile's, this one all math threads.
    static constexpr uint32_t kSplitKBarrier = 3;
    // Byte offset of (row, 16-byte unit) in a chunk buffer, swizzled as TMA does for rows of
    // kChunkBytesPerRow bytes: bits [4, 7) ^= bits [7, 10), masked to the row width.
    static DG_DEVICE uint32_t swizzled_offset(uint32_t row, uint32_t col16) {
        constexpr uint32_t kUnitsPerRow = kChunkBytesPerRow / 16;
        const uint32_t offset = row * kChunkBytesPerRow + col16 * 16;
        return offset ^ (((offset >> 7) & (kUnitsPerRow - 1)) << 4);
    }
    static constexpr uint32_t kChunkBytes = C::kBlockM * kChunkBytesPerRow;
    // The accumulators of rows `first_row` (this thread's) into the swizzled chunks: every chunk
    // (kChunk < 0, chunk c at c * kChunkBytes) or chunk kChunk alone (at smem_out). bf16 through
    // stmatrix.x4 (matrix j = lane / 8 holds rows (j % 2) * 8.. of column group i + j / 2), fp32 as
    // float pairs (columns 8 i + 2 (lane % 4), rows r and r + 8).
    template <int kChunk = -1>
    static DG_DEVICE void write_smem(const float (&acc)[C::kAccRegs], uint8_t* smem_out, uint32_t first_row,
                                     uint32_t lane) {
        const uint32_t base = ptx::smem_addr(smem_out);
        auto chunk_at = [&](uint32_t col) {
            return kChunk < 0 ? base + (col / C::kStoreChunkCols) * kChunkBytes : base;
        };
        if constexpr (C::kOutFp32) {
            const uint32_t row = first_row + lane / 4;
#pragma unroll
            for (int i = 0; i < C::kBlockN / 8; ++i) {
                if (kChunk >= 0 && i * 8 / C::kStoreChunkCols != kChunk) continue;
                const uint32_t col = i * 8 + (lane % 4) * 2, in_chunk = col % C::kStoreChunkCols;
                const uint32_t chunk = chunk_at(col) + (in_chunk % 4) * 4;
                ptx::sts_float2(chunk + swizzled_offset(row, in_chunk / 4), acc[4 * i + 0], acc[4 * i + 1]);
                ptx::sts_float2(chunk + swizzled_offset(row + 8, in_chunk / 4), acc[4 * i + 2], acc[4 * i + 3]);
            }
        } else {
            const uint32_t j = lane / 8;
            const uint32_t row = first_row + (j % 2) * 8 + lane % 8;
#pragma unroll
            for (int i = 0; i < C::kBlockN / 8; i += 2) {  // groups i and i + 1 share a chunk
                if (kChunk >= 0 && i * 8 / C::kStoreChunkCols != kChunk) continue;
                const uint32_t col = (i + j / 2) * 8;
                const uint32_t addr = chunk_at(col) + swizzled_offset(row, (col % C::kStoreChunkCols) / 8);
                ptx::stmatrix_x4(addr, ptx::pack_bf16x2(acc[4 * i + 0], acc[4 * i + 1]),
                                 ptx::pack_bf16x2(acc[4 * i + 2], acc[4 * i + 3]),
                                 ptx::pack_bf16x2(acc[4 * i + 4], acc[4 * i + 5]),
                                 ptx::pack_bf16x2(acc[4 * i + 6], acc[4 * i + 7]));
            }
        }
    }
    // One chunk's rows [row, row + 64) of D: stored, or added to D (kAccumulate); K-grouped D is
    // [G][M][N], so a box stops at its group's last row.
    static DG_DEVICE void store_chunk(const GemmParams& p, const uint8_t* src, int32_t col, int32_t row, int32_t group) {
        if constexpr (C::kLayout == kKGrouped) ptx::tma_store_3d<C::kAccumulate>(&p.tma_out, src, col, row, group);
        else ptx::tma_store_2d<C::kAccumulate>(&p.tma_out, src, col, row);
    }
    // This warpgroup's 64 rows of wave `wave`: into swizzled shared memory, then TMA stores that run
    // on under the next tile; bf16 row by row where a box would write too much (a masked group's
    // last rows, the last N block when N % 8 != 0).
    static DG_DEVICE void store_tile(const float (&acc)[C::kAccRegs], const Tile& tile, const GemmParams& p,
                                     uint8_t* smem_out, int32_t wave) {
        if constexpr (C::kOutBuffers > 0) return store_tile_by_chunks<0>(acc, tile, p, smem_out, wave);
        const uint32_t wg = threadIdx.x / 128 - 1;
        const uint32_t slice = wave * 128 + wg * 64;  // first row of this warpgroup's slice
        const uint32_t t = threadIdx.x % 128;
        const int32_t n0 = tile.n_block * C::kBlockN;
        // The previous tile's store must have read the buffer (later waves write other rows).
        if (t == 0 && wave == 0) ptx::tma_store_wait_read();
        ptx::named_barrier(1 + wg, 128);
        write_smem(acc, smem_out, slice + (t / 32) * 16, t % 32);
        ptx::fence_proxy_async_shared();
        ptx::named_barrier(1 + wg, 128);
        const bool n_edge = !C::kOutFp32 && C::kShapeN % 8 != 0 && n0 + C::kBlockN > C::kShapeN;
        if ((C::kLayout != kMasked || tile.rows_valid >= C::kBlockM) && !n_edge) {
            if (t == 0) {
#pragma unroll
                for (int c = 0; c < kNumChunks; ++c)
                    store_chunk(p, smem_out + c * kChunkBytes + slice * kChunkBytesPerRow, n0 + c * C::kStoreChunkCols,
                                tile.row_begin + slice, tile.group);
                ptx::tma_store_commit();
            }
            return;
        }
        if constexpr (!C::kOutFp32) store_rows(tile, p, smem_out, slice, slice, n0);
    }
    // Compact staging: chunk kChunk onwards, each through buffer kChunk % kOutBuffers and one commit
    // group. A wave's chunks are a multiple of the buffers, so the store that last read a buffer is
    // always kOutBuffers - 1 groups back (every group, where a tile went row by row).
    template <int kChunk>
    static DG_DEVICE void store_tile_by_chunks(const float (&acc)[C::kAccRegs], const Tile& tile, const GemmParams& p,
                                               uint8_t* smem_out, int32_t wave) {
        const uint32_t wg = threadIdx.x / 128 - 1;
        const uint32_t t = threadIdx.x % 128;
        const int32_t n0 = tile.n_block * C::kBlockN;
        uint8_t* buffer = smem_out + (kChunk % C::kOutBuffers) * C::kOutBufferBytes;
        const bool n_edge = !C::kOutFp32 && C::kShapeN % 8 != 0 && n0 + C::kBlockN > C::kShapeN;
        const bool boxes = (C::kLayout != kMasked || tile.rows_valid >= C::kBlockM) && !n_edge;
        if (t == 0) boxes ? ptx::tma_store_wait_read<C::kOutBuffers - 1>() : ptx::tma_store_wait_read();
        ptx::named_barrier(1 + wg, 128);
        write_smem<kChunk>(acc, buffer, wg * 64 + (t / 32) * 16, t % 32);
        ptx::fence_proxy_async_shared();
        ptx::named_barrier(1 + wg, 128);
        if (boxes) {
            if (t == 0) {
                store_chunk(p, buffer + wg * 64 * kChunkBytesPerRow, n0 + kChunk * C::kStoreChunkCols,
                            tile.row_begin + wave * 128 + wg * 64, tile.group);
                ptx::tma_store_commit();
            }
        } else if constexpr (!C::kOutFp32) {
            store_rows<kChunk>(tile, p, buffer, wg * 64, wave * 128 + wg * 64, n0);
        }
        if constexpr (kChunk + 1 < kNumChunks) store_tile_by_chunks<kChunk + 1>(acc, tile, p, smem_out, wave);
    }
    // The row-by-row copy of a slice (rows from `smem_row` of the staging, rows from `slice` of the
    // tile): 16-byte units, the row's last columns one bf16 at a time; every chunk, or chunk kChunk.
    template <int kChunk = -1>
    static DG_DEVICE void store_rows(const Tile& tile, const GemmParams& p, const uint8_t* smem_out, uint32_t smem_row,
                                     uint32_t slice, int32_t n0) {
        const uint32_t t = threadIdx.x % 128;
        const int32_t rows_here = min(64, tile.rows_valid - int32_t(slice));
        constexpr int32_t kFirstCol = kChunk < 0 ? 0 : kChunk * C::kStoreChunkCols;
        constexpr int32_t kUnitsPerRow = (kChunk < 0 ? C::kBlockN : C::kStoreChunkCols) / 8;
        for (int32_t idx = t; idx < rows_here * kUnitsPerRow; idx += 128) {
            const int32_t r = idx / kUnitsPerRow, col = kFirstCol + (idx % kUnitsPerRow) * 8;
            if (n0 + col >= C::kShapeN) continue;
            const uint8_t* src = smem_out + (kChunk < 0 ? (col / C::kStoreChunkCols) * kChunkBytes : 0) +
                                 swizzled_offset(smem_row + r, (col % C::kStoreChunkCols) / 8);
            uint8_t* dst = p.out + int64_t(tile.row_begin + slice + r) * p.out_ld_bytes + int64_t(n0 + col) * 2;
            if (C::kShapeN % 8 == 0 || n0 + col + 8 <= C::kShapeN) {
                *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
            } else {
                for (int32_t e = 0; e < C::kShapeN - n0 - col; ++e)
                    reinterpret_cast<uint16_t*>(dst)[e] = reinterpret_cast<const uint16_t*>(src)[e];
            }
        }
    }
    // Split-K: true in the tile's last unit to arrive, whose `acc` then holds the sum (in split
    // order: deterministic). Partials go to workspace slots, each thread's values in float4s,
    // thread-minor; a barrier then one thread's acquire-release count publishes them (cumulativity),
    // and the last unit reads them through L2 (.cg) after the second barrier.
    static DG_DEVICE bool reduce_split_k(float (&acc)[C::kAccRegs], const Tile& tile, const GemmParams& p,
                                         SharedStorage<C>& smem) {
        const uint32_t t = threadIdx.x - 128;  // 0 .. kNumMathThreads
        constexpr int32_t kSlotFloats = C::kBlockM * C::kBlockN;
        float4* slots = reinterpret_cast<float4*>(p.workspace + int64_t(tile.tail_index) * tile.num_splits * kSlotFloats);
        float4* mine = slots + tile.split * (kSlotFloats / 4);
#pragma unroll
        for (int i = 0; i < C::kAccRegs / 4; ++i)
            __stcg(mine + i * C::kNumMathThreads + t, make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
        ptx::named_barrier(kSplitKBarrier, C::kNumMathThreads);
        if (t == 0) {
            const bool last = ptx::atomic_add_acq_rel_gpu(p.tile_counters + tile.tail_index, 1) == tile.num_splits - 1;
            if (last) p.tile_counters[tile.tail_index] = 0;  // ready for the next launch (and graph replay)
            *smem.last_unit = last;
        }
        ptx::named_barrier(kSplitKBarrier, C::kNumMathThreads);
        // Read through a shuffle so ptxas knows the branch is warp-uniform (else the descriptors left
        // the uniform registers); rewritten only after every thread passed the next first barrier.
        if (!__shfl_sync(0xffffffffu, *reinterpret_cast<volatile int32_t*>(smem.last_unit), 0)) return false;
        // One split at a time; tiles over 128 columns (no room for a third tile) sum into acc.
        constexpr bool kSumIntoAcc = C::kAccRegs > 64;
        auto sum_splits = [&](float(&sum)[C::kAccRegs]) {
#pragma unroll 1
            for (int32_t s = 0; s < tile.num_splits; ++s) {
                float part[C::kAccRegs];
                if (!kSumIntoAcc && s == tile.split) {
#pragma unroll
                    for (int i = 0; i < C::kAccRegs; ++i) part[i] = acc[i];
                } else {
                    const float4* slot = slots + s * (kSlotFloats / 4);
#pragma unroll
                    for (int i = 0; i < C::kAccRegs / 4; ++i) {
                        const float4 v = __ldcg(slot + i * C::kNumMathThreads + t);
                        part[4 * i] = v.x, part[4 * i + 1] = v.y, part[4 * i + 2] = v.z, part[4 * i + 3] = v.w;
                    }
                }
#pragma unroll
                for (int i = 0; i < C::kAccRegs; ++i) sum[i] = s == 0 ? part[i] : sum[i] + part[i];
            }
        };
        if constexpr (kSumIntoAcc) {
            sum_splits(acc);
        } else {
            float sum[C::kAccRegs];
            sum_splits(sum);
#pragma unroll
            for (int i = 0; i < C::kAccRegs; ++i) acc[i] = sum[i];
        }
        return true;
    }
};

// ---- the math warpgroups' loop over their units of work --------------------------------------------
template <class C, class Math, class Epilogue>
DG_DEVICE void consume(const GemmParams& p, const int32_t* group_info, SharedStorage<C>& smem) {
    RingCursor<C> ring;
    Math math(p.sb, smem, ring);
    Scheduler<C> scheduler(p.shape_m, group_info);
    // The next tile and its first B scales: one tile ahead with a short K; with a long K (values
    // live across the main loop cost more) after the main loop (contiguous) or the epilogue.
    constexpr bool kLookAhead = !Math::kManyChunks;
    constexpr bool kFetchBeforeEpilogue = Math::kManyChunks && C::kLayout == kContiguous;
    using ScalePair = typename Math::ScalePair;
    Tile tile;
    bool has_tile = scheduler.next(tile);
    ScalePair first;
    if ((kLookAhead || kFetchBeforeEpilogue) && has_tile) first = math.first_chunk(tile);
    while (has_tile) {
        Tile next_tile;
        bool has_next = false;
        ScalePair next_first;
        auto look_ahead = [&]() {
            has_next = scheduler.next(next_tile);
            if (has_next) next_first = math.first_chunk(next_tile);
        };
        if (kLookAhead) {
            look_ahead();
        } else if (!kFetchBeforeEpilogue) {
            first = math.first_chunk(tile);
        }
        // Whole tiles of one K (every layout but K-grouped) run on compile-time bounds.
        const bool whole = C::kLayout != kKGrouped && (C::kSplitK == 1 || tile.num_splits == 1);
        const bool unsplit = C::kSplitK == 1 || tile.num_splits == 1;
        if (whole) {
            math.template run<true>(tile, first, p);
        } else {
            math.template run<false>(tile, first, p);
        }
        ring.end_tile();
        if (kFetchBeforeEpilogue) look_ahead();
        if (unsplit || Epilogue::reduce_split_k(math.acc[0], tile, p, smem)) {
#pragma unroll
            for (int w = 0; w < C::kMWaves; ++w) Epilogue::store_tile(math.acc[w], tile, p, smem.out, w);
        }
        if (!kLookAhead && !kFetchBeforeEpilogue) has_next = scheduler.next(next_tile);
        tile = next_tile;
        has_tile = has_next;
        first = next_first;
    }
    if (threadIdx.x % 128 == 0) ptx::tma_store_wait_all();
}

// The kernel's body: barrier set-up, then the roles. `groups`: the K-grouped parameter (else null).
template <class C, class Groups>
DG_DEVICE void run_gemm(const GemmParams& params, const Groups* groups) {
    using Math = typename MathOf<C, C::kBf16Operands>::type;
    extern __shared__ uint8_t smem_raw[];
    SharedStorage<C> smem(smem_raw);
    if (threadIdx.x == 0) {
        if (C::kLayout != kKGrouped) {  // (K-grouped: one map of A and B per group)
            ptx::prefetch_tma_descriptor(&params.tma_a);
            ptx::prefetch_tma_descriptor(&params.tma_b);
        }
        if (!C::kScaleLoaderWarp && !C::kBf16Operands) ptx::prefetch_tma_descriptor(&params.tma_sa);
        if (C::kRowScalesB) ptx::prefetch_tma_descriptor(&params.tma_sb);
        ptx::prefetch_tma_descriptor(&params.tma_out);
        if (params.a_tail_rows > 0) {
            ptx::prefetch_tma_descriptor(&params.tma_a_tail);
            if (!C::kScaleLoaderWarp && !C::kBf16Operands) ptx::prefetch_tma_descriptor(&params.tma_sa_tail);
        }
        for (int s = 0; s < C::kNumStages; ++s) {
            ptx::mbarrier_init(&smem.full[s], C::kFullArrivals);
            ptx::mbarrier_init(&smem.empty[s], C::kEmptyArrivals);
        }
        ptx::fence_barrier_init();
    }
    // PDL: the prologue reads only the parameters and shared memory; global memory waits for the
    // previous grid of the stream (its writes visible, its reads done).
    ptx::griddepcontrol_wait();
    __syncthreads();
    if (threadIdx.x < 128) {
        ptx::setmaxnreg_dec<C::kProducerRegs>();
        if (threadIdx.x == 0) {
            Producer<C>::load_tiles(params, groups, smem);
            // The block's last load is issued: the next grid may be scheduled (its own wait still
            // holds it until this grid completes).
            ptx::griddepcontrol_launch_dependents();
        } else if (C::kScaleLoaderWarp && ptx::warp_index() == 1) {
            Producer<C>::load_a_scales(params, smem);
        }
    } else {
        ptx::setmaxnreg_inc<C::kMathRegs>();
        consume<C, Math, Epilogue<C>>(params, group_info<C>(params, groups), smem);
    }
}

template <class C>
__global__ void __launch_bounds__(C::kNumThreads, 1) gemm_kernel(const __grid_constant__ GemmParams params) {
    static_assert(C::kLayout != kKGrouped, "K-grouped GEMMs run k_grouped_gemm_kernel");
    run_gemm<C>(params, static_cast<const KGroupedParams<1>*>(nullptr));
}

// K-grouped GEMMs: each group's tensor maps and K in a second parameter (up to the kernel parameter
// space: G <= K_GROUPED_MAX_GROUPS on the host).
template <class C>
__global__ void __launch_bounds__(C::kNumThreads, 1)
    k_grouped_gemm_kernel(const __grid_constant__ GemmParams params, const __grid_constant__ KGroupedParams<C::kNumGroups> groups) {
    static_assert(C::kLayout == kKGrouped && !C::kDeviceSizes, "K-grouped GEMMs with sizes on the host");
    run_gemm<C>(params, &groups);
}

// K-grouped GEMMs whose group sizes stay on the device: the maps and K blocks that
// group_maps_kernel (kernels/group_maps.cuh) wrote to global memory just before, on this stream.
template <class C>
__global__ void __launch_bounds__(C::kNumThreads, 1)
    k_grouped_device_gemm_kernel(const __grid_constant__ GemmParams params,
                                 const __grid_constant__ KGroupedDeviceParams groups) {
    static_assert(C::kLayout == kKGrouped && C::kDeviceSizes, "K-grouped GEMMs with sizes on the device");
    run_gemm<C>(params, &groups);
}

}  // namespace deep_gemm

// Every kernel of this header waits (griddepcontrol_wait) before touching global memory.
DG_PDL_READY
