// Goldfish masks on the CPU. The targets are cut into chunks of kChunk consecutive targets of one row, each
// chunk computed on its own (with the h - 1 labels before it), so chunks run in parallel and their scratch
// stays in L1. A chunk is a few branch-free vectorised passes (the window products, then the decisions: for
// the hash table one hand-written AVX-512 pass where available), then one pass that writes the output: the
// mask itself, or the labels with the dropped targets set to ignore_index (streamed to memory when large).
// Without exempt ids, the hash-table pass writes the outputs itself. With document boundaries, a hash chunk
// whose windows hold a boundary label gets one more pass that keeps the targets whose window crosses it (over
// its outputs, after the fused pass), and the static strategy counts positions from each segment start in one
// pass per row.
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_kernels.h"

namespace goldfish {
namespace {

// Targets per chunk. Small, so the chunk's scratch (~8 KiB at h = 13) leaves the L1 cache to the random
// lookups in the 122 KiB bit table: 1024 measured ~25% slower.
constexpr int64_t kChunk = 256;

// Outputs of at least this many bytes are written with streaming stores (a core's L2 cache, here 2 MiB).
constexpr int64_t kStreamBytes = int64_t{2} << 20;

// Scratch of one thread; window values cover a chunk plus the h - 1 labels before it. The three value
// buffers start on 64-byte boundaries, so the vectorised passes store whole cache lines (unaligned 64-byte
// stores measured ~5-10% slower).
struct ChunkScratch {
  // Only the hash strategies (`hashed`) use the window values and the table indices.
  explicit ChunkScratch(int64_t chunk, int64_t h, bool hashed)
      : stride(hashed ? (chunk + h + 7) / 8 * 8 : 0), values(3 * stride + 8), index(hashed ? chunk : 0),
        decided(chunk),
        aligned(values.data() + (8 - reinterpret_cast<uintptr_t>(values.data()) / 8 % 8) % 8) {}
  uint64_t* buffer(int j) { return aligned + j * stride; }
  // Whether p points into buffer j (p may also point outside the scratch, e.g. into the labels).
  bool holds(int j, const uint64_t* p) {
    const auto at = reinterpret_cast<uintptr_t>(p), start = reinterpret_cast<uintptr_t>(buffer(j));
    return at >= start && at < start + stride * sizeof(uint64_t);
  }
  // The one of the three buffers that holds neither a nor b (which may point into the middle of one).
  uint64_t* spare(const uint64_t* a, const uint64_t* b) {
    for (int j = 0; j < 2; ++j) {
      if (!holds(j, a) && !holds(j, b)) return buffer(j);
    }
    return buffer(2);
  }
  int64_t stride;  // a multiple of 8 values
  std::vector<uint64_t> values;
  std::vector<int32_t> index;
  std::vector<uint8_t> decided;
  uint64_t* aligned;  // the first 64-byte boundary in values
};

// out[i] = a[i] * b[i] (wrapping) for i < n.
void multiply(const uint64_t* __restrict a, const uint64_t* __restrict b, uint64_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = a[i] * b[i];
}

// The window products as two factors: window[i] = a[i] * b[i] (wrapping), or a[i] alone when b is null.
// The last multiply is left to the consumer, which can fuse it with its own pass.
struct WindowFactors {
  const uint64_t* a;
  const uint64_t* b;
};

// Wrapping products of the windows of width h over x: window[i] = x[i] * ... * x[i + h - 1] for i < n (x holds
// n + h - 1 values). By doubling: `power` holds products of 1, 2, 4, ... consecutive values and `acc`
// multiplies in the powers of two that make up h, so ceil(log2 h) + popcount(h) - 1 vectorised multiplies
// (5 at h = 13, the last one returned as factors) instead of the serial prefix/suffix scans of blocks of h
// (measured ~2x slower).
WindowFactors window_factors(const uint64_t* x, int64_t n, int64_t h, ChunkScratch& s) {
  const int64_t L = n + h - 1;
  const uint64_t* power = x;  // power[i] = x[i] * ... * x[i + w - 1], for i <= L - w
  int64_t w = 1;
  const uint64_t* acc = nullptr;  // acc[i] = x[i] * ... * x[i + acc_w - 1], for i <= L - acc_w
  int64_t acc_w = 0;
  for (int64_t rest = h;; rest >>= 1) {
    if (rest == 1) return acc == nullptr ? WindowFactors{power, nullptr} : WindowFactors{acc, power + acc_w};
    if (rest & 1) {
      if (acc == nullptr) {
        acc = power;
      } else {
        uint64_t* next = s.spare(power, acc);
        multiply(acc, power + acc_w, next, L - acc_w - w + 1);
        acc = next;
      }
      acc_w += w;
    }
    uint64_t* next = s.spare(power, acc);
    multiply(power, power + w, next, L - 2 * w + 1);
    power = next;
    w *= 2;
  }
}

// The n window products themselves (in the scratch, or x when h = 1).
const uint64_t* window_products(const uint64_t* x, int64_t n, int64_t h, ChunkScratch& s) {
  const WindowFactors f = window_factors(x, n, h, s);
  if (f.b == nullptr) return f.a;
  uint64_t* out = s.spare(f.a, f.b);
  multiply(f.a, f.b, out, n);
  return out;
}

// Rolling sums over x[0, L): out[i] = sum_j token_mix(x[i - j]) * B^j over j < min(h, i + 1), in O(1) each.
void window_rolling_sums(const int64_t* x, int64_t L, int64_t h, uint64_t base_pow_h, uint64_t* mixed,
                         uint64_t* out) {
  for (int64_t i = 0; i < L; ++i) mixed[i] = token_mix(x[i]);
  uint64_t sum = 0;
  for (int64_t i = 0; i < std::min(h, L); ++i) out[i] = sum = sum * kRollingBase + mixed[i];
  for (int64_t i = h; i < L; ++i) out[i] = sum = sum * kRollingBase + mixed[i] - mixed[i - h] * base_pow_h;
}

inline double bits_to_double(uint64_t bits) {
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

inline uint64_t double_to_bits(double d) {
  uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  return bits;
}

// table_index(): Python's floor modulo of the int64 product by m = kTableSize, exact for every int64, in
// operations that vectorise (64-bit integer division does not, and cost ~20 cycles a token).
constexpr uint64_t kTwo32ModM = (1ULL << 32) % kTableSize;

inline int32_t table_index_vectorisable(uint64_t w) {
  constexpr uint64_t m = kTableSize;
  constexpr uint64_t negative_fix = m - kTwo32ModM * kTwo32ModM % m;  // m - (2^64 mod m)
  constexpr uint64_t two52 = 0x4330000000000000ULL;  // the bits of 2^52 as a double
  // x = w (mod m) with 0 <= x < 0.92 * 2^52: w = hi * 2^32 + lo as unsigned, and a negative int64 is
  // its unsigned value - 2^64, i.e. + m - (2^64 mod m).
  const uint64_t x = static_cast<uint64_t>(static_cast<uint32_t>(w >> 32)) * kTwo32ModM + (w & 0xFFFFFFFFULL) +
                     (negative_fix & (0 - (w >> 63)));
  // x < 2^52, so (x | bits(2^52)) is the double 2^52 + x, exactly; the quotient rounded to the nearest
  // integer (x / m < 2^32) lands in the low 32 bits of q's bits. It is within 1 of x / m, and the
  // remainder in (-m, m) needs one correction. It fits an int32, so it is computed modulo 2^32 (a 32-bit
  // multiply: the 64-bit one, vpmullq, costs ~3x more per lane).
  const double xd = bits_to_double(x | two52) - bits_to_double(two52);
  const uint32_t q = static_cast<uint32_t>(double_to_bits(xd * (1.0 / m) + bits_to_double(two52)));
  const int32_t r = static_cast<int32_t>(static_cast<uint32_t>(x) - q * static_cast<uint32_t>(m));
  return r + (static_cast<int32_t>(m) & (r >> 31));
}

// The output of one target: the mask, or the label with dropped targets set to ignore_index (an ignored
// label is ignore_index either way). Branch-free, so the loops vectorise.
inline uint8_t output(uint8_t decided, int64_t label, int64_t ignore_index, uint8_t*) {
  return decided & static_cast<uint8_t>(label != ignore_index);
}
inline int64_t output(uint8_t decided, int64_t label, int64_t ignore_index, int64_t*) {
  return label ^ ((label ^ ignore_index) & -static_cast<int64_t>(decided));
}

// Where hash_table_decisions() puts the decision of target i (put) or of targets i to i + 15 (put16, bit j
// for target i + j): the chunk's decision bytes, before the ignore and exempt rules ...
struct DecisionBytes {
  uint8_t* decided;
  void put(int64_t i, bool dropped) const { decided[i] = dropped; }
#if defined(__AVX512F__)
  void put16(int64_t i, __mmask16 dropped) const {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(decided + i), _mm_maskz_set1_epi8(dropped, 1));
  }
#endif
};

// ... or the outputs of the targets with these labels: the mask, or the masked labels. With `stream`, dst is
// 64-byte aligned and masked labels are written with streaming stores, which skip the read of each
// destination line (measured ~8% faster on 64 x 8192 labels). Without exempt ids the hash-table pass writes
// them directly (measured ~5% faster than a separate pass over the decision bytes).
template <typename Out>
struct OutputsOf {
  const int64_t* labels;
  Out* dst;
  int64_t ignore_index;
  bool stream;
  void put(int64_t i, bool dropped) const { dst[i] = output(dropped, labels[i], ignore_index, dst); }
#if defined(__AVX512F__)
  void put16(int64_t i, __mmask16 dropped) const {
    const __m512i ignore = _mm512_set1_epi64(ignore_index);
    const __m512i lo = _mm512_loadu_si512(labels + i), hi = _mm512_loadu_si512(labels + i + 8);
    if constexpr (std::is_same_v<Out, uint8_t>) {
      const __mmask16 kept =
          _mm512_kunpackb(_mm512_cmpneq_epi64_mask(hi, ignore), _mm512_cmpneq_epi64_mask(lo, ignore));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm_maskz_set1_epi8(dropped & kept, 1));
    } else {
      const __m512i masked_lo = _mm512_mask_mov_epi64(lo, static_cast<__mmask8>(dropped), ignore);
      const __m512i masked_hi = _mm512_mask_mov_epi64(hi, static_cast<__mmask8>(dropped >> 8), ignore);
      if (stream) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i), masked_lo);
        _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i + 8), masked_hi);
      } else {
        _mm512_storeu_si512(dst + i, masked_lo);
        _mm512_storeu_si512(dst + i + 8, masked_hi);
      }
    }
  }
