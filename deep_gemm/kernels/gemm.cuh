// The FP8 GEMM: out[m, n] = sum_k A[m, k] B[n, k] sa[m, k/128] sb[n/128, k/128].
//
// Persistent and warp-specialised.  Warpgroup 0 produces: one thread issues
// TMA loads of A, B and A's scales into a NUM_STAGES ring of shared memory,
// STAGE_K_BLOCKS 128-K blocks a stage (with SA_LOADER_WARP, a second warp
// copies A's scales: see load_a_scales).
// Warpgroups 1..BLOCK_M/64 consume (two for BLOCK_M = 256, each taking two
// 64-row slices in turn): each multiplies 64 rows of the tile with wgmma (fp8
// in, fp32 out) one 128-K block at a time, then promotes the block's result
// into fp32 accumulators with both scales applied ("promotion every 128 K").
// The epilogue writes bf16 through shared memory and a TMA store that overlaps
// the next tile's main loop.
//
// Split-K (SPLIT_K > 1: at most that many splits per tile): the tiles of the
// last, partial wave are split into units over disjoint ranges of K blocks, so
// that wave keeps every SM busy (scheduler.cuh says how many splits; with fewer
// tiles than SMs, as in decode, every tile is split). Units are scheduled like
// tiles (no cluster: clusters of 4 do not all fit on the GPU at once, and their
// launch alone cost ~1.2 us). Every unit writes its fp32 partial tile to a
// global workspace and counts itself in the tile's arrival counter; the last
// to arrive sums the partials in split order (so results are deterministic),
// stores the tile and resets the counter to zero.
//
// Compile-time constants (SHAPE_N, SHAPE_K, BLOCK_M, BLOCK_N, BLOCK_K,
// NUM_STAGES, STAGE_K_BLOCKS, LAYOUT, NUM_GROUPS, RASTER_GROUP, CLUSTER_N, SPLIT_K,
// PIPELINE_PROMOTION, PIPELINE_HALVES, STREAM_B, SA_LOADER_WARP, FIXED_SCALE_SPLIT, STORE_CHUNK_COLS)
// and the function `wgmma_m64k32` (for BLOCK_N columns, and with PIPELINE_HALVES also for
// BLOCK_N / 2) are defined by the generated source before
// this header is included (see deep_gemm/jit/kernel_source.py).
#pragma once
#include "ptx.cuh"
#include "scheduler.cuh"

