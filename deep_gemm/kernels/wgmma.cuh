// wgmma.mma_async wrappers (e4m3 and bf16 operands) for every tile width N = 16 .. 256 (multiples of 16).
// The instruction names each of its N / 2 fp32 accumulator registers as its own operand, so
// every width is its own asm statement; the macros below spell the operand lists out.
#pragma once
#include "ptx.cuh"

// "%0, %1, ..., %(R - 1)": the accumulators in the instruction text, R = 8 .. 128.
#define DG_REGS_8 "%0, %1, %2, %3, %4, %5, %6, %7"
#define DG_REGS_16 DG_REGS_8 ", %8, %9, %10, %11, %12, %13, %14, %15"
#define DG_REGS_24 DG_REGS_16 ", %16, %17, %18, %19, %20, %21, %22, %23"
#define DG_REGS_32 DG_REGS_24 ", %24, %25, %26, %27, %28, %29, %30, %31"
#define DG_REGS_40 DG_REGS_32 ", %32, %33, %34, %35, %36, %37, %38, %39"
#define DG_REGS_48 DG_REGS_40 ", %40, %41, %42, %43, %44, %45, %46, %47"
#define DG_REGS_56 DG_REGS_48 ", %48, %49, %50, %51, %52, %53, %54, %55"
#define DG_REGS_64 DG_REGS_56 ", %56, %57, %58, %59, %60, %61, %62, %63"
#define DG_REGS_72 DG_REGS_64 ", %64, %65, %66, %67, %68, %69, %70, %71"
#define DG_REGS_80 DG_REGS_72 ", %72, %73, %74, %75, %76, %77, %78, %79"
#define DG_REGS_88 DG_REGS_80 ", %80, %81, %82, %83, %84, %85, %86, %87"
#define DG_REGS_96 DG_REGS_88 ", %88, %89, %90, %91, %92, %93, %94, %95"
#define DG_REGS_104 DG_REGS_96 ", %96, %97, %98, %99, %100, %101, %102, %103"
#define DG_REGS_112 DG_REGS_104 ", %104, %105, %106, %107, %108, %109, %110, %111"
#define DG_REGS_120 DG_REGS_112 ", %112, %113, %114, %115, %116, %117, %118, %119"
#define DG_REGS_128 DG_REGS_120 ", %120, %121, %122, %123, %124, %125, %126, %127"

// The matching constraints: R read-write fp32 registers d[0 .. R).
#define DG_ACC_4(d, o) "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3])
#define DG_ACC_8(d, o) DG_ACC_4(d, o), DG_ACC_4(d, o + 4)
#define DG_ACC_REGS_8(d) DG_ACC_8(d, 0)
#define DG_ACC_REGS_16(d) DG_ACC_REGS_8(d), DG_ACC_8(d, 8)
#define DG_ACC_REGS_24(d) DG_ACC_REGS_16(d), DG_ACC_8(d, 16)
#define DG_ACC_REGS_32(d) DG_ACC_REGS_24(d), DG_ACC_8(d, 24)
#define DG_ACC_REGS_40(d) DG_ACC_REGS_32(d), DG_ACC_8(d, 32)
#define DG_ACC_REGS_48(d) DG_ACC_REGS_40(d), DG_ACC_8(d, 40)
#define DG_ACC_REGS_56(d) DG_ACC_REGS_48(d), DG_ACC_8(d, 48)
#define DG_ACC_REGS_64(d) DG_ACC_REGS_56(d), DG_ACC_8(d, 56)
#define DG_ACC_REGS_72(d) DG_ACC_REGS_64(d), DG_ACC_8(d, 64)
#define DG_ACC_REGS_80(d) DG_ACC_REGS_72(d), DG_ACC_8(d, 72)
#define DG_ACC_REGS_88(d) DG_ACC_REGS_80(d), DG_ACC_8(d, 80)
#define DG_ACC_REGS_96(d) DG_ACC_REGS_88(d), DG_ACC_8(d, 88)
#define DG_ACC_REGS_104(d) DG_ACC_REGS_96(d), DG_ACC_8(d, 96)
#define DG_ACC_REGS_112(d) DG_ACC_REGS_104(d), DG_ACC_8(d, 104)
#define DG_ACC_REGS_120(d) DG_ACC_REGS_112(d), DG_ACC_8(d, 112)
#define DG_ACC_REGS_128(d) DG_ACC_REGS_120(d), DG_ACC_8(d, 120)

