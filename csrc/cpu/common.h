// Shared by the CPU kernels: argument checks, the deterministic token chunking
// and the two-stage reduction of per-chunk partial sums.
//
// Determinism: a kernel that sums over tokens (a weight gradient, a per-slot sum)
// never lets threads add into one accumulator. The tokens of each batch item are
// cut into chunks whose length depends on N only (never on the thread count);
// each chunk sums its own partial in token order, and the partials are then added
// in chunk order. Results are therefore bitwise identical for any thread count.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <bit>
#include <limits>
#include <type_traits>
#include <cstdint>
#include <new>
#include <vector>

namespace exposure_slot::cpu {

// One vector register of the target: 64 bytes with AVX-512, 32 with AVX2 (most
// laptops), 16 otherwise. Every vector type and width below is a number of these:
// GCC lowers a vector type wider than the target's registers through the stack, a
// piece at a time, and the kernels built for AVX2 with 64-byte vectors ran 8-11x
// slower than with 32-byte ones (benchmarks/README.md, "Vectorisation report").
// kVectorRegisters: how many such registers a register tile may plan on.
#if defined(__AVX512F__)
constexpr int64_t kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
constexpr int64_t kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
#else
constexpr int64_t kVectorBytes = 16;
constexpr int kVectorRegisters = 16;
#endif
template <typename T>
constexpr int64_t kVectorLanes = kVectorBytes / sizeof(T);

// Sums over a token's C channels (LayerNorm statistics). A plain loop (or `omp simd
// reduction`) keeps one vector accumulator, so each sum is a chain of C/16
// dependent adds, and a token's several such sums made the kernels latency-bound.
// kLanes independent partial sums (four registers) cut the chain to C/kLanes, then
// fold as a tree. The order of additions is fixed by the code, so results are
// reproducible bit for bit (for one build: the vector width sets the order). (Dot
// products: dot_block, below.)
template <typename T>
constexpr int64_t kLanes = 4 * kVectorLanes<T>;

// acc[0, kVectorLanes) += the rest, by halving: every step has a compile-time
// width, so each is one or two vector adds instead of a scalar loop.
template <int64_t Width, typename T>
__attribute__((always_inline)) inline void fold(T* acc) {
  if constexpr (Width > kVectorLanes<T>) {
    for (int64_t w = 0; w < Width / 2; ++w) acc[w] += acc[w + Width / 2];
    fold<Width / 2>(acc);
  }
}

// The sum of one register's worth of lanes: a shuffle tree where AVX-512 exists
// (the compiler's own horizontal sum is a chain of 16 scalar adds).
template <typename T>
__attribute__((always_inline)) inline T sum_lanes(const T* acc) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) return _mm512_reduce_add_ps(_mm512_loadu_ps(acc));
  if constexpr (std::is_same_v<T, double>) return _mm512_reduce_add_pd(_mm512_loadu_pd(acc));
#endif
  T total = 0;
  for (int64_t w = 0; w < kVectorLanes<T>; ++w) total += acc[w];
  return total;
}

// n rounded up to a multiple of `multiple` (a padded stride).
constexpr int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Per-thread scratch whose rows the kernels load and store as whole vectors.
// std::vector's storage comes from malloc, aligned to 16 bytes only, so every
// 64-byte load or store of it spanned two cache lines (a split access costs about
// two); on 64-byte boundaries a row of C = 128 floats is eight whole lines. That
// alone made the Winograd convolutions 2-14% and a slot-attention pass ~5% faster
// (benchmarks/HISTORY.md, tenth session).
constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

// Blocks of channels. Per-token loops over C go block by block, and everything a
// block needs from stage to stage (a modulation, a LayerNorm output) stays in
// registers. A full block is kBlock<T> values: two registers, enough independent
// work to hide the multiply-add latency, few enough to leave registers for the
// rest. Full blocks are arrays of GCC vector types with a compile-time length,
// which the compiler keeps in registers (arrays of T indexed in runtime loops went
// through the stack and stalled on store forwarding); the last, partial block runs
// the same code on single values.
template <typename T>
constexpr int64_t kBlock = 2 * kVectorLanes<T>;

