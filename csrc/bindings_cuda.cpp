// CUDA implementations of the goldfish_ds::* operators (schemas in bindings.cpp): the shared tensor checks,
// then the kernels of mask_cuda.cu and cross_entropy_cuda.cu on the current stream.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda_kernels.h"
#include "op_checks.h"

namespace goldfish {
namespace {

FloatType float_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return FloatType::kFloat32;
    case at::kBFloat16: return FloatType::kBFloat16;
    case at::kHalf: return FloatType::kFloat16;
    default: TORCH_CHECK(false, "goldfish_ds: logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

void check_launch(cudaError_t error, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, "goldfish_ds: the CUDA ", kernel, " kernel failed: ", cudaGetErrorString(error));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

at::Tensor goldfish_mask_cuda(const at::Tensor& labels, int64_t strategy, int64_t k, int64_t h,
                              int64_t start_position, int64_t ignore_index, bool preceding,
                              const c10::optional<at::Tensor>& table_bits, const c10::optional<at::Tensor>& exempt_ids,
                              int64_t seed, int64_t step, c10::optional<int64_t> boundary_id) {
  const MaskParams p = make_mask_params(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits,
                                        exempt_ids, seed, step, boundary_id);
  const c10::cuda::CUDAGuard guard(labels.device());
  at::Tensor dropped = at::empty(labels.sizes(), labels.options().dtype(at::kBool));
  check_launch(launch_mask_cuda(p, labels.data_ptr<int64_t>(), dropped.data_ptr<bool>(), labels.size(0),
                                labels.size(1), current_stream()),
               "goldfish mask");
  return dropped;
}

// grad may be undefined (forward only) or alias logits (in place); grad_scale is read on the device.
void run_cross_entropy_cuda(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& row_loss,
                            const at::Tensor& labels, const c10::optional<at::Tensor>& dropped,
                            int64_t ignore_index, bool dropped_loss, const at::Tensor& grad_scale) {
  check_launch(launch_cross_entropy_cuda(float_type(logits.scalar_type()), logits.data_ptr(),
                                         grad.defined() ? grad.data_ptr() : nullptr, row_loss.data_ptr<float>(),
                                         labels.data_ptr<int64_t>(),
                                         dropped.has_value() ? dropped->data_ptr<bool>() : nullptr,
                                         logits.size(0), logits.size(1), ignore_index, dropped_loss,
                                         grad_scale.defined() ? grad_scale.data_ptr<float>() : nullptr,
                                         current_stream()),
               "cross-entropy");
}

at::Tensor cross_entropy_loss_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                   const c10::optional<at::Tensor>& dropped, int64_t ignore_index, bool dropped_loss) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  run_cross_entropy_cuda(logits, at::Tensor(), row_loss, labels, dropped, ignore_index, dropped_loss, at::Tensor());
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_loss_grad_cuda(const at::Tensor& logits, const at::Tensor& labels,
                                                                const c10::optional<at::Tensor>& dropped,
                                                                int64_t ignore_index, bool dropped_loss,
                                                                const at::Tensor& grad_scale) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  check_grad_scale(grad_scale, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor grad = at::empty_like(logits);
  run_cross_entropy_cuda(logits, grad, row_loss, labels, dropped, ignore_index, dropped_loss, grad_scale);
  return {row_loss, grad};
}

at::Tensor cross_entropy_loss_grad_inplace_cuda(at::Tensor& logits, const at::Tensor& labels,
                                                const c10::optional<at::Tensor>& dropped, int64_t ignore_index,
                                                bool dropped_loss, const at::Tensor& grad_scale) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  check_grad_scale(grad_scale, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  run_cross_entropy_cuda(logits, logits, row_loss, labels, dropped, ignore_index, dropped_loss, grad_scale);
  return row_loss;
}

// The mask kernel, then torch's where (on the GPU already one bandwidth-bound pass).
at::Tensor apply_goldfish_cuda(const at::Tensor& labels, int64_t strategy, int64_t k, int64_t h,
                               int64_t start_position, int64_t ignore_index, bool preceding,
                               const c10::optional<at::Tensor>& table_bits, const c10::optional<at::Tensor>& exempt_ids,
                               int64_t seed, int64_t step, c10::optional<int64_t> boundary_id) {
  const at::Tensor dropped = goldfish_mask_cuda(labels, strategy, k, h, start_position, ignore_index, preceding,
                                                table_bits, exempt_ids, seed, step, boundary_id);
  const c10::cuda::CUDAGuard guard(labels.device());
  return at::where(dropped, at::scalar_tensor(ignore_index, labels.options()), labels);
}

void scale_rows_inplace_cuda(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_rows_args(grad, scale);
  const c10::cuda::CUDAGuard guard(grad.device());
  check_launch(launch_scale_rows_cuda(float_type(grad.scalar_type()), grad.data_ptr(), scale.data_ptr<float>(),
                                      scale.numel() != 1, grad.size(0), grad.size(1), current_stream()),
               "scale_rows");
}

std::tuple<at::Tensor, at::Tensor> vocab_parallel_stats_cuda_op(const at::Tensor& logits,
                                                                const at::Tensor& local_labels,
                                                                const c10::optional<at::Tensor>& skip) {
  check_vocab_parallel_args(logits, local_labels, skip);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor target_logit = at::empty_like(lse);
  check_launch(launch_vocab_parallel_stats_cuda(float_type(logits.scalar_type()), logits.data_ptr(),
                                                local_labels.data_ptr<int64_t>(),
                                                skip.has_value() ? skip->data_ptr<bool>() : nullptr, logits.size(0),
                                                logits.size(1), lse.data_ptr<float>(), target_logit.data_ptr<float>(),
                                                current_stream()),
               "vocab-parallel statistics");
  return {lse, target_logit};
}

// Writes the vocab-parallel gradient into grad (which may be logits itself).
void run_vocab_parallel_grad_cuda(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& local_labels,
                                  const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                  const at::Tensor& grad_scale) {
  check_vocab_parallel_args(logits, local_labels, skip);
  check_row_floats(lse, logits, "lse");
  check_grad_scale(grad_scale, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  check_launch(launch_vocab_parallel_grad_cuda(float_type(logits.scalar_type()), logits.data_ptr(), grad.data_ptr(),
                                               local_labels.data_ptr<int64_t>(),
                                               skip.has_value() ? skip->data_ptr<bool>() : nullptr,
                                               lse.data_ptr<float>(), logits.size(0), logits.size(1),
                                               grad_scale.data_ptr<float>(), current_stream()),
               "vocab-parallel gradient");
}

at::Tensor vocab_parallel_grad_cuda_op(const at::Tensor& logits, const at::Tensor& local_labels,
                                       const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                       const at::Tensor& grad_scale) {
  at::Tensor grad = at::empty_like(logits);
  run_vocab_parallel_grad_cuda(logits, grad, local_labels, skip, lse, grad_scale);
  return grad;
}

void vocab_parallel_grad_inplace_cuda_op(at::Tensor& logits, const at::Tensor& local_labels,
                                         const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                         const at::Tensor& grad_scale) {
  run_vocab_parallel_grad_cuda(logits, logits, local_labels, skip, lse, grad_scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(goldfish_ds, CUDA, m) {
  m.impl("goldfish_mask", &goldfish_mask_cuda);
  m.impl("apply_goldfish", &apply_goldfish_cuda);
  m.impl("cross_entropy_loss", &cross_entropy_loss_cuda);
  m.impl("cross_entropy_loss_grad", &cross_entropy_loss_grad_cuda);
  m.impl("cross_entropy_loss_grad_", &cross_entropy_loss_grad_inplace_cuda);
  m.impl("scale_rows_", &scale_rows_inplace_cuda);
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cuda_op);
  m.impl("vocab_parallel_grad", &vocab_parallel_grad_cuda_op);
  m.impl("vocab_parallel_grad_", &vocab_parallel_grad_inplace_cuda_op);
}

}  // namespace goldfish
