// FP8 (e4m3) casts that feed the GEMMs: per-token (1x128 blocks) and per-block (128x128 blocks).
//
// Bit-identical to deep_gemm/reference.py as torch runs it on a CUDA tensor:
//   amax  = max |x| over the block, NaN-propagating, then max(amax, 1e-4)   (clamp(min=1e-4))
//   scale = amax * fp32(1/448)   (torch turns "tensor / python scalar" into a multiply by the
//                                 fp32 reciprocal on CUDA, so this is what the reference computes)
//   q     = e4m3(RNE, saturating) of x / scale, an IEEE division (what div.rn.f32 gives; see Divisor)
// The saturating conversion equals the reference's clamp(-448, 448) followed by RNE.
//
// Constants from the generated preamble (deep_gemm/jit/cast_source.py):
//   CAST_K                 columns of x
//   CAST_IN_DTYPE          CAST_BF16, CAST_FP16 or CAST_FP32
//   CAST_VEC               1: K % 16 == 0 and every row of x starts 16-byte aligned, so a thread
//                          moves its 16 elements with 16-byte loads and one 16-byte store;
//                          0: element-wise accesses with bounds checks (odd K, misaligned x)
//   CAST_PER_BLOCK         0: deep_gemm_per_token_cast, 1: deep_gemm_per_block_cast (ignored where
//                          cast_transposed.cuh includes this header for its helpers)
//   CAST_THREADS           threads per CTA (a multiple of 32)
//   CAST_AMAX_FLOOR_BITS   fp32 bits of the amax floor (1e-4 as torch converts it)
//   CAST_INV_FP8_MAX_BITS  fp32 bits of 1.0f / 448.0f
#pragma once

#include "ptx.cuh"

#define CAST_BF16 0
#define CAST_FP16 1
#define CAST_FP32 2

