// Tensor checks and parameter packing shared by the CPU and CUDA bindings. Every check names the
// argument and the allowed values, so bad input from any caller becomes a Python exception.
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>

#include <limits>

#include "goldfish_hash.h"

namespace goldfish {

// Calls f(scalar_t{}) for the logits dtypes the CPU kernels support (float32, bfloat16, float16).
template <typename F>
void dispatch_logits_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(c10::BFloat16{});
    case at::kHalf: return f(c10::Half{});
    default: TORCH_CHECK(false, "goldfish_ds: logits must be float32, bfloat16 or float16, got ", dtype);
  }
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "goldfish_ds: ", name, " must be on the same device as ", ref_name,
              " (", ref.device(), "), got ", t.device());
}

inline void check_labels_tensor(const at::Tensor& labels, int64_t dim) {
  TORCH_CHECK(labels.scalar_type() == at::kLong, "goldfish_ds: labels must be int64 (torch.long), got ",
              labels.scalar_type());
  TORCH_CHECK(labels.dim() == dim, "goldfish_ds: labels must have ", dim, " dimension(s), got shape ",
              labels.sizes());
}

// Labels must be ignore_index or a vocabulary id in [0, V): an out-of-range id would read outside a row.
inline void check_label_range(const at::Tensor& labels, int64_t V, int64_t ignore_index) {
  const at::Tensor bad = labels.ne(ignore_index).logical_and(labels.lt(0).logical_or(labels.ge(V)));
  if (bad.any().item<bool>()) {
    const int64_t first = bad.nonzero().select(1, 0).min().item<int64_t>();
    TORCH_CHECK(false, "goldfish_ds: labels must be in [0, ", V, ") (the vocabulary of the logits) or equal to ",
                "ignore_index=", ignore_index, "; labels[", first, "] = ", labels[first].item<int64_t>());
  }
}

inline MaskParams make_mask_params(const at::Tensor& labels, int64_t strategy, int64_t k, int64_t h,
                                   int64_t start_position, int64_t ignore_index, bool preceding,
                                   const c10::optional<at::Tensor>& table_bits,
                                   const c10::optional<at::Tensor>& exempt_ids, int64_t seed, int64_t step,
                                   c10::optional<int64_t> boundary_id) {
  check_labels_tensor(labels, 2);
  TORCH_CHECK(labels.is_contiguous(), "goldfish_ds: labels must be contiguous");
  TORCH_CHECK(strategy >= kHashTable && strategy <= kHashRolling,
              "goldfish_ds: strategy code must be in [0, 4], got ", strategy);
  TORCH_CHECK(k >= 2, "goldfish_ds: k must be an integer >= 2 (drop about 1/k of the tokens), got ", k);
  TORCH_CHECK(h >= 1, "goldfish_ds: h (context width) must be an integer >= 1, got ", h);
  TORCH_CHECK(start_position >= 0, "goldfish_ds: start_position must be >= 0, got ", start_position);
  MaskParams p{};
  p.strategy = static_cast<int32_t>(strategy);
  p.k = k;
  p.h = h;
  p.start_position = start_position;
  p.ignore_index = ignore_index;
  p.preceding = preceding;
  p.avalanche_threshold = static_cast<float>(static_cast<double>((1ULL << 32) - 1) / static_cast<double>(k));
  p.threshold64 = std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(k);
  p.rolling_base_pow_h = pow_mod64(kRollingBase, h);
  p.seed = static_cast<uint64_t>(seed);
  p.step = static_cast<uint64_t>(step);
  p.has_boundary = boundary_id.has_value();
  p.boundary_id = boundary_id.value_or(0);
  if (strategy == kHashTable) {
    TORCH_CHECK(table_bits.has_value(), "goldfish_ds: the hash-table strategy needs its table_bits");
    const at::Tensor& tb = *table_bits;
    TORCH_CHECK(tb.scalar_type() == at::kLong && tb.dim() == 1 && tb.numel() == kTableWords && tb.is_contiguous(),
                "goldfish_ds: table_bits must be a contiguous int64 tensor of ", kTableWords, " words, got ",
                tb.scalar_type(), " of shape ", tb.sizes());
    check_same_device(tb, labels, "table_bits", "labels");
    p.table_bits = reinterpret_cast<const uint64_t*>(tb.data_ptr<int64_t>());
  }
  if (exempt_ids.has_value() && exempt_ids->numel() > 0) {
    const at::Tensor& ex = *exempt_ids;
    TORCH_CHECK(ex.scalar_type() == at::kLong && ex.dim() == 1 && ex.is_contiguous(),
                "goldfish_ds: exempt_ids must be a contiguous 1-D int64 tensor, got ", ex.scalar_type(),
                " of shape ", ex.sizes());
    check_same_device(ex, labels, "exempt_ids", "labels");
    p.exempt_ids = ex.data_ptr<int64_t>();
    p.num_exempt = ex.numel();
  }
  return p;
}

