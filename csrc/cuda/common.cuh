// Shared by the CUDA kernels: dtypes, the lane layout of a token's channels, group
// reductions, the token tiles that turn sums over tokens into deterministic
// per-block partials, the fixed-order reduction of those partials, and the host-side
// argument checks.
//
// Thread layout. A block has kThreads threads. Every token is handled by a *group*
// of G lanes (a power of two, aligned inside a warp), each lane holding V vectors of
// kVec consecutive channels: lane g's vector r covers channels
//   [(r * G + g) * kVec, (r * G + g) * kVec + kVec).
// G is the smallest power of two (at least kMinGroup) with G * V * kVec >= C, so a
// token's row is read with coalesced vector loads (the G lanes of a group read one
// contiguous run of G * kVec channels per vector; value by value when C is not a
// multiple of kVec) and a sum over the C channels is a per-lane sum plus log2(G)
// shuffles, which the 32 / G groups of a warp do at once. A block works on
// kThreads / G tokens at a time: a *tile*.
//
// Determinism. Nothing is accumulated with atomics. A quantity summed over tokens
// (attn_v, a weight gradient) is built per block in a fixed order -- tokens of a
// tile in order, the block's tiles in order -- into the block's own slice of a
// partials buffer, and reduce_partials() then adds the blocks' slices in block
// order. The blocks' token ranges depend on (B, N, C, dtype) only, never on the
// device, so results are bitwise repeatable.
//
// Tiles. Sums over tokens go through shared memory: each group writes its token's
// per-slot scalars s[t][r] and its C-vector u[t][:] into the tile, then thread c of
// the block adds sum_t s[t][r] * u[t][c] for its channel c (a small outer product,
// no two threads sharing an output). Every thread of the block must therefore run
// the same sequence of tile operations, including those of a tile's inactive
// tokens (past the end of the block's range), which contribute zeros.

#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace exposure_slot::cuda {

constexpr int kThreads = 256;     // threads per block, every kernel
constexpr int kVec = 4;           // channels per vector load
constexpr int kMinGroup = 4;      // lanes per token at least (bounds a tile's tokens)
constexpr int kMaxTileTokens = kThreads / kMinGroup;
constexpr int kMaxSlots = 16;     // K of the queries and of every factor
constexpr int kMaxChannels = 256;  // C (one channel per thread when summing a tile)
constexpr int kMaxFactors = 16;   // factors of one call (kernel arguments are fixed-size)
constexpr int kMaxStages = 8;     // D of a slot-attention pass
static_assert(kMaxChannels <= kThreads, "a tile's sums give each channel its own thread");

// float accumulates float16, bfloat16 and float32; double accumulates double.
template <typename T>
struct Accumulate {
  using type = float;
};
template <>
struct Accumulate<double> {
  using type = double;
};
template <typename T>
using acc_t = typename Accumulate<T>::type;

// Vectors per lane: 16 float accumulators, or 8 double ones (the same registers).
template <typename A>
constexpr int kVectors = sizeof(A) == 4 ? 4 : 2;

// ---------------------------------------------------------------- device: lanes

// kVec values of one row, loaded or stored as one vector (at most 16 bytes at a
// time; the host makes every row start 16-byte aligned, see aligned()).
template <typename T>
struct alignas(sizeof(T) * kVec > 16 ? 16 : sizeof(T) * kVec) Pack {
  T v[kVec];
};

// A token's row of C channels as seen by one lane: its V vectors.
template <typename A, int V>
struct Row {
  A x[V][kVec];
};

// Where this lane's channels lie; see the layout at the top. With C a multiple of
// kVec every vector is whole and read as one load; otherwise the last one is
// partial and rows are read value by value.
struct Lanes {
  int channels;  // C
  int size;      // G, lanes per token
  int lane;      // this lane's index in its group
  int token;     // its group's index in the block: the token's place in a tile

  __device__ static Lanes of_thread(int channels, int size) {
    const int t = static_cast<int>(threadIdx.x);
    return {channels, size, t % size, t / size};
  }
  __device__ int channel(int r) const { return (r * size + lane) * kVec; }
  __device__ bool valid(int r) const { return channel(r) < channels; }            // any of it
  __device__ bool valid(int r, int e) const { return channel(r) + e < channels; }  // value e
  __device__ bool whole_vectors() const { return channels % kVec == 0; }
};

