// Entry points of the CUDA kernels: raw device pointers and sizes, no torch types, so the .cu files
// include only CUDA headers. The torch-facing checks live in bindings_cuda.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

#include "goldfish_hash.h"

namespace goldfish {

enum class FloatType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// dropped[r, t] for labels [rows, T] (contiguous int64); see position_dropped() in goldfish_hash.h.
cudaError_t launch_mask_cuda(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows,
                             int64_t T, cudaStream_t stream);

// Fused masked cross-entropy over logits [N, V] (contiguous rows).
//   row_loss[i] = logsumexp(logits[i]) - logits[i, labels[i]] for kept rows, and for dropped rows when
//   dropped_loss is set; 0 otherwise.
//   grad (may be null, may equal logits): (softmax(logits[i]) - onehot(labels[i])) * (*grad_scale) for
//   kept rows, zeros for dropped and ignored rows. Each kept row is read once from global memory.
cudaError_t launch_cross_entropy_cuda(FloatType dtype, const void* logits, void* grad, float* row_loss,
                                      const int64_t* labels, const bool* dropped, int64_t N, int64_t V,
                                      int64_t ignore_index, bool dropped_loss, const float* grad_scale,
                                      cudaStream_t stream);

// grad[i, :] *= scale[per_row ? i : 0]; a scalar scale equal to 1 returns without touching grad
// (decided on the device, so the host never synchronises).
cudaError_t launch_scale_rows_cuda(FloatType dtype, void* grad, const float* scale, bool per_row, int64_t N,
                                   int64_t V, cudaStream_t stream);

}  // namespace goldfish
