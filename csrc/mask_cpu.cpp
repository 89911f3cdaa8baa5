// Goldfish masks on the CPU: rows in parallel, each row a few branch-free passes that the compiler
// vectorises, with O(1) work per token for any h (no division in the loops).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"

namespace goldfish {
namespace {

// Wrapping product of every window [e - h + 1, e] of y, stored at out[e] for e >= h - 1.
void window_products(const int64_t* y, int64_t T, int64_t h, uint64_t* prefix, uint64_t* suffix, uint64_t* out) {
  // Cut the row into blocks of h: a window is one whole block, or a suffix of one block times a prefix of
  // the next. (h vectorised passes of 64-bit multiplications measured slower from h = 2 on.)
  for (int64_t b0 = 0; b0 < T; b0 += h) {
    const int64_t b1 = std::min(b0 + h, T);
    prefix[b0] = static_cast<uint64_t>(y[b0]);
    for (int64_t i = b0 + 1; i < b1; ++i) prefix[i] = prefix[i - 1] * static_cast<uint64_t>(y[i]);
    suffix[b1 - 1] = static_cast<uint64_t>(y[b1 - 1]);
    for (int64_t i = b1 - 2; i >= b0; --i) suffix[i] = suffix[i + 1] * static_cast<uint64_t>(y[i]);
  }
  const int64_t last_start = T - h;  // windows start at 0 .. T - h
  for (int64_t s0 = 0; s0 <= last_start; s0 += h) {
    out[s0 + h - 1] = prefix[s0 + h - 1];
    const int64_t s1 = std::min(s0 + h, last_start + 1);
    for (int64_t s = s0 + 1; s < s1; ++s) out[s + h - 1] = suffix[s] * prefix[s + h - 1];
  }
}

// Rolling sums S_e = sum_j token_mix(y[e - j]) * B^j over windows of width h, in O(1) per window.
void window_rolling_sums(const int64_t* y, int64_t T, int64_t h, uint64_t base_pow_h, uint64_t* mixed,
                         uint64_t* out) {
  for (int64_t i = 0; i < T; ++i) mixed[i] = token_mix(y[i]);
  uint64_t sum = 0;
  for (int64_t i = 0; i < std::min(h, T); ++i) out[i] = sum = sum * kRollingBase + mixed[i];
  for (int64_t i = h; i < T; ++i) out[i] = sum = sum * kRollingBase + mixed[i] - mixed[i - h] * base_pow_h;
}

// table_index() (Python's floor modulo of the int64 product by kTableSize) in double arithmetic, which
// vectorises where 64-bit integer division does not: with w = hi * 2^32 + lo, hi * (2^32 mod m) + lo is
// below 2^53, so every step is exact in a double.
inline int64_t table_index_vectorisable(uint64_t w) {
  constexpr int64_t m = kTableSize;
  constexpr uint64_t two32_mod_m = (1ULL << 32) % m;
  constexpr int64_t two64_mod_m = static_cast<int64_t>((two32_mod_m * two32_mod_m) % m);
  const double x = static_cast<double>(w >> 32) * static_cast<double>(two32_mod_m) +
                   static_cast<double>(w & 0xFFFFFFFFULL);
  const double q = static_cast<double>(static_cast<int64_t>(x * (1.0 / m)));  // floor, possibly off by one
  int64_t r = static_cast<int64_t>(x - q * static_cast<double>(m));           // (w as unsigned) mod m, +-m
  r = r < 0 ? r + m : (r >= m ? r - m : r);
  r = static_cast<int64_t>(w) < 0 ? r - two64_mod_m : r;  // a negative int64 is its unsigned value - 2^64
  return r < 0 ? r + m : r;
}

// out[t] = window_dropped(p, window[t - lag]) for the targets whose window lies inside the row, with the
// strategy fixed at compile time so the loop has no branch.
template <int32_t kStrategy>
void hashed_decisions(const MaskParams& params, const uint64_t* window, uint64_t* scratch, int64_t T, bool* out) {
  MaskParams p = params;
  p.strategy = kStrategy;
  const int64_t lag = p.preceding ? 1 : 0;
  const int64_t first = std::min(p.h - 1 + lag, T);
  std::fill(out, out + first, false);
  if constexpr (kStrategy == kHashTable) {
    // Two loops: the index arithmetic vectorises on its own; the bit lookups are independent loads.
    int64_t* __restrict index = reinterpret_cast<int64_t*>(scratch);
    const uint64_t* __restrict bits = p.table_bits;
    uint8_t* __restrict bytes = reinterpret_cast<uint8_t*>(out);
    for (int64_t t = first; t < T; ++t) index[t] = table_index_vectorisable(window[t - lag]);
    for (int64_t t = first; t < T; ++t) bytes[t] = (bits[index[t] >> 6] >> (index[t] & 63)) & 1;
  } else {
    for (int64_t t = first; t < T; ++t) out[t] = window_dropped(p, window[t - lag]);
  }
}

// Ignored and exempt targets are never dropped (position_dropped in goldfish_hash.h). Bitwise &, not &&,
// and no captured references, so the loop has no branch or reload and vectorises.
void keep_ignored_and_exempt(const MaskParams& params, const int64_t* __restrict y, int64_t T,
                             bool* __restrict out) {
  const int64_t ignore_index = params.ignore_index;
  uint8_t* __restrict bytes = reinterpret_cast<uint8_t*>(out);  // GCC vectorises uint8_t, not bool
  for (int64_t t = 0; t < T; ++t) bytes[t] &= static_cast<uint8_t>(y[t] != ignore_index);
  if (params.num_exempt > 0) {
    for (int64_t t = 0; t < T; ++t) out[t] = out[t] & !is_exempt(params, y[t]);
  }
}

}  // namespace

void mask_cpu(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows, int64_t T) {
  const bool hashed = is_hash_strategy(params.strategy);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    // window[e]: the value of the window ending at e; scratch_a/b: prefix and suffix products, or mixed ids.
    std::vector<uint64_t> window(hashed ? T : 0), scratch_a(hashed ? T : 0), scratch_b(hashed ? T : 0);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t* y = labels + r * T;
      bool* out = dropped + r * T;
      switch (params.strategy) {
        case kHashTable:
          window_products(y, T, params.h, scratch_a.data(), scratch_b.data(), window.data());
          hashed_decisions<kHashTable>(params, window.data(), scratch_a.data(), T, out);
          break;
        case kHashAvalanche:
          window_products(y, T, params.h, scratch_a.data(), scratch_b.data(), window.data());
          hashed_decisions<kHashAvalanche>(params, window.data(), scratch_a.data(), T, out);
          break;
        case kHashRolling:
          window_rolling_sums(y, T, params.h, params.rolling_base_pow_h, scratch_a.data(), window.data());
          hashed_decisions<kHashRolling>(params, window.data(), scratch_a.data(), T, out);
          break;
        case kStatic:
          std::fill(out, out + T, false);
          for (int64_t t = params.start_position; t < T; t += params.k) out[t] = true;
          break;
        default:  // kRandom
          for (int64_t t = 0; t < T; ++t) out[t] = random_dropped(params, r, t);
      }
      keep_ignored_and_exempt(params, y, T, out);
    }
  });
}

}  // namespace goldfish