// The token a group works on (32-bit indices: fewer registers; the host checks
// N < 2^31, and offsets into [B,N,C] tensors are computed in 64 bits).
struct Token {
  int b, n, N;
  bool active;  // false past the end of the block's range: loads read nothing

  __device__ static Token at(int64_t b, int64_t n, int64_t N, bool active) {
    return {static_cast<int>(b), static_cast<int>(n), static_cast<int>(N), active};
  }
  __device__ int64_t row() const { return static_cast<int64_t>(b) * N + n; }
};

template <typename A, int V>
__device__ inline void fill(Row<A, V>& x, A value) {
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) x.x[r][e] = value;
  }
}

// out = row[the lane's vector r], zeros where invalid or when !active. Every row
// the kernels compute keeps zeros in the invalid values too.
template <typename T, typename A>
__device__ inline void load_vector(const T* row, const Lanes& l, int r, bool active,
                                   A (&out)[kVec]) {
  if (active && l.valid(r) && l.whole_vectors()) {
    const Pack<T> p = *reinterpret_cast<const Pack<T>*>(row + l.channel(r));
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[e] = static_cast<A>(p.v[e]);
  } else {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      out[e] = active && l.valid(r, e) ? static_cast<A>(row[l.channel(r) + e]) : A(0);
    }
  }
}

// out = row[the lane's channels], zeros where invalid or when !active.
template <typename T, typename A, int V>
__device__ inline void load_row(const T* row, const Lanes& l, bool active, Row<A, V>& out) {
#pragma unroll
  for (int r = 0; r < V; ++r) load_vector(row, l, r, active, out.x[r]);
}

template <typename T, typename A, int V>
__device__ inline void store_row(T* row, const Lanes& l, bool active, const Row<A, V>& x) {
  if (!active) return;
#pragma unroll
  for (int r = 0; r < V; ++r) {
    if (l.valid(r) && l.whole_vectors()) {
      Pack<T> p;
#pragma unroll
      for (int e = 0; e < kVec; ++e) p.v[e] = static_cast<T>(x.x[r][e]);
      *reinterpret_cast<Pack<T>*>(row + l.channel(r)) = p;
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (l.valid(r, e)) row[l.channel(r) + e] = static_cast<T>(x.x[r][e]);
      }
    }
  }
}

// The sum over a group's lanes, in every lane of the group (an xor butterfly: lanes
// add the same pairs in the same order, so all hold the same bits). Every lane of
// the warp must call it with the same size.
template <typename A>
__device__ inline A group_sum(A x, int size) {
  for (int offset = size / 2; offset > 0; offset /= 2) {
    x += __shfl_xor_sync(0xffffffffu, x, offset);
  }
  return x;
}

// This lane's part of sum_c a[c] * b[c] (only the valid values: a row such as the
// normalised h holds -mean * rstd past the end until it is cleared).
template <typename A, int V>
__device__ inline A lane_dot(const Row<A, V>& a, const Row<A, V>& b, const Lanes& l) {
  A s = A(0);
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (l.valid(r, e)) s += a.x[r][e] * b.x[r][e];
    }
  }
  return s;
}

template <typename A, int V>
__device__ inline A lane_sum(const Row<A, V>& a, const Lanes& l) {
  A s = A(0);
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (l.valid(r, e)) s += a.x[r][e];
    }
  }
  return s;
}

template <typename A>
__device__ inline A reciprocal_sqrt(A x) {
  if constexpr (sizeof(A) == 4) {
    return rsqrtf(x);
  } else {
    return rsqrt(x);
  }
}

// ---------------------------------------------------------------- device: tiles

// The shared-memory staging of one tile: s [tokens][kMaxSlots] per-slot scalars
// and u [tokens][C] one vector per token. Sized for the largest tile: tokens * C
// <= kThreads * V * kVec by the choice of G.
template <typename A, int V>
struct TileStorage {
  alignas(16) A s[kMaxTileTokens * kMaxSlots];
  alignas(16) A u[kThreads * V * kVec];
};