template <typename T>
struct VectorOf {
  typedef T type __attribute__((vector_size(kVectorBytes)));
  typedef T unaligned __attribute__((vector_size(kVectorBytes), aligned(alignof(T)), may_alias));
};
template <typename T>
using Vec = typename VectorOf<T>::type;

// The type of one lane of X: X itself, or Vec<T>'s T.
template <typename X>
struct LaneOf {
  using type = X;
};
template <>
struct LaneOf<Vec<float>> {
  using type = float;
};
template <>
struct LaneOf<Vec<double>> {
  using type = double;
};

template <typename T, int64_t Width = kBlock<T>>
struct FullBlock {
  using Unit = Vec<T>;
  static constexpr int64_t kStride = kVectorLanes<T>;  // values per unit
  static constexpr int64_t kCapacity = Width / kVectorLanes<T>;
  static constexpr int64_t units = kCapacity;
};

template <typename T, int64_t Width = kBlock<T>>
struct TailBlock {
  using Unit = T;
  static constexpr int64_t kStride = 1;
  static constexpr int64_t kCapacity = Width;
  int64_t units;
};

template <typename U, typename T>
__attribute__((always_inline)) inline U load(const T* p) {
  if constexpr (std::is_same_v<U, T>) {
    return *p;
  } else {
    return *reinterpret_cast<const typename VectorOf<T>::unaligned*>(p);
  }
}

template <typename U, typename T>
__attribute__((always_inline)) inline void store(T* p, U x) {
  if constexpr (std::is_same_v<U, T>) {
    *p = x;
  } else {
    *reinterpret_cast<typename VectorOf<T>::unaligned*>(p) = x;
  }
}

// Stores of large outputs that are not read again soon. A plain store to a line
// not in cache first reads the line (a read for ownership); a non-temporal store
// writes it without that read and without keeping it in cache. A leaf pass
// backward at B = 8, N = 4096 (its gradients 32 MB) ran 8-13% faster so, the
// training step ~6%; with its outputs in the last-level cache (B = 1) it would be
// slower, as the next op then reads them from memory: only outputs past
// kStreamBytes stream, and only where every vector of a row is aligned.
constexpr int64_t kStreamBytes = int64_t{16} << 20;

// Whether rows of C values from `data` (an output of `bytes` bytes in all, with the
// ones written beside it) stream: every row's vectors aligned.
template <typename T>
bool streams(const T* data, int64_t C, int64_t bytes) {
  return bytes > kStreamBytes && reinterpret_cast<uintptr_t>(data) % kVectorBytes == 0 &&
         C * int64_t(sizeof(T)) % kVectorBytes == 0;
}

// *p = x in a non-temporal store (p aligned to its vector), or a plain one for a
// tail block's single value.
template <typename U, typename T>
__attribute__((always_inline)) inline void store_streaming(T* p, U x) {
  if constexpr (std::is_same_v<U, T>) {
    *p = x;
  } else {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float>) _mm512_stream_ps(p, x);
    else _mm512_stream_pd(p, x);
#elif defined(__AVX__)
    if constexpr (std::is_same_v<T, float>) _mm256_stream_ps(p, x);
    else _mm256_stream_pd(p, x);
#elif defined(__SSE2__)
    if constexpr (std::is_same_v<T, float>) _mm_stream_ps(p, x);
    else _mm_stream_pd(p, x);
#else
    store(p, x);
#endif
  }
}

// dst[0, C) = src[0, C) in non-temporal stores (dst as `streams` allows).
template <typename T>
inline void stream_row(T* __restrict__ dst, const T* __restrict__ src, int64_t C) {
  for (int64_t c = 0; c < C; c += kVectorLanes<T>) store_streaming(dst + c, load<Vec<T>>(src + c));
}