namespace gemm {

// BLOCK_M = 256: still two math warpgroups, each covering two 64-row slices of the
// tile ("waves", rows wave * 128 + wg * 64 ..) one after the other with the same
// B tile in shared memory, so every byte of B read from L2 serves twice the rows.
constexpr int kNumMathWarpgroups = BLOCK_M == 64 ? 1 : 2;
constexpr int kMWaves = BLOCK_M / (64 * kNumMathWarpgroups);
constexpr int kNumThreads = 128 * (1 + kNumMathWarpgroups);
constexpr int kNumKBlocks = (SHAPE_K + BLOCK_K - 1) / BLOCK_K;
constexpr int kAccRegs = BLOCK_N / 2;                  // fp32 accumulators per thread
constexpr int kTileBytesA = BLOCK_M * BLOCK_K;         // fp8, one K block ("slot" of a stage)
constexpr int kTileBytesB = BLOCK_N * BLOCK_K;
// A stage holds kStageKBlocks K blocks of A, B and A's scales, each operand's blocks one
// after the other, and is filled by one TMA load per operand: on narrow decode tiles each
// TMA operation per stage costs time (docs/perf-notes.md, sections 22-23 and 25). With
// more than one block a stage, A and B are read through 3-D tensor maps [K / 128][rows][128]
// (K a multiple of 128), whose box of kStageKBlocks blocks lands as consecutive slots.
constexpr int kStageKBlocks = STAGE_K_BLOCKS;
constexpr int kStageBytesA = kStageKBlocks * kTileBytesA;
constexpr int kStageBytesB = kStageKBlocks * kTileBytesB;
constexpr int kStageScales = kStageKBlocks * BLOCK_M;  // floats
// What a stage's TMA loads bring: A's box of rows_a rows a K block (BLOCK_M, or fewer on
// a dense M's last, partial block: see produce), B and (unless the loader warp copies them)
// A's scales, rounded up to 16 bytes as their box is. Boxes past K count in full.
DG_DEVICE uint32_t stage_tma_bytes(int32_t rows_a) {
    return kStageKBlocks * (rows_a * BLOCK_K + kTileBytesB + (SA_LOADER_WARP ? 0 : (rows_a + 3) / 4 * 16));
}
// The loader warp's share: BLOCK_M floats in 16-byte cp.async pieces, at most two per lane.
constexpr int kScalePieces = BLOCK_M / 4;
constexpr int kScaleLanes = kScalePieces < 32 ? kScalePieces : 32;
// A stage is full once the TMA thread's arrive (with its bytes) and, with the loader warp,
// every scale lane's cp.async arrive have landed.
constexpr uint32_t kFullArrivals = SA_LOADER_WARP ? 1 + kScaleLanes : 1;
constexpr int kOutChunkBytesPerRow = STORE_CHUNK_COLS * 2;
constexpr int kNumOutChunks = BLOCK_N / STORE_CHUNK_COLS;
constexpr int kTileBytesOut = BLOCK_M * BLOCK_N * 2;
constexpr int kNumMathThreads = 128 * kNumMathWarpgroups;
// Named barriers: 0 is __syncthreads, 1 + warpgroup is store_tile's, and this
// one spans all math threads (split-K's reduction).
constexpr uint32_t kSplitKBarrier = 3;
// A tile spans at most two 128-column scale blocks of B (the planner keeps
// BLOCK_N <= 128 + gcd(BLOCK_N, 128)); when BLOCK_N divides 128 it spans one.
constexpr bool kOneScaleB = (128 % BLOCK_N) == 0;
constexpr int kNumScaleBRows = (SHAPE_N + 127) / 128;

// Where B's second scale block starts in a tile: column split = min(128 - n0 % 128, BLOCK_N),
// n0 = n_block * BLOCK_N. n0 % 128 is a multiple of g = gcd(BLOCK_N, 128), so split takes one
// of a few values: 2 for BLOCK_N = 192, 4 for 160, 3 for 96, 8 for 144. With the split known
// only at run time, promotion picks the scale of every 8-column group per K block (a compare, a
// select and two multiplies per group: about 100 of the ~200 instructions per K block and warp
// of a 192-column tile, SASS). FIXED_SCALE_SPLIT compiles the main loop once per value instead,
// and each tile runs the copy of its own split.
__host__ __device__ constexpr int32_t gcd_int(int32_t a, int32_t b) { return b == 0 ? a : gcd_int(b, a % b); }
constexpr int32_t kScaleSplitStep = gcd_int(BLOCK_N, 128);
// Cases c = kFirstSplitCase .. 128 / g - 1 have n0 % 128 = c * g; below the first, split = BLOCK_N
// as in the first (a narrow tile that ends inside its scale block has one scale).
constexpr int32_t kFirstSplitCase = BLOCK_N >= 128 ? 0 : (128 - BLOCK_N + kScaleSplitStep - 1) / kScaleSplitStep;
constexpr int32_t kNumSplitCases = kOneScaleB ? 1 : 128 / kScaleSplitStep - kFirstSplitCase;
constexpr bool kFixedScaleSplit = FIXED_SCALE_SPLIT && !kOneScaleB;
__host__ __device__ constexpr int32_t split_case_value(int32_t c) {
    const int32_t room = 128 - (kFirstSplitCase + c) * kScaleSplitStep;  // columns left in the scale block
    return room < BLOCK_N ? room : BLOCK_N;
}
// Every N block's split is one of the cases (n0 % 128 repeats within 128 N blocks): the last
// case of with_fixed_split takes whatever the others did not, without comparing.
__host__ __device__ constexpr bool split_cases_cover_every_tile() {
    for (int32_t j = 0; j < 128; ++j) {
        const int32_t room = 128 - j * BLOCK_N % 128;
        const int32_t split = room < BLOCK_N ? room : BLOCK_N;
        bool found = false;
        for (int32_t c = 0; c < kNumSplitCases; ++c) found = found || split_case_value(c) == split;
        if (!found) return false;
    }
    return true;
}
static_assert(kOneScaleB || split_cases_cover_every_tile(), "a tile's scale split has no main loop");
// Calls f(IntConstant<split>) with the tile's run-time split as a compile-time value.
template <int32_t kCase, typename F>
DG_DEVICE void with_fixed_split(int32_t split, F& f) {
    constexpr int32_t kValue = split_case_value(kCase);
    if constexpr (kCase + 1 >= kNumSplitCases) {
        f(ptx::IntConstant<kValue>());
    } else if (split == kValue) {
        f(ptx::IntConstant<kValue>());
    } else {
        with_fixed_split<kCase + 1>(split, f);
    }
}

// Registers: the producer needs few; the consumers hold two fp32 tiles, or
// three when promotion is pipelined (a second wgmma result tile in flight
// while the first is promoted), which fits up to BLOCK_N = 128.
constexpr bool kPipelinePromotion = PIPELINE_PROMOTION;
// PIPELINE_HALVES: each K block's wgmmas run as two N halves, each into its own register tile
// of BLOCK_N / 4 registers, and the tensor cores work on one half while the other is promoted.
// Pipelined at the registers of the unpipelined loop (acc plus one block's results), so tiles
// wider than 128 columns pipeline too.
constexpr bool kPipelineHalves = PIPELINE_HALVES;
constexpr uint32_t kProducerRegs = 40;
constexpr uint32_t kConsumerRegs = kNumMathWarpgroups == 2 ? 232 : 248;

static_assert(BLOCK_M == 64 || BLOCK_M == 128 || BLOCK_M == 256, "BLOCK_M must be 64, 128 or 256");
// Two waves hold two fp32 result tiles plus the wgmma tile: no room for pipelining,
// and the split-K and multicast paths are written for one wave. Grouped layouts
// assign groups per 128 rows (contiguous) or need row-exact stores (masked).
static_assert(!PIPELINE_HALVES || kMWaves == 1, "pipelined halves are written for one wave");
static_assert(kMWaves == 1 || (!PIPELINE_PROMOTION && SPLIT_K == 1 && CLUSTER_N == 1 && LAYOUT == kDense),
              "BLOCK_M = 256 runs dense GEMMs only, unpipelined, unsplit, without clusters");
static_assert(BLOCK_N % 16 == 0 && BLOCK_N <= 256, "BLOCK_N must be a multiple of 16 up to 256");
static_assert(BLOCK_K == 128, "one 128-byte swizzled row per K block");
static_assert(BLOCK_N % STORE_CHUNK_COLS == 0, "store chunks must tile BLOCK_N");

static_assert(CLUSTER_N == 1 || CLUSTER_N == 2, "clusters of one or two blocks");
static_assert(SPLIT_K == 1 || CLUSTER_N == 1, "split-K and multicast clusters are exclusive");
// The loader warp with a cluster of two hung on the GPU (64x2112x7168, 16-column tiles; cause
// not found, docs/perf-notes.md, section 24); the planner never combines them.
static_assert(!SA_LOADER_WARP || CLUSTER_N == 1, "the A-scale loader warp runs without clusters only");
// A multicast half-box of several K blocks would land as [blocks][half rows], not in the slots.
static_assert(kStageKBlocks == 1 || (SHAPE_K % BLOCK_K == 0 && CLUSTER_N == 1),
              "several K blocks a stage need K % 128 == 0 and no cluster");

// With CLUSTER_N == 2 the two blocks of a cluster compute neighbouring N tiles
// of one M block: each loads half of the A tile and multicasts it to both, so
// every empty-barrier release must reach both producers.
constexpr int kRowsLoadedA = BLOCK_M / CLUSTER_N;
constexpr uint32_t kEmptyArrivals = kNumMathWarpgroups * 4 * CLUSTER_N;

using Scheduler = TileScheduler<LAYOUT, BLOCK_M, BLOCK_N, SHAPE_N, NUM_GROUPS, RASTER_GROUP, CLUSTER_N, SPLIT_K>;

// K blocks [begin, end) of a unit of work (all of K for a whole tile).
DG_DEVICE int32_t k_block_begin(const Tile& t) { return SPLIT_K == 1 ? 0 : t.split * kNumKBlocks / t.num_splits; }
DG_DEVICE int32_t k_block_end(const Tile& t) {
    return SPLIT_K == 1 ? kNumKBlocks : (t.split + 1) * kNumKBlocks / t.num_splits;
}

// A's scales are [KB][aligned rows] per group (see runtime/kernels.py for the 2-D view): a
// tile's first scale row, and the view's row of K block 0 of the tile's group.
DG_DEVICE int32_t a_scale_row(const Tile& t) { return LAYOUT == kMasked ? t.m_block * BLOCK_M : t.row_begin; }
DG_DEVICE int32_t a_scale_kb_base(const Tile& t) { return LAYOUT == kMasked ? t.group * kNumKBlocks : 0; }

// Byte offset of (row, 16-byte column chunk) inside one output chunk buffer,
// with the swizzle TMA applies for rows of kOutChunkBytesPerRow bytes: the
// 16-byte unit index is XORed with the row's position in its 8-row group
// (bits [4, 7) ^= bits [7, 10) of the offset, masked to the row width).
DG_DEVICE uint32_t out_swizzled_offset(uint32_t row, uint32_t col16) {
    constexpr uint32_t kUnitsPerRow = kOutChunkBytesPerRow / 16;
    const uint32_t offset = row * kOutChunkBytesPerRow + col16 * 16;
    return offset ^ (((offset >> 7) & (kUnitsPerRow - 1)) << 4);
}

// Shared memory: [out tile][A ring][B ring][A-scale ring][full barriers][empty barriers]
// [split-K: the "last unit of its tile" flag].
// Stage addresses are computed, not stored in arrays: a run-time index into a
// pointer array would put it in local memory.
struct SharedStorage {
    uint8_t* out;  // kNumOutChunks x [BLOCK_M][STORE_CHUNK_COLS] bf16, swizzled
    uint8_t* ring_a;
    uint8_t* ring_b;
    float* ring_sa;
    uint64_t* full;
    uint64_t* empty;
    int32_t* last_unit;  // split-K: thread 0's verdict, read by every math thread

