// Goldfish masks on the CPU: rows in parallel, each row one sequential pass with O(1) work per token.
#include <ATen/Parallel.h>

#include <vector>

#include "cpu_kernels.h"

namespace goldfish {
namespace {

// Wrapping products of every window [e - h + 1, e] of `y`, for e >= h - 1, in O(1) per window:
// split the row into blocks of h; a window is the suffix of one block times the prefix of the next.
void window_products(const int64_t* y, int64_t T, int64_t h, std::vector<uint64_t>& prefix,
                     std::vector<uint64_t>& suffix, uint64_t* out) {
  for (int64_t i = 0; i < T; ++i) {
    const uint64_t v = static_cast<uint64_t>(y[i]);
    prefix[i] = (i % h == 0) ? v : prefix[i - 1] * v;
  }
  for (int64_t i = T - 1; i >= 0; --i) {
    const uint64_t v = static_cast<uint64_t>(y[i]);
    suffix[i] = (i % h == h - 1 || i == T - 1) ? v : suffix[i + 1] * v;
  }
  for (int64_t e = h - 1; e < T; ++e) {
    const int64_t s = e - h + 1;
    out[e] = (s % h == 0) ? prefix[e] : suffix[s] * prefix[e];
  }
}

// Rolling sums S_e = sum_j token_mix(y[e - j]) * B^j over windows of width h, in O(1) per window.
void window_rolling_sums(const int64_t* y, int64_t T, int64_t h, uint64_t base_pow_h, uint64_t* out) {
  uint64_t sum = 0;
  for (int64_t i = 0; i < T; ++i) {
    sum = sum * kRollingBase + token_mix(y[i]);
    if (i >= h) sum -= token_mix(y[i - h]) * base_pow_h;
    out[i] = sum;
  }
}

}  // namespace

void mask_cpu(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows, int64_t T) {
  const bool hashed = is_hash_strategy(params.strategy);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> window(hashed ? T : 0), prefix, suffix;
    if (hashed && params.strategy != kHashRolling) {
      prefix.resize(T);
      suffix.resize(T);
    }
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* y = labels + r * T;
      if (hashed) {
        if (params.strategy == kHashRolling) {
          window_rolling_sums(y, T, params.h, params.rolling_base_pow_h, window.data());
        } else {
          window_products(y, T, params.h, prefix, suffix, window.data());
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t e = window_end(params, t);
        const uint64_t value = (hashed && e >= params.h - 1) ? window[e] : 0;
        dropped[r * T + t] = position_dropped(params, y[t], r, t, value);
      }
    }
  });
}

}  // namespace goldfish
