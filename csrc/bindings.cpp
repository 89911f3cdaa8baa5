// The goldfish_ds::* operator schemas, their CPU implementations, and the Python module.
// The CUDA implementations are registered by bindings_cuda.cpp when the extension is built with CUDA.
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include "cpu_kernels.h"
#include "op_checks.h"

namespace goldfish {
namespace {

at::Tensor goldfish_mask_cpu(const at::Tensor& labels, int64_t strategy, int64_t k, int64_t h,
                             int64_t start_position, int64_t ignore_index, bool preceding,
                             const c10::optional<at::Tensor>& table_bits, const c10::optional<at::Tensor>& exempt_ids,
                             int64_t seed, int64_t step, c10::optional<int64_t> boundary_id) {
  const MaskParams p = make_mask_params(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits,
                                        exempt_ids, seed, step, boundary_id);
  at::Tensor dropped = at::empty(labels.sizes(), labels.options().dtype(at::kBool));
  mask_cpu(p, labels.data_ptr<int64_t>(), dropped.data_ptr<bool>(), labels.size(0), labels.size(1));
  return dropped;
}

// labels with the dropped positions set to ignore_index, in one pass (no mask tensor in between).
at::Tensor apply_goldfish_cpu_op(const at::Tensor& labels, int64_t strategy, int64_t k, int64_t h,
                                 int64_t start_position, int64_t ignore_index, bool preceding,
                                 const c10::optional<at::Tensor>& table_bits,
                                 const c10::optional<at::Tensor>& exempt_ids, int64_t seed, int64_t step,
                                 c10::optional<int64_t> boundary_id) {
  const MaskParams p = make_mask_params(labels, strategy, k, h, start_position, ignore_index, preceding, table_bits,
                                        exempt_ids, seed, step, boundary_id);
  at::Tensor masked = at::empty_like(labels);
  apply_goldfish_cpu(p, labels.data_ptr<int64_t>(), masked.data_ptr<int64_t>(), labels.size(0), labels.size(1));
  return masked;
}

// Runs the CPU cross-entropy kernel; grad may be undefined (forward only) or alias logits (in place).
void run_cross_entropy_cpu(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& row_loss,
                           const at::Tensor& labels, const c10::optional<at::Tensor>& dropped, int64_t ignore_index,
                           bool dropped_loss, float grad_scale) {
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool* dropped_ptr = dropped.has_value() ? dropped->data_ptr<bool>() : nullptr;
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    cross_entropy_cpu<scalar_t>(logits.data_ptr<scalar_t>(), grad.defined() ? grad.data_ptr<scalar_t>() : nullptr,
                                row_loss.data_ptr<float>(), labels.data_ptr<int64_t>(), dropped_ptr, N, V,
                                ignore_index, dropped_loss, grad_scale);
  });
}

at::Tensor cross_entropy_loss_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& dropped, int64_t ignore_index, bool dropped_loss) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  run_cross_entropy_cpu(logits, at::Tensor(), row_loss, labels, dropped, ignore_index, dropped_loss, 0.f);
  return row_loss;
}

std::tuple<at::Tensor, at::Tensor> cross_entropy_loss_grad_cpu(const at::Tensor& logits, const at::Tensor& labels,
                                                               const c10::optional<at::Tensor>& dropped,
                                                               int64_t ignore_index, bool dropped_loss,
                                                               const at::Tensor& grad_scale) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  check_grad_scale(grad_scale, logits);
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor grad = at::empty_like(logits);
  run_cross_entropy_cpu(logits, grad, row_loss, labels, dropped, ignore_index, dropped_loss,
                        grad_scale.item<float>());
  return {row_loss, grad};
}

at::Tensor cross_entropy_loss_grad_inplace_cpu(at::Tensor& logits, const at::Tensor& labels,
                                               const c10::optional<at::Tensor>& dropped, int64_t ignore_index,
                                               bool dropped_loss, const at::Tensor& grad_scale) {
  check_cross_entropy_args(logits, labels, dropped, ignore_index);
  check_grad_scale(grad_scale, logits);
  at::Tensor row_loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  run_cross_entropy_cpu(logits, logits, row_loss, labels, dropped, ignore_index, dropped_loss,
                        grad_scale.item<float>());
  return row_loss;
}

void scale_rows_inplace_cpu(at::Tensor& grad, const at::Tensor& scale) {
  check_scale_rows_args(grad, scale);
  dispatch_logits_dtype(grad.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    scale_rows_cpu<scalar_t>(grad.data_ptr<scalar_t>(), scale.data_ptr<float>(), scale.numel() != 1,
                             grad.size(0), grad.size(1));
  });
}

std::tuple<at::Tensor, at::Tensor> vocab_parallel_stats_cpu_op(const at::Tensor& logits, const at::Tensor& local_labels,
                                                               const c10::optional<at::Tensor>& skip) {
  check_vocab_parallel_args(logits, local_labels, skip);
  at::Tensor lse = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  at::Tensor target_logit = at::empty_like(lse);
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    vocab_parallel_stats_cpu<scalar_t>(logits.data_ptr<scalar_t>(), local_labels.data_ptr<int64_t>(),
                                       skip.has_value() ? skip->data_ptr<bool>() : nullptr, logits.size(0),
                                       logits.size(1), lse.data_ptr<float>(), target_logit.data_ptr<float>());
  });
  return {lse, target_logit};
}

