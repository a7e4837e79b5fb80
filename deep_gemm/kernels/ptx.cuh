// Thin wrappers over the Hopper PTX instructions the GEMM needs.
// No CUDA header is included: NVRTC ships none of the runtime headers, and
// every instruction here is written as inline PTX so the code compiles the same
// under NVRTC and nvcc.
#pragma once

#ifdef __CUDACC_RTC__
// NVRTC has no standard headers; these match what <cstdint> gives nvcc on Linux.
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
#else
#include <cstdint>
#endif

#define DG_DEVICE __device__ __forceinline__

// A CUtensorMap as the driver encodes it: 128 opaque bytes, 64-byte aligned.
struct alignas(64) TmaDescriptor {
    uint64_t opaque[16];
};

namespace ptx {

DG_DEVICE uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

DG_DEVICE uint32_t warp_index() {
    // Broadcast from lane 0 so the compiler knows the value is warp-uniform.
    return __shfl_sync(0xffffffffu, threadIdx.x / 32, 0);
}

DG_DEVICE uint32_t lane_index() { return threadIdx.x % 32; }

// The value, hidden from the optimiser: a loop bounded by it is not unrolled
// even when the bound is a compile-time constant (#pragma unroll 1 alone was
// not honoured for the producer's loop).
DG_DEVICE int32_t opaque(int32_t x) {
    asm volatile("" : "+r"(x));
    return x;
}

// A bool (an int) as a type, to instantiate one generic lambda per value (no
// <type_traits> under NVRTC).
template <bool kValue> struct Constant {
    static constexpr bool value = kValue;
};
template <int32_t kValue> struct IntConstant {
    static constexpr int32_t value = kValue;
};

// ---- registers -----------------------------------------------------------------
template <uint32_t kRegs> DG_DEVICE void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <uint32_t kRegs> DG_DEVICE void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// ---- barriers --------------------------------------------------------------------
// Named barrier among `count` threads (a multiple of 32); id 0 is __syncthreads.
DG_DEVICE void named_barrier(uint32_t id, uint32_t count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

DG_DEVICE void mbarrier_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}

// Makes the initialised barriers visible to the async proxy (TMA) and the cluster.
DG_DEVICE void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

DG_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
    asm volatile(
        "{\n"
        ".reg .pred done;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_%=;\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

DG_DEVICE void mbarrier_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Arrive on the barrier at the same offset in block `cta_rank` of the cluster
// as a plain signal (CTA-scope semantics, no fence): enough
// to say "this stage's shared memory may be refilled", since the reads it
// orders were done by wgmma and have completed (wgmma.wait_group).
DG_DEVICE void mbarrier_signal_cluster(uint64_t* bar, uint32_t cta_rank) {
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(smem_addr(bar)), "r"(cta_rank));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(remote) : "memory");
}

// Every thread of every block of the cluster (the cluster-wide __syncthreads).
DG_DEVICE void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}

DG_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// ---- TMA -------------------------------------------------------------------------
DG_DEVICE void prefetch_tma_descriptor(const TmaDescriptor* desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
}

// 2-D tile load global -> shared, completing `bar` with the tile's byte count.
DG_DEVICE void tma_load_2d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
        : "memory");
}

// 3-D tile load: the same, over a tensor map of three dimensions (c0 innermost).
DG_DEVICE void tma_load_3d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1, int32_t c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

// An L2 policy that marks the lines an access brings in as the first to evict: for data
// read exactly once (decode weights), which then recycle their own lines instead of
// evicting (and, if dirty, writing back) whatever the previous kernels left in L2.
DG_DEVICE uint64_t l2_evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// tma_load_2d under an L2 cache policy (see l2_evict_first_policy).
DG_DEVICE void tma_load_2d_hinted(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                  uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "l"(policy)
        : "memory");
}

// tma_load_3d under an L2 cache policy.
DG_DEVICE void tma_load_3d_hinted(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                  int32_t c2, uint64_t policy) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "l"(policy)
        : "memory");
}

