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

// Vocab-parallel cross-entropy: logits [N, V] hold one contiguous vocabulary shard of each row.
// local_labels[i] is the target's column in this shard, or -1 when the target lies in another shard.
// Rows with skip[i] set (skip may be null: none) are not read.
//
// Statistics pass (one read of each row): lse[i] = log(sum_j exp(logits[i, j])) and
// target_logit[i] = logits[i, local_labels[i]] (0 when -1); both 0 for skipped rows.
cudaError_t launch_vocab_parallel_stats_cuda(FloatType dtype, const void* logits, const int64_t* local_labels,
                                             const bool* skip, int64_t N, int64_t V, float* lse,
                                             float* target_logit, cudaStream_t stream);

// Gradient pass, given the global log-sum-exp of each row: grad[i, j] = (exp(logits[i, j] - lse[i]) -
// [j == local_labels[i]]) * (*grad_scale); zero rows where skip[i]. grad may equal logits (in place).
cudaError_t launch_vocab_parallel_grad_cuda(FloatType dtype, const void* logits, void* grad,
                                            const int64_t* local_labels, const bool* skip, const float* lse,
                                            int64_t N, int64_t V, const float* grad_scale, cudaStream_t stream);

// grad[i, :] *= scale[per_row ? i : 0]; a scalar scale equal to 1 returns without touching grad
// (decided on the device, so the host never synchronises).
cudaError_t launch_scale_rows_cuda(FloatType dtype, void* grad, const float* scale, bool per_row, int64_t N,
                                   int64_t V, cudaStream_t stream);

}  // namespace goldfish
