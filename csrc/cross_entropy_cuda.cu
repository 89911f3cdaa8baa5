// Fused masked cross-entropy (loss and gradient in one pass over the logits) and the row scaling of the
// gradient, on the GPU.
//
// Layout of the cross-entropy kernel: one block per row, or, for long rows on sm_90, one cluster of blocks
// per row, each block taking a contiguous slice and the blocks combining their (max, sum) pairs through
// distributed shared memory. A slice is cut into packs of W elements (16 bytes when the rows are 16-byte
// aligned, else single elements), and pack u belongs to thread u % blockDim.x. Each thread keeps its
// packs in one of three tiers, all filled by the single read of the row:
//   1. registers: its first reg_packs() packs (32 registers' worth; the slice's first reg_packs() *
//      blockDim.x packs);
//   2. shared memory: the next packs, as many as the planned capacity, copied asynchronously (cp.async);
//   3. re-read: whatever is left, only where slices cannot do (V = 128256 fp32 on sm_80, or rows longer
//      than 8 multiprocessors hold). It is prefetched into L2 with the evict_last priority when the row is
//      started, and every other access is marked evict-first, so that its lines are still in L2 when
//      pass 2 reads them again (backwards: the lines pass 1 read last come first).
// Pass 1 folds each thread's elements into an online (max, sum of exp) pair, one block (and cluster)
// reduction combines the pairs, and pass 2 writes the gradient from the kept copies. Each thread reads and
// writes only its own packs, and writes only after the reduction's barriers, so grad may alias logits.
//
// Numerics: fp32 throughout, exponentials as exp2((x - max) * log2(e)). The loss is taken as
// (max - x[label]) + log(sum exp(x - max)) rather than lse - x[label], so a small loss keeps its relative
// precision (as in torch's log_softmax).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cooperative_groups.h>
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "cuda_kernels.h"

namespace goldfish {
namespace {

namespace cg = cooperative_groups;
using namespace cuda_common;

constexpr float kLn2 = 0.6931471805599453f;

// Packs per thread held in registers: 32 of the 64 registers a thread may have in a 1024-thread block,
// which leaves room for the indices and accumulators without spilling: 8 packs of 16 bytes, or 32 single
// elements (a 16-bit one takes a register of its own).
__host__ __device__ constexpr int reg_packs(int pack_bytes) { return pack_bytes >= 4 ? 128 / pack_bytes : 32; }
constexpr int kMaxThreads = 1024;
constexpr int64_t kMaxRowLength = (int64_t{1} << 31) - (int64_t{1} << 16);

template <typename P>
__device__ __forceinline__ P load_evict_first(const P* p) {
  P r;
  r.raw = __ldcs(&p->raw);
  return r;
}

template <typename P>
__device__ __forceinline__ P load_normal(const P* p) {
  P r;
  r.raw = p->raw;
  return r;
}

template <typename P>
__device__ __forceinline__ void store_evict_first(P* p, const P& value) {
  __stcs(&p->raw, value.raw);
}

// Global -> shared copy of one pack, asynchronous where cp.async has the size (4 or 16 bytes).
template <typename P>
__device__ __forceinline__ void stage_pack(P* dst, const P* src) {
  if constexpr (sizeof(P) == 16) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(src) : "memory");
  } else if constexpr (sizeof(P) == 4) {
    const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(src) : "memory");
  } else {
    *dst = load_evict_first(src);
  }
}

__device__ __forceinline__ void wait_staged() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Prefetches the 128-byte lines of [begin, end) into L2 with the evict_last priority, spread over the block.
template <typename P>
__device__ __forceinline__ void prefetch_l2_evict_last(const P* begin, const P* end) {
  constexpr uintptr_t kLine = 128;
  const uintptr_t first_line = reinterpret_cast<uintptr_t>(begin) & ~(kLine - 1);
  for (uintptr_t a = first_line + threadIdx.x * kLine; a < reinterpret_cast<uintptr_t>(end); a += blockDim.x * kLine)
    asm volatile("prefetch.global.L2::evict_last [%0];\n" ::"l"(a));
}

