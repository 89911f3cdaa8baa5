// Fused masked cross-entropy on the CPU. Each kept row is read from memory once, in blocks that fit in
// L1: a block's max and exponentials are computed while it is in L1 (online softmax, rescaling the
// running sum when the max grows), the exponentials land in a per-thread float32 scratch row that stays
// in L2, and a last pass scales them into the gradient, written in the logits' dtype.
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
constexpr int64_t kBlock = 2048;  // floats per block: 8 KiB, resident in L1 between its two uses

constexpr int64_t kPrefetchBytes = 16384;  // how far ahead of the first pass memory is requested

float max_of(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

// First touch of a block x[0, n): returns its max and, for bfloat16/float16, stores it as float32 in e.
// It requests the memory kPrefetchBytes ahead (one cache line per iteration; rows are contiguous, so
// this runs into the next row), so the loads of later blocks overlap with this block's exponentials.
template <typename scalar_t>
float load_block(const scalar_t* x, float* e, int64_t n) {
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(scalar_t);
  Vec acc(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  float m;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; j + Vec::size() <= n; j += Vec::size()) {  // 16 floats: one cache line with AVX512
      __builtin_prefetch(x + j + kAhead);
      acc = at::vec::maximum(acc, Vec::loadu(x + j));
    }
    m = max_of(acc);
    for (; j < n; ++j) m = std::max(m, x[j]);
  } else {
    for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
      __builtin_prefetch(x + j + kAhead);
      auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(x + j));
      lo.store(e + j);
      hi.store(e + j + Vec::size());
      acc = at::vec::maximum(acc, at::vec::maximum(lo, hi));
    }
    m = max_of(acc);
    for (; j < n; ++j) {
      e[j] = static_cast<float>(x[j]);
      m = std::max(m, e[j]);
    }
  }
  return m;
}

// e[j] = exp(x[j] - m) (e may alias x); returns the sum of e.
float exp_and_sum(const float* x, float* e, int64_t n, float m) {
  const Vec vm(m);
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec v = (Vec::loadu(x + j) - vm).exp_u20();
    v.store(e + j);
    acc = acc + v;
  }
  float s = at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, acc);
  for (; j < n; ++j) {
    e[j] = std::exp(x[j] - m);
    s += e[j];
  }
  return s;
}

// One read of the row x [V]: e[j] = exp(x[j] - block_offset[j / kBlock]), where each block's offset is
// the running max when the block was read. Returns {max, sum of exp(x - max)}.
template <typename scalar_t>
std::pair<float, float> online_softmax(const scalar_t* x, int64_t V, float* e, float* block_offset) {
  float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - b0);
    const float bm = load_block(x + b0, e + b0, n);
    const float* xb;
    if constexpr (std::is_same_v<scalar_t, float>) {
      xb = x + b0;
    } else {
      xb = e + b0;
    }
    if (bm > m) {
      sum = sum == 0.f ? 0.f : sum * std::exp(m - bm);
      m = bm;
    }
    block_offset[b] = m;
    sum += exp_and_sum(xb, e + b0, n, m);
  }
  return {m, sum};
}

// g[j] = e[j] * c[j / kBlock], converted to scalar_t (g may alias e for float).
template <typename scalar_t>
void write_gradient(float* e, const float* block_coef, int64_t V, scalar_t* g) {
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - b0);
    const Vec c(block_coef[b]);
    if constexpr (std::is_same_v<scalar_t, float>) {
      at::vec::map([c](Vec v) { return v * c; }, g + b0, e + b0, n);
    } else {
      const float* eb = e + b0;
      scalar_t* gb = g + b0;
      int64_t j = 0;
      for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
        const Vec lo = Vec::loadu(eb + j) * c, hi = Vec::loadu(eb + j + Vec::size()) * c;
        at::vec::convert_from_float<scalar_t>(lo, hi).store(gb + j);
      }
      for (; j < n; ++j) gb[j] = static_cast<scalar_t>(eb[j] * block_coef[b]);
    }
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
  const int64_t num_blocks = (V + kBlock - 1) / kBlock;
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V), block_coef(num_blocks);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t y = labels[i];
      const bool is_dropped = dropped != nullptr && dropped[i];
      scalar_t* g = grad == nullptr ? nullptr : grad + i * V;
      if (y == ignore_index || (is_dropped && !dropped_loss)) {
        row_loss[i] = 0.f;
        if (g) zero_row(g, V);
        continue;
      }
      const scalar_t* x = logits + i * V;
      const float target_logit = static_cast<float>(x[y]);
      const auto [m, sum] = online_softmax(x, V, e.data(), block_coef.data());
      const float lse = m + std::log(sum);
      row_loss[i] = lse - target_logit;
      if (!g) continue;
      if (is_dropped) {
        zero_row(g, V);
        continue;
      }
      for (int64_t b = 0; b < num_blocks; ++b) block_coef[b] = grad_scale * std::exp(block_coef[b] - m) / sum;
      write_gradient(e.data(), block_coef.data(), V, g);
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
