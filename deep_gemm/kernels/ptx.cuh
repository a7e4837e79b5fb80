// Thin wrappers over the Hopper PTX instructions the kernels need. No CUDA header is included:
// NVRTC ships none of the runtime headers, and inline PTX compiles the same under NVRTC and nvcc.
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

DG_DEVICE uint32_t smem_addr(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// Broadcast from lane 0, so the compiler knows the value is warp-uniform.
DG_DEVICE uint32_t warp_index() { return __shfl_sync(0xffffffffu, threadIdx.x / 32, 0); }
DG_DEVICE uint32_t lane_index() { return threadIdx.x % 32; }

// The value, hidden from the optimiser (a loop bounded by it is not unrolled or specialised).
DG_DEVICE int32_t opaque(int32_t x) {
    asm volatile("" : "+r"(x));
    return x;
}

// ---- registers and barriers ------------------------------------------------------------------
template <uint32_t kRegs>
DG_DEVICE void setmaxnreg_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs)); }
template <uint32_t kRegs>
DG_DEVICE void setmaxnreg_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs)); }

// Named barrier among `count` threads (a multiple of 32); id 0 is __syncthreads.
DG_DEVICE void named_barrier(uint32_t id, uint32_t count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
DG_DEVICE void mbarrier_init(uint64_t* bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes the initialised barriers visible to the async proxy (TMA).
DG_DEVICE void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
DG_DEVICE void mbarrier_wait(uint64_t* bar, uint32_t parity) {
    asm volatile("{\n.reg .pred done;\nWAIT_%=:\nmbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
DG_DEVICE void mbarrier_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
DG_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}

// ---- TMA and asynchronous copies ---------------------------------------------------------------
DG_DEVICE void prefetch_tma_descriptor(const TmaDescriptor* desc) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(desc)) : "memory");
}

// Tile loads global -> shared (c0 innermost), completing `bar` with the tile's byte count.
DG_DEVICE void tma_load_2d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4}], [%2];\n" ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(desc)),
                 "r"(smem_addr(bar)), "r"(c0), "r"(c1) : "memory");
}
DG_DEVICE void tma_load_3d(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1, int32_t c2) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%3, %4, %5}], [%2];\n" ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(desc)),
                 "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2) : "memory");
}
// The same under an L2 cache policy.
DG_DEVICE void tma_load_2d_hinted(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                  uint64_t policy) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1, {%3, %4}], [%2], %5;\n" ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(desc)),
                 "r"(smem_addr(bar)), "r"(c0), "r"(c1), "l"(policy) : "memory");
}
DG_DEVICE void tma_load_3d_hinted(void* dst, const TmaDescriptor* desc, uint64_t* bar, int32_t c0, int32_t c1,
                                  int32_t c2, uint64_t policy) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1, {%3, %4, %5}], [%2], %6;\n" ::"r"(smem_addr(dst)), "l"(reinterpret_cast<uint64_t>(desc)),
                 "r"(smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "l"(policy) : "memory");
}
// An L2 policy marking the lines an access brings in first to evict: data read once (decode
// weights) then recycles its own lines instead of evicting what earlier kernels left in L2.
DG_DEVICE uint64_t l2_evict_first_policy() {
    uint64_t policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
    return policy;
}

// cp.async: 16 bytes global -> shared, the first `src_bytes` read and the rest zero-filled.
DG_DEVICE void cp_async_16(uint32_t dst, const void* src, int32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// An arrive on `bar` once this thread's earlier cp.asyncs have landed (counted in the expected count).
DG_DEVICE void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// Tile store shared -> global; out-of-bounds parts of the box are clipped. kAdd: the tile is added
// to what global memory holds instead (a reduce-add: one addition per element, in L2).
template <bool kAdd = false>
DG_DEVICE void tma_store_2d(const TmaDescriptor* desc, const void* src, int32_t c0, int32_t c1) {
    if constexpr (kAdd) {
        asm volatile("cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.bulk_group [%0, {%2, %3}], [%1];\n"
                     ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(src)), "r"(c0), "r"(c1) : "memory");
    } else {
        asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n"
                     ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(src)), "r"(c0), "r"(c1) : "memory");
    }
}
template <bool kAdd = false>
DG_DEVICE void tma_store_3d(const TmaDescriptor* desc, const void* src, int32_t c0, int32_t c1, int32_t c2) {
    if constexpr (kAdd) {
        asm volatile("cp.reduce.async.bulk.tensor.3d.global.shared::cta.add.bulk_group [%0, {%2, %3, %4}], [%1];\n"
                     ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2) : "memory");
    } else {
        asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n"
                     ::"l"(reinterpret_cast<uint64_t>(desc)), "r"(smem_addr(src)), "r"(c0), "r"(c1), "r"(c2) : "memory");
    }
}
DG_DEVICE void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Until the committed stores have read shared memory / have completed (before the block exits).
template <int kPending = 0>  // groups that may still be reading
DG_DEVICE void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory"); }
DG_DEVICE void tma_store_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
// Orders this thread's ordinary shared-memory writes before later async-proxy (TMA, wgmma) reads.
DG_DEVICE void fence_proxy_async_shared() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// ---- wgmma (the instructions themselves: wgmma.cuh) --------------------------------------------
DG_DEVICE void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
DG_DEVICE void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending> DG_DEVICE void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Keeps the compiler from moving accumulator reads across the asynchronous wgmma writing them.
DG_DEVICE void fence_register(float& r) { asm volatile("" : "+f"(r)::"memory"); }
template <int N>
DG_DEVICE void fence_registers(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) fence_register(r[i]);
}

