// Cross-entropy kernels on the CPU: the fused masked loss + gradient, and the two passes of the
// vocab-parallel loss. In the fused loss each kept row is read from memory once, in small blocks: a block's
// max and exponentials are computed in the same pass (against a running reference, redone only when the
// max jumps), the exponentials land in a per-thread float32 scratch row that stays in L2, and a last pass
// scales them into the gradient, written in the logits' dtype.
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace goldfish {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kBlock = 512;  // elements per block (measured faster than 1024 to 2048 for bf16 and long rows)

constexpr int64_t kPrefetchBytes = 16384;  // how far ahead of the current block memory is requested
constexpr float kMaxExponent = 64.f;      // exp(64) * V stays far below float32's range

// exp(x) for x <= kMaxExponent, in generic at::vec operations and cheaper than Vec::exp(): 2^n * 2^f with
// n = round(x * log2(e)) and 2^f from Cephes' exp2f polynomial on [-0.5, 0.5] (relative error ~2e-7).
// Inputs below about -87 give about 2^-126 instead of a denormal or 0, which is negligible: the row's sum
// of exponentials is at least exp(-kMaxExponent). NaN propagates.
Vec exp_bounded(Vec x) {
  // Adding 1.5 * 2^23 rounds t to the nearest integer n, which then sits in the low mantissa bits of `shifted`.
  constexpr float kRoundingShift = 12582912.f;
  const Vec t = at::vec::clamp_min(x * Vec(1.44269504088896341f), Vec(-126.f));  // keeps a NaN t
  const Vec shifted = t + Vec(kRoundingShift);
  const Vec f = t - (shifted - Vec(kRoundingShift));
  Vec p = at::vec::fmadd(Vec(1.535336188319500e-4f), f, Vec(1.339887440266574e-3f));
  p = at::vec::fmadd(p, f, Vec(9.618437357674640e-3f));
  p = at::vec::fmadd(p, f, Vec(5.550332471162809e-2f));
  p = at::vec::fmadd(p, f, Vec(2.402264791363012e-1f));
  p = at::vec::fmadd(p, f, Vec(6.931472028550421e-1f));
  p = at::vec::fmadd(p, f, Vec(1.f));
  // 2^n: n + 127 in the exponent field (the shift drops the high bits of 1.5 * 2^23).
  const auto exponent = (at::vec::cast<int32_t>(shifted) + at::vec::Vectorized<int32_t>(127))
                        << at::vec::Vectorized<int32_t>(23);
  return p * at::vec::cast<float>(exponent);
}

// The 2 * Vec::size() elements at x as two float32 vectors.
template <typename scalar_t>
std::pair<Vec, Vec> load_two(const scalar_t* x) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return {Vec::loadu(x), Vec::loadu(x + Vec::size())};
  } else {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(x));
    return {lo, hi};
  }
}

// Stores two float32 vectors as 2 * Vec::size() values of scalar_t at g (rounding to nearest even).
template <typename scalar_t>
void store_two(Vec lo, Vec hi, scalar_t* g) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo.store(g);
    hi.store(g + Vec::size());
#if defined(__AVX512BF16__)
  } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // One instruction for 32 values, where the generic conversion spends ~10 integer operations per 16
    // (the fused loss on bf16 logits measured ~10% faster). It flushes bf16 denormals (below 1.2e-38)
    // to zero.
    _mm512_storeu_si512(g, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
#endif
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(g);
  }
}

float max_of(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, v);
}

float sum_of(Vec v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// One pass over a block x[0, n): e[j] = exp(x[j] - ref). Returns {max of the block, sum of e}.
// Memory is requested kPrefetchBytes ahead (rows are contiguous, so this runs into the next row), so
// the loads of later blocks overlap with this block's exponentials.
template <typename scalar_t>
std::pair<float, float> exp_block(const scalar_t* x, float* e, int64_t n, float ref) {
  constexpr int64_t kStep = 2 * Vec::size();
  constexpr int64_t kAhead = kPrefetchBytes / sizeof(scalar_t);
  const Vec vref(ref);
  Vec vmax(-std::numeric_limits<float>::infinity()), vsum(0.f);
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    for (int64_t line = 0; line < kStep * static_cast<int64_t>(sizeof(scalar_t)); line += 64) {
      __builtin_prefetch(reinterpret_cast<const char*>(x + j + kAhead) + line);
    }
    const auto [a, b] = load_two(x + j);
    // clamp_min is a plain max: it skips a NaN element, whose NaN still reaches the sum and so the loss.
    vmax = at::vec::clamp_min(at::vec::clamp_min(vmax, a), b);
    const Vec ea = exp_bounded(a - vref), eb = exp_bounded(b - vref);
    ea.store(e + j);
    eb.store(e + j + Vec::size());
    vsum = vsum + ea + eb;
  }
  float m = max_of(vmax), sum = sum_of(vsum);
  for (; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    m = std::max(m, v);
    e[j] = std::exp(v - ref);
    sum += e[j];
  }
  return {m, sum};
}

