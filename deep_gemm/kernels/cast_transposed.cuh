// Transposed per-token FP8 cast: x [T, H] row-major -> q = e4m3(x^T) [H, T] row-major, scaled per
// 1x128 block along T, for the operands of weight-gradient GEMMs (A = dY^T, B = X^T, both K-major
// with K = tokens). The numerics are cast.cuh's (amax floor, scale = amax * fp32(1/448), IEEE
// division, saturating RNE e4m3): q and the scales are bit-identical to the per-token cast of
// x.T.contiguous(), without x.T ever being written.
//
// Tokens come in groups (experts) of token_start[g + 1] - token_start[g] rows each; a dense cast is
// one group. Group g's output is its own [H, T_g] row-major block, starting at element
// token_start[g] * H of q, its 128-token blocks restarting at its first token; the scale of
// (column h, token block b) -- b counted over all groups, block_start[g] being g's first -- is
// scales[b * s_ld + h] (dense: s_ld = H rounded up to 4, the column-major TMA-aligned layout;
// K-grouped: s_ld = H, row-major [blocks][H]).
//
// One CTA per (token block, tile of 128 bytes of columns): the 128 x 128-byte tile of x lands in
// shared memory by 16-byte cp.async (coalesced rows), each thread then reads one 4-byte column
// word over 16 tokens (one or two columns), the 8 threads of a column word reduce their amax by
// shuffles, and each writes 16 e4m3 bytes (16 consecutive tokens) of each of its output rows.
//
// Constants from the generated preamble (deep_gemm/jit/cast_source.py), besides cast.cuh's:
//   CAST_K            H, the columns of x
//   CAST_VEC          1: every row of x starts 16-byte aligned and H * element size % 16 == 0
//                     (cp.async of whole chunks); 0: element-wise loads with bounds checks
//   CAST_MAX_GROUPS   groups one launch can take (1: dense)
//   CAST_MIN_BLOCKS   resident CTAs per SM the registers are budgeted for (cast.cuh's launch bounds)
#pragma once

#define CAST_TRANSPOSED 1
#include "cast.cuh"

