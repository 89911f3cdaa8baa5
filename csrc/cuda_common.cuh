// Device helpers shared by the CUDA cross-entropy kernels (cross_entropy_cuda.cu, vocab_parallel_cuda.cu):
// element conversions, 16-byte packs, the hardware exponential and (max, sum of exp) pairs. CUDA headers only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

namespace goldfish {
namespace cuda_common {

constexpr float kLog2e = 1.4426950408889634f;

// ---- element types ------------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <int Bytes>
struct RawWord;
template <>
struct RawWord<16> { using type = uint4; };
template <>
struct RawWord<4> { using type = unsigned int; };
template <>
struct RawWord<2> { using type = unsigned short; };

// W consecutive elements moved as one machine word (one 16-byte access when W * sizeof(T) == 16).
template <typename T, int W>
union Pack {
  typename RawWord<sizeof(T) * W>::type raw;
  T v[W];
};

template <typename T, int W>
__device__ __forceinline__ Pack<T, W> filled(float x) {
  Pack<T, W> p;
#pragma unroll
  for (int e = 0; e < W; ++e) p.v[e] = from_float<T>(x);
  return p;
}

// ---- exponentials and (max, sum of exp) pairs -----------------------------------------------------------
// A pair (m, s) stands for sum_j exp(x_j) = s * exp(m), with m the largest x_j seen (-inf: none yet, s == 0).
// Exponentials are exp2((x - m) * log2(e)): x - m is exact for the elements near the max, which dominate
// the sum, so their error does not grow with |m|, and the max element contributes exactly 1.

// 2^x by the hardware's ex2 (2 ulp, what __expf uses), without exp2f's rescaling for subnormal results:
// those are more than 2^126 below the largest term of the row, far below what the fp32 sum or the gradient
// can resolve, and flushing them to zero saves instructions and registers in the hot loops.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ float exp_shifted(float x, float shift) { return fast_exp2((x - shift) * kLog2e); }

// The value subtracted before exponentiating: the max, or 0 while it is -inf (every element seen is then
// -inf, and -inf - 0 gives exp2(-inf) = 0 where -inf - (-inf) would give NaN).
__device__ __forceinline__ float shift_of(float m) { return m == -CUDART_INF_F ? 0.f : m; }

// s expressed relative to m_new >= m_old instead of m_old.
__device__ __forceinline__ float rebase(float s, float m_old, float m_new) {
  return m_old == -CUDART_INF_F ? 0.f : s * fast_exp2((m_old - m_new) * kLog2e);
}

__device__ __forceinline__ void combine(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = rebase(s, m, mx) + rebase(s2, m2, mx);
  m = mx;
}

// Combines the block's pairs; every thread gets the block's pair. Must be reached by all threads of the
// block. warp_pairs (one slot per warp) and block_pair live in shared memory.
__device__ __forceinline__ float2 block_reduce_pairs(float m, float s, float2* warp_pairs, float2& block_pair) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    combine(m, s, __shfl_xor_sync(0xFFFFFFFFu, m, offset), __shfl_xor_sync(0xFFFFFFFFu, s, offset));
  if (lane == 0) warp_pairs[warp] = make_float2(m, s);
  __syncthreads();
  if (warp == 0) {
    const float2 part = lane < static_cast<int>(blockDim.x >> 5) ? warp_pairs[lane] : make_float2(-CUDART_INF_F, 0.f);
    m = part.x;
    s = part.y;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1)
      combine(m, s, __shfl_xor_sync(0xFFFFFFFFu, m, offset), __shfl_xor_sync(0xFFFFFFFFu, s, offset));
    if (lane == 0) block_pair = make_float2(m, s);
  }
  __syncthreads();
  return block_pair;
}

// Grid of a grid-stride loop over `items` work items: at most 8 blocks of 256 threads per multiprocessor
// (what fills one), so a cheap pass costs one short wave rather than one block per item.
inline cudaError_t resident_grid(int64_t items, unsigned* grid) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t resident = static_cast<int64_t>(sms) * 8;
  *grid = static_cast<unsigned>(items < resident ? items : resident);
  return err;
}

}  // namespace cuda_common
}  // namespace goldfish
