// The scheduler role: a persistent block's sequence of linear work indices -> output tiles (or,
// with split-K, shares of a tile's K blocks), for every layout. The producer and the math
// warpgroups each run a copy; both see the same sequence (it depends on the block index and
// kernel arguments only).
#pragma once
#include "ptx.cuh"

namespace deep_gemm {

enum Layout : int {
    kDense = 0,       // one [M, K] x [N, K] problem
    kContiguous = 1,  // experts' rows concatenated along M; group_info = the expert of each row
    kMasked = 2,      // [G, max_m, K] x [G, N, K]; group_info = the valid rows of each group
    kKGrouped = 3,    // G problems [M, K_g] x [N, K_g] -> [G, M, N]; group_info = K blocks, then
                      // first scale row, of each group (KGroupedParams)
};

struct Tile {
    int32_t m_block;     // M block inside the group (masked) or the whole M (dense, contiguous)
    int32_t n_block;
    int32_t group;       // expert whose weights this tile multiplies
    int32_t row_begin;   // first row of A / D this tile covers (as rows of the 2-D views)
    int32_t rows_valid;  // rows of the tile that hold real output (<= BLOCK_M)
    int32_t split;       // split-K: which share of K this unit of work covers (0 without)
    int32_t num_splits;  // split-K: how many units share this tile (1: a whole tile)
    int32_t tail_index;  // split-K: the tile's place among the split tiles (its counter and slot)
    int32_t k_blocks;    // K-grouped: the group's K blocks
    int32_t kb_offset;   // K-grouped: the group's first row of the scale tensors
};

// Split-K against wave quantisation: of T tiles on G blocks, each of the T % G tiles of the last
// wave is split into S = min(kSplitK, G / (T % G)) consecutive units over shares of K, keeping S
// times more blocks busy for 1/S of the time. Masked: T counts the real groups' M blocks.
template <class C>
struct Scheduler {
    static constexpr int kNumNBlocks = (C::kShapeN + C::kBlockN - 1) / C::kBlockN;

    // M: rows of A, or max_m (masked). group_info: m_indices[M] (contiguous), masked_m[G] (masked).
    const int32_t shape_m;
    const int32_t* group_info;
    int32_t next_index;
    int32_t num_blocks;  // gridDim.x: the stride between a block's units

    // Masked layout: cursor over the groups (indices only grow).
    int32_t cursor_group = 0;
    int32_t cursor_first_tile = 0;
    int32_t cursor_m_blocks = 0;

    // Split-K: tiles of the full waves, splits per tail tile, and all units of work.
    int32_t whole_tiles = 0;
    int32_t tail_splits = 1;
    int32_t num_units = 0;

    DG_DEVICE Scheduler(int32_t m, const int32_t* info) : shape_m(m), group_info(info) {
        next_index = blockIdx.x;
        num_blocks = gridDim.x;
        if (C::kLayout == kMasked) cursor_m_blocks = masked_m_blocks(0);
        if (C::kSplitK > 1) {
            int32_t num_m_blocks = (shape_m + C::kBlockM - 1) / C::kBlockM;
            if (C::kLayout == kMasked) {  // the groups' real sizes: each block sums them once
                num_m_blocks = 0;
                for (int32_t g = 0; g < C::kNumGroups; ++g) num_m_blocks += masked_m_blocks(g);
            }
            const int32_t num_tiles = num_m_blocks * kNumNBlocks;
            const int32_t tail = num_tiles % num_blocks;
            whole_tiles = num_tiles - tail;
            tail_splits = tail > 0 ? max(1, min(C::kSplitK, num_blocks / tail)) : 1;
            num_units = whole_tiles + tail * tail_splits;
        }
    }

    DG_DEVICE int32_t masked_m_blocks(int32_t g) const {
        const int32_t rows = min(max(ptx::ldg_int(group_info + g), 0), shape_m);
        return (rows + C::kBlockM - 1) / C::kBlockM;
    }