    DG_DEVICE explicit SharedStorage(uint8_t* raw) {
        // 128-byte swizzle works on absolute address bits: 1024-byte align.
        out = reinterpret_cast<uint8_t*>((reinterpret_cast<uint64_t>(raw) + 1023) & ~uint64_t(1023));
        ring_a = out + kTileBytesOut;
        ring_b = ring_a + NUM_STAGES * kStageBytesA;
        ring_sa = reinterpret_cast<float*>(ring_b + NUM_STAGES * kStageBytesB);
        full = reinterpret_cast<uint64_t*>(ring_sa + NUM_STAGES * kStageScales);
        empty = full + NUM_STAGES;
        last_unit = reinterpret_cast<int32_t*>(empty + NUM_STAGES);
    }
    DG_DEVICE uint8_t* a(int32_t stage) const { return ring_a + stage * kStageBytesA; }
    DG_DEVICE uint8_t* b(int32_t stage) const { return ring_b + stage * kStageBytesB; }
    DG_DEVICE float* sa(int32_t stage) const { return ring_sa + stage * kStageScales; }
};

// Position in the ring: stage index, the parity of its current fill and, for the
// consumers, the K block inside the stage. A tile's K blocks fill its stages from slot 0,
// so its last stage may be partly used; the next tile starts a new stage.
struct RingCursor {
    int32_t stage = 0;
    uint32_t phase = 0;
    int32_t slot = 0;
    DG_DEVICE void advance() {
        if (++stage == NUM_STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
    DG_DEVICE void advance_k_block() {
        if (kStageKBlocks == 1) {  // (touching `slot` here changed ptxas' schedule of the main loop)
            advance();
        } else if (++slot == kStageKBlocks) {
            slot = 0;
            advance();
        }
    }
    DG_DEVICE void end_tile() {
        if (kStageKBlocks > 1 && slot != 0) {
            slot = 0;
            advance();
        }
    }
};

// One stage's K blocks [kb, kb + kStageKBlocks) of a K-major operand from row `row` on.
DG_DEVICE void load_k_blocks(void* dst, const TmaDescriptor* map, uint64_t* bar, int32_t kb, int32_t row) {
    if (kStageKBlocks == 1) {
        ptx::tma_load_2d(dst, map, bar, kb * BLOCK_K, row);
    } else {
        ptx::tma_load_3d(dst, map, bar, 0, row, kb);
    }
}
DG_DEVICE void load_k_blocks_hinted(void* dst, const TmaDescriptor* map, uint64_t* bar, int32_t kb, int32_t row,
                                    uint64_t policy) {
    if (kStageKBlocks == 1) {
        ptx::tma_load_2d_hinted(dst, map, bar, kb * BLOCK_K, row, policy);
    } else {
        ptx::tma_load_3d_hinted(dst, map, bar, 0, row, kb, policy);
    }
}

// a_tail_rows > 0 (dense, no cluster): M's last block is partial, and its tiles load A and
// A's scales through tma_a_tail / tma_sa_tail, boxes of a_tail_rows rows: the block's rows,
// rounded up to 8 with several K blocks a stage (so that every slot of the box starts
// 1024-byte aligned, as the swizzle needs). A box of BLOCK_M rows would be filled
// with zeros past M by TMA, which made such tiles up to 1.6x slower (docs/perf-notes.md,
// section 24). The rows past the short box keep stale shared memory; they only feed output
// rows past M, which are never stored.
DG_DEVICE void produce(const TmaDescriptor* tma_a, const TmaDescriptor* tma_b, const TmaDescriptor* tma_sa,
                       const TmaDescriptor* tma_a_tail, const TmaDescriptor* tma_sa_tail, SharedStorage& smem,
                       int32_t shape_m, int32_t a_tail_rows, const int32_t* group_info) {
    Scheduler scheduler(shape_m, group_info);
    RingCursor ring;
    Tile tile;
    // Decode: B is read once, and its lines had better evict each other than what the
    // previous kernels left in L2 (see ptx::l2_evict_first_policy and plan.py).
    const uint64_t b_policy = STREAM_B ? ptx::l2_evict_first_policy() : 0;
    while (scheduler.next(tile)) {
        // (The compile-time terms drop this from kernels the host never gives a tail.)
        const bool tail = LAYOUT == kDense && CLUSTER_N == 1 && a_tail_rows > 0 && tile.row_begin + BLOCK_M > shape_m;
        const TmaDescriptor* map_a = tail ? tma_a_tail : tma_a;
        const TmaDescriptor* map_sa = tail ? tma_sa_tail : tma_sa;
        const uint32_t stage_bytes = stage_tma_bytes(tail ? a_tail_rows : BLOCK_M);
        const int32_t b_row = tile.group * SHAPE_N + tile.n_block * BLOCK_N;
        const int32_t sa_row = a_scale_row(tile);
        const int32_t sa_kb_base = a_scale_kb_base(tile);
        // Not unrolled: the producer runs on few registers and gains nothing from it.
        const int32_t kb_end = ptx::opaque(k_block_end(tile));
#pragma unroll 1
        for (int32_t kb = k_block_begin(tile); kb < kb_end; kb += kStageKBlocks) {
            // First pass over the ring: the parity trick makes this wait return at once.
            ptx::mbarrier_wait(&smem.empty[ring.stage], ring.phase ^ 1);
            uint64_t* full = &smem.full[ring.stage];
            ptx::mbarrier_arrive_expect_tx(full, stage_bytes);
            if (CLUSTER_N == 1) {
                load_k_blocks(smem.a(ring.stage), map_a, full, kb, tile.row_begin);
            } else {
                const int32_t half = scheduler.cluster_rank * kRowsLoadedA;
                ptx::tma_load_2d_multicast(smem.a(ring.stage) + half * BLOCK_K, tma_a, full, kb * BLOCK_K,
                                           tile.row_begin + half, (1 << CLUSTER_N) - 1);
            }
            if (!SA_LOADER_WARP) ptx::tma_load_2d(smem.sa(ring.stage), map_sa, full, sa_row, sa_kb_base + kb);
            if (STREAM_B) {
                load_k_blocks_hinted(smem.b(ring.stage), tma_b, full, kb, b_row, b_policy);
            } else {
                load_k_blocks(smem.b(ring.stage), tma_b, full, kb, b_row);
            }
            ring.advance();
        }
    }
}

// SA_LOADER_WARP: A's scales of each stage, copied by warp 1 of the producer
// warpgroup with cp.async (16-byte pieces through the load/store unit) rather
// than by a third TMA operation per stage. On the narrowest decode tiles the TMA
// thread's operations per stage set the pace: 64x2112x7168 11.3 -> 10.2 us and
// 128x2112x7168 12.4 -> 11.9 on 64 x 16 / 128 x 16 tiles; on large tiles the
// same warp cost 3-9% (docs/perf-notes.md, sections 22-23), so the planner
// turns it on for dense BLOCK_N = 16 tiles only. Each lane's arrive fires on the
// stage's full barrier once its pieces have landed (.noinc: counted in
// kFullArrivals), which orders the copies before the consumers' reads.
// sa holds [groups x KB][sa_ld] floats (column-major scales, see runtime/kernels.py);
// rows at or past sa_rows read as zeros, as a TMA box would.
DG_DEVICE void load_a_scales(const float* sa, int32_t sa_rows, int32_t sa_ld, SharedStorage& smem,
                             int32_t shape_m, const int32_t* group_info) {
    const int32_t lane = ptx::lane_index();
    if (lane >= kScaleLanes) return;
    Scheduler scheduler(shape_m, group_info);
    RingCursor ring;
    Tile tile;
    while (scheduler.next(tile)) {
        const int32_t row0 = a_scale_row(tile);
        const float* kb_row = sa + int64_t(a_scale_kb_base(tile)) * sa_ld;
        const int32_t kb_end = ptx::opaque(k_block_end(tile));
#pragma unroll 1
        for (int32_t kb = k_block_begin(tile); kb < kb_end; kb += kStageKBlocks) {
            ptx::mbarrier_wait(&smem.empty[ring.stage], ring.phase ^ 1);
#pragma unroll
            for (int32_t slot = 0; slot < kStageKBlocks; ++slot) {
                // A stage's blocks past K (an odd number of K blocks) read as zeros.
                const bool in_k = kStageKBlocks == 1 || kb + slot < kNumKBlocks;
#pragma unroll
                for (int32_t piece = lane; piece < kScalePieces; piece += kScaleLanes) {
                    const int32_t row = row0 + piece * 4;
                    const int32_t bytes = in_k ? max(0, min(16, (sa_rows - row) * 4)) : 0;
                    const float* src = kb_row + (in_k ? int64_t(kb + slot) * sa_ld : 0) + (bytes > 0 ? row : 0);
                    ptx::cp_async_16(ptx::smem_addr(smem.sa(ring.stage) + slot * BLOCK_M + piece * 4), src, bytes);
                }
            }
            ptx::cp_async_mbarrier_arrive_noinc(&smem.full[ring.stage]);
            ring.advance();
        }
    }
}

// Writes this warpgroup's 64 rows of wave `wave` of the finished tile: fp32 registers ->
// bf16 in swizzled shared memory (stmatrix) -> TMA store, which runs on while
// the next tile's main loop starts.  A masked group's last tile has rows that
// must stay untouched; it is copied row by row instead of with the TMA box. So is
// the last N block when N is not a multiple of 8: TMA stores write whole 16-byte
// chunks, so the box would also write the columns up to the next multiple of 8,
// which belong to the caller when `out` is a view of a wider tensor.
DG_DEVICE void store_tile(const float (&acc)[kAccRegs], const Tile& tile, const TmaDescriptor* tma_out,
                          uint8_t* smem_out, uint8_t* out, int32_t out_ld_bytes, int32_t wave = 0) {
    const uint32_t wg = threadIdx.x / 128 - 1;
    const uint32_t slice = wave * 128 + wg * 64;  // first row of this warpgroup's slice
    const uint32_t t = threadIdx.x % 128;
    const uint32_t warp = t / 32, lane = t % 32;
    const int32_t n0 = tile.n_block * BLOCK_N;
    constexpr uint32_t kChunkBytes = BLOCK_M * kOutChunkBytesPerRow;

    // The previous tile's store must have finished reading the buffer (a later
    // wave writes rows that this tile's earlier waves' stores do not read).
    if (t == 0 && wave == 0) ptx::tma_store_wait_read();
    ptx::named_barrier(1 + wg, 128);

    // stmatrix.x4 writes two 8-column groups of 16 rows: matrix j = lane / 8
    // holds rows (j % 2) * 8 .. +8 of column group i + j / 2.
    const uint32_t j = lane / 8;
    const uint32_t row = wg * 64 + warp * 16 + (j % 2) * 8 + lane % 8 + wave * 128;
#pragma unroll
    for (int i = 0; i < BLOCK_N / 8; i += 2) {
        const uint32_t col = (i + j / 2) * 8;
        const uint32_t addr = ptx::smem_addr(smem_out) + (col / STORE_CHUNK_COLS) * kChunkBytes +
                              out_swizzled_offset(row, (col % STORE_CHUNK_COLS) / 8);
        ptx::stmatrix_x4(addr, ptx::pack_bf16x2(acc[4 * i + 0], acc[4 * i + 1]),
                         ptx::pack_bf16x2(acc[4 * i + 2], acc[4 * i + 3]),
                         ptx::pack_bf16x2(acc[4 * i + 4], acc[4 * i + 5]),
                         ptx::pack_bf16x2(acc[4 * i + 6], acc[4 * i + 7]));
    }
    ptx::fence_proxy_async_shared();
    ptx::named_barrier(1 + wg, 128);

    const bool n_edge = SHAPE_N % 8 != 0 && n0 + BLOCK_N > SHAPE_N;
    if ((LAYOUT != kMasked || tile.rows_valid >= BLOCK_M) && !n_edge) {
        if (t == 0) {
#pragma unroll
            for (int c = 0; c < kNumOutChunks; ++c)
                ptx::tma_store_2d(tma_out,
                                  smem_out + c * kChunkBytes + (wg * 64 + wave * 128) * kOutChunkBytesPerRow,
                                  n0 + c * STORE_CHUNK_COLS, tile.row_begin + wg * 64 + wave * 128);
            ptx::tma_store_commit();
        }
        return;
    }
    const int32_t rows_here = min(64, tile.rows_valid - int32_t(slice));
    constexpr int32_t kUnitsPerRow = BLOCK_N / 8;  // 16-byte units
    for (int32_t idx = t; idx < rows_here * kUnitsPerRow; idx += 128) {
        const int32_t r = idx / kUnitsPerRow, col = (idx % kUnitsPerRow) * 8;
        if (n0 + col >= SHAPE_N) continue;
        const uint8_t* src = smem_out + (col / STORE_CHUNK_COLS) * kChunkBytes +
                             out_swizzled_offset(slice + r, (col % STORE_CHUNK_COLS) / 8);
        uint8_t* dst = out + int64_t(tile.row_begin + slice + r) * out_ld_bytes + int64_t(n0 + col) * 2;
        if (SHAPE_N % 8 == 0 || n0 + col + 8 <= SHAPE_N) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {  // the row's last columns, one bf16 at a time
            for (int32_t e = 0; e < SHAPE_N - n0 - col; ++e)
                reinterpret_cast<uint16_t*>(dst)[e] = reinterpret_cast<const uint16_t*>(src)[e];
        }
    }
}

// Split-K: sums the tile's partial results; true in the unit that must store
// the tile (the last of its units to arrive), whose `acc` then holds
// the sum. Each unit's partial tile is one workspace slot, laid out as each
// thread's accumulators in groups of four, thread-minor, so that every write
// and read is a coalesced 16-byte access and a thread only ever reads back the
// values it holds itself. Ordering: the math threads' barrier orders every
// thread's writes before one thread's acquire-release count (cumulativity of
// the PTX memory model, the pattern CUTLASS's split-K semaphores use: one GPU
// fence per unit instead of one per thread); in the last unit the same count
// acquires the other units' partials, which every thread then reads through L2
// (.cg: never stale L1 lines) after the second barrier. Summing in split order
// 0, 1, ... makes the result independent of which unit comes last.
DG_DEVICE bool reduce_split_k(float (&acc)[kAccRegs], const Tile& tile, SharedStorage& smem, float* workspace,
                              int32_t* tile_counters) {
    const uint32_t t = threadIdx.x - 128;  // 0 .. kNumMathThreads
    constexpr int32_t kSlotFloats = BLOCK_M * BLOCK_N;
    float4* slots = reinterpret_cast<float4*>(workspace + int64_t(tile.tail_index) * tile.num_splits * kSlotFloats);
    float4* mine = slots + tile.split * (kSlotFloats / 4);
#pragma unroll
    for (int i = 0; i < kAccRegs / 4; ++i)
        __stcg(mine + i * kNumMathThreads + t, make_float4(acc[4 * i], acc[4 * i + 1], acc[4 * i + 2], acc[4 * i + 3]));
    ptx::named_barrier(kSplitKBarrier, kNumMathThreads);
    if (t == 0) {
        const bool last = ptx::atomic_add_acq_rel_gpu(tile_counters + tile.tail_index, 1) == tile.num_splits - 1;
        if (last) tile_counters[tile.tail_index] = 0;  // ready for the next launch (and CUDA graph replay)
        *smem.last_unit = last;
    }
    ptx::named_barrier(kSplitKBarrier, kNumMathThreads);
    // No thread writes the flag again before every thread has passed the first
    // barrier of the next unit, i.e. after reading it here. Read through a
    // shuffle from lane 0: ptxas then knows the branch is warp-uniform (a plain
    // shared-memory value made everything after it divergent, and the next
    // tiles' wgmma descriptors left the uniform registers: perf-notes 13).
    if (!__shfl_sync(0xffffffffu, *reinterpret_cast<volatile int32_t*>(smem.last_unit), 0)) return false;
    // One split at a time, all of its loads in flight at once (a load per group
    // of four would wait out an L2 round trip each). Tiles wider than 128 columns
    // have no room for a third register tile (acc, the sum and a split's values:
    // 3 x 80 registers at BLOCK_N = 160 spilled), so they read their own partial back
    // from the workspace too and sum into acc.
    constexpr bool kSumIntoAcc = kAccRegs > 64;
    auto sum_splits = [&](float(&sum)[kAccRegs]) {
#pragma unroll 1
        for (int32_t s = 0; s < tile.num_splits; ++s) {
            float part[kAccRegs];
            if (!kSumIntoAcc && s == tile.split) {
#pragma unroll
                for (int i = 0; i < kAccRegs; ++i) part[i] = acc[i];
            } else {
                const float4* slot = slots + s * (kSlotFloats / 4);
#pragma unroll
                for (int i = 0; i < kAccRegs / 4; ++i) {
                    const float4 v = __ldcg(slot + i * kNumMathThreads + t);
                    part[4 * i] = v.x, part[4 * i + 1] = v.y, part[4 * i + 2] = v.z, part[4 * i + 3] = v.w;
                }
            }
#pragma unroll
            for (int i = 0; i < kAccRegs; ++i) sum[i] = s == 0 ? part[i] : sum[i] + part[i];
        }
    };
    if constexpr (kSumIntoAcc) {
        sum_splits(acc);
    } else {
        float sum[kAccRegs];
        sum_splits(sum);
#pragma unroll
        for (int i = 0; i < kAccRegs; ++i) acc[i] = sum[i];
    }
    return true;
}

DG_DEVICE void consume(const TmaDescriptor* tma_out, SharedStorage& smem, const float* sb, uint8_t* out,
                       int32_t out_ld_bytes, int32_t shape_m, int32_t a_tail_rows, const int32_t* group_info,
                       float* workspace, int32_t* tile_counters) {
    const uint32_t wg = threadIdx.x / 128 - 1;
    const uint32_t warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    // This thread's accumulators cover tile rows r and r + 8 (wgmma's layout).
    const uint32_t r = wg * 64 + warp * 16 + lane / 4;
    // Stage 0's addresses in the forms the loop uses: A's and B's wgmma
    // descriptors (low words) and this thread's row r of A's scales.
    // A's is computed from warp_index(), which the compiler knows is warp-uniform
    // (wg is not), so the descriptors live in uniform registers.
    const uint32_t wg_uniform = ptx::warp_index() / 4 - 1;
    const uint32_t desc_a_ring = ptx::smem_desc_low(ptx::smem_addr(smem.a(0) + wg_uniform * 64 * BLOCK_K));
    const uint32_t desc_b_ring = ptx::smem_desc_low(ptx::smem_addr(smem.b(0)));
    const uint32_t sa_ring_addr = ptx::smem_addr(smem.sa(0) + r);

    // B's scales come from global memory (L2), 32 K blocks at a time: lane i
    // holds block chunk + i's scale, loaded a whole chunk ahead, and each K
    // block takes its value with a shuffle. A scale loaded just before it is
    // needed (one or two K blocks ahead) stalled the wgmma issue on L2 latency
    // in Nsight Compute: ptxas moves such a warp-uniform value into a uniform
    // register right after the load. Per-lane addresses keep the loads out of
    // that path, and a chunk ahead hides the latency. With a short K a tile's
    // first chunk is loaded during the previous tile (as is the next tile
    // itself, whose scheduling may read group sizes or expert indices).
    struct BScaleRows {
        const float* first;   // row of the tile's first 128-column scale block
        const float* second;  // the next block's row (= first when the tile has one)
        int32_t split;        // columns from `split` on take `second`'s scales
    };
    auto b_scale_rows = [&](const Tile& t) {
        const int32_t n0 = t.n_block * BLOCK_N;
        // A tile past N (the idle half of a cluster's last unit) reads the last
        // scale row: its results are never stored.
        const int32_t sb_row = min(n0 / 128, kNumScaleBRows - 1);
        BScaleRows rows;
        rows.first = sb + (int64_t(t.group) * kNumScaleBRows + sb_row) * kNumKBlocks;
        rows.split = kOneScaleB ? BLOCK_N : min(128 - n0 % 128, BLOCK_N);
        rows.second = rows.split < BLOCK_N && sb_row + 1 < kNumScaleBRows ? rows.first + kNumKBlocks : rows.first;
        return rows;
    };
    Scheduler scheduler(shape_m, group_info);
    constexpr bool kManyChunks = kNumKBlocks > 32;
    // Lane's K block in chunk c of K blocks [begin, end), a tile's share of K (clamped
    // into the share; an empty split share: its begin, which is still a K block).
    auto chunk_kb = [&](int32_t begin, int32_t end, int32_t c) {
        return max(begin, min(begin + c * 32 + int32_t(lane), end - 1));
    };

    // Where the next tile (whose scheduling may read group sizes or expert indices)
    // and its first scale chunk are fetched. With a short K, one tile ahead: that
    // first load is then a large part of a tile's time (+3-5% at K <= 2048). With a
    // long K, values live across the main loop cost more than they save (-4-7% at
    // K = 7168/16384), so they are fetched after it: in contiguous kernels right
    // after the main loop, where the chain of loads (the tile's expert index, then
    // its B scales) overlaps the epilogue (+1.4-2.7% at K = 7168); in the others
    // after the epilogue (the same move measured -1% to -1.5% on masked 4x256
    // 4096x7168 and 64x7168x16384: docs/perf-notes.md, section 19).
    constexpr bool kLookAhead = !kManyChunks;
    constexpr bool kFetchBeforeEpilogue = kManyChunks && LAYOUT == kContiguous;
    auto first_chunk = [&](const Tile& t, float& sb0, float& sb1) {
        const BScaleRows rows = b_scale_rows(t);
        const int32_t kb = chunk_kb(k_block_begin(t), k_block_end(t), 0);
        sb0 = ptx::ldg_float(rows.first + kb);
        sb1 = kOneScaleB ? sb0 : ptx::ldg_float(rows.second + kb);
    };

    RingCursor ring;
    Tile tile;
    bool has_tile = scheduler.next(tile);
    float sb0_first_chunk = 0.f, sb1_first_chunk = 0.f;
    if ((kLookAhead || kFetchBeforeEpilogue) && has_tile) first_chunk(tile, sb0_first_chunk, sb1_first_chunk);
    float acc[kMWaves][kAccRegs];
    float part[kAccRegs];
    float part_next[kAccRegs];  // unused (and free) without pipelined promotion
    while (has_tile) {
        Tile next_tile;
        bool has_next = false;
        float sb0_next_tile = 0.f, sb1_next_tile = 0.f;
        auto look_ahead = [&]() {
            has_next = scheduler.next(next_tile);
            if (has_next) first_chunk(next_tile, sb0_next_tile, sb1_next_tile);
        };
        if (kLookAhead) {
            look_ahead();
        } else if (!kFetchBeforeEpilogue) {
            first_chunk(tile, sb0_first_chunk, sb1_first_chunk);
        }
        // The tile's main loop. A split-capable kernel runs it in two forms: whole tiles
        // with compile-time K bounds, exactly like a kernel without split-K, and split
        // units with run-time ones (run-time bounds everywhere made whole tiles of such
        // kernels a few % slower: docs/perf-notes.md, sections 13 and 17).
        // fixed_split: the tile's split as a compile-time value (FIXED_SCALE_SPLIT), or 0.
        auto main_loop = [&](auto whole_tile, auto fixed_split) {
            constexpr bool kWhole = decltype(whole_tile)::value;
            constexpr int32_t kSplit = decltype(fixed_split)::value;
            const BScaleRows sb_rows = b_scale_rows(tile);
            const float* sb_first = sb_rows.first;
            const float* sb_second = sb_rows.second;
            const int32_t split = kSplit > 0 ? kSplit : sb_rows.split;
            const int32_t kb_begin = kWhole ? 0 : k_block_begin(tile);
            // An odd number of K blocks known at compile time (K = 576, 1408, 4224, ..., five
            // blocks or more) made ptxas serialise every wgmma of the pipelined loop (C7514: a wait
            // after each k32 step); hidden from the compiler, the count gives the loop that even
            // counts get (SASS; every other kernel is unchanged).
            constexpr bool kHideCount = kPipelinePromotion && kNumKBlocks % 2 == 1;
            const int32_t kb_end = kWhole ? (kHideCount ? ptx::opaque(kNumKBlocks) : kNumKBlocks) : k_block_end(tile);
            // Several K blocks a stage: the distance between a stage's slots of A (and of A's
            // scales, when TMA brings them) is the rows of its box, fewer for a tail tile.
            const bool tail = kStageKBlocks > 1 && LAYOUT == kDense && a_tail_rows > 0 &&
                              tile.row_begin + BLOCK_M > shape_m;
            const uint32_t a_slot_rows = tail ? a_tail_rows : BLOCK_M;
            const uint32_t a_slot_desc = a_slot_rows * BLOCK_K >> 4;
            const uint32_t sa_slot_bytes = (SA_LOADER_WARP ? BLOCK_M : a_slot_rows) * 4;

#pragma unroll
            for (int w = 0; w < kMWaves; ++w)
#pragma unroll
                for (int i = 0; i < kAccRegs; ++i) acc[w][i] = 0.f;

            // One K block: wait for its stage, read its scales, issue its 4 wgmmas
            // into `part` (asynchronous), and later retire it: release the stage
            // and promote `part` into `acc` with sa * sb.
            struct BlockScales {
                float sa0, sa1, sb0, sb1;  // A's rows r / r + 8; B's scale block 0 / 1
                int32_t stage, slot;       // where the block is in the ring
                bool last_of_stage;        // retiring it frees the stage
            };
            float sb0_chunk = sb0_first_chunk, sb1_chunk = sb1_first_chunk;
            float sb0_next_chunk = 0.f, sb1_next_chunk = 0.f;
            if (kManyChunks) {
                const int32_t kb_next = chunk_kb(kb_begin, kb_end, 1);
                sb0_next_chunk = ptx::ldg_float(sb_first + kb_next);
                sb1_next_chunk = kOneScaleB ? sb0_next_chunk : ptx::ldg_float(sb_second + kb_next);
            }
            // The wgmmas of one 64-row slice of the block at scales.stage / slot (wave 1: the
            // second 128 rows of a 256-row tile), after reading that slice's A scales into `scales`.
            // With PIPELINE_HALVES, part is half a tile: the first N half (through issue()), or the
            // second one (second_half: B's rows from BLOCK_N / 2 on; the A scales are read already).
            auto issue_slice = [&](auto& part, BlockScales& scales, int wave, bool second_half = false) {
                constexpr int kRegs = sizeof(part) / sizeof(float);
                const int32_t stage = scales.stage, slot = scales.slot;
                if (!second_half) {
                    const uint32_t sa_addr =
                        sa_ring_addr + stage * (kStageScales * 4) + slot * sa_slot_bytes + wave * (128 * 4);
                    scales.sa0 = ptx::lds_float(sa_addr);
                    scales.sa1 = ptx::lds_float(sa_addr + 8 * 4);
                }
                const uint32_t desc_a =
                    desc_a_ring + stage * (kStageBytesA >> 4) + slot * a_slot_desc + wave * (128 * BLOCK_K >> 4);
                const uint32_t desc_b = desc_b_ring + stage * (kStageBytesB >> 4) + slot * (kTileBytesB >> 4) +
                                        (second_half ? (BLOCK_N / 2) * BLOCK_K >> 4 : 0);
#pragma unroll
                for (int i = 0; i < kRegs; ++i) ptx::fence_register(part[i]);
                ptx::wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BLOCK_K / 32; ++kk)  // 32 fp8 = 32 bytes of the swizzled row
                    wgmma_m64k32(part, ptx::smem_desc(desc_a + kk * (32 >> 4)), ptx::smem_desc(desc_b + kk * (32 >> 4)),
                                 kk > 0);
                ptx::wgmma_commit();
            };
            auto issue = [&](auto& part, int32_t kb, BlockScales& scales) {
                const int32_t step = kb - kb_begin;
                if (kManyChunks && step % 32 == 0 && step > 0) {  // a new chunk: rotate, load the one after
                    sb0_chunk = sb0_next_chunk;
                    sb1_chunk = sb1_next_chunk;
                    const int32_t kb_next = chunk_kb(kb_begin, kb_end, step / 32 + 1);
                    sb0_next_chunk = ptx::ldg_float(sb_first + kb_next);
                    sb1_next_chunk = kOneScaleB ? sb0_next_chunk : ptx::ldg_float(sb_second + kb_next);
                }
                scales.sb0 = __shfl_sync(0xffffffffu, sb0_chunk, step % 32);
                scales.sb1 = kOneScaleB ? scales.sb0 : __shfl_sync(0xffffffffu, sb1_chunk, step % 32);
                if (kStageKBlocks == 1 || ring.slot == 0) ptx::mbarrier_wait(&smem.full[ring.stage], ring.phase);
                scales.stage = ring.stage;
                scales.slot = ring.slot;
                scales.last_of_stage = ring.slot == kStageKBlocks - 1 || kb == kb_end - 1;
                issue_slice(part, scales, 0);
                ring.advance_k_block();
            };
            auto release = [&](int32_t stage) {
                // The loader warp's cp.async writes come from threads, so every lane's read of
                // the stage's A scales must be ordered before the one lane's release that lets
                // them in: an mbarrier arrive releases only its own thread's accesses
                // (docs/perf-notes.md, section 24).
                if (SA_LOADER_WARP) __syncwarp();
                if (CLUSTER_N == 1) {
                    if (lane == 0) ptx::mbarrier_arrive(&smem.empty[stage]);
                } else if (lane < CLUSTER_N) {
                    ptx::mbarrier_signal_cluster(&smem.empty[stage], lane);
                }
            };
            // part: the block's results for the tile's columns [first_col, first_col + its width)
            // (all of them, or one N half with PIPELINE_HALVES).
            constexpr ptx::IntConstant<0> kAllColumns;
            auto promote = [&](float(&acc)[kAccRegs], const auto& part, const BlockScales& scales, auto first_col) {
                constexpr int kFirstCol = decltype(first_col)::value;
                constexpr int kRegs = sizeof(part) / sizeof(float);
                const float top0 = scales.sa0 * scales.sb0, top1 = scales.sa0 * scales.sb1;
                const float bottom0 = scales.sa1 * scales.sb0, bottom1 = scales.sa1 * scales.sb1;
#pragma unroll
                for (int i = 0; i < kRegs / 4; ++i) {
                    // split is a multiple of 16, so a whole 8-column group shares one scale.
                    const bool second = !kOneScaleB && kFirstCol + i * 8 >= split;
                    const float top = second ? top1 : top0;
                    const float bottom = second ? bottom1 : bottom0;
                    constexpr int kBase = kFirstCol / 2;  // two registers a column pair per row pair
                    acc[kBase + 4 * i + 0] += part[4 * i + 0] * top;
                    acc[kBase + 4 * i + 1] += part[4 * i + 1] * top;
                    acc[kBase + 4 * i + 2] += part[4 * i + 2] * bottom;
                    acc[kBase + 4 * i + 3] += part[4 * i + 3] * bottom;
                }
            };
            auto retire = [&](float(&part)[kAccRegs], const BlockScales& scales) {
#pragma unroll
                for (int i = 0; i < kAccRegs; ++i) ptx::fence_register(part[i]);
                if (scales.last_of_stage) release(scales.stage);
                promote(acc[0], part, scales, kAllColumns);
            };

            if constexpr (kPipelineHalves) {
                // The second half's retirement releases the block's stage (both halves have read it).
                auto retire_half = [&](float(&half)[kAccRegs / 2], const BlockScales& scales, auto h) {
                    constexpr int32_t kHalf = decltype(h)::value;
#pragma unroll
                    for (int i = 0; i < kAccRegs / 2; ++i) ptx::fence_register(half[i]);
                    if (kHalf == 1 && scales.last_of_stage) release(scales.stage);
                    promote(acc[0], half, scales, ptx::IntConstant<kHalf * (BLOCK_N / 2)>());
                };
                constexpr ptx::IntConstant<0> kFirst;
                constexpr ptx::IntConstant<1> kSecond;
                float half0[kAccRegs / 2], half1[kAccRegs / 2];
                BlockScales scales, next;
                // Units 2 kb (half 0 of block kb) and 2 kb + 1 (half 1), in the shape of the
                // two-tile loop below: each half of the loop body either issues the next unit and
                // retires this one, or waits for everything, retires and leaves. Shorter forms
                // (a body issuing both halves of a block, with or without the first half's
                // condition, which is always true) made ptxas serialise every wgmma (C7514).
                const int32_t u_end = 2 * (kb_end - kb_begin);
                int32_t u = 0;
                if (u < u_end) {
                    issue(half0, kb_begin, scales);
                    while (true) {
                        if (u + 1 < u_end) {
                            issue_slice(half1, scales, 0, true);  // issue() put in the first half
                            ptx::wgmma_wait<1>();
                            retire_half(half0, scales, kFirst);
                        } else {
                            ptx::wgmma_wait<0>();
                            retire_half(half0, scales, kFirst);
                            break;
                        }
                        ++u;
                        if (u + 1 < u_end) {
                            issue(half0, kb_begin + (u + 1) / 2, next);
                            ptx::wgmma_wait<1>();
                            retire_half(half1, scales, kSecond);
                            scales = next;
                        } else {
                            ptx::wgmma_wait<0>();
                            retire_half(half1, scales, kSecond);
                            break;
                        }
                        ++u;
                    }
                }
            } else if (kPipelinePromotion) {
                // Two register tiles: block kb + 1's wgmmas run while block kb is promoted.
                // Each half of the loop either issues the next block and retires this
                // one, or (last block) waits for everything and leaves: with no path
                // that skips an issue and goes on, ptxas can tell which wgmma group
                // each wait<1> completes and keeps two in flight (other shapes of
                // this loop made it inject waits, C7517, or serialise, C7514). The two
                // halves are written out: folding them into one lambda changed ptxas'
                // schedule (4096x32768x512 measured 141 -> 164 us in the run that tried it).
                BlockScales scales0, scales1;
                int32_t kb = kb_begin;
                if (kb < kb_end) {
                    issue(part, kb, scales0);
                    while (true) {
                        if (kb + 1 < kb_end) {
                            issue(part_next, kb + 1, scales1);
                            ptx::wgmma_wait<1>();
                            retire(part, scales0);
                        } else {
                            ptx::wgmma_wait<0>();
                            retire(part, scales0);
                            break;
                        }
                        ++kb;
                        if (kb + 1 < kb_end) {
                            issue(part, kb + 1, scales0);
                            ptx::wgmma_wait<1>();
                            retire(part_next, scales1);
                        } else {
                            ptx::wgmma_wait<0>();
                            retire(part_next, scales1);
                            break;
                        }
                        ++kb;
                    }
                }
            } else if (kMWaves == 1) {
                for (int32_t kb = kb_begin; kb < kb_end; ++kb) {
                    BlockScales scales;
                    issue(part, kb, scales);
                    ptx::wgmma_wait<0>();
                    retire(part, scales);
                }
            } else {
                // Two waves per K block on one stage: wave 0's wgmmas are issued by issue(),
                // wave 1's here; the stage is released once both have read it.
                for (int32_t kb = kb_begin; kb < kb_end; ++kb) {
                    BlockScales scales;
                    issue(part, kb, scales);
                    ptx::wgmma_wait<0>();
#pragma unroll
                    for (int i = 0; i < kAccRegs; ++i) ptx::fence_register(part[i]);
                    promote(acc[0], part, scales, kAllColumns);
#pragma unroll
                    for (int w = 1; w < kMWaves; ++w) {
                        issue_slice(part, scales, w);
                        ptx::wgmma_wait<0>();
#pragma unroll
                        for (int i = 0; i < kAccRegs; ++i) ptx::fence_register(part[i]);
                        if (w == kMWaves - 1 && scales.last_of_stage) release(scales.stage);
                        promote(acc[w], part, scales, kAllColumns);
                    }
                }
            }
        };
        if constexpr (kFixedScaleSplit) {
            auto run_tile = [&](auto whole_tile) {
                auto loop = [&](auto fixed_split) { main_loop(whole_tile, fixed_split); };
                with_fixed_split<0>(b_scale_rows(tile).split, loop);
            };
            if (SPLIT_K == 1 || tile.num_splits == 1) {
                run_tile(ptx::Constant<true>());
            } else {
                run_tile(ptx::Constant<false>());
            }
        } else if (SPLIT_K == 1 || tile.num_splits == 1) {
            main_loop(ptx::Constant<true>(), ptx::IntConstant<0>());
        } else {
            main_loop(ptx::Constant<false>(), ptx::IntConstant<0>());
        }
        ring.end_tile();
        if (kFetchBeforeEpilogue) look_ahead();
        if (SPLIT_K == 1 || tile.num_splits == 1 || reduce_split_k(acc[0], tile, smem, workspace, tile_counters)) {
#pragma unroll
            for (int w = 0; w < kMWaves; ++w) store_tile(acc[w], tile, tma_out, smem.out, out, out_ld_bytes, w);
        }
        if (!kLookAhead && !kFetchBeforeEpilogue) has_next = scheduler.next(next_tile);
        tile = next_tile;
        has_tile = has_next;
        sb0_first_chunk = sb0_next_tile;
        sb1_first_chunk = sb1_next_tile;
    }
    if (threadIdx.x % 128 == 0) ptx::tma_store_wait_all();
}

}  // namespace gemm

extern "C" __global__ void __launch_bounds__(gemm::kNumThreads, 1)
    deep_gemm_fp8_gemm(const __grid_constant__ TmaDescriptor tma_a, const __grid_constant__ TmaDescriptor tma_b,
                       const __grid_constant__ TmaDescriptor tma_sa, const __grid_constant__ TmaDescriptor tma_out,
                       const __grid_constant__ TmaDescriptor tma_a_tail, const __grid_constant__ TmaDescriptor tma_sa_tail,
                       const float* sa, const float* sb, uint8_t* out,
                       int32_t out_ld_bytes, int32_t shape_m, int32_t sa_rows, int32_t sa_ld, int32_t a_tail_rows,
                       const int32_t* group_info, float* workspace, int32_t* tile_counters) {
    using namespace gemm;
    extern __shared__ uint8_t smem_raw[];
    SharedStorage smem(smem_raw);
    if (threadIdx.x == 0) {
        ptx::prefetch_tma_descriptor(&tma_a);
        ptx::prefetch_tma_descriptor(&tma_b);
        if (!SA_LOADER_WARP) ptx::prefetch_tma_descriptor(&tma_sa);
        ptx::prefetch_tma_descriptor(&tma_out);
        if (a_tail_rows > 0) {
            ptx::prefetch_tma_descriptor(&tma_a_tail);
            if (!SA_LOADER_WARP) ptx::prefetch_tma_descriptor(&tma_sa_tail);
        }
        for (int s = 0; s < NUM_STAGES; ++s) {
            ptx::mbarrier_init(&smem.full[s], kFullArrivals);
            ptx::mbarrier_init(&smem.empty[s], kEmptyArrivals);  // one arrive per math warp of each block
        }
        ptx::fence_barrier_init();
    }
    // The peer block multicasts into our barriers: they must be live cluster-wide.
    if (CLUSTER_N > 1) ptx::cluster_sync(); else __syncthreads();

    if (threadIdx.x < 128) {
        ptx::setmaxnreg_dec<kProducerRegs>();
        if (threadIdx.x == 0) {
            produce(&tma_a, &tma_b, &tma_sa, &tma_a_tail, &tma_sa_tail, smem, shape_m, a_tail_rows, group_info);
        } else if (SA_LOADER_WARP && ptx::warp_index() == 1) {
            load_a_scales(sa, sa_rows, sa_ld, smem, shape_m, group_info);
        }
    } else {
        ptx::setmaxnreg_inc<kConsumerRegs>();
        consume(&tma_out, smem, sb, out, out_ld_bytes, shape_m, a_tail_rows, group_info, workspace, tile_counters);
    }
    // Neither block may exit while its peer can still arrive on its barriers.
    if (CLUSTER_N > 1) ptx::cluster_sync();
}