namespace cast {
namespace transposed {

constexpr int kRowWords = 32;                        // one tile row: 128 bytes of x, 32 words
constexpr int kTileCols = 4 * kRowWords / kElemBytes; // 64 (16-bit inputs) or 32 (fp32) columns
constexpr int kColsPerWord = 4 / kElemBytes;
constexpr int kColTiles = (CAST_K + kTileCols - 1) / kTileCols;
constexpr int kRowBytes = CAST_K * kElemBytes;       // bytes of a row of x that hold data
constexpr int kChunksPerRow = 4 * kRowWords / 16;    // 16-byte chunks of a tile row: 8
constexpr int kTokensPerThread = 16;                 // one 16-byte chunk of an output row
constexpr int kLoadsPerThread = kBlock * kChunksPerRow / CAST_THREADS;
static_assert(CAST_THREADS == 256, "8 warps: warp w transposes column words 4w .. 4w + 3 of the tile");
static_assert(kBlock == 8 * kTokensPerThread, "8 lanes cover the 128 tokens of a column word");

// The kernel's one parameter (deep_gemm/ops/cast.py packs it; sizeof is checked below). The
// group tables are read with a run-time index, so the parameter is a grid constant: indexing it
// reads the constant bank instead of copying the parameter to local memory.
struct Params {
    const uint8_t* x;          // x [T, H], rows x_row_stride elements apart
    uint8_t* q;                // e4m3, group g's [H, T_g] block at element token_start[g] * H
    float* scales;             // scale (h, token block b) at b * s_ld + h
    int64_t x_row_stride;      // elements
    int32_t s_ld;              // floats between consecutive token blocks' scales
    int32_t num_groups;        // groups of this launch, <= CAST_MAX_GROUPS
    int32_t num_blocks;        // token blocks of this launch, block_start[num_groups]
    int32_t q_vec;             // 1: every output row starts 16-byte aligned (T_g % 16 == 0, q aligned)
    int32_t token_start[CAST_MAX_GROUPS + 1];   // group g: tokens [token_start[g], token_start[g + 1])
    int32_t block_start[CAST_MAX_GROUPS + 1];   // group g: token blocks [block_start[g], block_start[g + 1])
};
static_assert(sizeof(Params) == 56 + 8 * CAST_MAX_GROUPS, "Params must match ops/cast.py's packing");

DG_DEVICE void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

DG_DEVICE void sts16(uint32_t addr, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(a), "r"(b), "r"(c), "r"(d) : "memory");
}

// The group of token block `block`: the last g whose first block is <= block (empty groups own
// no block, so they are skipped). A binary search over the parameter's table.
DG_DEVICE int32_t group_of(const Params& p, int32_t block) {
    int32_t lo = 0;
#if CAST_MAX_GROUPS > 1
    int32_t hi = p.num_groups - 1;
    while (lo < hi) {
        const int32_t mid = (lo + hi + 1) / 2;
        if (p.block_start[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
#endif
    return lo;
}

// Shared-memory word of (tile row r, column word w). A thread reads one word column over 16
// consecutive rows while the other 7 token chunks of its warp read 16 rows further on each:
// XOR-ing the 16-byte chunk index with r / 16 puts those 8 rows on 8 different bank groups, so
// the warp's 32 reads hit 32 banks, and a 16-byte chunk of a row still lands whole.
DG_DEVICE int smem_word(int r, int w) { return r * kRowWords + (w ^ ((r / kTokensPerThread) << 2)); }

// The tile: rows [0, rows) of x_tile (a row of 128 bytes from the tile's first column), zeros past
// `rows` and past H (zeros never raise an amax: the reference pads with zeros too).
DG_DEVICE void load_tile(uint32_t* tile, const uint8_t* x_tile, int64_t row_bytes, int rows, int col_byte0) {
#pragma unroll
    for (int k = 0; k < kLoadsPerThread; ++k) {
        const uint32_t u = threadIdx.x + k * CAST_THREADS;
        const int r = static_cast<int>(u / kChunksPerRow), j = static_cast<int>(u % kChunksPerRow);
        const uint32_t dst = ptx::smem_addr(tile + smem_word(r, 4 * j));
#if CAST_VEC
        // H * element size % 16 == 0: a chunk is wholly inside a row or wholly past it. Zero
        // source bytes fill the chunk with zeros (the address is then never read, but stays valid).
        const bool ok = r < rows && col_byte0 + 16 * j < kRowBytes;
        ptx::cp_async_16(dst, ok ? x_tile + r * row_bytes + 16 * j : x_tile, ok ? 16 : 0);
#else
        constexpr int kPerChunk = 16 / kElemBytes;
        uint32_t w[4] = {0, 0, 0, 0};
        if (r < rows) {
            const uint8_t* row = x_tile + r * row_bytes;
#pragma unroll
            for (int e = 0; e < kPerChunk; ++e) {
                const int byte = 16 * j + e * kElemBytes;
                if (col_byte0 + byte < kRowBytes) {
#if CAST_IN_DTYPE == CAST_FP32
                    w[e] = ld_u32(row + byte);
#else
                    w[e / 2] |= ld_u16(row + byte) << (16 * (e % 2));
#endif
                }
            }
        }
        sts16(dst, w[0], w[1], w[2], w[3]);
#endif
    }
#if CAST_VEC
    cp_async_wait_all();
#endif
    __syncthreads();
}

// Element h (0 or 1 for 16-bit inputs, 0 for fp32) of a column word, as fp32 (exact).
DG_DEVICE float element(uint32_t word, int h) {
#if CAST_IN_DTYPE == CAST_FP32
    return as_float(word);
#elif CAST_IN_DTYPE == CAST_BF16
    return as_float(h ? (word & 0xFFFF0000u) : (word << 16));
#else
    float r;
    const uint16_t half = static_cast<uint16_t>(h ? (word >> 16) : (word & 0xFFFFu));
    asm("{\n.reg .f16 t;\nmov.b16 t, %1;\ncvt.f32.f16 %0, t;\n}" : "=f"(r) : "h"(half));
    return r;
#endif
}

// Bytes of a 16-token chunk to dst (its first token's byte). Aligned rows: one 16-byte store when
// the chunk is inside the group (T_g % 16 == 0 makes a chunk all in or all out); otherwise bytes
// up to the group's end.
DG_DEVICE void store_chunk(uint8_t* dst, const uint32_t (&out)[4], int32_t tokens_left, bool vec) {
    if (vec) {
        if (tokens_left > 0) st16(dst, out[0], out[1], out[2], out[3]);
        return;
    }
#pragma unroll
    for (int b = 0; b < kTokensPerThread; ++b)
        if (b < tokens_left) st_u8(dst + b, (out[b / 4] >> (8 * (b % 4))) & 0xFFu);
}

}  // namespace transposed
}  // namespace cast

extern "C" __global__ void CAST_LAUNCH_BOUNDS deep_gemm_per_token_cast_transposed(
    const __grid_constant__ cast::transposed::Params p) {
    using namespace cast;
    using namespace cast::transposed;
    __shared__ __align__(16) uint32_t tile[kBlock * kRowWords];

    // Column tiles vary fastest: CTAs running together read whole rows of x between them.
    const int32_t col_tile = static_cast<int32_t>(blockIdx.x % kColTiles);
    const int32_t block = static_cast<int32_t>(blockIdx.x / kColTiles);
    if (block >= p.num_blocks) return;
    const int32_t g = group_of(p, block);
    const int32_t group_tokens = p.token_start[g + 1] - p.token_start[g];
    const int32_t first = (block - p.block_start[g]) * kBlock;   // the tile's first token within its group
    const int32_t rows = group_tokens - first < kBlock ? group_tokens - first : kBlock;   // tokens of the tile
    const int64_t row_bytes = p.x_row_stride * kElemBytes;
    const int col_byte0 = col_tile * 4 * kRowWords;
    load_tile(tile, p.x + (static_cast<int64_t>(p.token_start[g]) + first) * row_bytes + col_byte0, row_bytes, rows,
              col_byte0);

    // This thread: column word `word` of the tile (columns kColsPerWord * word + h), tokens
    // [16 c, 16 c + 16) of it, read once (conflict-free, see smem_word).
    const int lane = threadIdx.x % 32;
    const int c = lane / 4;
    const int word = (threadIdx.x / 32) * 4 + lane % 4;
    uint32_t words[kTokensPerThread];
#pragma unroll
    for (int i = 0; i < kTokensPerThread; ++i) words[i] = tile[smem_word(c * kTokensPerThread + i, word)];

    float amax[kColsPerWord];
#pragma unroll
    for (int h = 0; h < kColsPerWord; ++h) {
        amax[h] = 0.0f;
#pragma unroll
        for (int i = 0; i < kTokensPerThread; ++i) amax[h] = max_nan(amax[h], abs_f32(element(words[i], h)));
        // The 8 lanes of a column word differ in lane bits 2-4: together they cover its 128 tokens.
#pragma unroll
        for (int offset = 4; offset < 32; offset *= 2)
            amax[h] = max_nan(amax[h], __shfl_xor_sync(0xFFFFFFFFu, amax[h], offset));
    }

    // Column h's 16 tokens as 16 e4m3 bytes in token order: tokens 4i .. 4i + 3 in out[h][i].
    Divisor divisors[kColsPerWord] = {Divisor(block_scale(amax[0]))
#if CAST_IN_DTYPE != CAST_FP32
                                      , Divisor(block_scale(amax[1]))
#endif
    };
    uint32_t out[kColsPerWord][4];
#pragma unroll
    for (int h = 0; h < kColsPerWord; ++h) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const Divisor& d = divisors[h];
            const uint32_t lo = e4m3x2(d.divide(element(words[4 * i], h)), d.divide(element(words[4 * i + 1], h)));
            const uint32_t hi = e4m3x2(d.divide(element(words[4 * i + 2], h)), d.divide(element(words[4 * i + 3], h)));
            out[h][i] = lo | (hi << 16);
        }
    }

    const int32_t tokens_left = rows - c * kTokensPerThread;   // of this chunk, inside the group
    uint8_t* q_group = p.q + static_cast<int64_t>(p.token_start[g]) * CAST_K;
    const int col0 = col_tile * kTileCols + word * kColsPerWord;
#pragma unroll
    for (int h = 0; h < kColsPerWord; ++h) {
        const int col = col0 + h;
        if (col < CAST_K) {
            if (c == 0) p.scales[static_cast<int64_t>(block) * p.s_ld + col] = divisors[h].s;
            uint8_t* dst = q_group + static_cast<int64_t>(col) * group_tokens + first + c * kTokensPerThread;
            store_chunk(dst, out[h], tokens_left, p.q_vec != 0);
        }
    }
}