// logits [N, V] and the per-row tensors that go with them (labels [N] int64, an optional bool row mask).
inline void check_logits_and_rows(const at::Tensor& logits, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& row_mask, const char* row_mask_name) {
  TORCH_CHECK(logits.dim() == 2, "goldfish_ds: logits must be 2-D [N, V], got shape ", logits.sizes());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "goldfish_ds: logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(logits.is_contiguous(), "goldfish_ds: logits must be contiguous");
  const int64_t N = logits.size(0);
  TORCH_CHECK(logits.size(1) >= 1, "goldfish_ds: logits must have a vocabulary dimension V >= 1, got shape ",
              logits.sizes());
  check_labels_tensor(labels, 1);
  TORCH_CHECK(labels.numel() == N, "goldfish_ds: labels must have N = ", N, " entries (one per logits row), got ",
              labels.numel());
  check_same_device(labels, logits, "labels", "logits");
  TORCH_CHECK(labels.is_contiguous(), "goldfish_ds: labels must be contiguous");
  if (row_mask.has_value()) {
    TORCH_CHECK(row_mask->scalar_type() == at::kBool && row_mask->numel() == N && row_mask->is_contiguous(),
                "goldfish_ds: ", row_mask_name, " must be a contiguous bool tensor of N = ", N, " entries, got ",
                row_mask->scalar_type(), " of shape ", row_mask->sizes());
    check_same_device(*row_mask, logits, row_mask_name, "logits");
  }
}

// Shared checks of the cross-entropy ops.
inline void check_cross_entropy_args(const at::Tensor& logits, const at::Tensor& labels,
                                     const c10::optional<at::Tensor>& dropped, int64_t ignore_index) {
  check_logits_and_rows(logits, labels, dropped, "dropped");
  check_label_range(labels, logits.size(1), ignore_index);
}

// Shared checks of the vocab-parallel ops: local_labels in [-1, V) on the rows that are not skipped.
inline void check_vocab_parallel_args(const at::Tensor& logits, const at::Tensor& local_labels,
                                      const c10::optional<at::Tensor>& skip) {
  check_logits_and_rows(logits, local_labels, skip, "skip");
  at::Tensor bad = local_labels.lt(-1).logical_or(local_labels.ge(logits.size(1)));
  if (skip.has_value()) bad = bad.logical_and(skip->logical_not());
  TORCH_CHECK(!bad.any().item<bool>(), "goldfish_ds: local_labels must be in [-1, ", logits.size(1),
              ") (a column of this vocabulary shard, or -1 when the target is in another shard)");
}

inline void check_row_floats(const at::Tensor& t, const at::Tensor& logits, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 1 && t.numel() == logits.size(0) && t.is_contiguous(),
              "goldfish_ds: ", name, " must be a contiguous float32 tensor of N = ", logits.size(0),
              " entries, got ", t.scalar_type(), " of shape ", t.sizes());
  check_same_device(t, logits, name, "logits");
}

inline void check_grad_scale(const at::Tensor& grad_scale, const at::Tensor& logits) {
  TORCH_CHECK(grad_scale.scalar_type() == at::kFloat && grad_scale.numel() == 1,
              "goldfish_ds: grad_scale must be a float32 tensor with one element, got ", grad_scale.scalar_type(),
              " of shape ", grad_scale.sizes());
  check_same_device(grad_scale, logits, "grad_scale", "logits");
}

inline void check_scale_rows_args(const at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(grad.dim() == 2 && grad.is_contiguous(), "goldfish_ds: grad must be a contiguous 2-D tensor, got shape ",
              grad.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  (scale.numel() == 1 || scale.numel() == grad.size(0)),
              "goldfish_ds: scale must be float32 with 1 or N = ", grad.size(0), " elements, got ",
              scale.scalar_type(), " of shape ", scale.sizes());
  check_same_device(scale, grad, "scale", "grad");
}

}  // namespace goldfish