    // Rasterisation: tiles walk a band of kRasterGroup M blocks before the next N block, so a wave
    // of blocks shares few A and B tiles in L2.
    DG_DEVICE static void raster(int32_t t, int32_t num_m_blocks, int32_t& m_block, int32_t& n_block) {
        const int32_t band_tiles = C::kRasterGroup * kNumNBlocks;
        const int32_t band = t / band_tiles;
        const int32_t first_m = band * C::kRasterGroup;
        const int32_t band_m = min(C::kRasterGroup, num_m_blocks - first_m);
        const int32_t in_band = t - band * band_tiles;
        m_block = first_m + in_band % band_m;
        n_block = in_band / band_m;
    }

    // The block's next unit, or false when it is done. Tiles with nothing to compute (contiguous
    // padding, bad expert indices) are skipped here, by every role alike.
    DG_DEVICE bool next(Tile& tile) {
        while (true) {
            int32_t t = next_index;
            next_index += num_blocks;
            tile.split = 0;
            tile.num_splits = 1;
            tile.tail_index = 0;
            if (C::kSplitK > 1 && t >= whole_tiles) {  // a unit of a split tail tile
                if (t >= num_units) return false;
                const int32_t v = t - whole_tiles;
                tile.tail_index = v / tail_splits;
                tile.split = v - tile.tail_index * tail_splits;
                tile.num_splits = tail_splits;
                t = whole_tiles + tile.tail_index;
            }
            if (C::kLayout == kMasked) return next_masked(t, tile);
            if (C::kLayout == kKGrouped) {
                if (next_k_grouped(t, tile)) return true;
                if (tile.group >= C::kNumGroups) return false;
                continue;
            }
            const int32_t num_m_blocks = (shape_m + C::kBlockM - 1) / C::kBlockM;
            if (t >= num_m_blocks * kNumNBlocks) return false;
            raster(t, num_m_blocks, tile.m_block, tile.n_block);
            tile.row_begin = tile.m_block * C::kBlockM;
            tile.rows_valid = min(C::kBlockM, shape_m - tile.row_begin);
            tile.group = 0;
            if (C::kLayout == kContiguous) {
                // Every row of an aligned block belongs to one expert (or is padding).
                tile.group = ptx::ldg_int(group_info + tile.row_begin);
                if (tile.group < 0 || tile.group >= C::kNumGroups) continue;
            }
            return true;
        }
    }

    // Every group has the same M and N, so the same tiles; a group with no K (nothing to add to
    // D) is skipped when accumulating, and stores zeros otherwise; one marked invalid (K blocks < 0,
    // sizes read on the device) is skipped. group_info is in parameter space, or global memory a
    // previous grid wrote: plain loads.
    DG_DEVICE bool next_k_grouped(int32_t t, Tile& tile) {
        const int32_t num_m_blocks = (shape_m + C::kBlockM - 1) / C::kBlockM;
        const int32_t group_tiles = num_m_blocks * kNumNBlocks;
        tile.group = t / group_tiles;
        if (tile.group >= C::kNumGroups) return false;
        tile.k_blocks = group_info[tile.group];
        tile.kb_offset = group_info[C::kNumGroups + tile.group];
        if (tile.k_blocks < 0 || (C::kAccumulate && tile.k_blocks == 0)) return false;
        raster(t - tile.group * group_tiles, num_m_blocks, tile.m_block, tile.n_block);
        tile.row_begin = tile.m_block * C::kBlockM;
        tile.rows_valid = min(C::kBlockM, shape_m - tile.row_begin);
        return true;
    }

    DG_DEVICE bool next_masked(int32_t t, Tile& tile) {
        // Advance the cursor to the group holding tile t.
        while (t >= cursor_first_tile + cursor_m_blocks * kNumNBlocks) {
            cursor_first_tile += cursor_m_blocks * kNumNBlocks;
            if (++cursor_group >= C::kNumGroups) return false;
            cursor_m_blocks = masked_m_blocks(cursor_group);
        }
        raster(t - cursor_first_tile, cursor_m_blocks, tile.m_block, tile.n_block);
        const int32_t rows = min(max(ptx::ldg_int(group_info + cursor_group), 0), shape_m);
        tile.group = cursor_group;
        tile.row_begin = cursor_group * shape_m + tile.m_block * C::kBlockM;
        tile.rows_valid = min(C::kBlockM, rows - tile.m_block * C::kBlockM);
        return true;
    }
};

}  // namespace deep_gemm
