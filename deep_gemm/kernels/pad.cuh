// Zero-padding of fp8 operands along K: rows of K bytes become rows of K16 = round_up(K, 16)
// bytes, the tail zero. TMA needs 16-byte row strides, so the GEMMs run on such copies when
// K % 16 != 0; one launch pads both operands of a call (two launches per operand with torch).
//
// Constants from the generated preamble (deep_gemm/jit/pad_source.py):
//   PAD_THREADS            threads per CTA
//   PAD_CHUNKS_PER_THREAD  16-byte destination chunks each thread writes
// Everything else (pointers, rows, K) is a run-time argument: one kernel serves every shape.
//
// Work split: the destination of each operand is a flat run of 16-byte chunks (row by row, K16 / 16
// a row), so chunk c is written at dst + 16 * c; only the source needs c's row and column. A CTA
// writes PAD_THREADS * PAD_CHUNKS_PER_THREAD consecutive chunks of one operand; its threads take
// them PAD_THREADS apart, so each store instruction of a warp covers 512 contiguous bytes.
// CTAs [0, ctas0) pad operand 0, the others operand 1.
//
// Reads: a source row starts at src + row * K, in general 16-byte aligned only when K % 16 == 0
// (never here). So the source is read in words of W = 8, 4, 2 or 1 bytes, the largest W that
// divides both K and src's address: then every row starts W-aligned, a chunk holds 16 / W whole
// words, and each word lies wholly inside the row's K bytes or wholly past them (never read).
//
// 32 registers at most (launch bounds), so 2048 threads per SM, each with all its chunks' loads in
// flight (64 bytes): enough outstanding reads to keep HBM busy on a copy.
#pragma once

#include "ptx.cuh"

namespace pad {

constexpr int kChunk = 16;
constexpr int kChunksPerCta = PAD_THREADS * PAD_CHUNKS_PER_THREAD;
static_assert(PAD_THREADS % 32 == 0, "whole warps only");

struct Operand {
    const uint8_t* src;  // rows of k bytes, back to back
    uint8_t* dst;        // rows of round_up(k, 16) bytes, 16-byte aligned
    int64_t rows;
    int32_t k;
};

// Bytes [0, 16) of a destination chunk whose source bytes start at p, `valid` of them in the row
// (valid > 0); the words past the row read as zero. T is the word type, W = sizeof(T).
template <typename T>
DG_DEVICE uint4 load_chunk(const uint8_t* __restrict__ p, int valid) {
    constexpr int kWordBytes = static_cast<int>(sizeof(T));
    uint64_t half[2] = {0, 0};
#pragma unroll
    for (int j = 0; j < kChunk / kWordBytes; ++j) {
        if (j * kWordBytes < valid) {
            const uint64_t word = reinterpret_cast<const T*>(p)[j];
            half[j * kWordBytes / 8] |= word << (8 * (j * kWordBytes % 8));
        }
    }
    return make_uint4(static_cast<uint32_t>(half[0]), static_cast<uint32_t>(half[0] >> 32),
                      static_cast<uint32_t>(half[1]), static_cast<uint32_t>(half[1] >> 32));
}

// This thread's chunks of the CTA's range: chunk `first_chunk` of the destination (flat, so chunk c
// starts at byte 16 * c), which is chunk `col_chunk` of row `row`. All loads are issued before
// the first store, so a thread keeps PAD_CHUNKS_PER_THREAD chunks in flight.
template <typename T>
DG_DEVICE void pad_chunks(const Operand& op, int64_t first_chunk, int64_t row, int col_chunk, int row_chunks,
                          int mine) {
    // Step from one of this thread's chunks to the next (PAD_THREADS chunks on) without dividing
    // again: whole rows plus a remainder of chunks.
    const int step_rows = PAD_THREADS / row_chunks;
    const int step_chunks = PAD_THREADS - step_rows * row_chunks;
    uint4 data[PAD_CHUNKS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < PAD_CHUNKS_PER_THREAD; ++i) {
        const int col = col_chunk * kChunk;
        if (i * PAD_THREADS < mine) data[i] = load_chunk<T>(op.src + row * op.k + col, op.k - col);
        row += step_rows;
        col_chunk += step_chunks;
        if (col_chunk >= row_chunks) {
            col_chunk -= row_chunks;
            ++row;
        }
    }
    // Every load of this block is issued: the next kernel (the GEMM) may be scheduled (PDL).
    ptx::griddepcontrol_launch_dependents();
    // Plain stores: the GEMM reads these rows next, so they may stay in L2.
    uint4* dst = reinterpret_cast<uint4*>(op.dst) + first_chunk;
#pragma unroll
    for (int i = 0; i < PAD_CHUNKS_PER_THREAD; ++i)
        if (i * PAD_THREADS < mine) dst[i * PAD_THREADS] = data[i];
}

}  // namespace pad

// The kernel below waits for the previous grid before touching memory: it may be launched with PDL.
DG_PDL_READY

extern "C" __global__ void __launch_bounds__(PAD_THREADS, 2048 / PAD_THREADS) deep_gemm_pad_k16(
    const uint8_t* __restrict__ src0, uint8_t* __restrict__ dst0, int64_t rows0, int32_t k0,
    const uint8_t* __restrict__ src1, uint8_t* __restrict__ dst1, int64_t rows1, int32_t k1,
    int32_t ctas0) {
    using namespace pad;
    const bool operand0 = static_cast<int32_t>(blockIdx.x) < ctas0;
    const Operand op = operand0 ? Operand{src0, dst0, rows0, k0} : Operand{src1, dst1, rows1, k1};
    const int64_t cta = operand0 ? blockIdx.x : blockIdx.x - ctas0;
    const int row_chunks = (op.k + kChunk - 1) / kChunk;

    // The CTA's first chunk, then this thread's: one division each.
    const int64_t start = cta * kChunksPerCta;
    const int64_t start_row = start / row_chunks;
    const int pos = static_cast<int>(start - start_row * row_chunks) + static_cast<int>(threadIdx.x);
    const int rows_in = pos / row_chunks;
    const int64_t row = start_row + rows_in;
    const int col_chunk = pos - rows_in * row_chunks;
    // This thread's chunk i exists if i * PAD_THREADS < mine (a CTA's range is kChunksPerCta long).
    const int64_t left = op.rows * row_chunks - start;
    const int mine = static_cast<int>(left < kChunksPerCta ? left : kChunksPerCta) - static_cast<int>(threadIdx.x);
    const int64_t first_chunk = start + threadIdx.x;

    // Launched with PDL the previous kernel may still run (it may be writing src, or reading dst):
    // everything above used only the parameters.
    ptx::griddepcontrol_wait();

    // The widest word that divides K and the source address (uniform over the CTA).
    const uint32_t align = static_cast<uint32_t>(reinterpret_cast<uint64_t>(op.src)) | static_cast<uint32_t>(op.k);
    if (align % 8 == 0) {
        pad_chunks<uint64_t>(op, first_chunk, row, col_chunk, row_chunks, mine);
    } else if (align % 4 == 0) {
        pad_chunks<uint32_t>(op, first_chunk, row, col_chunk, row_chunks, mine);
    } else if (align % 2 == 0) {
        pad_chunks<uint16_t>(op, first_chunk, row, col_chunk, row_chunks, mine);
    } else {
        pad_chunks<uint8_t>(op, first_chunk, row, col_chunk, row_chunks, mine);
    }
}