#endif
};

// Puts into `sink` whether each target i < n is dropped: bit table_index(window[i]) of the table, with
// window[i] = f.a[i] * f.b[i]. The table's int64 words are read as 32-bit words (bit j of word j / 32, on a
// little-endian machine).
template <typename Sink>
void hash_table_decisions(const uint64_t* table_bits, WindowFactors f, int64_t n, ChunkScratch& s,
                          const Sink& sink) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(table_bits);
  int64_t i = 0;
#if defined(__AVX512F__)
  // 16 targets at a time in registers: the last multiply, the floor modulo on two halves of 8 lanes, a
  // 16-lane gather of the bit words (GCC does not vectorise the lookup, it avoids gathers; they measured
  // ~3.5x faster than loads) and the bit test. Fusing these passes measured ~5-9% faster.
  // The modulo is table_index_vectorisable() with the high half taken as signed, which AVX-512 converts
  // to double in one instruction (4 fewer per 8 lanes, ~10% faster): w = hi * 2^32 + lo, so
  // x = hi * (2^32 mod m) + lo = w (mod m) with |x| < 2^52, and q = round(x / m) is within 1 of the
  // quotient; adding 1.5 * 2^52 leaves q (two's complement) in the low 32 bits of the double's bits.
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFLL);
  const __m512i two32_mod_m = _mm512_set1_epi64(kTwo32ModM);
  const __m512d inv_m = _mm512_set1_pd(1.0 / kTableSize);
  const __m512d round_shift = _mm512_set1_pd(6755399441055744.0);  // 1.5 * 2^52
  const __m512i m = _mm512_set1_epi64(kTableSize);
  const __m512i m32 = _mm512_set1_epi32(kTableSize);
  const __m512i even_dwords = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i low5 = _mm512_set1_epi32(31), one = _mm512_set1_epi32(1);
  // The remainder in (-m, m), before its sign correction, in the low 32 bits of each 64-bit lane.
  auto remainder8 = [&](__m512i w) {
    const __m512i x =
        _mm512_add_epi64(_mm512_mul_epi32(_mm512_srai_epi64(w, 32), two32_mod_m), _mm512_and_si512(w, low32));
    const __m512i q = _mm512_castpd_si512(_mm512_fmadd_pd(_mm512_cvtepi64_pd(x), inv_m, round_shift));
    return _mm512_sub_epi32(x, _mm512_mul_epu32(q, m));
  };
  for (; i + 16 <= n; i += 16) {
    __m512i w0 = _mm512_loadu_si512(f.a + i), w1 = _mm512_loadu_si512(f.a + i + 8);
    if (f.b != nullptr) {
      w0 = _mm512_mullo_epi64(w0, _mm512_loadu_si512(f.b + i));
      w1 = _mm512_mullo_epi64(w1, _mm512_loadu_si512(f.b + i + 8));
    }
    __m512i r = _mm512_permutex2var_epi32(remainder8(w0), even_dwords, remainder8(w1));
    r = _mm512_add_epi32(r, _mm512_and_si512(m32, _mm512_srai_epi32(r, 31)));
    const __m512i word = _mm512_i32gather_epi32(_mm512_srli_epi32(r, 5), words, 4);
    const __mmask16 bit = _mm512_test_epi32_mask(_mm512_srlv_epi32(word, _mm512_and_si512(r, low5)), one);
    sink.put16(i, bit);
  }
