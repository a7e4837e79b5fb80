// Maps a persistent block's sequence of linear tile indices to output tiles,
// for all three layouts.  The producer and the consumers of a block each run
// their own copy; both see the same sequence because it depends only on the
// block index and on kernel arguments.
#pragma once
#include "ptx.cuh"

enum GemmLayout : int { kDense = 0, kContiguous = 1, kMasked = 2 };

struct Tile {
    int32_t m_block;     // M block inside the group (masked) or the whole M (dense, contiguous)
    int32_t n_block;
    int32_t group;       // expert whose weights this tile multiplies
    int32_t row_begin;   // first row of A / D this tile covers (as rows of the 2-D views)
    int32_t rows_valid;  // rows of the tile that hold real output (<= BLOCK_M)
    int32_t split;       // split-K: which share of K this unit of work covers (0 without)
    int32_t num_splits;  // split-K: how many units share this tile (1: a whole tile)
    int32_t tail_index;  // split-K: the tile's place among the split tiles (its counter and slots)
};

// With a cluster of kClusterN blocks, the blocks of a cluster take neighbouring
// N blocks of the same M block (they share A, loaded once and multicast).  The
// scheduler then walks "units" of kClusterN N blocks; when N has an odd number
// of blocks the last unit's second tile lies past N: it is computed from
// zero-filled (or unrelated) rows and its store is clipped, which keeps both
// blocks' pipelines in step without special cases.
//
// Split-K against wave quantisation (kSplitK > 1 is the most splits a tile may
// get): with T tiles on G blocks, the T - T % G tiles of the full waves stay
// whole, and the T % G tiles of the last, partial wave ("tail") are each split
// into S = min(kSplitK, G / (T % G)) units over shares of K, so the last wave
// keeps S times more blocks busy for 1/S of the time. A tile's units are
// consecutive, so they run at the same time on neighbouring blocks; the kernel
// sums their partial results through a global workspace of at most G slots.
// With fewer tiles than blocks (decode) every tile is in the tail. Masked: T
// counts the real groups' M blocks (masked_m, summed by every block at start).
template <int kLayout, int kBlockM, int kBlockN, int kShapeN, int kNumGroups, int kRasterGroup, int kClusterN,
          int kSplitK>
struct TileScheduler {
    static_assert(kSplitK == 1 || kClusterN == 1, "split-K and multicast clusters are exclusive");
    static constexpr int kNumNBlocks = (kShapeN + kBlockN - 1) / kBlockN;
    static constexpr int kNumNUnits = (kNumNBlocks + kClusterN - 1) / kClusterN;

    // Dense / contiguous: M is the number of rows of A.  Masked: M is max_m
    // (rows per group), and group_info holds masked_m[G].  Contiguous:
    // group_info holds m_indices[M].
    const int32_t shape_m;
    const int32_t* group_info;
    int32_t next_tile;
    int32_t cluster_rank;
    int32_t num_clusters;  // == gridDim.x / kClusterN: the stride between a block's tiles

    // Masked layout: cursor over the groups (tile indices only grow).
    int32_t cursor_group = 0;
    int32_t cursor_first_tile = 0;
    int32_t cursor_m_blocks = 0;

    // Split-K: tiles of the full waves, splits per tail tile, and all units of work.
    int32_t whole_tiles = 0;
    int32_t tail_splits = 1;
    int32_t num_units = 0;

    DG_DEVICE TileScheduler(int32_t m, const int32_t* info) : shape_m(m), group_info(info) {
        cluster_rank = blockIdx.x % kClusterN;
        num_clusters = gridDim.x / kClusterN;
        next_tile = blockIdx.x / kClusterN;
        if (kLayout == kMasked) cursor_m_blocks = masked_m_blocks(0);
        if (kSplitK > 1) {
            int32_t num_m_blocks = (shape_m + kBlockM - 1) / kBlockM;
            if (kLayout == kMasked) {  // the groups' real sizes: each block sums them once
                num_m_blocks = 0;
                for (int32_t g = 0; g < kNumGroups; ++g) num_m_blocks += masked_m_blocks(g);
            }
            const int32_t num_tiles = num_m_blocks * kNumNUnits;
            const int32_t tail = num_tiles % num_clusters;
            whole_tiles = num_tiles - tail;
            tail_splits = tail > 0 ? max(1, min(kSplitK, num_clusters / tail)) : 1;
            num_units = whole_tiles + tail * tail_splits;
        }
    }