template <typename A, int V>
struct Tile {
  TileStorage<A, V>& storage;
  int tokens;    // kThreads / G
  int channels;  // C

  // This token's row of the scalars: s[t][:], shared by the group's lanes.
  __device__ A* scalars(const Lanes& l) const { return storage.s + l.token * kMaxSlots; }

  // This group's scalars value(i), i < rows (zeros when !active); the group's
  // lanes take turns.
  template <typename Value>
  __device__ void put_scalars(const Lanes& l, int rows, bool active, const Value& value) const {
    A* s = scalars(l);
    for (int i = l.lane; i < rows; i += l.size) s[i] = active ? value(i) : A(0);
  }

  // This group's vector (zeros when !active).
  __device__ void put_row(const Lanes& l, bool active, const Row<A, V>& x) const {
    A* u = storage.u + l.token * channels;
#pragma unroll
    for (int r = 0; r < V; ++r) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        if (l.valid(r, e)) u[l.channel(r) + e] = active ? x.x[r][e] : A(0);
      }
    }
  }

  // Block-wide, once every group has put its scalars and vector: dest[r * C + c]
  // += sum_t s[t][r] * u[t][c] for r < rows, in token order. dest is the block's
  // own partial (global memory); thread c is the only one ever to touch column c
  // of it. between() runs after the first barrier, while the tile is intact.
  template <typename Between>
  __device__ void flush(int rows, A* dest, const Between& between) const {
    __syncthreads();
    between();
    const int c = static_cast<int>(threadIdx.x);
    if (c < channels) {
      A acc[kMaxSlots];
#pragma unroll
      for (int r = 0; r < kMaxSlots; ++r) acc[r] = r < rows ? dest[r * channels + c] : A(0);
#pragma unroll 1
      for (int t = 0; t < tokens; ++t) {
        const A u = storage.u[t * channels + c];
        const Pack<A>* s = reinterpret_cast<const Pack<A>*>(storage.s + t * kMaxSlots);
#pragma unroll
        for (int q = 0; q < kMaxSlots / kVec; ++q) {
          if (q * kVec < rows) {
            const Pack<A> w = s[q];  // the same address in every thread: a broadcast
#pragma unroll
            for (int e = 0; e < kVec; ++e) {
              if (q * kVec + e < rows) acc[q * kVec + e] += w.v[e] * u;
            }
          }
        }
      }
#pragma unroll
      for (int r = 0; r < kMaxSlots; ++r) {
        if (r < rows) dest[r * channels + c] = acc[r];
      }
    }
    __syncthreads();
  }

  __device__ void flush(int rows, A* dest) const {
    flush(rows, dest, [] {});
  }

  // Zeroes the block's partial [size / C, C] (each thread its own column).
  __device__ void zero(A* dest, int64_t size) const {
    const int c = static_cast<int>(threadIdx.x);
    if (c < channels) {
      for (int64_t r = 0; r < size / channels; ++r) dest[r * channels + c] = A(0);
    }
  }
};

// ---------------------------------------------------------------- device: partials

// out[g, e] = sum over members m of group g, in order, of partials[m, offset + e];
// e < size. One thread per output value.
template <typename A, typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_partials_kernel(const A* partials, int64_t stride, int64_t offset, int64_t size,
                           int64_t members, int64_t groups, T* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= groups * size) return;
  const int64_t g = i / size, e = i % size;
  const A* src = partials + g * members * stride + offset + e;
  A total = A(0);
  for (int64_t m = 0; m < members; ++m) total += src[m * stride];
  out[i] = static_cast<T>(total);
}

// ---------------------------------------------------------------- host

// Lanes per token for C channels and V vectors per lane.
inline int group_size(int64_t channels, int vectors) {
  int size = kMinGroup;
  while (size * vectors * kVec < channels) size *= 2;
  TORCH_INTERNAL_ASSERT(size <= 32, "a token's group of lanes must fit in a warp: C = ", channels,
                        " with ", vectors, " vectors per lane");
  return size;
}