// The same 2-D tile load, written into the same shared-memory offset of every
// block of the cluster named in cta_mask, each completing its own `bar`.
DG_DEVICE void tma_load_2d_multicast(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                     uint16_t cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(dst)),
        "l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(bar)), "r"(c0), "r"(c1), "h"(cta_mask)
        : "memory");
}

// cp.async (non-bulk, through the load/store unit): 16 bytes from global to shared
// memory, of which the first `src_bytes` are read and the rest zero-filled (0: none read).
DG_DEVICE void cp_async_16(uint32_t dst, const void* src, int32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}
// An arrive on `bar` once every earlier cp.async of this thread has landed. .noinc: the
// arrive counts towards the barrier's expected arrivals (set at init).
DG_DEVICE void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// 2-D tile store shared -> global; out-of-bounds parts of the box are clipped.
DG_DEVICE void tma_store_2d(const TmaDescriptor* desc, const void* src, int32_t c0, int32_t c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                     reinterpret_cast<uint64_t>(desc)),
                 "r"(smem_addr(src)), "r"(c0), "r"(c1)
                 : "memory");
}

DG_DEVICE void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }

// Wait until the committed stores have finished reading shared memory.
DG_DEVICE void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }

// Wait until the committed stores are complete (before the block exits).
DG_DEVICE void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

// Orders this thread's ordinary shared-memory writes before later async-proxy
// (TMA, wgmma) reads of the same memory.
DG_DEVICE void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- wgmma -----------------------------------------------------------------------
DG_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DG_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending> DG_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving reads of an accumulator register across the
// asynchronous wgmma (which it cannot see writing the register).
DG_DEVICE void fence_register(float& r) { asm volatile("" : "+f"(r)::"memory"); }

// Shared-memory matrix descriptor for a K-major tile whose rows are 128 bytes
// (128 fp8 values of K) stored with the 128-byte swizzle, as TMA writes it.
// Start address and leading/stride byte offsets are in 16-byte units; the
// stride between groups of 8 rows is 8 * 128 = 1024 bytes, and the tile base
// must be 1024-byte aligned so base_offset can stay 0.
// Kept in halves: the high word (stride offset in bits 32-45, swizzle mode 1 =
// 128B in bits 62-63) is a constant, and the low word (start address in bits
// 0-13, leading offset 1, unused for swizzled K-major, in bits 16-29) moves
// with the tile. Stepping through a stage in 32-bit arithmetic keeps the main
// loop free of 64-bit adds (start + 6 never carries out of its 14 bits: shared
// memory ends below 2^18 bytes).
constexpr uint32_t kDescHighK128Sw128 = (1024u >> 4) | (1u << 30);
DG_DEVICE uint32_t smem_desc_low(uint32_t smem_byte_addr) { return ((smem_byte_addr & 0x3FFFFu) >> 4) | (1u << 16); }
DG_DEVICE uint64_t smem_desc(uint32_t low) { return (uint64_t(kDescHighK128Sw128) << 32) | low; }

DG_DEVICE float lds_float(uint32_t smem_byte_addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem_byte_addr) : "memory");
    return v;
}

// ---- epilogue helpers ----------------------------------------------------------------
DG_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}

// Stores four 8x8 b16 matrices; lane i supplies the address of row i%8 of matrix i/8.
DG_DEVICE void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.x4.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0),
                 "r"(r1), "r"(r2), "r"(r3)
                 : "memory");
}

// Adds v to a global counter at GPU scope with acquire-release semantics and returns the
// old value: releases everything that happens-before it (other threads' writes included, when
// a block barrier orders them first) and acquires what other blocks released the same way.
DG_DEVICE int32_t atomic_add_acq_rel_gpu(int32_t* p, int32_t v) {
    int32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

DG_DEVICE float ldg_float(const float* p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];\n" : "=f"(v) : "l"(p));
    return v;
}

DG_DEVICE int32_t ldg_int(const int32_t* p) {
    int32_t v;
    asm volatile("ld.global.nc.s32 %0, [%1];\n" : "=r"(v) : "l"(p));
    return v;
}

}  // namespace ptx
