// A 3x3 convolution (stride 1, padding 1) by Winograd's minimal filtering
// F(4x4, 3x3), with its pixel (un)shuffles, bias, residual sum and GELU fused:
// exposure_slot::winograd_conv3x3 and winograd_conv3x3_ (which adds into `out`).
//
// Formula. Each 4x4 tile of the output is computed from the 6x6 tile d of the
// (padded) input around it (Lavin and Gray, "Fast Algorithms for Convolutional
// Neural Networks", 2016):
//   y[co] = A^T [ sum_ci U[ci, co] (.) (B^T d[ci] B) ] A,    U = G g G^T,
// (.) elementwise over the 36 points: 36 multiply-adds per input channel, tile and
// output channel instead of the direct convolution's 144. The filter transform U
// is done once per layer, in float64, by the Python side
// (exposure_slot/ops/winograd_conv3x3.py); the kernels take U [36, Ci, Co]. Then
//   out = gelu?(y + bias + (out, for winograd_conv3x3_)).
// The transforms' entries (up to 8 in A and B, 1/24 in G) round in float32: per
// output the error is about 10x the direct convolution's (~5e-6 relative;
// tests/test_winograd_conv3x3.py states it), far below the 1e-4 the inference
// path allows.
//
// The convolution's own maps may be pixel shuffles of the tensors: with
// `unshuffle` = 2 its input is the 2x2 pixel unshuffle of `x` [B, Cx, 2H, 2W],
// channel (2a + b) * Cx + c at (i, j) being x[c, 2i + a, 2j + b]; with `shuffle`
// = 2 its output channel (2a + b) * Co/4 + c at (i, j) is written to
// out[c, 2i + a, 2j + b]. (Phase-major channel orders, so that a vector of
// channels is one contiguous run of the tensor; the Python side permutes the
// model's weights to match.) `reflect` pads by reflection instead of zeros.
//
// Memory layout: x and out are channels-last ([B, H, W, C] in memory); U is
// [36, Ci, Co] (point-major, then input channel), the layout the products want.
// Each block of T tiles (tiles_per_block) is transformed into a thread's V
// [T][Ci / L][36][L] (L lanes per vector), multiplied point by point into Y
// [T][Co / L][36][L], and transformed back: a tile's channels are vectors, so
// every transform is vector additions at fixed offsets.
//
// Launch: OpenMP over the blocks of tiles (all batch items and rows in one list);
// every output is written by one tile, so results do not depend on the thread
// count. Numbers are in benchmarks/README.md ("Winograd convolutions").

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "common.h"