#endif
  // The rest (every target without AVX-512): the same steps as loops the compiler vectorises.
  int32_t* __restrict index = s.index.data();
  for (int64_t j = i; j < n; ++j) index[j] = table_index_vectorisable(f.b == nullptr ? f.a[j] : f.a[j] * f.b[j]);
  for (int64_t j = i; j < n; ++j) sink.put(j, (words[index[j] >> 5] >> (index[j] & 31)) & 1);
}

// decided[i] = window_dropped(p, window[i]) for i < n, with the strategy fixed at compile time so the loops
// have no branch.
template <int32_t kStrategy>
void hashed_decisions(const MaskParams& params, const uint64_t* __restrict window, int64_t n,
                      uint8_t* __restrict decided) {
  MaskParams p = params;
  p.strategy = kStrategy;
  for (int64_t i = 0; i < n; ++i) decided[i] = window_dropped(p, window[i]);
}

// Whether y[from, to) holds the label id (no early exit, so the loop vectorises).
bool holds_label(const int64_t* __restrict y, int64_t from, int64_t to, int64_t id) {
  int64_t found = 0;
  for (int64_t i = from; i < to; ++i) found |= static_cast<int64_t>(y[i] == id);
  return found != 0;
}

// How many targets after a boundary label have it in their window (labels [t - lag - h + 1, t - 1] of target t).
inline int64_t boundary_reach(const MaskParams& p) { return p.h - 1 + (p.preceding ? 1 : 0); }