// Orders a thread's streamed stores before what follows (the end of a parallel
// region, after which other threads read them).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// Brings a row of C values into L1 ahead of its use: the backward kernels take, per
// token, the row a tile ahead of the one they work on (the hardware prefetchers ran
// too few lines ahead of the several streams a backward reads: ~10% of a leaf pass
// backward at B = 8, N = 4096).
template <typename T>
inline void prefetch_row(const T* row, int64_t C) {
  constexpr int64_t kLineValues = kCacheLine / int64_t(sizeof(T));
  for (int64_t c = 0; c < C; c += kLineValues) __builtin_prefetch(row + c, 0, 3);
}

// acc += x for a block's unit: a whole vector, or (a tail block's single value)
// into the first lane.
template <typename T, typename U>
__attribute__((always_inline)) inline void add_lanes(Vec<T>& acc, U x) {
  if constexpr (std::is_same_v<U, T>) {
    acc[0] += x;
  } else {
    acc += x;
  }
}

// body(c0, block) for the blocks of [0, C): FullBlock<T, Width>{} or the TailBlock
// left. Width: kBlock<T>, or wider where a block's work is one short dependency
// chain per unit (more units, more chains in flight).
template <typename T, int64_t Width = kBlock<T>, typename Body>
__attribute__((always_inline)) inline void for_each_block(int64_t C, const Body& body) {
  int64_t c0 = 0;
  for (; c0 + Width <= C; c0 += Width) body(c0, FullBlock<T, Width>{});
  if (c0 < C) body(c0, TailBlock<T, Width>{C - c0});
}

// lanes[m] = the sum of the lanes of in[(m % 4) * 4 + m / 4], for 16 registers of
// float: a transposing tree of shuffles and adds (16 -> 8 -> 4 -> 2 -> 1 registers,
// 45 instructions) instead of a horizontal sum per register (~8 each). The order of
// the additions is fixed, so results are reproducible bit for bit.
#if defined(__AVX512F__)
inline void sum_lanes_16(const Vec<float> (&in)[16], float* lanes) {
  __m512 half[8], quarter[4], eighth[2];
  for (int k = 0; k < 8; ++k) {  // [a0+a2, a1+a3, b0+b2, b1+b3] in 128-bit quarters
    const __m512 a = in[2 * k], b = in[2 * k + 1];
    half[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int k = 0; k < 4; ++k) {  // quarter L: in[4k + L]'s four partial sums
    const __m512 a = half[2 * k], b = half[2 * k + 1];
    quarter[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x88), _mm512_shuffle_f32x4(a, b, 0xDD));
  }
  for (int k = 0; k < 2; ++k) {
    const __m512 a = quarter[2 * k], b = quarter[2 * k + 1];
    eighth[k] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
  }
  // Pairs of floats moved as doubles, added as floats.
  const __m512d a = _mm512_castps_pd(eighth[0]), b = _mm512_castps_pd(eighth[1]);
  _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                                        _mm512_castpd_ps(_mm512_unpackhi_pd(a, b))));
}
#endif

