// Entry points of the CPU kernels: raw pointers and sizes. The torch-facing checks live in bindings.cpp.
#pragma once
#include <cstdint>

#include "goldfish_hash.h"

namespace goldfish {

// dropped[r, t] for labels [rows, T] (contiguous int64); see position_dropped() in goldfish_hash.h.
void mask_cpu(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows, int64_t T);

// masked[r, t] = dropped[r, t] ? ignore_index : labels[r, t], in the same pass as the mask.
void apply_goldfish_cpu(const MaskParams& params, const int64_t* labels, int64_t* masked, int64_t rows, int64_t T);

// Fused masked cross-entropy over logits [N, V] (contiguous rows); same contract as
// launch_cross_entropy_cuda in cuda_kernels.h. scalar_t is float, c10::BFloat16 or c10::Half.
template <typename scalar_t>
void cross_entropy_cpu(const scalar_t* logits, scalar_t* grad, float* row_loss, const int64_t* labels,
                       const bool* dropped, int64_t N, int64_t V, int64_t ignore_index, bool dropped_loss,
                       float grad_scale);

// Vocab-parallel cross-entropy on one vocabulary shard; same contracts as launch_vocab_parallel_stats_cuda
// and launch_vocab_parallel_grad_cuda in cuda_kernels.h.
template <typename scalar_t>
void vocab_parallel_stats_cpu(const scalar_t* logits, const int64_t* local_labels, const bool* skip, int64_t N,
                              int64_t V, float* lse, float* target_logit);
template <typename scalar_t>
void vocab_parallel_grad_cpu(const scalar_t* logits, scalar_t* grad, const int64_t* local_labels, const bool* skip,
                             const float* lse, int64_t N, int64_t V, float grad_scale);

// grad[i, :] *= scale[per_row ? i : 0]; a scalar scale equal to 1 returns at once.
template <typename scalar_t>
void scale_rows_cpu(scalar_t* grad, const float* scale, bool per_row, int64_t N, int64_t V);

}  // namespace goldfish