// Writes the vocab-parallel gradient into grad (which may be logits itself).
void run_vocab_parallel_grad_cpu(const at::Tensor& logits, const at::Tensor& grad, const at::Tensor& local_labels,
                                 const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                 const at::Tensor& grad_scale) {
  check_vocab_parallel_args(logits, local_labels, skip);
  check_row_floats(lse, logits, "lse");
  check_grad_scale(grad_scale, logits);
  dispatch_logits_dtype(logits.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    vocab_parallel_grad_cpu<scalar_t>(logits.data_ptr<scalar_t>(), grad.data_ptr<scalar_t>(),
                                      local_labels.data_ptr<int64_t>(),
                                      skip.has_value() ? skip->data_ptr<bool>() : nullptr, lse.data_ptr<float>(),
                                      logits.size(0), logits.size(1), grad_scale.item<float>());
  });
}

at::Tensor vocab_parallel_grad_cpu_op(const at::Tensor& logits, const at::Tensor& local_labels,
                                      const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                      const at::Tensor& grad_scale) {
  at::Tensor grad = at::empty_like(logits);
  run_vocab_parallel_grad_cpu(logits, grad, local_labels, skip, lse, grad_scale);
  return grad;
}

void vocab_parallel_grad_inplace_cpu_op(at::Tensor& logits, const at::Tensor& local_labels,
                                        const c10::optional<at::Tensor>& skip, const at::Tensor& lse,
                                        const at::Tensor& grad_scale) {
  run_vocab_parallel_grad_cpu(logits, logits, local_labels, skip, lse, grad_scale);
}

}  // namespace

TORCH_LIBRARY(goldfish_ds, m) {
  m.def(
      "goldfish_mask(Tensor labels, int strategy, int k, int h, int start_position, int ignore_index, "
      "bool preceding, Tensor? table_bits, Tensor? exempt_ids, int seed, int step, int? boundary_id=None) "
      "-> Tensor");
  m.def(
      "apply_goldfish(Tensor labels, int strategy, int k, int h, int start_position, int ignore_index, "
      "bool preceding, Tensor? table_bits, Tensor? exempt_ids, int seed, int step, int? boundary_id=None) "
      "-> Tensor");
  m.def("cross_entropy_loss(Tensor logits, Tensor labels, Tensor? dropped, int ignore_index, bool dropped_loss) -> Tensor");
  m.def(
      "cross_entropy_loss_grad(Tensor logits, Tensor labels, Tensor? dropped, int ignore_index, bool dropped_loss, "
      "Tensor grad_scale) -> (Tensor, Tensor)");
  m.def(
      "cross_entropy_loss_grad_(Tensor(a!) logits, Tensor labels, Tensor? dropped, int ignore_index, "
      "bool dropped_loss, Tensor grad_scale) -> Tensor");
  m.def("scale_rows_(Tensor(a!) grad, Tensor scale) -> ()");
  m.def("vocab_parallel_stats(Tensor logits, Tensor local_labels, Tensor? skip) -> (Tensor, Tensor)");
  m.def("vocab_parallel_grad(Tensor logits, Tensor local_labels, Tensor? skip, Tensor lse, Tensor grad_scale) -> Tensor");
  m.def(
      "vocab_parallel_grad_(Tensor(a!) logits, Tensor local_labels, Tensor? skip, Tensor lse, Tensor grad_scale) "
      "-> ()");
}

TORCH_LIBRARY_IMPL(goldfish_ds, CPU, m) {
  m.impl("goldfish_mask", &goldfish_mask_cpu);
  m.impl("apply_goldfish", &apply_goldfish_cpu_op);
  m.impl("cross_entropy_loss", &cross_entropy_loss_cpu);
  m.impl("cross_entropy_loss_grad", &cross_entropy_loss_grad_cpu);
  m.impl("cross_entropy_loss_grad_", &cross_entropy_loss_grad_inplace_cpu);
  m.impl("scale_rows_", &scale_rows_inplace_cpu);
  m.impl("vocab_parallel_stats", &vocab_parallel_stats_cpu_op);
  m.impl("vocab_parallel_grad", &vocab_parallel_grad_cpu_op);
  m.impl("vocab_parallel_grad_", &vocab_parallel_grad_inplace_cpu_op);
}

}  // namespace goldfish

// The SIMD level in a form Python finds in the file without loading it (goldfish_ds/kernels.py reads it and
// checks the CPU before the import: code built for AVX-512 may run AVX-512 instructions while it loads).
extern "C" __attribute__((used, visibility("default"))) const char goldfish_ds_cpu_capability_tag[] =
    "goldfish_ds.cpu_capability=" GOLDFISH_CPU_CAPABILITY ";";

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "goldfish_ds compiled kernels (operators are registered under torch.ops.goldfish_ds)";
  m.def("compiled_backends", [] {
    std::vector<std::string> backends{"cpu"};
#ifdef GOLDFISH_WITH_CUDA
    backends.push_back("cuda");
#endif
    return backends;
  }, "Devices whose kernels this build contains.");
  m.def("cpu_capability", [] { return std::string(GOLDFISH_CPU_CAPABILITY); },
        "The SIMD level the CPU kernels were compiled for.");
}