// out[j][r] = dot(w[j], x[r]) for Jb rows of w and Rb rows of x (rows of `in`
// values): Jb * Rb vector accumulators, one per dot, each vector of w and x loaded
// once per block. Where there are several dots to take, this beats one dot at a
// time, which spends as much on its accumulators' loads and horizontal sum as on
// the multiply-adds (the slot update's matrix products, a tile's slot logits, a
// token's mask gradients). A float block of 16 dots (the logits' 4 x 4) takes its
// 16 sums together, stored as one vector in out's order.
template <int Jb, int Rb, typename T>
inline void dot_block(const T* w, const T* x, int64_t in, T (&out)[Jb][Rb]) {
  using V = Vec<T>;
  constexpr int64_t L = kVectorLanes<T>;
  V acc[Jb][Rb];
#pragma GCC unroll 16
  for (int j = 0; j < Jb; ++j) {
#pragma GCC unroll 16
    for (int r = 0; r < Rb; ++r) acc[j][r] = V{};
  }
  int64_t c = 0;
  for (; c + L <= in; c += L) {
    V wv[Jb], xv[Rb];
#pragma GCC unroll 16
    for (int j = 0; j < Jb; ++j) wv[j] = load<V>(w + j * in + c);
#pragma GCC unroll 16
    for (int r = 0; r < Rb; ++r) xv[r] = load<V>(x + r * in + c);
#pragma GCC unroll 16
    for (int j = 0; j < Jb; ++j) {
#pragma GCC unroll 16
      for (int r = 0; r < Rb; ++r) acc[j][r] += wv[j] * xv[r];
    }
  }
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && Jb * Rb == 16) {
    V in_order[16];  // sum_lanes_16's order for lanes m = Rb * j + r
    for (int m = 0; m < 16; ++m) in_order[(m % 4) * 4 + m / 4] = acc[m / Rb][m % Rb];
    sum_lanes_16(in_order, &out[0][0]);
  } else
#endif
  {
    for (int j = 0; j < Jb; ++j) {
      for (int r = 0; r < Rb; ++r) out[j][r] = sum_lanes(reinterpret_cast<const T*>(&acc[j][r]));
    }
  }
  if (c < in) {  // a test per dot, else: the compiler does not hoist it
    for (int j = 0; j < Jb; ++j) {
      for (int r = 0; r < Rb; ++r) {
        for (int64_t t = c; t < in; ++t) out[j][r] += w[j * in + t] * x[r * in + t];
      }
    }
  }
}

// body.template operator()<G>(i0) for the groups [i0, i0 + G) of [0, K): groups of
// four, then the one to three left as one group (G a compile-time constant, so a
// group's accumulators stay in registers).
template <typename Body>
inline void for_each_group_of_4(int64_t K, const Body& body) {
  int64_t i0 = 0;
  for (; i0 + 4 <= K; i0 += 4) body.template operator()<4>(i0);
  switch (K - i0) {
    case 3: body.template operator()<3>(i0); break;
    case 2: body.template operator()<2>(i0); break;
    case 1: body.template operator()<1>(i0); break;
    default: break;
  }
}

// out[i * stride + t] = rows_i . xs_t for K rows and `count` xs of C values each (a
// token's g_v dots; a tile's mask gradients), in blocks of up to four rows by up to
// four xs: dot_block loads each block's vectors once and keeps one accumulator per
// pair.
template <typename T>
inline void row_dots(const T* rows, const T* xs, int64_t K, int64_t count, int64_t C, T* out,
                     int64_t stride) {
  for_each_group_of_4(count, [&]<int R>(int64_t t0) {
    for_each_group_of_4(K, [&]<int G>(int64_t i0) {
      T dots[G][R];
      dot_block<G, R>(rows + i0 * C, xs + t0 * C, C, dots);
      for (int64_t g = 0; g < G; ++g) {
        for (int64_t r = 0; r < R; ++r) out[(i0 + g) * stride + t0 + r] = dots[g][r];
      }
    });
  });
}