template <typename T>
struct PairOf;
template <>
struct PairOf<__nv_bfloat16> { using type = __nv_bfloat162; };
template <>
struct PairOf<__half> { using type = __half2; };

__device__ __forceinline__ float pair_max_float(__nv_bfloat162 a) { return fmaxf(__low2float(a), __high2float(a)); }
__device__ __forceinline__ float pair_max_float(__half2 a) { return fmaxf(__low2float(a), __high2float(a)); }

template <typename T, int W>
__device__ __forceinline__ float pack_max(const Pack<T, W>& p) {
  if constexpr (sizeof(T) == 2 && W % 2 == 0) {
    // Paired 16-bit maxima: half the instructions, and no fp32 copies of the pack for the compiler to keep
    // alive until the exponentials (which would spill the register tier).
    using T2 = typename PairOf<T>::type;
    const T2* pairs = reinterpret_cast<const T2*>(p.v);
    T2 mx = pairs[0];
#pragma unroll
    for (int e = 1; e < W / 2; ++e) mx = __hmax2(mx, pairs[e]);
    return pair_max_float(mx);
  } else {
    float mx = to_float(p.v[0]);
#pragma unroll
    for (int e = 1; e < W; ++e) mx = fmaxf(mx, to_float(p.v[e]));
    return mx;
  }
}

template <typename T, int W>
__device__ __forceinline__ void fold_pack(float& m, float& s, const Pack<T, W>& p) {
  const float pm = pack_max(p);
  if (pm > m) {
    s = rebase(s, m, pm);
    m = pm;
  }
  const float shift = shift_of(m);
#pragma unroll
  for (int e = 0; e < W; ++e) s += exp_shifted(to_float(p.v[e]), shift);
}

struct ReduceScratch {
  float2 warp[kMaxThreads / 32];
  float2 row;       // the block's (max, sum) pair
  float x_label;    // logits[row, label], read before any gradient of the row is written
  float grad_scale;
};

// ---- cross-entropy ------------------------------------------------------------------------------------

template <typename T, int W>
__device__ __forceinline__ void write_zero_row(Pack<T, W>* out, int packs) {
  const Pack<T, W> zero = filled<T, W>(0.f);
  for (int u = threadIdx.x; u < packs; u += blockDim.x) store_evict_first(out + u, zero);
}

// grad of one pack: softmax * gs, minus gs at the label. `label_lane` is the label's index inside this
// pack (any value outside [0, W) when the label is elsewhere).
template <typename T, int W>
__device__ __forceinline__ void write_grad_pack(Pack<T, W>* out, const Pack<T, W>& x, float shift, float k, float gs,
                                                int label_lane) {
  Pack<T, W> g;
#pragma unroll
  for (int e = 0; e < W; ++e)
    g.v[e] = from_float<T>(__fmaf_rn(exp_shifted(to_float(x.v[e]), shift), k, e == label_lane ? -gs : 0.f));
  store_evict_first(out, g);
}

