// Goldfish mask arithmetic shared by the CPU (.cpp) and CUDA (.cu) kernels.
// Plain C++ with <cstdint> only, so nvcc compiles it without torch headers.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define GOLDFISH_HD __host__ __device__ __forceinline__
#else
#define GOLDFISH_HD inline
#endif

namespace goldfish {

// Strategy codes; the Python side maps names to these (goldfish_ds/config.py).
enum Strategy : int32_t {
  kHashTable = 0,      // official: product of the window, table lookup
  kStatic = 1,         // official: every k-th position from start_position
  kHashAvalanche = 2,  // official: product of the window, Thomas Wang 32-bit mix
  kRandom = 3,         // ablation: counter-based random per (seed, step, row, position)
  kHashRolling = 4,    // ours: order-sensitive rolling polynomial hash of mixed ids
};

constexpr int64_t kTableSize = 1000003;
// The hash-table strategy only needs table[i] < float32(1/k): one bit per entry, 122 KiB, which stays in
// cache where the 3.8 MiB float table would not.
constexpr int64_t kTableWords = (kTableSize + 63) / 64;
// Odd multiplier of the rolling polynomial hash (any odd constant keeps it invertible mod 2^64).
constexpr uint64_t kRollingBase = 0xD6E8FEB86659FD93ULL;

// All the parameters of a mask computation; plain data, passed by value to kernels.
struct MaskParams {
  int32_t strategy;
  int64_t k;                   // drop about 1/k of the eligible targets (k >= 2)
  int64_t h;                   // window width (h >= 1)
  int64_t start_position;      // static strategy: first dropped position
  int64_t ignore_index;        // labels equal to this are never dropped (already ignored)
  bool preceding;              // window = the h tokens before the target (paper) instead of ending at it (official)
  const uint64_t* table_bits;  // hash-table strategy: bit i of word i / 64 is table[i] < float32(1/k)
  float avalanche_threshold;   // float32((2^32 - 1) / k), the official comparison
  uint64_t threshold64;        // floor(2^64 / k) for the 64-bit hashes (random, hash-rolling)
  uint64_t rolling_base_pow_h; // kRollingBase^h mod 2^64, to remove the token leaving the window
  const int64_t* exempt_ids;   // sorted ids that are never dropped (may be null when num_exempt == 0)
  int64_t num_exempt;
  uint64_t seed;               // random strategy
  uint64_t step;               // random strategy
  bool has_boundary;           // rows are cut into segments after every label equal to boundary_id
  int64_t boundary_id;         // (each segment masked as its own row; not applied to the random strategy)
};

// Whether the mask depends on document boundaries: they are set and the strategy is not random.
GOLDFISH_HD bool uses_boundaries(const MaskParams& p) { return p.has_boundary && p.strategy != kRandom; }

// MurmurHash3's 64-bit finalizer: a bijection with full avalanche.
GOLDFISH_HD uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xFF51AFD7ED558CCDULL;
  x ^= x >> 33;
  x *= 0xC4CEB9FE1A85EC53ULL;
  x ^= x >> 33;
  return x;
}

// Per-token mixing of the rolling hash: distinct ids map to unrelated 64-bit words (0 and 1 included).
GOLDFISH_HD uint64_t token_mix(int64_t id) {
  return fmix64(static_cast<uint64_t>(id) ^ 0x9E3779B97F4A7C15ULL);
}

GOLDFISH_HD uint64_t pow_mod64(uint64_t base, int64_t exponent) {
  uint64_t result = 1;
  while (exponent > 0) {
    if (exponent & 1) result *= base;
    base *= base;
    exponent >>= 1;
  }
  return result;
}

// The official `hashint(key, width=32)` (Thomas Wang's 64-bit mix truncated to 32 bits), in uint64 arithmetic.
GOLDFISH_HD uint64_t official_hashint32(uint64_t key) {
  const uint64_t mask = 0xFFFFFFFFULL;
  key = (~key + (key << 21)) & mask;
  key = (key << 21) - key - 1;
  key = key ^ (key >> 24);
  key = ((key + (key << 3)) + (key << 8)) & mask;
  key = key * 265;
  key = key ^ (key >> 14);
  key = ((key + (key << 2)) + (key << 4)) & mask;
  key = key * 21;
  key = key ^ (key >> 28);
  key = (key + (key << 31)) & mask;
  return key;
}

// Python's floor modulo of the signed 64-bit product by the table size: a value in [0, kTableSize).
GOLDFISH_HD int64_t table_index(uint64_t product) {
  int64_t r = static_cast<int64_t>(product) % kTableSize;
  return r < 0 ? r + kTableSize : r;
}

// Decision of a hash strategy from its window value (a wrapped product, or a rolling sum).
GOLDFISH_HD bool window_dropped(const MaskParams& p, uint64_t window_value) {
  switch (p.strategy) {
    case kHashTable: {
      const int64_t i = table_index(window_value);
      return (p.table_bits[i >> 6] >> (i & 63)) & 1;
    }
    case kHashAvalanche:
      // The official code compares the int64 hash with a Python float, which torch does in float32.
      return static_cast<float>(static_cast<int64_t>(official_hashint32(window_value))) < p.avalanche_threshold;
    default:  // kHashRolling
      return fmix64(window_value ^ static_cast<uint64_t>(p.h)) < p.threshold64;
  }
}

GOLDFISH_HD bool random_dropped(const MaskParams& p, int64_t row, int64_t position) {
  const uint64_t key = fmix64(p.seed ^ fmix64(p.step + 0x632BE59BD9B4E019ULL)) ^
                       fmix64((static_cast<uint64_t>(row) << 32) ^ static_cast<uint64_t>(position));
  return fmix64(key) < p.threshold64;
}

GOLDFISH_HD bool is_exempt(const MaskParams& p, int64_t label) {
  int64_t lo = 0, hi = p.num_exempt;  // binary search in the sorted ids
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (p.exempt_ids[mid] < label) lo = mid + 1; else hi = mid;
  }
  return lo < p.num_exempt && p.exempt_ids[lo] == label;
}

GOLDFISH_HD bool is_hash_strategy(int32_t strategy) {
  return strategy == kHashTable || strategy == kHashAvalanche || strategy == kHashRolling;
}

// Last position of the window that decides target t (the window is [end - h + 1, end]).
GOLDFISH_HD int64_t window_end(const MaskParams& p, int64_t t) { return p.preceding ? t - 1 : t; }

// Whether target t of `row` is dropped, given the value of its window (ignored for non-hash strategies).
// `window_value` must be the product (official hashes) or rolling sum (hash-rolling) of the window ending
// at window_end(p, t), and is only read when that window lies inside the row. With boundaries, t is the
// target's position in its segment (the row as if it started at the segment), except for the random strategy.
GOLDFISH_HD bool position_dropped(const MaskParams& p, int64_t label, int64_t row, int64_t t, uint64_t window_value) {
  if (label == p.ignore_index) return false;
  if (p.num_exempt > 0 && is_exempt(p, label)) return false;
  switch (p.strategy) {
    case kStatic:
      return t >= p.start_position && (t - p.start_position) % p.k == 0;
    case kRandom:
      return random_dropped(p, row, t);
    default:
      return window_end(p, t) - p.h + 1 >= 0 && window_dropped(p, window_value);
  }
}

}  // namespace goldfish