// partial[i, :] += sum over `count` rows t of weights[i * weight_stride + t] *
// rows[t, :] for K rows of weights and rows of C values `row_stride` apart (a
// tile's A * v sums and query gradient, the table gradients of a tile's tokens): a
// block of channels at a time, every group of up to four weight rows, their sums
// in registers over the rows (eight or fewer independent accumulators, enough to
// hide the latency of their FMAs), so that each row of the partial is read and
// written once per call. step() runs once per block and group (a tile's
// prefetches).
template <typename T, typename Step>
inline void weighted_row_sums(const T* weights, int64_t weight_stride, const T* rows,
                              int64_t row_stride, int64_t count, int64_t K, int64_t C,
                              T* __restrict__ partial, const Step& step) {
  for_each_block<T>(C, [&](int64_t c0, auto blk) {
    using Block = decltype(blk);
    using U = typename Block::Unit;
    constexpr int64_t S = Block::kStride;
    for_each_group_of_4(K, [&]<int G>(int64_t i0) {
      U acc[G][Block::kCapacity];
      for (int g = 0; g < G; ++g) {
        for (int64_t u = 0; u < blk.units; ++u) acc[g][u] = U{};
      }
      for (int64_t t = 0; t < count; ++t) {
        U x[Block::kCapacity];
        for (int64_t u = 0; u < blk.units; ++u) x[u] = load<U>(rows + t * row_stride + c0 + u * S);
        for (int g = 0; g < G; ++g) {
          const T a = weights[(i0 + g) * weight_stride + t];
          for (int64_t u = 0; u < blk.units; ++u) acc[g][u] += a * x[u];
        }
      }
      for (int g = 0; g < G; ++g) {
        T* dst = partial + (i0 + g) * C + c0;
        for (int64_t u = 0; u < blk.units; ++u) store(dst + u * S, load<U>(dst + u * S) + acc[g][u]);
      }
      step();
    });
  });
}

// 1/k! for k = 0 .. Terms.
template <typename T, int Terms>
constexpr std::array<T, Terms + 1> inverse_factorials() {
  std::array<T, Terms + 1> c{};
  double f = 1;
  for (int k = 0; k <= Terms; ++k) {
    if (k > 1) f *= k;
    c[k] = static_cast<T>(1 / f);
  }
  return c;
}

// exp(x) for x <= 0 (a softmax's arguments; slot_update's sigmoid and tanh of
// -|x|), in a form a loop over many of them vectorises (libm's expf is a call per
// value): x = n ln2 + r with |r| <= ln2/2, exp(r) by its Taylor series up to
// r^7/7! for float and r^13/13! for double (truncation below half an ulp), and
// 2^n written into the exponent bits. x is clamped at the smallest normal power
// of two (exp(-87.3) for float): anything that far below 1 is lost to rounding
// next to the 1 (a softmax's largest term, the sigmoid's 1 + e) it is added to.
template <typename X>
inline X exp_nonpositive(X x) {
  using T = typename LaneOf<X>::type;
  using Bits = std::conditional_t<std::is_same_v<T, float>, int32_t, int64_t>;
  constexpr int kMantissaBits = std::numeric_limits<T>::digits - 1;
  constexpr Bits kBias = std::numeric_limits<T>::max_exponent - 1;
  constexpr T kLog2e = T(1.4426950408889634074);
  constexpr T kLn2Hi = T(0.693145751953125);  // ln2 split so that n * kLn2Hi is exact
  constexpr T kLn2Lo = T(1.42860682030941723212e-6);
  constexpr T kRound = T(1.5) * T(Bits(1) << kMantissaBits);  // adding it rounds to an integer
  constexpr int kTerms = std::is_same_v<T, float> ? 7 : 13;
  const X lowest = X{} + T(std::numeric_limits<T>::min_exponent - 1) / kLog2e;
  x = x < lowest ? lowest : x;  // std::max's result, for a vector too
  const X rounded = x * kLog2e + kRound;  // n in its low mantissa bits
  const X n = rounded - kRound;
  const X r = (x - n * kLn2Hi) - n * kLn2Lo;
  // Horner's rule on the coefficients 1/k! (a division per term would cost a
  // vdivps each, 16 cycles per vector).
  constexpr std::array<T, kTerms + 1> kCoefficients = inverse_factorials<T, kTerms>();
  X poly = X{} + kCoefficients[kTerms];
#pragma GCC unroll 16
  for (int k = kTerms - 1; k >= 0; --k) poly = poly * r + kCoefficients[k];
  // n as an integer: the bits of `rounded` less kRound's (no float-to-integer
  // conversion, which AVX2 lacks for double).
  using BitsOfX = std::conditional_t<std::is_arithmetic_v<X>, Bits, typename VectorOf<Bits>::type>;
  const BitsOfX n_bits = std::bit_cast<BitsOfX>(rounded) - std::bit_cast<Bits>(kRound);
  return poly * std::bit_cast<X>((n_bits + kBias) << kMantissaBits);
}