// Hash strategies with boundaries: calls keep(i) for the targets t0 + i (i < n) of row y whose window holds a
// boundary label other than the target itself; they are kept, as if every segment were a row (a segment's first
// targets have no window). The labels are checked 16 at a time (vectorised), and only blocks that hold a boundary
// label are read one by one.
template <typename Keep>
void keep_windows_across_boundaries(const MaskParams& p, const int64_t* y, int64_t t0, int64_t n, const Keep& keep) {
  constexpr int64_t kBlock = 16;
  const int64_t reach = boundary_reach(p);  // a boundary label at q is in the windows of targets q + 1 .. q + reach
  const int64_t last = t0 + n - 1;          // the chunk's last target
  int64_t kept_to = t0 - 1;                 // targets up to here are kept already
  for (int64_t b0 = std::max(int64_t{0}, t0 - reach); b0 < last; b0 += kBlock) {
    const int64_t b1 = std::min(b0 + kBlock, last);
    if (!holds_label(y, b0, b1, p.boundary_id)) continue;
    for (int64_t q = b0; q < b1; ++q) {
      if (y[q] != p.boundary_id) continue;
      const int64_t to = std::min(q + reach, last);
      for (int64_t t = std::max(q + 1, kept_to + 1); t <= to; ++t) keep(t - t0);
      kept_to = std::max(kept_to, to);
    }
  }
}