namespace exposure_slot::cpu {
namespace {

constexpr int kTile = 4;                    // output tile side
constexpr int kSpan = kTile + 2;            // input tile side
constexpr int kPoints = kSpan * kSpan;      // Winograd points per tile

// B^T and A^T of F(4, 3), interpolation points 0, 1, -1, 2, -2 and infinity.
constexpr float kInputTransform[kSpan][kSpan] = {
    {4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
    {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
constexpr float kOutputTransform[kTile][kSpan] = {
    {1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};

// out[i * out_step] = sum_j m[i][j] * in[j * in_step]. Fully unrolled, so the zero
// and unit coefficients cost nothing.
template <int Rows, int Cols, typename V>
__attribute__((always_inline)) inline void transform(const float (&m)[Rows][Cols], const V* in,
                                                     int in_step, V* out, int out_step) {
#pragma GCC unroll 8
  for (int i = 0; i < Rows; ++i) {
    V acc = {};
#pragma GCC unroll 8
    for (int j = 0; j < Cols; ++j) {
      if (m[i][j] == 1.f) {
        acc += in[j * in_step];
      } else if (m[i][j] == -1.f) {
        acc -= in[j * in_step];
      } else if (m[i][j] != 0.f) {
        acc += static_cast<std::remove_cvref_t<decltype(acc[0])>>(m[i][j]) * in[j * in_step];
      }
    }
    out[i * out_step] = acc;
  }
}

// gelu(x) = x/2 (1 + erf(x / sqrt 2)). float: erf by Abramowitz and Stegun 7.1.28,
// 1 - (1 + a1 t + ... + a6 t^6)^-16 for t = |x| / sqrt 2 (clamped at 6, where erf is
// 1 in float), absolute error below 3e-7: a polynomial, four squarings and a
// reciprocal, all vector operations (the reciprocal by one Newton step from
// AVX-512's 14-bit estimate: a division per vector cost as much as the products).
// double: std::erf, lane by lane (the float64 path is the tests' exact one).
template <typename T>
__attribute__((always_inline)) inline Vec<T> gelu(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    Vec<T> t = (x < 0 ? -x : x) * T(0.70710678118654752440);
    t = t < T(6) ? t : T(6);
    Vec<T> p = T(0.0000430638) * t + T(0.0002765672);
    p = p * t + T(0.0001520143);
    p = p * t + T(0.0092705272);
    p = p * t + T(0.0422820123);
    p = p * t + T(0.0705230784);
    p = p * t + T(1);
    p = p * p;
    p = p * p;
    p = p * p;
    p = p * p;
#if defined(__AVX512F__)
    Vec<T> r = reinterpret_cast<Vec<T>>(_mm512_rcp14_ps(reinterpret_cast<__m512>(p)));
    r = r * (T(2) - p * r);
#else
    const Vec<T> r = T(1) / p;
#endif
    const Vec<T> erf_abs = T(1) - r;
    return T(0.5) * x * (T(1) + (x < 0 ? -erf_abs : erf_abs));
  } else {
    Vec<T> out;
    for (int l = 0; l < kVectorLanes<T>; ++l) {
      out[l] = T(0.5) * x[l] * (T(1) + std::erf(x[l] * T(0.70710678118654752440)));
    }
    return out;
  }
}

struct Geometry {
  int64_t batch, height, width;            // the convolution's own (virtual) maps
  int64_t in_channels, out_channels;       // virtual: Ci = unshuffle^2 * Cx
  int64_t x_channels, out_phase_channels;  // Cx, and Co / shuffle^2
  int64_t unshuffle, shuffle;
  bool reflect;
  int64_t tiles_y, tiles_x, tiles;
  // element strides of x and out (channels-last: the channel stride is 1)
  int64_t x_batch, x_row, x_pixel, out_batch, out_row, out_pixel;
};

// Tiles per block: more for more channels, where each block reads all of U
// (28 to 126 tiles, as measured fastest; benchmarks/README.md).
int64_t tiles_per_block(const Geometry& g) {
  return std::clamp<int64_t>(14 * ((g.in_channels + g.out_channels) / 42), 28, 126);
}

// Row r of the padded virtual input, as a row of the map or -1 for zeros.
inline int64_t source_row(int64_t r, int64_t size, bool reflect) {
  if (r >= 0 && r < size) return r;
  if (reflect && r == -1) return 1;
  if (reflect && r == size) return size - 2;
  return -1;  // zero padding, or beyond the pad (feeds only outputs never stored)
}

// A tile's block of V or Y: [C / L vectors of channels][36 points][L lanes], so that
// each transform reads and writes its 36 vectors at fixed offsets.
template <typename T>
__attribute__((always_inline)) inline T* tile_points(T* buffer, int64_t slot, int64_t channels) {
  return buffer + slot * kPoints * channels;
}

// Channel vector by channel vector, the tile's 6x6 input pixels are loaded straight
// from x (zeros for padding) and transformed in registers, along each row, then
// down each column; only the 36 transformed vectors are stored.
template <typename T>
void input_transform(const Geometry& g, const T* x, const int64_t* channel_shifts, int64_t tile,
                     int64_t slot, T* V) {
  constexpr int64_t L = kVectorLanes<T>;
  const int64_t b = tile / (g.tiles_y * g.tiles_x);
  const int64_t y0 = (tile / g.tiles_x) % g.tiles_y * kTile - 1;
  const int64_t x0 = tile % g.tiles_x * kTile - 1;
  // Where each of the tile's pixels starts in x, or -1 for a padding zero.
  int64_t pixel[kSpan][kSpan];
  for (int i = 0; i < kSpan; ++i) {
    const int64_t row = source_row(y0 + i, g.height, g.reflect);
    for (int j = 0; j < kSpan; ++j) {
      const int64_t col = source_row(x0 + j, g.width, g.reflect);
      pixel[i][j] = row < 0 || col < 0 ? -1
                                       : b * g.x_batch + row * g.unshuffle * g.x_row +
                                             col * g.unshuffle * g.x_pixel;
    }
  }
  T* points = tile_points(V, slot, g.in_channels);
  for (int64_t v = 0; v < g.in_channels / L; ++v) {
    const T* from = x + channel_shifts[v];
    T* d = points + v * kPoints * L;
    Vec<T> rows[kSpan][kSpan];
#pragma GCC unroll 6
    for (int i = 0; i < kSpan; ++i) {
      Vec<T> pixels[kSpan];
#pragma GCC unroll 6
      for (int j = 0; j < kSpan; ++j) {
        pixels[j] = pixel[i][j] < 0 ? Vec<T>{} : load<Vec<T>>(from + pixel[i][j]);
      }
      transform(kInputTransform, pixels, 1, rows[i], 1);
    }
#pragma GCC unroll 6
    for (int j = 0; j < kSpan; ++j) {
      Vec<T> column[kSpan];
      transform(kInputTransform, &rows[0][j], kSpan, column, 1);
#pragma GCC unroll 6
      for (int i = 0; i < kSpan; ++i) store(d + (i * kSpan + j) * L, column[i]);
    }
  }
}

// Y[t, p] = V[t, p] U[p] for the block's `count` tiles t: per point a [count, Ci] x
// [Ci, Co] product, in register tiles of Rows tiles x Width vectors of output
// channels, stepping over the tile-major blocks of V and Y.
template <typename T, int Rows, int Width>
__attribute__((always_inline)) inline void product_tile(const T* V, const T* U, T* Y,
                                                        int64_t ci, int64_t co) {
  constexpr int64_t L = kVectorLanes<T>;
  Vec<T> acc[Rows][Width] = {};
  for (int64_t v = 0; v < ci / L; ++v) {
    const T* a = V + v * kPoints * L;
#pragma GCC unroll 4
    for (int64_t l = 0; l < L; ++l) {
      Vec<T> u[Width];
      for (int w = 0; w < Width; ++w) u[w] = load<Vec<T>>(U + (v * L + l) * co + w * L);
#pragma GCC unroll 16
      for (int r = 0; r < Rows; ++r) {
        for (int w = 0; w < Width; ++w) acc[r][w] += a[r * kPoints * ci + l] * u[w];
      }
    }
  }
  for (int r = 0; r < Rows; ++r) {
    for (int w = 0; w < Width; ++w) store(Y + r * kPoints * co + w * kPoints * L, acc[r][w]);
  }
}

template <typename T, int Width>
void products(const Geometry& g, const T* V, const T* U, int64_t count, T* Y) {
  constexpr int64_t L = kVectorLanes<T>;
  // Accumulators in all the registers but 4 (for u and a): 28 of AVX-512's 32 (at
  // Width 4, 24: 28 spill one), 12 of AVX2's 16.
  constexpr int kAccumulators = kVectorRegisters - 4;
  constexpr int Rows = Width == 4 && kVectorRegisters == 32 ? 6 : kAccumulators / Width;
  const int64_t ci = g.in_channels, co = g.out_channels;
  for (int64_t p = 0; p < kPoints; ++p) {
    const T* Up = U + p * ci * co;
    for (int64_t c0 = 0; c0 < co; c0 += Width * L) {
      const int64_t y_offset = c0 * kPoints + p * L;  // vector c0 / L, point p
      int64_t r = 0;
      for (; r + Rows <= count; r += Rows) {
        product_tile<T, Rows, Width>(tile_points(V, r, ci) + p * L, Up + c0,
                                     tile_points(Y, r, co) + y_offset, ci, co);
      }
      for (; r < count; ++r) {
        product_tile<T, 1, Width>(tile_points(V, r, ci) + p * L, Up + c0,
                                  tile_points(Y, r, co) + y_offset, ci, co);
      }
    }
  }
}

// The inverse: down each column of the tile's 36 products, then along its 4 rows.
template <typename T>
void output_transform(const Geometry& g, const T* Y, const T* bias, bool accumulate, bool gelu_after,
                      int64_t tile, int64_t slot, T* out) {
  constexpr int64_t L = kVectorLanes<T>;
  const int64_t b = tile / (g.tiles_y * g.tiles_x);
  const int64_t y0 = (tile / g.tiles_x) % g.tiles_y * kTile;
  const int64_t x0 = tile % g.tiles_x * kTile;
  const int rows = static_cast<int>(std::min<int64_t>(kTile, g.height - y0));
  const int cols = static_cast<int>(std::min<int64_t>(kTile, g.width - x0));
  for (int64_t c0 = 0; c0 < g.out_channels; c0 += L) {
    const int64_t phase = c0 / g.out_phase_channels;
    T* base = out + b * g.out_batch + phase / 2 * g.out_row + phase % 2 * g.out_pixel +
              c0 % g.out_phase_channels;
    const T* points = tile_points(Y, slot, g.out_channels) + c0 * kPoints;
    Vec<T> half[kTile][kSpan];
#pragma GCC unroll 6
    for (int j = 0; j < kSpan; ++j) {
      Vec<T> column[kSpan];
#pragma GCC unroll 6
      for (int i = 0; i < kSpan; ++i) {
        column[i] = load<Vec<T>>(points + (i * kSpan + j) * L);
      }
      transform(kOutputTransform, column, 1, &half[0][j], kSpan);
    }
    const Vec<T> beta = bias != nullptr ? load<Vec<T>>(bias + c0) : Vec<T>{};
#pragma GCC unroll 4
    for (int i = 0; i < kTile; ++i) {
      Vec<T> y[kTile];
      transform(kOutputTransform, half[i], 1, y, 1);
      if (i >= rows) break;
#pragma GCC unroll 4
      for (int j = 0; j < kTile; ++j) {
        if (j >= cols) break;
        T* at = base + (y0 + i) * g.shuffle * g.out_row + (x0 + j) * g.shuffle * g.out_pixel;
        Vec<T> value = y[j] + beta;
        if (accumulate) value += load<Vec<T>>(at);
        store(at, gelu_after ? gelu<T>(value) : value);
      }
    }
  }
}

template <typename T>
void convolution_kernel(const Geometry& g, const T* x, const T* U, const T* bias, bool accumulate,
                        bool gelu_after, T* out) {
  const int64_t block = tiles_per_block(g);
  const int64_t blocks = (g.tiles + block - 1) / block;
  // The widest register tile that divides Co: each broadcast of V feeds Width products
  // (4 wide was 3-12% faster than 2 at Co >= 64; benchmarks/README.md).
  const int64_t vectors = g.out_channels / kVectorLanes<T>;
  const int width = vectors % 4 == 0 ? 4 : vectors % 2 == 0 ? 2 : 1;
  // Where each vector of the convolution's input channels starts in a pixel of x:
  // its phase's pixel of the 2x2 group (unshuffle), then its channel.
  std::vector<int64_t> channel_shifts;
  for (int64_t c0 = 0; c0 < g.in_channels; c0 += kVectorLanes<T>) {
    const int64_t phase = c0 / g.x_channels;
    channel_shifts.push_back(phase / 2 * g.x_row + phase % 2 * g.x_pixel + c0 % g.x_channels);
  }
#pragma omp parallel if (g.tiles * g.in_channels * g.out_channels >= kMinParallelWork)
  {
    AlignedVector<T> V(kPoints * block * g.in_channels), Y(kPoints * block * g.out_channels);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t first = blk * block, count = std::min(block, g.tiles - first);
      for (int64_t s = 0; s < count; ++s) {
        input_transform(g, x, channel_shifts.data(), first + s, s, V.data());
      }
      switch (width) {
        case 4: products<T, 4>(g, V.data(), U, count, Y.data()); break;
        case 2: products<T, 2>(g, V.data(), U, count, Y.data()); break;
        default: products<T, 1>(g, V.data(), U, count, Y.data());
      }
      for (int64_t s = 0; s < count; ++s) {
        output_transform(g, Y.data(), bias, accumulate, gelu_after, first + s, s, out);
      }
    }
  }
}

// --------------------------------------------------------------------------
// Host side

constexpr char kOp[] = "winograd_conv3x3";

Geometry check_and_measure(const char* op, const at::Tensor& x, const at::Tensor& filter,
                           const std::optional<at::Tensor>& bias, bool reflect, int64_t unshuffle,
                           int64_t shuffle) {
  check_float_cpu(op, "x", x, x.scalar_type(), "x");
  check_float_cpu(op, "filter", filter, x.scalar_type(), "x");
  TORCH_CHECK(x.dim() == 4, op, ": x must be [B, C, H, W], got shape ", x.sizes());
  TORCH_CHECK(unshuffle == 1 || unshuffle == 2, op, ": unshuffle must be 1 or 2, got ", unshuffle);
  TORCH_CHECK(shuffle == 1 || shuffle == 2, op, ": shuffle must be 1 or 2, got ", shuffle);
  // The widest build's vector (AVX-512), whatever this build's: which layers run here
  // must not depend on the machine the extension was built for.
  static_assert(64 % kVectorBytes == 0);
  const int64_t lanes = 64 / x.element_size();
  Geometry g{};
  g.batch = x.size(0);
  g.x_channels = x.size(1);
  TORCH_CHECK(x.size(2) % unshuffle == 0 && x.size(3) % unshuffle == 0, op,
              ": with unshuffle = 2, x's height and width must be even, got shape ", x.sizes());
  g.height = x.size(2) / unshuffle;
  g.width = x.size(3) / unshuffle;
  g.in_channels = g.x_channels * unshuffle * unshuffle;
  TORCH_CHECK(g.x_channels % lanes == 0, op, ": x's channels must be a multiple of ", lanes,
              " (one vector of ", x.scalar_type(), "), got ", g.x_channels);
  TORCH_CHECK(g.height >= 1 && g.width >= 1, op, ": x must hold at least one pixel, got shape ",
              x.sizes());
  TORCH_CHECK(!reflect || (g.height >= 2 && g.width >= 2), op,
              ": reflect padding needs a map of at least 2 x 2, got ", g.height, " x ", g.width);
  TORCH_CHECK(filter.dim() == 3 && filter.size(0) == kPoints && filter.size(1) == g.in_channels,
              op, ": filter must be [36, Ci, Co] with Ci = ", g.in_channels,
              " (x's channels times unshuffle^2), got shape ", filter.sizes());
  g.out_channels = filter.size(2);
  g.out_phase_channels = g.out_channels / (shuffle * shuffle);
  TORCH_CHECK(g.out_channels % (shuffle * shuffle) == 0 && g.out_phase_channels % lanes == 0, op,
              ": the filter's Co / shuffle^2 must be a multiple of ", lanes, ", got Co = ",
              g.out_channels, " with shuffle = ", shuffle);
  if (bias.has_value()) {
    check_float_cpu(op, "bias", *bias, x.scalar_type(), "x");
    check_shape(op, "bias", *bias, {g.out_channels}, "[Co]");
  }
  g.unshuffle = unshuffle;
  g.shuffle = shuffle;
  g.reflect = reflect;
  g.tiles_y = (g.height + kTile - 1) / kTile;
  g.tiles_x = (g.width + kTile - 1) / kTile;
  g.tiles = g.batch * g.tiles_y * g.tiles_x;
  return g;
}

std::vector<int64_t> output_shape(const Geometry& g) {
  return {g.batch, g.out_phase_channels, g.height * g.shuffle, g.width * g.shuffle};
}

void run(const Geometry& geometry, const at::Tensor& x, const at::Tensor& filter,
         const std::optional<at::Tensor>& bias, bool accumulate, bool gelu, at::Tensor& out) {
  Geometry g = geometry;
  const at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor uc = filter.contiguous();
  const std::optional<at::Tensor> bc =
      bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  g.x_batch = xc.stride(0);
  g.x_row = xc.stride(2);
  g.x_pixel = xc.stride(3);
  g.out_batch = out.stride(0);
  g.out_row = out.stride(2);
  g.out_pixel = out.stride(3);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv3x3_cpu", [&] {
    convolution_kernel<scalar_t>(g, xc.const_data_ptr<scalar_t>(), uc.const_data_ptr<scalar_t>(),
                                 bc.has_value() ? bc->const_data_ptr<scalar_t>() : nullptr,
                                 accumulate, gelu, out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor winograd_conv3x3_cpu(const at::Tensor& x, const at::Tensor& filter,
                                const std::optional<at::Tensor>& bias, bool reflect,
                                int64_t unshuffle, int64_t shuffle, bool gelu) {
  const Geometry g = check_and_measure(kOp, x, filter, bias, reflect, unshuffle, shuffle);
  at::Tensor out = at::empty(output_shape(g), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  run(g, x, filter, bias, false, gelu, out);
  return out;
}

void winograd_conv3x3_inplace_cpu(at::Tensor& out, const at::Tensor& x, const at::Tensor& filter,
                                  const std::optional<at::Tensor>& bias, bool reflect,
                                  int64_t unshuffle, int64_t shuffle, bool gelu) {
  const char* op = "winograd_conv3x3_";
  const Geometry g = check_and_measure(op, x, filter, bias, reflect, unshuffle, shuffle);
  check_float_cpu(op, "out", out, x.scalar_type(), "x");
  check_shape(op, "out", out, output_shape(g), "the convolution's output shape [B, Co, H, W]");
  // The kernel reads and writes it in vectors of channels.
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast), op,
              ": out must be channels-last (torch.channels_last) to be updated in place");
  run(g, x, filter, bias, true, gelu, out);
}

}  // namespace
}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("winograd_conv3x3", &exposure_slot::cpu::winograd_conv3x3_cpu);
  m.impl("winograd_conv3x3_", &exposure_slot::cpu::winograd_conv3x3_inplace_cpu);
}