namespace cast {

constexpr int kBlock = 128;                     // scale granularity
constexpr int kChunk = 16;                      // consecutive elements of one row per thread
constexpr int kLanesPerBlock = kBlock / kChunk; // 8 lanes cover one 128-wide block of a row
constexpr int kKB = (CAST_K + kBlock - 1) / kBlock;
constexpr int kElemBytes = CAST_IN_DTYPE == CAST_FP32 ? 4 : 2;
constexpr int kWords = kChunk * kElemBytes / 4; // 32-bit words per chunk: 8 (16-bit) or 16 (fp32)
// A minimum of resident CTAs per SM, when the preamble sets one, caps the registers; without it
// ptxas picks the count (giving it "at least 1" instead makes it spend far more registers).
#ifdef CAST_MIN_BLOCKS
#define CAST_LAUNCH_BOUNDS __launch_bounds__(CAST_THREADS, CAST_MIN_BLOCKS)
#else
#define CAST_LAUNCH_BOUNDS __launch_bounds__(CAST_THREADS)
#endif
static_assert(CAST_THREADS % 32 == 0, "whole warps only: the reductions shuffle across full warps");

// ---- small PTX helpers -------------------------------------------------------------------------
DG_DEVICE float as_float(uint32_t bits) { return __uint_as_float(bits); }

// max that returns NaN if either input is NaN, like torch's amax and clamp.
DG_DEVICE float max_nan(float a, float b) {
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

DG_DEVICE float abs_f32(float a) {
    float r;
    asm("abs.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}

// Explicit rounding modes: keep the compiler from fusing or approximating either operation.
DG_DEVICE float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

DG_DEVICE float fma_rn(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}

DG_DEVICE float rcp_approx(float a) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}

// x / s rounded to nearest even (what div.rn.f32 returns), for the divisor of one block.
//
// div.rn.f32 compiles to a fast path (reciprocal by MUFU.RCP and one Newton step, then
// q0 = x * r, rem = fma(-s, q0, x), q = fma(r, rem, q0)) guarded by a range check (FCHK) that
// sends extreme operands to an out-of-line slow path. The divisor is shared by a whole block, so
// the reciprocal is computed once here, and the fast path is taken wherever it is exact:
//  * It is exact whenever x, s, r and every intermediate are normal: the steps only see the
//    mantissas then (scaling x or s by a power of two scales every step exactly), and the
//    compiler's own fast path is exact for every pair of mantissas.
//  * Here s = max(amax, 1e-4) / 448 lies in [2^-23, 2^120) (or is inf/NaN, handled apart) and
//    |x| <= amax, so |x / s| <= 448 and nothing overflows. For |x / s| >= 2^-24 everything is
//    normal. Below that the result may differ from div.rn in its low bits, but it stays under
//    2^-10 with the sign of x, so it converts to the same e4m3 value: +-0.
//  * x = -0 would come out +0 from the fmas, so zeros are passed through (x / s = x).
//  * s = inf or NaN (some |x| is inf or NaN): x / s is x * 0 (+-0, or NaN for x = +-inf) or NaN.
// tests/test_cast_gpu.py compares this with div.rn.f32 for every bf16 x against many divisors.
struct Divisor {
    float s, r;
    bool finite;

    DG_DEVICE explicit Divisor(float scale) : s(scale) {
        finite = scale < __int_as_float(0x7F800000);       // false for inf and NaN
        if (finite) {
            const float r0 = rcp_approx(scale);
            r = fma_rn(r0, fma_rn(-scale, r0, 1.0f), r0);
        } else {
            r = scale == __int_as_float(0x7F800000) ? 0.0f : scale;   // 1/inf = 0, 1/NaN = NaN
        }
    }

    DG_DEVICE float divide(float x) const {
        if (!finite) return mul_rn(x, r);
        const float q0 = mul_rn(x, r);
        const float q = fma_rn(r, fma_rn(-s, q0, x), q0);
        return x == 0.0f ? x : q;
    }
};

// Two fp32 -> two e4m3 bytes (lo in bits 0-7, hi in bits 8-15), RNE, saturating to +-448.
DG_DEVICE uint32_t e4m3x2(float lo, float hi) {
    uint32_t r;
    asm("{\n.reg .b16 t;\ncvt.rn.satfinite.e4m3x2.f32 t, %1, %2;\ncvt.u32.u16 %0, t;\n}"
        : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Read-only streaming loads: x is read exactly once, so don't keep it in L1. volatile: the
// compiler must not hoist a load above the bounds check that guards it.
DG_DEVICE void ld16(const void* p, uint32_t& a, uint32_t& b, uint32_t& c, uint32_t& d) {
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(a), "=r"(b), "=r"(c), "=r"(d) : "l"(p));
}

DG_DEVICE uint32_t ld_u16(const void* p) {
    uint16_t v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

DG_DEVICE uint32_t ld_u32(const void* p) { return ptx::ldg_int(static_cast<const int32_t*>(p)); }

DG_DEVICE void st16(void* p, uint32_t a, uint32_t b, uint32_t c, uint32_t d) {
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(a), "r"(b), "r"(c), "r"(d)
                 : "memory");
}

DG_DEVICE void st_u8(void* p, uint32_t v) {
    asm volatile("st.global.u8 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

// ---- one thread's chunk: 16 consecutive elements of one row, kept as raw input bits ------------
struct Chunk {
    uint32_t w[kWords];

    // Element i as fp32 (exact for every input dtype).
    DG_DEVICE float get(int i) const {
#if CAST_IN_DTYPE == CAST_FP32
        return as_float(w[i]);
#elif CAST_IN_DTYPE == CAST_BF16
        const uint32_t word = w[i / 2];
        return as_float(i % 2 ? (word & 0xFFFF0000u) : (word << 16));
#else
        float r;
        const uint16_t half = static_cast<uint16_t>(i % 2 ? (w[i / 2] >> 16) : (w[i / 2] & 0xFFFFu));
        asm("{\n.reg .f16 h;\nmov.b16 h, %1;\ncvt.f32.f16 %0, h;\n}" : "=f"(r) : "h"(half));
        return r;
#endif
    }

    // Elements [col, col + 16) of `row` (x + row offset); columns >= K and inactive rows read as 0,
    // which never raises an amax (the reference pads with zeros too).
    DG_DEVICE void load(const uint8_t* row, int col, bool active) {
#pragma unroll
        for (int i = 0; i < kWords; ++i) w[i] = 0;
#if CAST_VEC
        // K % 16 == 0: a chunk is either wholly inside the row or wholly past its end.
        if (active && col < CAST_K) {
            const uint8_t* p = row + static_cast<int64_t>(col) * kElemBytes;
#pragma unroll
            for (int i = 0; i < kWords; i += 4) ld16(p + i * 4, w[i], w[i + 1], w[i + 2], w[i + 3]);
        }
#else
        if (active) {
#pragma unroll
            for (int i = 0; i < kChunk; ++i) {
                if (col + i < CAST_K) {
                    const uint8_t* p = row + static_cast<int64_t>(col + i) * kElemBytes;
#if CAST_IN_DTYPE == CAST_FP32
                    w[i] = ld_u32(p);
#else
                    w[i / 2] |= ld_u16(p) << (16 * (i % 2));
#endif
                }
            }
        }
#endif
    }

    DG_DEVICE float amax() const {
        float m = 0.0f;
#pragma unroll
        for (int i = 0; i < kChunk; ++i) m = max_nan(m, abs_f32(get(i)));
        return m;
    }

    // Quantise (x / scale) and write the chunk's bytes to q_row[col, col + 16).
    DG_DEVICE void store(uint8_t* q_row, int col, bool active, const Divisor& d) const {
#if CAST_VEC
        uint32_t out[kChunk / 4];
#pragma unroll
        for (int i = 0; i < kChunk / 4; ++i) {
            const uint32_t lo = e4m3x2(d.divide(get(4 * i)), d.divide(get(4 * i + 1)));
            const uint32_t hi = e4m3x2(d.divide(get(4 * i + 2)), d.divide(get(4 * i + 3)));
            out[i] = lo | (hi << 16);
        }
        if (active && col < CAST_K) st16(q_row + col, out[0], out[1], out[2], out[3]);
#else
        // Byte by byte, each stored as soon as it is made: collecting them in an array first lets
        // the compiler turn the bounds checks into a run-time index (a stack frame) for tiny K.
        if (!active) return;
#pragma unroll
        for (int i = 0; i < kChunk; i += 2) {
            const uint32_t pair = e4m3x2(d.divide(get(i)), d.divide(get(i + 1)));
            if (col + i < CAST_K) st_u8(q_row + col + i, pair & 0xFFu);
            if (col + i + 1 < CAST_K) st_u8(q_row + col + i + 1, pair >> 8);
        }
#endif
    }
};

// scale = clamp(amax, min=floor) * (1/448), in the reference's order.
DG_DEVICE float block_scale(float amax) {
    return mul_rn(max_nan(amax, as_float(CAST_AMAX_FLOOR_BITS)), as_float(CAST_INV_FP8_MAX_BITS));
}

}  // namespace cast

#if defined(CAST_TRANSPOSED)
// cast_transposed.cuh defines its own kernel on the helpers above: one kernel per translation unit.
#elif !CAST_PER_BLOCK
// Per-token: x is rows of K elements (row r of group g is x + (g * m + r) * x_row_stride elements).
// Each group of 8 lanes quantises one 128-wide block of one row; a CTA takes CAST_THREADS / 8
// consecutive (row, k-block) units of one group. The scale of (g, r, kb) goes straight to the
// column-major TMA-aligned layout: scales[(g * KB + kb) * aligned_m + r].
extern "C" __global__ void CAST_LAUNCH_BOUNDS deep_gemm_per_token_cast(
    const uint8_t* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
    int64_t x_row_stride, int32_t m, int32_t aligned_m, int32_t ctas_per_group) {
    using namespace cast;
    constexpr int kUnitsPerCta = CAST_THREADS / kLanesPerBlock;
    // One run-time division per thread; the divisions by KB below are by a constant.
    const uint32_t group = blockIdx.x / static_cast<uint32_t>(ctas_per_group);
    const uint32_t unit = (blockIdx.x - group * ctas_per_group) * kUnitsPerCta + threadIdx.x / kLanesPerBlock;
    const uint32_t r = unit / kKB;
    const uint32_t kb = unit - r * kKB;
    const bool active = r < static_cast<uint32_t>(m);   // idle lanes still join the shuffles
    const int col = kb * kBlock + (threadIdx.x % kLanesPerBlock) * kChunk;
    const int64_t row = static_cast<int64_t>(group) * m + r;

    Chunk chunk;
    chunk.load(x + row * x_row_stride * kElemBytes, col, active);
    float amax = chunk.amax();
#pragma unroll
    for (int offset = kLanesPerBlock / 2; offset > 0; offset /= 2)
        amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    const float scale = block_scale(amax);
    if (active && threadIdx.x % kLanesPerBlock == 0)
        scales[(static_cast<int64_t>(group) * kKB + kb) * aligned_m + r] = scale;
    chunk.store(q + row * CAST_K, col, active, Divisor(scale));
}
#else
// Per-block: one CTA per 128x128 block of x (rows of group g start at g * n). Each thread holds
// 128 / (CAST_THREADS / 8) chunks of 16 (one per pass over the rows) in registers, so x is read once.
// scales[(g * nb_count + nb) * KB + kb], row-major.
extern "C" __global__ void CAST_LAUNCH_BOUNDS deep_gemm_per_block_cast(
    const uint8_t* __restrict__ x, uint8_t* __restrict__ q, float* __restrict__ scales,
    int64_t x_row_stride, int32_t n, int32_t nb_count) {
    using namespace cast;
    constexpr int kRowsPerPass = CAST_THREADS / kLanesPerBlock;
    constexpr int kPasses = kBlock / kRowsPerPass;
    constexpr int kWarps = CAST_THREADS / 32;
    static_assert(kBlock % kRowsPerPass == 0, "CAST_THREADS must divide 1024");
    __shared__ float warp_amax[kWarps];

    const uint32_t blocks_per_group = static_cast<uint32_t>(nb_count) * kKB;
    const uint32_t group = blockIdx.x / blocks_per_group;
    const uint32_t rem = blockIdx.x - group * blocks_per_group;
    const uint32_t nb = rem / kKB;
    const uint32_t kb = rem - nb * kKB;
    const int col = kb * kBlock + (threadIdx.x % kLanesPerBlock) * kChunk;
    const uint32_t r0 = nb * kBlock + threadIdx.x / kLanesPerBlock;
    const int64_t group_row = static_cast<int64_t>(group) * n;

    Chunk chunks[kPasses];
    float amax = 0.0f;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
        const uint32_t r = r0 + p * kRowsPerPass;
        chunks[p].load(x + (group_row + r) * x_row_stride * kElemBytes, col, r < static_cast<uint32_t>(n));
    }
#pragma unroll
    for (int p = 0; p < kPasses; ++p) amax = max_nan(amax, chunks[p].amax());
    // Every lane of a warp works on the same 128x128 block: reduce over the warp, then the CTA.
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) amax = max_nan(amax, __shfl_xor_sync(0xFFFFFFFFu, amax, offset));
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) amax = max_nan(amax, warp_amax[w]);
    const float scale = block_scale(amax);
    if (threadIdx.x == 0) scales[(static_cast<int64_t>(group) * nb_count + nb) * kKB + kb] = scale;
    const Divisor divisor(scale);
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
        const uint32_t r = r0 + p * kRowsPerPass;
        chunks[p].store(q + (group_row + r) * CAST_K, col, r < static_cast<uint32_t>(n), divisor);
    }
}
#endif
