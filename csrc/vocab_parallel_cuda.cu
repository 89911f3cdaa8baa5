// Vocab-parallel cross-entropy on one vocabulary shard, on the GPU: a statistics pass (local log-sum-exp
// and target logit of each row) and, once the caller has combined the shards' statistics, a gradient pass.
//
// Statistics: one block per row; each thread folds its packs (16 bytes when the rows are 16-byte aligned,
// else single elements) into an online (max, sum of exp) pair, and a block reduction combines the pairs.
// Gradient: a pure elementwise map given lse, run as a grid-stride loop over (row, chunk) work items so
// that the row of a pack costs one division per item, not per pack.
//
// Numerics as in cross_entropy_cuda.cu: fp32 throughout, exponentials as exp2((x - shift) * log2(e)) by the
// hardware ex2 (2 ulp). Its arguments are <= 0 (up to the rounding of lse in the gradient pass), where ex2
// needs no range handling, and x - shift is exact for the elements near the shift, which dominate.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace goldfish {
namespace {

using namespace cuda_common;

constexpr int kStatsThreads = 256;

struct ReduceScratch {
  float2 warp[kStatsThreads / 32];
  float2 row;
};

// ---- statistics -----------------------------------------------------------------------------------------

// Packs each thread loads before folding them: enough loads in flight to cover the memory latency.
constexpr int kStatsUnroll = 4;

template <typename T, int W>
__global__ void __launch_bounds__(kStatsThreads)
    stats_kernel(const T* __restrict__ logits, const int64_t* __restrict__ local_labels, const bool* __restrict__ skip,
                 int64_t N, int64_t V, float* __restrict__ lse, float* __restrict__ target_logit) {
  using P = Pack<T, W>;
  __shared__ ReduceScratch scratch;
  const int64_t packs = V / W;  // exact: W > 1 only when W divides V
  const int64_t stride = blockDim.x;
  // The loop only runs more than once past 2^31 - 1 rows; every branch in it is uniform over the block.
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    if (skip != nullptr && skip[row]) {
      if (threadIdx.x == 0) lse[row] = target_logit[row] = 0.f;
      continue;
    }
    const P* in = reinterpret_cast<const P*>(logits + row * V);
    float m = -CUDART_INF_F;
    float s = 0.f;
    for (int64_t base = threadIdx.x; base < packs; base += kStatsUnroll * stride) {
      P p[kStatsUnroll];
#pragma unroll
      for (int r = 0; r < kStatsUnroll; ++r) {
        const int64_t u = base + r * stride;
        p[r] = u < packs ? in[u] : filled<T, W>(-CUDART_INF_F);  // -inf adds nothing
      }
      // One rebase per batch: the exponentials are taken against the batch's max.
      float mx = m;
#pragma unroll
      for (int r = 0; r < kStatsUnroll; ++r)
#pragma unroll
        for (int e = 0; e < W; ++e) mx = fmaxf(mx, to_float(p[r].v[e]));
      if (mx > m) {
        s = rebase(s, m, mx);
        m = mx;
      }
      const float shift = shift_of(m);
#pragma unroll
      for (int r = 0; r < kStatsUnroll; ++r)
#pragma unroll
        for (int e = 0; e < W; ++e) s += exp_shifted(to_float(p[r].v[e]), shift);
    }
    const float2 stats = block_reduce_pairs(m, s, scratch.warp, scratch.row);
    if (threadIdx.x == 0) {
      // m + log(s): -inf for a row of -inf (s == 0), NaN where the row holds a NaN.
      lse[row] = stats.x + logf(stats.y);
      const int64_t label = local_labels[row];  // in [-1, V) by the caller's contract
      target_logit[row] = label >= 0 ? to_float(logits[row * V + label]) : 0.f;
    }
  }
}

