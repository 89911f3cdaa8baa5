// Goldfish mask on the GPU: dropped[r, t] = position_dropped(...) for every target of labels [rows, T].
//
// One thread per target, one block per tile of kTile consecutive targets of one row. For the hash
// strategies each thread folds its window of h labels in an O(h) loop. The labels the tile's windows
// span ([first window start, last window end], at most kTile + h - 1 positions) are staged through
// shared memory kTile positions at a time, so each label is read from global memory once per tile
// whatever h is, and the per-token mixing of the rolling hash is done once per staged label, not h times.
//
// With document boundaries (a kernel instance of its own, so the plain one is unchanged) each target is
// decided at its position in its segment, t - segment start: a hashed target's window must lie inside the
// segment, i.e. hold no boundary label before the target (flags staged with the labels); the static strategy
// needs the segment start itself, the last boundary label before the target anywhere in the row (found by the
// block: a backward scan from the tile, then a max-scan over the tile).
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"
#include "goldfish_hash.h"

namespace goldfish {
namespace {

// Targets per block; also the number of window positions staged per chunk (one per thread).
constexpr int kTile = 256;

// Static strategy with boundaries: the start of the segment of target t0 + threadIdx.x (one past the last
// boundary label before it, or 0). Every thread of the block calls it (it has barriers).
__device__ int64_t static_segment_start(const MaskParams& p, const int64_t* row_labels, int64_t t0, int64_t T,
                                        int64_t* scan, unsigned long long* before_tile) {
  const int i = threadIdx.x;
  __syncthreads();  // the previous tile no longer reads scan or before_tile
  if (i == 0) *before_tile = 0;  // one past the last boundary position before t0 (0: none)
  __syncthreads();
  // Backward over the row, kTile labels at a time, until a chunk holds a boundary label (block-uniform loop).
  for (int64_t c0 = t0 - kTile; c0 > -kTile; c0 -= kTile) {
    const int64_t pos = c0 + i;
    const bool found = pos >= 0 && row_labels[pos] == p.boundary_id;
    if (found) atomicMax(before_tile, static_cast<unsigned long long>(pos + 1));
    if (__syncthreads_or(found)) break;
  }
  // Inclusive max-scan over the tile: scan[i] = the last boundary position in [t0, t0 + i], or -1.
  const int64_t t = t0 + i;
  scan[i] = t < T && row_labels[t] == p.boundary_id ? t : -1;
  for (int offset = 1; offset < kTile; offset <<= 1) {
    __syncthreads();
    const int64_t left = i >= offset ? scan[i - offset] : -1;
    __syncthreads();
    if (left > scan[i]) scan[i] = left;
  }
  __syncthreads();
  const int64_t in_tile = i > 0 ? scan[i - 1] : -1;  // the last boundary position in [t0, t - 1]
  return in_tile >= 0 ? in_tile + 1 : static_cast<int64_t>(*before_tile);
}

template <bool kBoundaries>
__global__ void __launch_bounds__(kTile)
    mask_kernel(const MaskParams p, const int64_t* labels, bool* dropped, int64_t T, int64_t tiles_per_row,
                int64_t num_tiles) {
  __shared__ uint64_t staged[kTile];
  __shared__ bool staged_boundary[kBoundaries ? kTile : 1];
  __shared__ int64_t scan[kBoundaries ? kTile : 1];
  __shared__ unsigned long long before_tile;
  const bool hashed = is_hash_strategy(p.strategy);
  const bool rolling = p.strategy == kHashRolling;
  const int64_t lag = p.preceding ? 1 : 0;  // window_end(p, t) == t - lag

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int64_t t0 = (tile - row * tiles_per_row) * kTile;
    const int64_t t = t0 + threadIdx.x;
    const bool active = t < T;
    const int64_t* row_labels = labels + row * T;
    int64_t segment_start = 0;  // with boundaries: where the segment of target t starts (see the file comment)

    // Product of the window's labels (official hashes), or the rolling sum folded in Horner form
    // (oldest token first, so token end - j ends up multiplied by kRollingBase^j).
    uint64_t value = rolling ? 0 : 1;
    if (hashed) {
      const int64_t end = t - lag;
      const int64_t start = end - p.h + 1;  // the window is only folded when it lies inside the row
      // Positions read by any window of the tile; negative ones belong to windows that are not folded.
      const int64_t lo = t0 - lag - p.h + 1 > 0 ? t0 - lag - p.h + 1 : 0;
      const int64_t hi = (t0 + kTile < T ? t0 + kTile : T) - 1 - lag;
      // Block-uniform bounds: every thread takes part in every barrier.
      for (int64_t c0 = lo; c0 <= hi; c0 += kTile) {
        __syncthreads();  // the previous chunk (or tile) is no longer read
        const int64_t pos = c0 + threadIdx.x;
        if (pos <= hi) {
          const int64_t id = row_labels[pos];
          staged[threadIdx.x] = rolling ? token_mix(id) : static_cast<uint64_t>(id);
          if (kBoundaries) staged_boundary[threadIdx.x] = id == p.boundary_id;
        }
        __syncthreads();
        if (active && start >= 0) {
          const int64_t a = start > c0 ? start : c0;
          const int64_t b = end < c0 + kTile - 1 ? end : c0 + kTile - 1;
          if (rolling) {
            for (int64_t q = a; q <= b; ++q) value = value * kRollingBase + staged[q - c0];
          } else {
            for (int64_t q = a; q <= b; ++q) value *= staged[q - c0];
          }
          if (kBoundaries) {  // a boundary label in the window before the target starts a later segment
            for (int64_t q = a; q <= b && q < t; ++q) {
              if (staged_boundary[q - c0]) segment_start = q + 1;
            }
          }
        }
      }
    } else if (kBoundaries && p.strategy == kStatic) {
      segment_start = static_segment_start(p, row_labels, t0, T, scan, &before_tile);
    }
    if (active) dropped[row * T + t] = position_dropped(p, row_labels[t], row, t - segment_start, value);
  }
}

}  // namespace

cudaError_t launch_mask_cuda(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows,
                             int64_t T, cudaStream_t stream) {
  if (rows <= 0 || T <= 0) return cudaSuccess;
  const int64_t tiles_per_row = (T + kTile - 1) / kTile;
  const int64_t num_tiles = rows * tiles_per_row;
  // Blocks loop over tiles, so the grid only needs to fit gridDim.x; past 2^31 - 1 tiles they take several.
  const int64_t max_grid = 0x7FFFFFFF;
  const unsigned grid = static_cast<unsigned>(num_tiles < max_grid ? num_tiles : max_grid);
  if (uses_boundaries(params)) {
    mask_kernel<true><<<grid, kTile, 0, stream>>>(params, labels, dropped, T, tiles_per_row, num_tiles);
  } else {
    mask_kernel<false><<<grid, kTile, 0, stream>>>(params, labels, dropped, T, tiles_per_row, num_tiles);
  }
  return cudaGetLastError();
}

}  // namespace goldfish
