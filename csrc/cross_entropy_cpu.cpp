// Fused masked cross-entropy on the CPU. Each kept row is read from memory once: the first pass brings
// it into cache (max), the next two work on a per-thread float32 scratch row that stays in L2
// (exp and sum, then the scaled gradient written in the logits' dtype).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace goldfish {
namespace {

using Vec = at::vec::Vectorized<float>;

// The row as float32: the logits themselves for float, else converted into `scratch`.
template <typename scalar_t>
const float* row_as_float(const scalar_t* x, int64_t V, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    at::vec::convert(x, scratch, V);
    return scratch;
  }
}

float row_max(const float* x, int64_t V) {
  Vec acc(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(x + j));
  float m = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, acc);
  for (; j < V; ++j) m = std::max(m, x[j]);
  return m;
}

// e[j] = exp(x[j] - m) (e may alias x); returns the sum of e.
float exp_and_sum(const float* x, float* e, int64_t V, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    const Vec v = (Vec::loadu(x + j) - vm).exp();
    v.store(e + j);
    acc = acc + v;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < V; ++j) {
    e[j] = std::exp(x[j] - m);
    s += e[j];
  }
  return s;
}

// out[j] = e[j] * c, converted to scalar_t.
template <typename scalar_t>
void scale_into(const float* e, float c, scalar_t* out, int64_t V, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    at::vec::map([c](Vec v) { return v * Vec(c); }, out, e, V);
  } else {
    at::vec::map([c](Vec v) { return v * Vec(c); }, scratch, e, V);
    at::vec::convert(scratch, out, V);
  }
}

template <typename scalar_t>
void zero_row(scalar_t* g, int64_t V) {
  std::fill(g, g + V, scalar_t(0));
}

}  // namespace

template <typename scalar_t>
void cross_entropy_cpu(const scalar_t* logits, scalar_t* grad, float* row_loss, const int64_t* labels,
                       const bool* dropped, int64_t N, int64_t V, int64_t ignore_index, bool dropped_loss,
                       float grad_scale) {
  // Rows are independent; a grain of a few rows keeps the per-chunk scratch allocation negligible.
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(V);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = labels[i];
      const bool is_dropped = dropped != nullptr && dropped[i];
      scalar_t* g = grad == nullptr ? nullptr : grad + i * V;
      if (y == ignore_index || (is_dropped && !dropped_loss)) {
        row_loss[i] = 0.f;
        if (g) zero_row(g, V);
        continue;
      }
      const float* x = row_as_float(logits + i * V, V, scratch.data());
      const float target_logit = x[y];
      const float m = row_max(x, V);
      const float sum = exp_and_sum(x, scratch.data(), V, m);
      const float lse = m + std::log(sum);
      row_loss[i] = lse - target_logit;
      if (!g) continue;
      if (is_dropped) {
        zero_row(g, V);
        continue;
      }
      const float c = grad_scale / sum;
      scale_into(scratch.data(), c, g, V, scratch.data());
      // The target's term, from the exact target logit rather than the stored exponential.
      g[y] = static_cast<scalar_t>((std::exp(target_logit - lse) - 1.f) * grad_scale);
    }
  });
}

template <typename scalar_t>
void scale_rows_cpu(scalar_t* grad, const float* scale, bool per_row, int64_t N, int64_t V) {
  if (!per_row && scale[0] == 1.f) return;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float s = scale[per_row ? i : 0];
      scalar_t* g = grad + i * V;
      for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>(static_cast<float>(g[j]) * s);
    }
  });
}

#define GOLDFISH_INSTANTIATE(T)                                                                          \
  template void cross_entropy_cpu<T>(const T*, T*, float*, const int64_t*, const bool*, int64_t, int64_t, \
                                     int64_t, bool, float);                                              \
  template void scale_rows_cpu<T>(T*, const float*, bool, int64_t, int64_t);
GOLDFISH_INSTANTIATE(float)
GOLDFISH_INSTANTIATE(c10::BFloat16)
GOLDFISH_INSTANTIATE(c10::Half)
#undef GOLDFISH_INSTANTIATE

}  // namespace goldfish