template <typename T, int W>
cudaError_t launch_stats_typed(const T* logits, const int64_t* local_labels, const bool* skip, int64_t N, int64_t V,
                               float* lse, float* target_logit, cudaStream_t stream) {
  // Short rows get fewer threads (at least a warp), so that each has a full batch of packs to load.
  const int64_t batches = (V / W + kStatsUnroll - 1) / kStatsUnroll;
  const int64_t warps = (batches + 31) / 32;
  const int threads = static_cast<int>(warps < kStatsThreads / 32 ? warps * 32 : kStatsThreads);
  const int64_t max_grid = 0x7FFFFFFF;
  const unsigned grid = static_cast<unsigned>(N < max_grid ? N : max_grid);
  stats_kernel<T, W><<<grid, threads, 0, stream>>>(logits, local_labels, skip, N, V, lse, target_logit);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_stats_dispatch(const void* logits, const int64_t* local_labels, const bool* skip, int64_t N,
                                  int64_t V, float* lse, float* target_logit, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* x = static_cast<const T*>(logits);
  if (V % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0)
    return launch_stats_typed<T, kVec>(x, local_labels, skip, N, V, lse, target_logit, stream);
  return launch_stats_typed<T, 1>(x, local_labels, skip, N, V, lse, target_logit, stream);
}

// ---- gradient -------------------------------------------------------------------------------------------

constexpr int kGradThreads = 256;
constexpr int kGradUnroll = 4;
constexpr int64_t kGradChunk = static_cast<int64_t>(kGradThreads) * kGradUnroll;  // packs per work item

// No __restrict__ on logits and grad: they may alias. Each thread loads its packs before storing them, and
// no other thread touches them, which is all the in-place case needs. The loads and stores are
// evict-first: this pass is the last use of the logits.
template <typename T, int W>
__global__ void __launch_bounds__(kGradThreads)
    grad_kernel(const T* logits, T* grad, const int64_t* __restrict__ local_labels, const bool* __restrict__ skip,
                const float* __restrict__ lse, const float* __restrict__ grad_scale, int64_t N, int64_t packs_per_row,
                int64_t chunks_per_row) {
  using P = Pack<T, W>;
  const float gs = *grad_scale;
  const P* in = reinterpret_cast<const P*>(logits);
  P* out = reinterpret_cast<P*>(grad);
  const int64_t items = N * chunks_per_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / chunks_per_row;
    const int64_t begin = row * packs_per_row;
    const int64_t chunk_begin = (item - row * chunks_per_row) * kGradChunk;
    if (skip != nullptr && skip[row]) {
      const P zero = filled<T, W>(0.f);
#pragma unroll
      for (int j = 0; j < kGradUnroll; ++j) {
        const int64_t u = chunk_begin + j * kGradThreads + threadIdx.x;
        if (u < packs_per_row) __stcs(&out[begin + u].raw, zero.raw);
      }
      continue;
    }
    const float shift = lse[row];
    const int64_t label = local_labels[row];  // -1 never matches an element
    P p[kGradUnroll];
#pragma unroll
    for (int j = 0; j < kGradUnroll; ++j) {
      const int64_t u = chunk_begin + j * kGradThreads + threadIdx.x;
      if (u < packs_per_row) p[j].raw = __ldcs(&in[begin + u].raw);
    }
#pragma unroll
    for (int j = 0; j < kGradUnroll; ++j) {
      const int64_t u = chunk_begin + j * kGradThreads + threadIdx.x;
      if (u < packs_per_row) {
        const int64_t label_lane = label - u * W;  // the label's index in this pack, if in [0, W)
#pragma unroll
        for (int e = 0; e < W; ++e)
          // fma: p * gs - gs at the label rounds once.
          p[j].v[e] = from_float<T>(__fmaf_rn(exp_shifted(to_float(p[j].v[e]), shift), gs, e == label_lane ? -gs : 0.f));
        __stcs(&out[begin + u].raw, p[j].raw);
      }
    }
  }
}

template <typename T, int W>
cudaError_t launch_grad_typed(const T* logits, T* grad, const int64_t* local_labels, const bool* skip, const float* lse,
                              int64_t N, int64_t V, const float* grad_scale, cudaStream_t stream) {
  const int64_t packs_per_row = V / W;
  const int64_t chunks_per_row = (packs_per_row + kGradChunk - 1) / kGradChunk;
  unsigned grid = 0;
  if (const cudaError_t err = resident_grid(N * chunks_per_row, &grid); err != cudaSuccess) return err;
  grad_kernel<T, W><<<grid, kGradThreads, 0, stream>>>(logits, grad, local_labels, skip, lse, grad_scale, N,
                                                       packs_per_row, chunks_per_row);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_dispatch(const void* logits, void* grad, const int64_t* local_labels, const bool* skip,
                                 const float* lse, int64_t N, int64_t V, const float* grad_scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const T* x = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  if (V % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0)
    return launch_grad_typed<T, kVec>(x, g, local_labels, skip, lse, N, V, grad_scale, stream);
  return launch_grad_typed<T, 1>(x, g, local_labels, skip, lse, N, V, grad_scale, stream);
}

}  // namespace

cudaError_t launch_vocab_parallel_stats_cuda(FloatType dtype, const void* logits, const int64_t* local_labels,
                                             const bool* skip, int64_t N, int64_t V, float* lse,
                                             float* target_logit, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_stats_dispatch<float>(logits, local_labels, skip, N, V, lse, target_logit, stream);
    case FloatType::kBFloat16:
      return launch_stats_dispatch<__nv_bfloat16>(logits, local_labels, skip, N, V, lse, target_logit, stream);
    case FloatType::kFloat16:
      return launch_stats_dispatch<__half>(logits, local_labels, skip, N, V, lse, target_logit, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_vocab_parallel_grad_cuda(FloatType dtype, const void* logits, void* grad,
                                            const int64_t* local_labels, const bool* skip, const float* lse,
                                            int64_t N, int64_t V, const float* grad_scale, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_grad_dispatch<float>(logits, grad, local_labels, skip, lse, N, V, grad_scale, stream);
    case FloatType::kBFloat16:
      return launch_grad_dispatch<__nv_bfloat16>(logits, grad, local_labels, skip, lse, N, V, grad_scale, stream);
    case FloatType::kFloat16:
      return launch_grad_dispatch<__half>(logits, grad, local_labels, skip, lse, N, V, grad_scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace goldfish