// Static strategy with boundaries, over a whole row y of n targets: every k-th target from start_position,
// counted from the start of each segment (the target after a boundary label is position 0).
void static_segment_decisions(const MaskParams& p, const int64_t* y, int64_t n, uint8_t* decided) {
  int64_t position = 0, phase = 0;  // phase = (position - start_position) % k once position >= start_position
  for (int64_t t = 0; t < n; ++t) {
    decided[t] = position >= p.start_position && phase == 0;
    if (y[t] == p.boundary_id) {
      position = phase = 0;
    } else if (++position > p.start_position) {
      phase = phase + 1 == p.k ? 0 : phase + 1;
    }
  }
}

// decided[i] for the targets t0 + i (i < n) of a row y, before the ignore and exempt rules.
void decide_chunk(const MaskParams& p, const int64_t* y, int64_t row, int64_t t0, int64_t n, ChunkScratch& s) {
  uint8_t* decided = s.decided.data();
  if (p.strategy == kStatic && uses_boundaries(p)) {
    static_segment_decisions(p, y, n, decided);  // a whole row (t0 = 0): positions count from segment starts
    return;
  }
  if (p.strategy == kStatic) {
    std::fill(decided, decided + n, 0);
    const int64_t from = std::max(t0, p.start_position);
    for (int64_t t = p.start_position + (from - p.start_position + p.k - 1) / p.k * p.k; t < t0 + n; t += p.k) {
      decided[t - t0] = 1;
    }
    return;
  }
  if (p.strategy == kRandom) {
    for (int64_t i = 0; i < n; ++i) decided[i] = random_dropped(p, row, t0 + i);
    return;
  }
  // Hash strategies: target t reads the window [t - lag - h + 1, t - lag]; the first targets have none.
  const int64_t lag = p.preceding ? 1 : 0;
  const int64_t skip = std::clamp(p.h - 1 + lag - t0, int64_t{0}, n);
  std::fill(decided, decided + skip, 0);
  const int64_t m = n - skip;
  if (m == 0) return;
  const int64_t* x = y + (t0 + skip - lag - p.h + 1);  // the labels of the m windows: m + h - 1 of them
  if (p.strategy == kHashRolling) {
    window_rolling_sums(x, m + p.h - 1, p.h, p.rolling_base_pow_h, s.buffer(0), s.buffer(1));
    hashed_decisions<kHashRolling>(p, s.buffer(1) + p.h - 1, m, decided + skip);
    return;
  }
  const uint64_t* labels = reinterpret_cast<const uint64_t*>(x);
  if (p.strategy == kHashTable) {
    hash_table_decisions(p.table_bits, window_factors(labels, m, p.h, s), m, s, DecisionBytes{decided + skip});
  } else {
    hashed_decisions<kHashAvalanche>(p, window_products(labels, m, p.h, s), m, decided + skip);
  }
}

// dst[i] for the n targets with the labels src (the mask or the masked labels) from their decision bytes,
// through the same sink as the fused hash-table pass (with `stream`, see OutputsOf).
template <typename Out>
void write_outputs(const uint8_t* __restrict decided, const int64_t* __restrict src, int64_t ignore_index,
                   Out* __restrict dst, int64_t n, bool stream) {
  const OutputsOf<Out> sink{src, dst, ignore_index, stream};
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m128i ones = _mm_set1_epi8(1);
  for (; i + 16 <= n; i += 16) {
    sink.put16(i, _mm_test_epi8_mask(_mm_loadu_si128(reinterpret_cast<const __m128i*>(decided + i)), ones));
  }
#endif
  for (; i < n; ++i) sink.put(i, decided[i]);
}