    DG_DEVICE int32_t masked_m_blocks(int32_t g) const {
        const int32_t rows = min(max(ptx::ldg_int(group_info + g), 0), shape_m);
        return (rows + kBlockM - 1) / kBlockM;
    }

    // Rasterisation: tiles walk the M blocks of a band of kRasterGroup M blocks
    // before moving to the next N block, so a wave of blocks shares few A and
    // B tiles in L2.
    DG_DEVICE static void raster(int32_t t, int32_t num_m_blocks, int32_t& m_block, int32_t& n_block) {
        const int32_t band_tiles = kRasterGroup * kNumNUnits;
        const int32_t band = t / band_tiles;
        const int32_t first_m = band * kRasterGroup;
        const int32_t band_m = min(kRasterGroup, num_m_blocks - first_m);
        const int32_t in_band = t - band * band_tiles;
        m_block = first_m + in_band % band_m;
        n_block = in_band / band_m;
    }

    // Next tile of this block, or false when the block is done.  Tiles with
    // nothing to compute (contiguous padding, bad expert indices) are skipped
    // here so the producer and consumers skip them alike.
    DG_DEVICE bool next(Tile& tile) {
        while (true) {
            int32_t t = next_tile;
            next_tile += num_clusters;
            tile.split = 0;
            tile.num_splits = 1;
            tile.tail_index = 0;
            if (kSplitK > 1 && t >= whole_tiles) {  // a unit of a split tail tile
                if (t >= num_units) return false;
                const int32_t v = t - whole_tiles;
                tile.tail_index = v / tail_splits;
                tile.split = v - tile.tail_index * tail_splits;
                tile.num_splits = tail_splits;
                t = whole_tiles + tile.tail_index;
            }
            if (kLayout == kMasked) {
                if (!next_masked(t, tile)) return false;
                return true;
            }
            const int32_t num_m_blocks = (shape_m + kBlockM - 1) / kBlockM;
            if (t >= num_m_blocks * kNumNUnits) return false;
            raster(t, num_m_blocks, tile.m_block, tile.n_block);
            tile.n_block = tile.n_block * kClusterN + (kClusterN > 1 ? cluster_rank : 0);
            tile.row_begin = tile.m_block * kBlockM;
            tile.rows_valid = min(kBlockM, shape_m - tile.row_begin);
            tile.group = 0;
            if (kLayout == kContiguous) {
                // Every row of an aligned block belongs to one expert (or is padding).
                tile.group = ptx::ldg_int(group_info + tile.row_begin);
                if (tile.group < 0 || tile.group >= kNumGroups) continue;
            }
            return true;
        }
    }

    DG_DEVICE bool next_masked(int32_t t, Tile& tile) {
        // Advance the cursor to the group holding tile t.
        while (t >= cursor_first_tile + cursor_m_blocks * kNumNUnits) {
            cursor_first_tile += cursor_m_blocks * kNumNUnits;
            if (++cursor_group >= kNumGroups) return false;
            cursor_m_blocks = masked_m_blocks(cursor_group);
        }
        raster(t - cursor_first_tile, cursor_m_blocks, tile.m_block, tile.n_block);
        tile.n_block = tile.n_block * kClusterN + (kClusterN > 1 ? cluster_rank : 0);
        const int32_t rows = min(max(ptx::ldg_int(group_info + cursor_group), 0), shape_m);
        tile.group = cursor_group;
        tile.row_begin = cursor_group * shape_m + tile.m_block * kBlockM;
        tile.rows_valid = min(kBlockM, rows - tile.m_block * kBlockM);
        return true;
    }
};