template <typename T, int W>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_kernel(const T* logits, T* grad, float* row_loss, const int64_t* labels, const bool* dropped,
                         int64_t N, int64_t V, int64_t ignore_index, bool dropped_loss, const float* grad_scale,
                         int slices, int staged_capacity) {
  using P = Pack<T, W>;
  constexpr int kRegPacks = reg_packs(sizeof(P));
  extern __shared__ uint4 staged_raw[];  // uint4: 16-byte alignment for cp.async
  P* staged = reinterpret_cast<P*>(staged_raw);
  __shared__ ReduceScratch scratch;

  const int tid = threadIdx.x;
  const int nthreads = blockDim.x;
  // The row is cut into `slices` contiguous slices, one per block of a cluster (blocks slices * r ...
  // slices * r + slices - 1 along x). Rows past what x can count continue along y. One row per block: a
  // loop over rows would keep more values alive and spill.
  const int slice = static_cast<int>(blockIdx.x % slices);
  const int64_t row = blockIdx.x / slices + static_cast<int64_t>(blockIdx.y) * (gridDim.x / slices);
  if (row >= N) return;  // uniform over the cluster
  // In-row indices are 32-bit (the launcher rejects V >= 2^31); only row offsets need 64 bits.
  const int row_packs = static_cast<int>(V / W);  // exact: W > 1 only when W divides V
  const int slice_packs = (row_packs + slices - 1) / slices;
  const int slice_begin = min(row_packs, slice * slice_packs);
  const int packs = min(slice_packs, row_packs - slice_begin);  // this block's packs (maybe none)
  const int reg_end = kRegPacks * nthreads;
  // Packs in shared memory: the capacity is planned for the longest slice; the last one may be shorter.
  const int staged_packs = max(0, min(staged_capacity, packs - reg_end));
  const int reread_begin = reg_end + staged_packs;
  // Every branch below depends on the row only, so it is uniform over the block and the cluster.
  const int64_t label = labels[row];
  const bool ignored = label == ignore_index;
  const bool is_dropped = !ignored && dropped != nullptr && dropped[row];
  const P* in = reinterpret_cast<const P*>(logits + row * V) + slice_begin;
  if (ignored || (is_dropped && !dropped_loss)) {
    if (tid == 0 && slice == 0) row_loss[row] = 0.f;
    if (grad != nullptr) write_zero_row(reinterpret_cast<P*>(grad + row * V) + slice_begin, packs);
    return;
  }

  const bool label_ok = label >= 0 && label < V;
  // The label's element index inside this slice; any negative or large value never matches a pack.
  const int label_pos = label_ok ? static_cast<int>(label - static_cast<int64_t>(slice_begin) * W) : -W;

  // Issue every read of the slice up front: the shared-memory tier by cp.async, the re-read tier as L2
  // prefetches (they hold no registers, and evict_last keeps the lines for pass 2), then the registers.
  for (int i = tid; i < staged_packs; i += nthreads) stage_pack(staged + i, in + reg_end + i);
  if (reread_begin < packs) prefetch_l2_evict_last(in + reread_begin, in + packs);
  P regs[kRegPacks];
#pragma unroll
  for (int r = 0; r < kRegPacks; ++r) {
    const int u = r * nthreads + tid;
    regs[r] = u < packs ? load_evict_first(in + u) : filled<T, W>(-CUDART_INF_F);  // -inf adds nothing
  }

  // Pass 1: fold the tiers into the thread's (max, sum) pair, the register tier last against the final
  // max so that its exponentials need no rebasing.
  float m = -CUDART_INF_F;
  float s = 0.f;
  for (int u = reread_begin + tid; u < packs; u += nthreads) fold_pack(m, s, load_normal(in + u));
  wait_staged();  // this thread's own copies; no other thread reads them
  for (int i = tid; i < staged_packs; i += nthreads) fold_pack(m, s, staged[i]);
  {
    float reg_max = -CUDART_INF_F;
#pragma unroll
    for (int r = 0; r < kRegPacks; ++r) reg_max = fmaxf(reg_max, pack_max(regs[r]));
    if (reg_max > m) {
      s = rebase(s, m, reg_max);
      m = reg_max;
    }
    const float shift = shift_of(m);
#pragma unroll
    for (int r = 0; r < kRegPacks; ++r)
#pragma unroll
      for (int e = 0; e < W; ++e) s += exp_shifted(to_float(regs[r].v[e]), shift);
  }

  // Scalars for after the reduction, read now: before its barriers, so before any gradient of the row is
  // written (grad may alias logits), and after pass 1, so no register holds them through it and their
  // lines are likely cached (reading them first thing measured 10% slower). Slice 0 starts the row, so
  // label_pos indexes the row there; an out-of-range label (torch would assert) yields a NaN loss rather
  // than an out-of-bounds read.
  if (tid == 0) {
    if (slice == 0)
      scratch.x_label = label_pos >= 0 ? to_float(reinterpret_cast<const T*>(in)[label_pos]) : CUDART_NAN_F;
    scratch.grad_scale = grad != nullptr ? *grad_scale : 0.f;
  }
  float2 stats = block_reduce_pairs(m, s, scratch.warp, scratch.row);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (slices > 1) {
    // Every block combines the slices' pairs in the same order, so all get the same bits.
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // each block's pair is in its scratch.row
    float cm = -CUDART_INF_F, cs = 0.f;
    for (int r = 0; r < slices; ++r) {
      const float2 part = *cluster.map_shared_rank(&scratch.row, r);
      combine(cm, cs, part.x, part.y);
    }
    stats = make_float2(cm, cs);
    cluster.barrier_arrive();  // done reading the other blocks' shared memory; waited for before exiting
  }
#endif
  const float row_max = stats.x, row_sum = stats.y;
  if (tid == 0 && slice == 0) row_loss[row] = (row_max - scratch.x_label) + log2f(row_sum) * kLn2;

  P* out = grad != nullptr ? reinterpret_cast<P*>(grad + row * V) + slice_begin : nullptr;
  if (out != nullptr && is_dropped) {
    write_zero_row(out, packs);
  } else if (out != nullptr) {
    const float shift = shift_of(row_max);
    const float gs = scratch.grad_scale;
    const float k = gs / row_sum;
    auto lane_of_label = [&](int u) { return label_pos - u * W; };

    // Pass 2: the re-read tier first and backwards, so the lines read last in pass 1 are read first.
    if (reread_begin + tid < packs) {
      const int last = packs - 1 - (packs - 1 - reread_begin - tid) % nthreads;  // this thread's last pack
      for (int u = last; u >= reread_begin; u -= nthreads)
        write_grad_pack(out + u, load_evict_first(in + u), shift, k, gs, lane_of_label(u));
    }
    for (int i = tid; i < staged_packs; i += nthreads) {
      const int u = reg_end + i;
      write_grad_pack(out + u, staged[i], shift, k, gs, lane_of_label(u));
    }
#pragma unroll
    for (int r = 0; r < kRegPacks; ++r) {
      const int u = r * nthreads + tid;
      if (u < packs) write_grad_pack(out + u, regs[r], shift, k, gs, lane_of_label(u));
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (slices > 1) cg::this_cluster().barrier_wait();  // no block leaves while another may read its scratch
#endif
}

// Launch shape of the cross-entropy kernel for one row length: the row is cut into `slices` slices (one
// block each, in one cluster), each block has `threads` threads and `staged_packs` packs of shared memory.
struct CrossEntropyPlan {
  int slices;
  int threads;
  int64_t staged_packs;
};

// A row of `packs` packs of `pack_bytes` bytes. A block of t threads holds reg_packs() * t packs in
// registers; with at most 64 registers a thread, two 512-thread blocks share a multiprocessor, so that one
// block's loads overlap the other's reduction and stores (one 1024-thread block per multiprocessor measured
// 10 to 20 points of copy bandwidth slower on an H200). Preferred, in order: one 512-thread block per row;
// the fewest slices (blocks of a cluster) whose registers plus half a multiprocessor's shared memory hold
// them; one 1024-thread block per row with all the shared memory it may have, and the re-read tier for the
// rest. `static_smem` is the kernel's own shared memory; `max_slices` is 1 where clusters are not available.
CrossEntropyPlan plan_cross_entropy(int64_t packs, int pack_bytes, int64_t static_smem, int64_t smem_per_sm,
                                    int64_t smem_per_block, int64_t smem_reserved_per_block, int max_slices) {
  constexpr int kThreads = kMaxThreads / 2;
  const int per_thread = reg_packs(pack_bytes);
  const int64_t block_reg_packs = static_cast<int64_t>(per_thread) * kThreads;
  if (packs <= block_reg_packs) {
    const int64_t threads = (packs + per_thread - 1) / per_thread;
    return {1, static_cast<int>((threads + 31) / 32 * 32), 0};
  }
  for (int slices = 1; slices <= max_slices; slices *= 2) {
    const int64_t rest = (packs + slices - 1) / slices - block_reg_packs;
    if (rest <= 0) return {slices, kThreads, 0};
    const int64_t bytes = rest * pack_bytes + static_smem;
    if (bytes <= smem_per_block && 2 * (bytes + smem_reserved_per_block) <= smem_per_sm)
      return {slices, kThreads, rest};
  }
  const int64_t rest = packs - static_cast<int64_t>(per_thread) * kMaxThreads;
  if (rest <= 0) return {1, kMaxThreads, 0};
  const int64_t room = (smem_per_block - static_smem) / pack_bytes;
  return {1, kMaxThreads, room < rest ? room : rest};
}

template <typename T, int W>
cudaError_t launch_cross_entropy_typed(const T* logits, T* grad, float* row_loss, const int64_t* labels,
                                       const bool* dropped, int64_t N, int64_t V, int64_t ignore_index,
                                       bool dropped_loss, const float* grad_scale, cudaStream_t stream) {
  // The kernel indexes inside a row with 32-bit integers, leaving headroom for its loop strides.
  if (V > kMaxRowLength) return cudaErrorInvalidValue;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  int smem_per_sm = 0, smem_per_block = 0, smem_reserved = 0;
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&smem_reserved, cudaDevAttrReservedSharedMemoryPerBlock, device);
  auto kernel = cross_entropy_kernel<T, W>;
  cudaFuncAttributes attributes;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, kernel);
  if (err != cudaSuccess) return err;

  // Clusters need code compiled for compute_90 or later: below that the cluster code is compiled out (also
  // when the driver JIT-compiles older PTX for a newer device, hence the PTX version, not the device's).
  const int max_slices = attributes.ptxVersion >= 90 ? 8 : 1;
  constexpr int kPackBytes = static_cast<int>(sizeof(T)) * W;
  const CrossEntropyPlan plan = plan_cross_entropy(V / W, kPackBytes, static_cast<int64_t>(attributes.sharedSizeBytes),
                                                   smem_per_sm, smem_per_block, smem_reserved, max_slices);
  const size_t smem_bytes = static_cast<size_t>(plan.staged_packs) * kPackBytes;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
  if (err != cudaSuccess) return err;

  const int64_t rows_x = N < 0x7FFFFFFF / plan.slices ? N : 0x7FFFFFFF / plan.slices;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(rows_x * plan.slices), static_cast<unsigned>((N + rows_x - 1) / rows_x));
  config.blockDim = dim3(plan.threads);
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = plan.slices;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = plan.slices > 1 ? 1 : 0;
  err = cudaLaunchKernelEx(&config, kernel, logits, grad, row_loss, labels, dropped, N, V, ignore_index, dropped_loss,
                           grad_scale, plan.slices, static_cast<int>(plan.staged_packs));
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// 16-byte packs when every row of logits and grad starts on a 16-byte boundary, else single elements.
template <typename T>
cudaError_t launch_cross_entropy_dispatch(const void* logits, void* grad, float* row_loss, const int64_t* labels,
                                          const bool* dropped, int64_t N, int64_t V, int64_t ignore_index,
                                          bool dropped_loss, const float* grad_scale, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const bool aligned = V % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                       reinterpret_cast<uintptr_t>(grad) % 16 == 0;
  const T* x = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  if (aligned)
    return launch_cross_entropy_typed<T, kVec>(x, g, row_loss, labels, dropped, N, V, ignore_index, dropped_loss,
                                               grad_scale, stream);
  return launch_cross_entropy_typed<T, 1>(x, g, row_loss, labels, dropped, N, V, ignore_index, dropped_loss,
                                          grad_scale, stream);
}