// Orders a thread's streaming stores before what follows (the end of the operator).
inline void finish_streaming_stores() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// out[t] for every target of labels [rows, T]; Out is uint8_t (the mask) or int64_t (the masked labels).
template <typename Out>
void goldfish_rows(const MaskParams& params, const int64_t* labels, Out* out, int64_t rows, int64_t T) {
  if (rows <= 0 || T <= 0) return;
  const bool boundaries = uses_boundaries(params);
  const bool hashed = is_hash_strategy(params.strategy);
  // Chunks of at least h targets, so the h - 1 labels read before a chunk are at most half of its work. Static
  // positions with boundaries count from a segment start that may lie anywhere before: one chunk per row.
  const int64_t chunk = boundaries && params.strategy == kStatic ? T : std::max(kChunk, params.h);
  const int64_t chunks_per_row = (T + chunk - 1) / chunk;
  // Masked labels larger than a core's L2 cache do not stay in cache: they are streamed to memory.
  const bool stream = std::is_same_v<Out, int64_t> && rows * T * static_cast<int64_t>(sizeof(Out)) >= kStreamBytes;
  // Hash-table decisions go straight to the outputs where no id is exempt.
  const bool fuse_outputs = params.strategy == kHashTable && params.num_exempt == 0;
  const auto run_chunks = [params, labels, out, T, chunk, chunks_per_row, stream, fuse_outputs, boundaries,
                           hashed](int64_t begin, int64_t end) {
    ChunkScratch s(chunk, params.h, hashed);
    const int64_t ignore_index = params.ignore_index;
    for (int64_t c = begin; c < end; ++c) {
      const int64_t row = c / chunks_per_row;
      const int64_t t0 = (c - row * chunks_per_row) * chunk;
      const int64_t n = std::min(chunk, T - t0);
      const int64_t* y = labels + row * T;
      Out* dst = out + row * T + t0;
      const bool stream_chunk = stream && reinterpret_cast<uintptr_t>(dst) % 64 == 0;  // streaming needs alignment
      // Whether a boundary label lies in a window of the chunk's targets, other than as the target itself.
      const bool crossed = boundaries && hashed && boundary_reach(params) > 0 &&
                           holds_label(y, std::max(int64_t{0}, t0 - boundary_reach(params)), t0 + n - 1,
                                       params.boundary_id);
      if (fuse_outputs && t0 >= params.h - 1 + params.preceding) {  // every target has a window
        const auto* x = reinterpret_cast<const uint64_t*>(y + t0 - params.preceding - params.h + 1);
        hash_table_decisions(params.table_bits, window_factors(x, n, params.h, s), n, s,
                             OutputsOf<Out>{y + t0, dst, ignore_index, stream_chunk});
        if (crossed) {  // rewrite the few targets whose window crossed a boundary as kept
          if (stream_chunk) finish_streaming_stores();  // after the streamed outputs they overwrite
          keep_windows_across_boundaries(params, y, t0, n,
                                         [&](int64_t i) { dst[i] = output(0, y[t0 + i], ignore_index, dst); });
        }
        continue;
      }
      decide_chunk(params, y, row, t0, n, s);
      uint8_t* __restrict decided = s.decided.data();
      if (crossed) keep_windows_across_boundaries(params, y, t0, n, [decided](int64_t i) { decided[i] = 0; });
      if (params.num_exempt > 0) {
        for (int64_t i = 0; i < n; ++i) decided[i] &= static_cast<uint8_t>(!is_exempt(params, y[t0 + i]));
      }
      write_outputs(decided, y + t0, ignore_index, dst, n, stream_chunk);
    }
    if (stream) finish_streaming_stores();
  };
  at::parallel_for(0, rows * chunks_per_row, 4, run_chunks);
}

}  // namespace

void mask_cpu(const MaskParams& params, const int64_t* labels, bool* dropped, int64_t rows, int64_t T) {
  goldfish_rows(params, labels, reinterpret_cast<uint8_t*>(dropped), rows, T);  // GCC vectorises uint8_t, not bool
}

void apply_goldfish_cpu(const MaskParams& params, const int64_t* labels, int64_t* masked, int64_t rows, int64_t T) {
  goldfish_rows(params, labels, masked, rows, T);
}

}  // namespace goldfish
