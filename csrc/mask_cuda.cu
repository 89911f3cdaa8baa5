// Goldfish mask on the GPU: dropped[r, t] = position_dropped(...) for every target of labels [rows, T].
//
// One thread per target, one block per tile of kTile consecutive targets of one row. For the hash
// strategies each thread folds its window of h labels in an O(h) loop. The labels the tile's windows
// span ([first window start, last window end], at most kTile + h - 1 positions) are staged through
// shared memory kTile positions at a time, so each label is read from global memory once per tile
// whatever h is, and the per-token mixing of the rolling hash is done once per staged label, not h times.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_kernels.h"
#include "goldfish_hash.h"

namespace goldfish {
namespace {

// Targets per block; also the number of window positions staged per chunk (one per thread).
constexpr int kTile = 256;

__global__ void __launch_bounds__(kTile)
    mask_kernel(const MaskParams p, const int64_t* labels, bool* dropped, int64_t T, int64_t tiles_per_row,
                int64_t num_tiles) {
  __shared__ uint64_t staged[kTile];
  const bool hashed = is_hash_strategy(p.strategy);
  const bool rolling = p.strategy == kHashRolling;
  const int64_t lag = p.preceding ? 1 : 0;  // window_end(p, t) == t - lag

  for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
    const int64_t row = tile / tiles_per_row;
    const int64_t t0 = (tile - row * tiles_per_row) * kTile;
    const int64_t t = t0 + threadIdx.x;
    const bool active = t < T;
    const int64_t* row_labels = labels + row * T;

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
        }
      }
    }
    if (active) dropped[row * T + t] = position_dropped(p, row_labels[t], row, t, value);
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
  mask_kernel<<<grid, kTile, 0, stream>>>(params, labels, dropped, T, tiles_per_row, num_tiles);
  return cudaGetLastError();
}

}  // namespace goldfish