// Below this many multiply-adds, starting a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

inline void check_float_cpu(const char* op, const char* name, const at::Tensor& t,
                            at::ScalarType dtype, const char* dtype_source) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor for the CPU kernel, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
              name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": all tensors must share one dtype, but ",
              name, " is ", t.scalar_type(), " and ", dtype_source, " is ", dtype);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must be ", layout, " = ", expected,
              ", got shape ", t.sizes());
}

// Tokens a tile: the passes take a chunk's tokens kTile at a time, with per-tile
// products over them (a tile's logits and A * v sums; in the backwards the query,
// mask and table gradients).
constexpr int64_t kTile = 16;

// How the tokens of each batch item are cut into chunks.
struct Chunking {
  int64_t length;    // tokens per chunk (the last chunk of an item may be shorter)
  int64_t per_item;  // chunks per batch item
  int64_t count;     // chunks in all

  // Chunks are at least kMinLength tokens (so a partial is small next to the
  // tokens it sums) and at most kMaxPerItem per batch item (so the partials of a
  // 24-megapixel image stay a few megabytes).
  static constexpr int64_t kMinLength = 256;
  static constexpr int64_t kMaxPerItem = 64;

  Chunking(int64_t batch, int64_t tokens) {
    length = std::max(kMinLength, (tokens + kMaxPerItem - 1) / kMaxPerItem);
    per_item = (tokens + length - 1) / length;
    count = batch * per_item;
  }
  int64_t item(int64_t chunk) const { return chunk / per_item; }
  int64_t begin(int64_t chunk) const { return (chunk % per_item) * length; }
  int64_t end(int64_t chunk, int64_t tokens) const {
    return std::min(begin(chunk) + length, tokens);
  }
};

// Per-chunk partial sums: every chunk owns `size` values (`stride` apart, a whole
// number of cache lines, so a chunk's block starts on a line); a quantity is a
// range [offset, offset + size) of each chunk's block.
template <typename T>
struct Partials {
  int64_t stride;
  AlignedVector<T> values;  // [chunk, stride], zero-initialised

  Partials(int64_t chunks, int64_t size)
      : stride(round_up(size, kCacheLine / sizeof(T))),
        values(chunks * stride, T(0)) {}
  T* chunk(int64_t c) { return values.data() + c * stride; }

  // out[g, :size] = sum over the chunks of group g, in chunk order, of the range
  // [offset, offset + size). `per_batch_item` gives one group per batch item (a
  // quantity of that item); otherwise one group holds every chunk (a quantity
  // shared by the batch, such as a weight).
  void reduce(const Chunking& chunks, int64_t offset, int64_t size, bool per_batch_item,
              T* out, bool parallel) const {
    const int64_t groups = per_batch_item ? chunks.count / chunks.per_item : 1;
    const int64_t members = per_batch_item ? chunks.per_item : chunks.count;
    // Split each group's output into pieces of a few cache lines, so that even a
    // single group keeps every thread busy.
    constexpr int64_t kPiece = 64;
    const int64_t pieces = (size + kPiece - 1) / kPiece;
#pragma omp parallel for schedule(static) if (parallel)
    for (int64_t job = 0; job < groups * pieces; ++job) {
      const int64_t g = job / pieces;
      const int64_t lo = (job % pieces) * kPiece, hi = std::min(lo + kPiece, size);
      T* dst = out + g * size;
      for (int64_t e = lo; e < hi; ++e) dst[e] = T(0);
      for (int64_t m = g * members; m < (g + 1) * members; ++m) {
        const T* src = values.data() + m * stride + offset;
        for (int64_t e = lo; e < hi; ++e) dst[e] += src[e];
      }
    }
  }
};

}  // namespace exposure_slot::cpu