// Shared-memory descriptor of a tile of 128-byte rows, 128-byte swizzle (as TMA writes it; 16-byte
// units, 8-row groups 1024 bytes apart, 1024-aligned base). The high word (stride offset, swizzle
// mode) is constant; the low word (start address, leading offset) moves with the tile, so stepping
// through a stage stays 32-bit (the start never carries out of its 14 bits). Leading offset: 1
// (unused) for a K-major tile; for an MN-major one the distance between its 64-column boxes.
constexpr uint32_t kDescHighK128Sw128 = (1024u >> 4) | (1u << 30);
DG_DEVICE uint32_t smem_desc_low(uint32_t smem_byte_addr, uint32_t lead_units = 1) {
    return ((smem_byte_addr & 0x3FFFFu) >> 4) | (lead_units << 16);
}
DG_DEVICE uint64_t smem_desc(uint32_t low) { return (uint64_t(kDescHighK128Sw128) << 32) | low; }

// ---- loads, stores, conversions ----------------------------------------------------------------
DG_DEVICE float lds_float(uint32_t smem_byte_addr) {
    float v;
    asm volatile("ld.shared.f32 %0, [%1];\n" : "=f"(v) : "r"(smem_byte_addr) : "memory");
    return v;
}
DG_DEVICE float2 lds_float2(uint32_t smem_byte_addr) {
    float2 v;
    asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];\n" : "=f"(v.x), "=f"(v.y) : "r"(smem_byte_addr) : "memory");
    return v;
}
DG_DEVICE void sts_float2(uint32_t smem_byte_addr, float x, float y) {
    asm volatile("st.shared.v2.f32 [%0], {%1, %2};\n" ::"r"(smem_byte_addr), "f"(x), "f"(y) : "memory");
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
DG_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    uint32_t packed;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(packed) : "f"(hi), "f"(lo));
    return packed;
}
// Stores four 8x8 b16 matrices; lane i gives the address of row i % 8 of matrix i / 8.
DG_DEVICE void stmatrix_x4(uint32_t addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
    asm volatile("stmatrix.sync.aligned.x4.m8n8.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r0), "r"(r1),
                 "r"(r2), "r"(r3) : "memory");
}
// Adds v to a global counter (GPU scope, acquire-release: publishes what happens-before it, other
// threads' writes too after a block barrier) and returns the old value.
DG_DEVICE int32_t atomic_add_acq_rel_gpu(int32_t* p, int32_t v) {
    int32_t old;
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(p), "r"(v) : "memory");
    return old;
}

// ---- tensor maps written by a kernel (the graph-safe K-grouped GEMM's, kernels/group_maps.cuh) ----
// Fields of a 128-byte tensor map in global memory, rewritten in place (generic-proxy writes): the
// base address, dimension `kDim`'s extent and, for kDim >= 1, dimension kDim's stride in bytes.
DG_DEVICE void tensormap_set_address(TmaDescriptor* map, uint64_t address) {
    asm volatile("tensormap.replace.tile.global_address.global.b1024.b64 [%0], %1;\n" ::"l"(map), "l"(address)
                 : "memory");
}
template <int kDim>
DG_DEVICE void tensormap_set_extent(TmaDescriptor* map, uint32_t extent) {
    asm volatile("tensormap.replace.tile.global_dim.global.b1024.b32 [%0], %1, %2;\n" ::"l"(map), "n"(kDim),
                 "r"(extent) : "memory");
}
template <int kDim>
DG_DEVICE void tensormap_set_stride(TmaDescriptor* map, uint64_t stride_bytes) {
    static_assert(kDim >= 1, "dimension 0 is contiguous: it has no stride field");
    asm volatile("tensormap.replace.tile.global_stride.global.b1024.b64 [%0], %1, %2;\n" ::"l"(map), "n"(kDim - 1),
                 "l"(stride_bytes) : "memory");
}
// The writer's side: its generic-proxy writes of tensor maps are ordered before later reads of
// them through the tensor-map proxy (TMA), once a reader acquires them.
DG_DEVICE void tensormap_release() { asm volatile("fence.proxy.tensormap::generic.release.gpu;\n" ::: "memory"); }
// The reader's side, before a map written by another grid is first used by TMA.
DG_DEVICE void tensormap_acquire(const TmaDescriptor* map) {
    asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(map) : "memory");
}

}  // namespace ptx

// ---- programmatic dependent launch (PDL) -------------------------------------------------------
// Launched with programmatic stream serialization (deep_gemm.set_pdl(True)), a grid may start
// while the previous grid of its stream still runs. Both instructions are no-ops otherwise.
namespace ptx {
// Returns once every prerequisite grid has completed and its writes are visible. Call it before
// the first global read or write that may touch that grid's data: reads of its outputs, and
// writes to buffers it may still read.
DG_DEVICE void griddepcontrol_wait() { asm volatile("griddepcontrol.wait;\n" ::: "memory"); }
// Lets the next grid of the stream be scheduled once every block of this one has called it (or
// exited). Only a hint: the next grid still waits for this one's completion in
// griddepcontrol_wait, so calling it once a block has issued its last loads is always safe.
DG_DEVICE void griddepcontrol_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n"); }
}  // namespace ptx

// A kernel header whose every kernel calls ptx::griddepcontrol_wait() before its first global
// memory access says so by DG_PDL_READY; at file scope, once per module. The host looks the symbol
// up (runtime/driver.py, PDL_READY_SYMBOL) and gives only such modules the PDL launch attribute:
// a kernel without the wait could read a buffer the previous kernel has not written yet.
#define DG_PDL_READY extern "C" __device__ const int deep_gemm_pdl_ready = 1;