// ---- row scaling --------------------------------------------------------------------------------------

constexpr int kScaleThreads = 256;
constexpr int kScaleUnroll = 4;
constexpr int64_t kScaleChunk = static_cast<int64_t>(kScaleThreads) * kScaleUnroll;  // packs per work item

// Work items are (row, chunk of kScaleChunk packs), so the row of a pack needs one division per item.
template <typename T, int W>
__global__ void __launch_bounds__(kScaleThreads)
    scale_rows_kernel(T* grad, const float* scale, bool per_row, int64_t N, int64_t packs_per_row,
                      int64_t chunks_per_row) {
  using P = Pack<T, W>;
  const float common = per_row ? 1.f : *scale;
  if (!per_row && common == 1.f) return;
  P* g = reinterpret_cast<P*>(grad);
  const int64_t items = N * chunks_per_row;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t row = item / chunks_per_row;
    const float f = per_row ? scale[row] : common;
    if (f == 1.f) continue;  // x * 1 == x: spare the row's traffic
    const int64_t begin = row * packs_per_row;
    const int64_t chunk_begin = (item - row * chunks_per_row) * kScaleChunk;
    P p[kScaleUnroll];
#pragma unroll
    for (int j = 0; j < kScaleUnroll; ++j) {
      const int64_t u = chunk_begin + j * kScaleThreads + threadIdx.x;
      if (u < packs_per_row) p[j] = load_evict_first(g + begin + u);
    }
#pragma unroll
    for (int j = 0; j < kScaleUnroll; ++j) {
      const int64_t u = chunk_begin + j * kScaleThreads + threadIdx.x;
      if (u < packs_per_row) {
#pragma unroll
        for (int e = 0; e < W; ++e) p[j].v[e] = from_float<T>(to_float(p[j].v[e]) * f);
        store_evict_first(g + begin + u, p[j]);
      }
    }
  }
}

