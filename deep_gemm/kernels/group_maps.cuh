// The first of the two kernels of a K-grouped GEMM whose group sizes stay on the device (CUDA-graph
// safe: a replay reads the sizes the routing wrote this time). From the sizes (int32 [G]) it
// writes, to global memory, each group's tensor maps of A and B and its K blocks and first scale
// row; k_grouped_device_gemm_kernel (gemm.cuh) runs next on the stream and reads them.
//
// A group's maps differ from the host-encoded template only in the block's start and its K:
//   K-major (fp8, [rows, K_g] row-major): address, extent of dimension 0 (K_g) and the row
//   stride (K_g bytes);
//   MN-major (bf16, rows [K_g][M] of a [sum K, M] tensor): address and extent of dimension 1.
// so each is the template with those fields rewritten by tensormap.replace.
//
// Sizes are checked here, since nothing on the host can read them: every group up to g must have
// K >= 0 and a multiple of k_multiple (TMA's 16-byte strides), and group g must end inside the
// flat operands and the scale tensors. Group g fails otherwise, and so does every later one (their
// starts are unknown): its K blocks read -1, the GEMM skips it, and its D is filled with NaN here,
// so bad sizes give a loud result rather than a read out of bounds or a silently wrong one.
#pragma once
#include "ptx.cuh"

namespace deep_gemm {

constexpr int kGroupMapsThreads = 256;
constexpr int kGroupMapsMaxGroups = 1024;

// The kernel's parameter; deep_gemm/config.py's GROUP_MAPS_PARAMS describes it (the generated
// source checks every offset).
struct GroupMapsParams {
    TmaDescriptor map_a, map_b;  // templates: a group's maps as the host encodes them, for any K
    TmaDescriptor* maps_a;       // out: [G]
    TmaDescriptor* maps_b;       // out: [G]
    int32_t* k_blocks;           // out: [2][G], K blocks (-1: invalid) then first scale rows
    float* out;                  // D, [G][M][N]: an invalid group's is filled with NaN
    const int32_t* k_sizes;      // [G], on the device
    uint64_t a_base, b_base;     // the flat operands
    uint64_t a_bytes_per_k, b_bytes_per_k;  // how far one K step moves a block's start
    uint64_t k_capacity;         // K the flat operands hold
    uint64_t out_group_floats;   // M * N
    int32_t kb_capacity;         // K blocks the scale tensors hold (2^31 - 1 without scales)
    int32_t num_groups, k_multiple, block_k;
};

template <bool kMnMajor>
DG_DEVICE void write_group_map(TmaDescriptor* dst, const TmaDescriptor& src, uint64_t address, uint32_t k) {
#pragma unroll
    for (int i = 0; i < 16; ++i) dst->opaque[i] = src.opaque[i];
    ptx::tensormap_set_address(dst, address);
    if constexpr (kMnMajor) {
        ptx::tensormap_set_extent<1>(dst, k);
    } else {
        ptx::tensormap_set_extent<0>(dst, k);
        ptx::tensormap_set_stride<1>(dst, k);
    }
}

template <bool kMnMajor>
__global__ void __launch_bounds__(kGroupMapsThreads, 1) group_maps_kernel(const __grid_constant__ GroupMapsParams p) {
    __shared__ int32_t sizes[kGroupMapsMaxGroups];
    __shared__ int32_t first_invalid;
    // PDL: the sizes may come from the previous grid, and the previous GEMM may still read the maps.
    ptx::griddepcontrol_wait();
    ptx::griddepcontrol_launch_dependents();  // the GEMM's prologue may start; it waits for this grid
    const int32_t groups = p.num_groups;
    if (threadIdx.x == 0) first_invalid = groups;
    for (int32_t g = threadIdx.x; g < groups; g += kGroupMapsThreads) sizes[g] = p.k_sizes[g];
    __syncthreads();
    for (int32_t g = threadIdx.x; g < groups; g += kGroupMapsThreads) {
        // Where group g starts: the sizes before it (a prefix sum; G is small).
        uint64_t k_offset = 0;
        int64_t kb_offset = 0;
        bool valid = true;
        for (int32_t h = 0; h <= g; ++h) {
            const int32_t k = sizes[h];
            valid = valid && k >= 0 && k % p.k_multiple == 0;
            if (h < g && k > 0) {
                k_offset += k;
                kb_offset += (k + p.block_k - 1) / p.block_k;
            }
        }
        const int32_t k = valid ? sizes[g] : 0;
        const int32_t kb = (k + p.block_k - 1) / p.block_k;
        valid = valid && k_offset + k <= p.k_capacity && kb_offset + kb <= p.kb_capacity;
        p.k_blocks[g] = valid ? kb : -1;
        p.k_blocks[groups + g] = valid ? static_cast<int32_t>(kb_offset) : 0;
        if (!valid) atomicMin(&first_invalid, g);
        if (valid && k > 0) {
            write_group_map<kMnMajor>(p.maps_a + g, p.map_a, p.a_base + k_offset * p.a_bytes_per_k, k);
            write_group_map<kMnMajor>(p.maps_b + g, p.map_b, p.b_base + k_offset * p.b_bytes_per_k, k);
        }
    }
    ptx::tensormap_release();
    __syncthreads();
    // Invalid sizes: NaN in D from the first failing group on (16-byte stores: M * N % 16 == 0).
    const uint64_t begin = static_cast<uint64_t>(first_invalid) * p.out_group_floats / 4;
    const uint64_t end = static_cast<uint64_t>(groups) * p.out_group_floats / 4;
    const float nan = __int_as_float(0x7fffffff);
    for (uint64_t i = begin + threadIdx.x; i < end; i += kGroupMapsThreads)
        reinterpret_cast<float4*>(p.out)[i] = make_float4(nan, nan, nan, nan);
}

}  // namespace deep_gemm

// The kernel waits (griddepcontrol_wait) before touching global memory.
DG_PDL_READY