// One read of the row x [V]: e[j] = exp(x[j] - block_ref[j / kBlock]). Each block is exponentiated against
// the running reference R while it is in L1 (its max is found in the same pass); a block whose max exceeds
// R by more than kMaxExponent is redone against its max, which becomes R. Returns {R, sum of exp(x - R)}.
template <typename scalar_t>
std::pair<float, float> online_softmax(const scalar_t* x, int64_t V, float* e, float* block_ref) {
  float first_max = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < std::min(kBlock, V); ++j) first_max = std::max(first_max, static_cast<float>(x[j]));
  float R = std::max(first_max, std::numeric_limits<float>::lowest()), S = 0.f;
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - b0);
    auto [bm, bs] = exp_block(x + b0, e + b0, n, R);
    if (bm > R + kMaxExponent) {  // bm skips NaN elements; their NaN reaches S, and so the loss
      S *= std::exp(R - bm);
      R = bm;
      bs = exp_block(x + b0, e + b0, n, R).second;
    }
    block_ref[b] = R;
    S += bs;
  }
  return {R, S};
}

// g[j] = e[j] * c[j / kBlock], converted to scalar_t (g may alias e for float).
template <typename scalar_t>
void write_gradient(float* e, const float* block_coef, int64_t V, scalar_t* g) {
  for (int64_t b0 = 0, b = 0; b0 < V; b0 += kBlock, ++b) {
    const int64_t n = std::min(kBlock, V - b0);
    const Vec c(block_coef[b]);
    const float* eb = e + b0;
    scalar_t* gb = g + b0;
    int64_t j = 0;
    for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
      store_two(Vec::loadu(eb + j) * c, Vec::loadu(eb + j + Vec::size()) * c, gb + j);
    }
    for (; j < n; ++j) gb[j] = static_cast<scalar_t>(eb[j] * block_coef[b]);
  }
}

template <typename scalar_t>
void zero_row(scalar_t* g, int64_t V) {
  std::fill(g, g + V, scalar_t(0));
}

// g[j] = exp(x[j] - lse) * c, converted to scalar_t (g may alias x).
template <typename scalar_t>
void softmax_row(const scalar_t* x, float lse, float c, int64_t V, scalar_t* g) {
  constexpr int64_t kStep = 2 * Vec::size();
  const Vec vlse(lse), vc(c);
  int64_t j = 0;
  for (; j + kStep <= V; j += kStep) {
    const auto [a, b] = load_two(x + j);
    store_two(exp_bounded(a - vlse) * vc, exp_bounded(b - vlse) * vc, g + j);
  }
  for (; j < V; ++j) g[j] = static_cast<scalar_t>(std::exp(static_cast<float>(x[j]) - lse) * c);
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

template <typename scalar_t>
void vocab_parallel_stats_cpu(const scalar_t* logits, const int64_t* local_labels, const bool* skip, int64_t N,
                              int64_t V, float* lse, float* target_logit) {
  const int64_t num_blocks = (V + kBlock - 1) / kBlock;
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    std::vector<float> e(V), block_ref(num_blocks);
    for (int64_t i = begin; i < end; ++i) {
      if (skip != nullptr && skip[i]) {
        lse[i] = target_logit[i] = 0.f;
        continue;
      }
      const scalar_t* x = logits + i * V;
      const auto [R, S] = online_softmax(x, V, e.data(), block_ref.data());
      lse[i] = R + std::log(S);
      target_logit[i] = local_labels[i] >= 0 ? static_cast<float>(x[local_labels[i]]) : 0.f;
    }
  });
}

template <typename scalar_t>
void vocab_parallel_grad_cpu(const scalar_t* logits, scalar_t* grad, const int64_t* local_labels, const bool* skip,
                             const float* lse, int64_t N, int64_t V, float grad_scale) {
  at::parallel_for(0, N, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* g = grad + i * V;
      if (skip != nullptr && skip[i]) {
        zero_row(g, V);
        continue;
      }
      const scalar_t* x = logits + i * V;
      const int64_t y = local_labels[i];
      const float target_logit = y >= 0 ? static_cast<float>(x[y]) : 0.f;  // read before g may overwrite it
      softmax_row(x, lse[i], grad_scale, V, g);
      if (y >= 0) g[y] = static_cast<scalar_t>((std::exp(target_logit - lse[i]) - 1.f) * grad_scale);
    }
  });
}

#define GOLDFISH_INSTANTIATE(T)                                                                          \
  template void vocab_parallel_stats_cpu<T>(const T*, const int64_t*, const bool*, int64_t, int64_t, float*,  \
                                            float*);                                                     \
  template void vocab_parallel_grad_cpu<T>(const T*, T*, const int64_t*, const bool*, const float*, int64_t,  \
                                           int64_t, float);                                              \
  template void cross_entropy_cpu<T>(const T*, T*, float*, const int64_t*, const bool*, int64_t, int64_t, \
                                     int64_t, bool, float);                                              \
  template void scale_rows_cpu<T>(T*, const float*, bool, int64_t, int64_t);
GOLDFISH_INSTANTIATE(float)
GOLDFISH_INSTANTIATE(c10::BFloat16)
GOLDFISH_INSTANTIATE(c10::Half)
#undef GOLDFISH_INSTANTIATE

}  // namespace goldfish