namespace ptx {

// One wgmma wrapper struct per width: Name<N>::mma(d, desc_a, desc_b, accumulate), operands from
// shared-memory descriptors (K- or MN-major: the transpose bits in Tail); accumulate = false overwrites D. `Shape` is the
// instruction's K and types, `Tail` its arguments after scale-d (and the two scale factors).
// Operands after the R accumulators: desc_a is %R, desc_b %R+1, the accumulate flag %R+2.
#define DG_WGMMA(Name, Shape, Tail, N, R, R1, R2)                                                         \
    template <>                                                                                           \
    struct Name<N> {                                                                                      \
        static DG_DEVICE void mma(float (&d)[R], uint64_t desc_a, uint64_t desc_b, bool accumulate) {     \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #R2 ", 0;\n"                                \
                         "wgmma.mma_async.sync.aligned.m64n" #N Shape " "                                  \
                         "{" DG_REGS_##R "}, %" #R ", %" #R1 ", p, 1, 1" Tail ";\n}\n"                      \
                         : DG_ACC_REGS_##R(d)                                                             \
                         : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));                               \
        }                                                                                                 \
    };
// The struct template Name<N> of one instruction, every width N = 16 .. 256 (R = N / 2 accumulators).
#define DG_WGMMA_WIDTHS(Name, Shape, Tail)                                                                \
    template <int N>                                                                                      \
    struct Name;                                                                                          \
    DG_WGMMA(Name, Shape, Tail, 16, 8, 9, 10) DG_WGMMA(Name, Shape, Tail, 32, 16, 17, 18)                 \
    DG_WGMMA(Name, Shape, Tail, 48, 24, 25, 26) DG_WGMMA(Name, Shape, Tail, 64, 32, 33, 34)               \
    DG_WGMMA(Name, Shape, Tail, 80, 40, 41, 42) DG_WGMMA(Name, Shape, Tail, 96, 48, 49, 50)               \
    DG_WGMMA(Name, Shape, Tail, 112, 56, 57, 58) DG_WGMMA(Name, Shape, Tail, 128, 64, 65, 66)             \
    DG_WGMMA(Name, Shape, Tail, 144, 72, 73, 74) DG_WGMMA(Name, Shape, Tail, 160, 80, 81, 82)             \
    DG_WGMMA(Name, Shape, Tail, 176, 88, 89, 90) DG_WGMMA(Name, Shape, Tail, 192, 96, 97, 98)             \
    DG_WGMMA(Name, Shape, Tail, 208, 104, 105, 106) DG_WGMMA(Name, Shape, Tail, 224, 112, 113, 114)       \
    DG_WGMMA(Name, Shape, Tail, 240, 120, 121, 122) DG_WGMMA(Name, Shape, Tail, 256, 128, 129, 130)

// D(64 x N, fp32) (+)= A(64 x 32) * B(N x 32)^T, e4m3 operands.
DG_WGMMA_WIDTHS(WgmmaFp8, "k32.f32.e4m3.e4m3", "")

// D(64 x N, fp32) (+)= A(64 x 16) * B(N x 16)^T, bf16 operands, K-major or (transpose bit 1)
// MN-major: wgmma_bf16<N, A MN-major, B MN-major>.
DG_WGMMA_WIDTHS(WgmmaBf16KK, "k16.f32.bf16.bf16", ", 0, 0")
DG_WGMMA_WIDTHS(WgmmaBf16MK, "k16.f32.bf16.bf16", ", 1, 0")
DG_WGMMA_WIDTHS(WgmmaBf16KM, "k16.f32.bf16.bf16", ", 0, 1")
DG_WGMMA_WIDTHS(WgmmaBf16MM, "k16.f32.bf16.bf16", ", 1, 1")
template <int N, bool kMnA, bool kMnB>
DG_DEVICE void wgmma_bf16(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
    if constexpr (kMnA && kMnB) WgmmaBf16MM<N>::mma(d, desc_a, desc_b, accumulate);
    else if constexpr (kMnA) WgmmaBf16MK<N>::mma(d, desc_a, desc_b, accumulate);
    else if constexpr (kMnB) WgmmaBf16KM<N>::mma(d, desc_a, desc_b, accumulate);
    else WgmmaBf16KK<N>::mma(d, desc_a, desc_b, accumulate);
}

#undef DG_WGMMA_WIDTHS
#undef DG_WGMMA

}  // namespace ptx