// How the tokens of each batch item are cut into blocks: whole tiles, at most
// kTargetBlocks blocks in all (enough to fill a GPU several times over, few enough
// that the partials stay small next to the inputs). Depends on the shape only.
struct Chunking {
  int64_t tile;      // tokens per tile
  int64_t length;    // tokens per block (a multiple of tile)
  int64_t per_item;  // blocks per batch item (grid.x; grid.y is the batch)
  int64_t count;     // blocks in all

  static constexpr int64_t kTargetBlocks = 1024;

  Chunking(int64_t batch, int64_t tokens, int group) {
    tile = kThreads / group;
    const int64_t tiles = (tokens + tile - 1) / tile;
    const int64_t wanted = std::max<int64_t>(1, (kTargetBlocks + batch - 1) / batch);
    const int64_t tiles_per_block = (tiles + std::min(tiles, wanted) - 1) / std::min(tiles, wanted);
    length = tiles_per_block * tile;
    per_item = (tokens + length - 1) / length;
    count = batch * per_item;
  }
  dim3 grid() const { return dim3(static_cast<unsigned>(per_item), static_cast<unsigned>(count / per_item)); }
};

// out = the sum of the blocks' partials [count, stride] over [offset, offset +
// size): per batch item (out [B, size]) or over the whole batch (out [size]).
template <typename A, typename T>
void reduce_partials(const at::Tensor& partials, const Chunking& chunks, int64_t offset,
                     int64_t size, bool per_batch_item, T* out, cudaStream_t stream) {
  const int64_t groups = per_batch_item ? chunks.count / chunks.per_item : 1;
  const int64_t members = per_batch_item ? chunks.per_item : chunks.count;
  const int64_t outputs = groups * size;
  if (outputs == 0) return;
  const auto blocks = static_cast<unsigned>((outputs + kThreads - 1) / kThreads);
  reduce_partials_kernel<A, T><<<blocks, kThreads, 0, stream>>>(
      partials.const_data_ptr<A>(), partials.size(1), offset, size, members, groups, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// A float tensor on the kernels' device: CUDA, one of the four dtypes, `dtype`
// (that of `dtype_source`), on `device`.
inline void check_float_cuda(const char* op, const char* name, const at::Tensor& t,
                             at::ScalarType dtype, const char* dtype_source,
                             const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor for the CUDA kernel, got device ",
              t.device());
  TORCH_CHECK(t.device() == device, op, ": all tensors must be on one device, but ", name,
              " is on ", t.device(), " and ", dtype_source, " on ", device);
  const at::ScalarType s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kDouble || s == at::kHalf || s == at::kBFloat16, op,
              ": ", name, " must be float32, float64, float16 or bfloat16, got ", s);
  TORCH_CHECK(s == dtype, op, ": all tensors must share one dtype, but ", name, " is ", s, " and ",
              dtype_source, " is ", dtype);
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t,
                        at::IntArrayRef expected, const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must be ", layout, " = ", expected,
              ", got shape ", t.sizes());
}

// The limits of the kernels' layout: C channels spread over at most one block (a
// thread per channel when summing a tile); 32-bit token indices; the batch on
// grid.y.
inline void check_limits(const char* op, int64_t batch, int64_t tokens, int64_t channels,
                         const char* source) {
  TORCH_CHECK(channels >= 1 && channels <= kMaxChannels, op, ": the CUDA kernels take 1 to ",
              kMaxChannels, " channels C (from ", source, "), got C = ", channels);
  TORCH_CHECK(tokens < (int64_t{1} << 31), op,
              ": the CUDA kernels take fewer than 2^31 tokens N, got N = ", tokens);
  TORCH_CHECK(batch <= 65535, op, ": the CUDA kernels take a batch B of at most 65535, got B = ",
              batch);
}

inline void check_slots(const char* op, const char* name, int64_t slots) {
  TORCH_CHECK(slots >= 1 && slots <= kMaxSlots, op, ": the CUDA kernels support 1 to ", kMaxSlots,
              " slots, but ", name, " has K = ", slots);
}

// t contiguous and 16-byte aligned (when C is a multiple of kVec every row then
// starts on a vector boundary): a contiguous view at an odd storage offset is
// copied.
inline at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace exposure_slot::cuda