template <typename T, int W>
cudaError_t launch_scale_rows_typed(T* grad, const float* scale, bool per_row, int64_t N, int64_t V,
                                    cudaStream_t stream) {
  const int64_t packs_per_row = V / W;
  const int64_t chunks_per_row = (packs_per_row + kScaleChunk - 1) / kScaleChunk;
  unsigned grid = 0;  // the scale == 1 case then costs one short wave of blocks
  if (const cudaError_t err = resident_grid(N * chunks_per_row, &grid); err != cudaSuccess) return err;
  scale_rows_kernel<T, W><<<grid, kScaleThreads, 0, stream>>>(grad, scale, per_row, N, packs_per_row, chunks_per_row);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scale_rows_dispatch(void* grad, const float* scale, bool per_row, int64_t N, int64_t V,
                                       cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  T* g = static_cast<T*>(grad);
  if (V % kVec == 0 && reinterpret_cast<uintptr_t>(grad) % 16 == 0)
    return launch_scale_rows_typed<T, kVec>(g, scale, per_row, N, V, stream);
  return launch_scale_rows_typed<T, 1>(g, scale, per_row, N, V, stream);
}

}  // namespace

cudaError_t launch_cross_entropy_cuda(FloatType dtype, const void* logits, void* grad, float* row_loss,
                                      const int64_t* labels, const bool* dropped, int64_t N, int64_t V,
                                      int64_t ignore_index, bool dropped_loss, const float* grad_scale,
                                      cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_cross_entropy_dispatch<float>(logits, grad, row_loss, labels, dropped, N, V, ignore_index,
                                                  dropped_loss, grad_scale, stream);
    case FloatType::kBFloat16:
      return launch_cross_entropy_dispatch<__nv_bfloat16>(logits, grad, row_loss, labels, dropped, N, V,
                                                          ignore_index, dropped_loss, grad_scale, stream);
    case FloatType::kFloat16:
      return launch_cross_entropy_dispatch<__half>(logits, grad, row_loss, labels, dropped, N, V, ignore_index,
                                                   dropped_loss, grad_scale, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_scale_rows_cuda(FloatType dtype, void* grad, const float* scale, bool per_row, int64_t N,
                                   int64_t V, cudaStream_t stream) {
  if (N <= 0 || V <= 0) return cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      return launch_scale_rows_dispatch<float>(grad, scale, per_row, N, V, stream);
    case FloatType::kBFloat16:
      return launch_scale_rows_dispatch<__nv_bfloat16>(grad, scale, per_row, N, V, stream);
    case FloatType::kFloat16:
      return launch_scale_rows_dispatch<__half>(grad, scale, per_row, N, V, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace goldfish
