// One slot-attention pass of one level on the GPU: forward and backward kernels of
// exposure_slot::slot_attention_pass (the CPU twin, csrc/cpu/slot_attention_pass.cpp,
// states the formulas in full).
//
// Formula. Through D stages (d = 0..D-1), from x_{-1} = k_in[b,n] (v_in for v):
//   h_d = (x_{d-1} - mean) * rstd,  rstd = 1 / sqrt(var + norm_eps)
//   x_d = (h_d * weight_d + bias_d) * m_d      m_d: the stage's modulation
//                                              (modulation.cuh), 1 if it has none
//   k = x^k_{D-1}, v = x^v_{D-1};  s_i = softmax_i(q_i . k),  A_i = s_i + attn_eps
//   attn[b,i,n] = A_i,  attn_sum[b,i] = sum_n A_i,  attn_v[b,i,:] = sum_n A_i * v
//   stats[b,n,d,:] = (mean, rstd) of the k row entering stage d, then of the v row.
// A `stats` input [B,N,S,4] (a previous pass's output) replaces the statistics of
// stages d < S: a pass given its own stats back reproduces its outputs bit for bit
// in float32 and float64 (in float16 and bfloat16 the cache holds the statistics
// rounded to the dtype, while the pass that computes them uses them unrounded).
// Backward, for gradients g_attn, g_sum, g_v of the three outputs:
//   gA_i = g_attn[i,n] + g_sum[i] + g_v[i] . v;  gl_i = s_i (gA_i - sum_j s_j gA_j)
//   gk = sum_i gl_i q_i;  g_queries_i += gl_i k;  gv = sum_i A_i g_v[i]
// then stage d = D-1 down to 0, with y_d = h_d * weight_d + bias_d:
//   gm_d = gk * y^k_d + gv * y^v_d  -> modulation_backward (bases, masks, tables)
//   gy = g * m_d;  g weight_d += gy * h_d;  g bias_d += gy;  gh = gy * weight_d
//   g x_{d-1} = rstd * (gh - mean(gh) - h_d * mean(gh * h_d))
// The backward recomputes instead of storing: the chain up to stage d is rerun
// from k_in, v_in for every stage d (D(D+1)/2 stage evaluations for D <= 8 small
// stages), and it never reads the stats cache (make_pass only checks it).
//
// Memory layout: k_in, v_in, stage bases and their gradients [B,N,C] (rows 16-byte
// aligned, common.cuh); norm weights and biases [D,C]; queries and g_v [B,K,C];
// attn, g_attn and the masks [B,K,N]; stats [B,N,D,4]. Nothing of size [B,N,C] is
// written by the forward.
//
// Launch: a grid (blocks per item, B) of kThreads-thread blocks, each over a range
// of whole tiles of one batch item, a group of G lanes per token (common.cuh).
// Forward: each group runs its token's chain and softmax; the tile (A_i and v per
// token) then goes through shared memory: attn is written along the tokens
// (coalesced), and thread c adds sum_t A_i v[c] for its channel c into column c of
// the block's partial [K sums | K x C] (its slot sums stay in registers until the
// block ends); reduce_partials() adds the blocks' partials in order. Backward: the same tiles carry the sums over tokens
// of the query, norm and table gradients into each block's partial slice
// [K x C queries | 4 x D x C norms | K_j x C per table], reduced the same way.
// All of it is bitwise repeatable.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common.cuh"
#include "modulation.cuh"

namespace exposure_slot::cuda {
namespace {

// The backward keeps about twice the rows of the forward live: half the vectors
// per lane (at least 2, so that C = 256 fits in a warp).
template <typename A>
constexpr int kBackwardVectors = kVectors<A> / 2 > 2 ? kVectors<A> / 2 : 2;

template <typename T>
struct PassArgs {
  const T* k_in;          // [B,N,C]
  const T* v_in;          // [B,N,C]
  const T* norms[4];      // [D,C] each: k weight, k bias, v weight, v bias
  const T* queries;       // [B,K,C]
  const T* known_stats;   // [B,N,S,4] or null
  int known_stages;       // S
  Factor<T> factors[kMaxFactors];
  Stage<T> stages[kMaxStages];
  int64_t tokens;         // N
  int channels, group, slots, depth;  // C, G, K, D
  double norm_eps, attn_eps;
};

// The backward's upstream gradients and per-token outputs (the bases' and masks'
// gradients are in the stages and factors).
template <typename T>
struct GradArgs {
  const T* attn;    // [B,K,N]
  const T* sum;     // [B,K]
  const T* attn_v;  // [B,K,C]
  T* k_in;          // [B,N,C]
  T* v_in;          // [B,N,C]
  int64_t norm;     // offset of the norm partials [4,D,C] in a block's slice
};

// ---------------------------------------------------------------- the chain

template <typename A>
struct Moments {
  A mean_k, rstd_k, mean_v, rstd_v;
};

// The LayerNorm statistics of a token's k and v rows: two passes over the
// registers, the mean, then the centred squares.
template <typename A, int V>
__device__ Moments<A> moments(const Row<A, V>& xk, const Row<A, V>& xv, const Lanes& l, A eps) {
  const A inv_c = A(1) / static_cast<A>(l.channels);
  const A mean_k = group_sum(lane_sum(xk, l), l.size) * inv_c;
  const A mean_v = group_sum(lane_sum(xv, l), l.size) * inv_c;
  A sq_k = A(0), sq_v = A(0);
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      if (l.valid(r, e)) {
        const A dk = xk.x[r][e] - mean_k, dv = xv.x[r][e] - mean_v;
        sq_k += dk * dk;
        sq_v += dv * dv;
      }
    }
  }
  const A var_k = group_sum(sq_k, l.size) * inv_c;
  const A var_v = group_sum(sq_v, l.size) * inv_c;
  return {mean_k, reciprocal_sqrt(var_k + eps), mean_v, reciprocal_sqrt(var_v + eps)};
}

// x <- (x - mean) * rstd on the valid channels (invalid ones stay 0).
template <typename A, int V>
__device__ inline void normalise(Row<A, V>& x, A mean, A rstd, const Lanes& l) {
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) x.x[r][e] = l.valid(r, e) ? (x.x[r][e] - mean) * rstd : A(0);
  }
}

// h <- (h * weight + bias), times mod when modulated; weight, bias: rows of [D,C].
template <typename T, typename A, int V>
__device__ inline void affine(Row<A, V>& h, const T* weight, const T* bias, bool modulated,
                              const Row<A, V>& mod, const Lanes& l) {
#pragma unroll
  for (int r = 0; r < V; ++r) {
    A w[kVec], c[kVec];
    load_vector(weight, l, r, true, w);
    load_vector(bias, l, r, true, c);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      h.x[r][e] = h.x[r][e] * w[e] + c[e];
      if (modulated) h.x[r][e] *= mod.x[r][e];
    }
  }
}

// Runs stages [0, stages) of the token's chain on xk, xv (loaded from k_in,
// v_in). The forward (Forward = true) takes the statistics of stages d <
// known_stages from the cache and writes every stage's to `stats`; otherwise
// all are computed.
template <bool Forward, typename T, typename A, int V>
__device__ void run_stages(const PassArgs<T>& p, const Token& tok, const Lanes& l, int stages,
                           Row<A, V>& xk, Row<A, V>& xv, T* stats) {
  const int64_t C = l.channels;
  for (int d = 0; d < stages; ++d) {
    Moments<A> m;
    if (Forward && d < p.known_stages) {
      m = {A(0), A(1), A(0), A(1)};
      if (tok.active) {
        const T* known = p.known_stats + (tok.row() * p.known_stages + d) * 4;
        m = {static_cast<A>(known[0]), static_cast<A>(known[1]), static_cast<A>(known[2]),
             static_cast<A>(known[3])};
      }
    } else {
      m = moments(xk, xv, l, static_cast<A>(p.norm_eps));
    }
    if (Forward && tok.active && l.lane == 0) {
      T* out = stats + (tok.row() * p.depth + d) * 4;
      out[0] = static_cast<T>(m.mean_k);
      out[1] = static_cast<T>(m.rstd_k);
      out[2] = static_cast<T>(m.mean_v);
      out[3] = static_cast<T>(m.rstd_v);
    }
    normalise(xk, m.mean_k, m.rstd_k, l);
    normalise(xv, m.mean_v, m.rstd_v, l);
    Row<A, V> mod;
    const bool modulated = !p.stages[d].empty();
    if (modulated) product(p.stages[d], p.factors, tok, l, true, -1, mod);
    affine(xk, p.norms[0] + d * C, p.norms[1] + d * C, modulated, mod, l);
    affine(xv, p.norms[2] + d * C, p.norms[3] + d * C, modulated, mod, l);
  }
}

// s[i] = softmax over the K slots of q_i . k, i < K: the token's row of the tile's
// scalars, visible to the whole group on return.
template <typename T, typename A, int V>
__device__ void slot_probs(const PassArgs<T>& p, const Token& tok, const Lanes& l,
                           const Row<A, V>& k, A* s) {
  const int64_t C = l.channels;
  const int K = p.slots;
  const T* q = p.queries + tok.b * K * C;
#pragma unroll 1
  for (int i = 0; i < K; ++i) {
    Row<A, V> qi;
    load_row(q + i * C, l, true, qi);
    const A logit = group_sum(lane_dot(qi, k, l), l.size);
    if (l.lane == 0) s[i] = logit;
  }
  __syncwarp();
  A top = s[0];
  for (int i = 1; i < K; ++i) top = s[i] > top ? s[i] : top;
  A total = A(0);
  for (int i = 0; i < K; ++i) total += exp(s[i] - top);
  const A inv = A(1) / total;
  __syncwarp();  // every lane has read the logits
  for (int i = l.lane; i < K; i += l.size) s[i] = exp(s[i] - top) * inv;
  __syncwarp();
}

// ---------------------------------------------------------------- forward

// partials [blocks, K + K * C]: each block's attn_sum, then attn_v.
// Two blocks per SM (16 warps, at most 128 registers) for the float accumulators:
// the forward is mostly memory traffic, and needs enough loads in flight.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads, sizeof(acc_t<T>) == 4 ? 2 : 1)
    slot_attention_pass_kernel(PassArgs<T> p, T* attn, T* stats, acc_t<T>* partials,
                               int64_t length) {
  using A = acc_t<T>;
  __shared__ TileStorage<A, V> storage;
  const Lanes l = Lanes::of_thread(p.channels, p.group);
  const Tile<A, V> tile{storage, kThreads / p.group, p.channels};
  const int64_t b = blockIdx.y, N = p.tokens, C = p.channels;
  const int K = p.slots, c = static_cast<int>(threadIdx.x);
  const A attn_eps = static_cast<A>(p.attn_eps);
  A* partial = partials + (b * gridDim.x + blockIdx.x) * (K + K * C);
  tile.zero(partial + K, K * C);
  A total = A(0);  // thread c < K: the block's attn_sum[c]

  const int64_t begin = blockIdx.x * length, end = std::min(begin + length, N);
  for (int64_t n0 = begin; n0 < end; n0 += tile.tokens) {
    const int64_t n = n0 + l.token;
    const Token tok = Token::at(b, n, N, n < end);
    Row<A, V> xk, xv;
    load_row(p.k_in + tok.row() * C, l, tok.active, xk);
    load_row(p.v_in + tok.row() * C, l, tok.active, xv);
    run_stages<true>(p, tok, l, p.depth, xk, xv, stats);
    A* s = tile.scalars(l);
    slot_probs(p, tok, l, xk, s);
    for (int i = l.lane; i < K; i += l.size) s[i] = tok.active ? s[i] + attn_eps : A(0);
    tile.put_row(l, tok.active, xv);
    tile.flush(K, partial + K, [&] {
      // attn along the tile's tokens (coalesced), and the slot sums.
      for (int e = c; e < K * tile.tokens; e += kThreads) {
        const int i = e / tile.tokens, t = e % tile.tokens;
        if (n0 + t < end) {
          attn[(b * K + i) * N + n0 + t] = static_cast<T>(storage.s[t * kMaxSlots + i]);
        }
      }
      if (c < K) {
        for (int t = 0; t < tile.tokens; ++t) total += storage.s[t * kMaxSlots + c];
      }
    });
  }
  if (c < K) partial[c] = total;
}

// ---------------------------------------------------------------- backward

// Back through a LayerNorm's affine and normalisation: g (in: the gradient of y =
// h * weight + bias; out: of the LayerNorm's input) with gh = g * weight:
//   g <- rstd * (gh - mean(gh) - h * mean(gh * h)).
template <typename T, typename A, int V>
__device__ inline void norm_backward(Row<A, V>& g, const Row<A, V>& h, A rstd, const T* weight,
                                     const Lanes& l) {
#pragma unroll
  for (int r = 0; r < V; ++r) {
    A w[kVec];
    load_vector(weight, l, r, true, w);
#pragma unroll
    for (int e = 0; e < kVec; ++e) g.x[r][e] *= w[e];
  }
  const A inv_c = A(1) / static_cast<A>(l.channels);
  const A mean_g = group_sum(lane_sum(g, l), l.size) * inv_c;
  const A mean_gh = group_sum(lane_dot(g, h, l), l.size) * inv_c;
#pragma unroll
  for (int r = 0; r < V; ++r) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      g.x[r][e] = l.valid(r, e) ? rstd * (g.x[r][e] - mean_g - h.x[r][e] * mean_gh) : A(0);
    }
  }
}

// Back through stage d for this token: gk, gv (in: gradients of x^k_d, x^v_d;
// out: of x_{d-1}); adds the stage's norm and table terms to the block's partial
// and writes its base and mask gradients. Block-wide (tile flushes).
template <typename T, typename A, int V>
__device__ void stage_backward(const PassArgs<T>& p, const GradArgs<T>& g, int d,
                               const Token& tok, const Lanes& l, const Tile<A, V>& tile,
                               A* partial, Row<A, V>& gk, Row<A, V>& gv) {
  const int64_t C = l.channels, D = p.depth;
  Row<A, V> hk, hv;  // the stage's normalised inputs, recomputed
  load_row(p.k_in + tok.row() * C, l, tok.active, hk);
  load_row(p.v_in + tok.row() * C, l, tok.active, hv);
  run_stages<false>(p, tok, l, d, hk, hv, static_cast<T*>(nullptr));
  const Moments<A> m = moments(hk, hv, l, static_cast<A>(p.norm_eps));
  normalise(hk, m.mean_k, m.rstd_k, l);
  normalise(hv, m.mean_v, m.rstd_v, l);

  const Stage<T>& stage = p.stages[d];
  Row<A, V> gm;  // the gradient of the stage's modulation
  if (!stage.empty()) {
    Row<A, V> mod;
    product(stage, p.factors, tok, l, true, -1, mod);
#pragma unroll
    for (int r = 0; r < V; ++r) {
      A wk[kVec], bk[kVec], wv[kVec], bv[kVec];
      load_vector(p.norms[0] + d * C, l, r, true, wk);
      load_vector(p.norms[1] + d * C, l, r, true, bk);
      load_vector(p.norms[2] + d * C, l, r, true, wv);
      load_vector(p.norms[3] + d * C, l, r, true, bv);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        gm.x[r][e] = gk.x[r][e] * (hk.x[r][e] * wk[e] + bk[e]) +
                     gv.x[r][e] * (hv.x[r][e] * wv[e] + bv[e]);
        gk.x[r][e] *= mod.x[r][e];
        gv.x[r][e] *= mod.x[r][e];
      }
    }
  }

  // The norm weights' and biases' terms: four rows [q][d] of the [4,D,C] partial,
  // one token vector each, with the scalar 1 (put once: flushes leave it).
  A* norm = partial + g.norm + d * C;
  tile.put_scalars(l, 1, tok.active, [](int) { return A(1); });
  auto flush_norm = [&](int q, const Row<A, V>& gy, const Row<A, V>& h, bool weight_term) {
    Row<A, V> u = gy;
    if (weight_term) {
#pragma unroll
      for (int r = 0; r < V; ++r) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) u.x[r][e] *= h.x[r][e];
      }
    }
    tile.put_row(l, tok.active, u);
    tile.flush(1, norm + q * D * C);
  };
  flush_norm(0, gk, hk, true);
  flush_norm(1, gk, hk, false);
  flush_norm(2, gv, hv, true);
  flush_norm(3, gv, hv, false);

  norm_backward(gk, hk, m.rstd_k, p.norms[0] + d * C, l);
  norm_backward(gv, hv, m.rstd_v, p.norms[2] + d * C, l);
  if (!stage.empty()) modulation_backward(stage, p.factors, tok, l, gm, tile, partial);
}

// partials [blocks, stride]: each block's slice [K x C queries | 4 x D x C norms |
// K_j x C per table], zeroed here, then built tile by tile.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    slot_attention_pass_backward_kernel(PassArgs<T> p, GradArgs<T> g, acc_t<T>* partials,
                                        int64_t stride, int64_t length) {
  using A = acc_t<T>;
  __shared__ TileStorage<A, V> storage;
  __shared__ A slot_scratch[kMaxTileTokens * kMaxSlots];
  const Lanes l = Lanes::of_thread(p.channels, p.group);
  const Tile<A, V> tile{storage, kThreads / p.group, p.channels};
  const int64_t b = blockIdx.y, N = p.tokens, C = p.channels;
  const int K = p.slots;
  const A attn_eps = static_cast<A>(p.attn_eps);
  A* partial = partials + (b * gridDim.x + blockIdx.x) * stride;
  tile.zero(partial, stride);
  const T* q = p.queries + b * K * C;
  const T* g_v = g.attn_v + b * K * C;

  const int64_t begin = blockIdx.x * length, end = std::min(begin + length, N);
  for (int64_t n0 = begin; n0 < end; n0 += tile.tokens) {
    const int64_t n = n0 + l.token;
    const Token tok = Token::at(b, n, N, n < end);
    Row<A, V> k, v;
    load_row(p.k_in + tok.row() * C, l, tok.active, k);
    load_row(p.v_in + tok.row() * C, l, tok.active, v);
    run_stages<false>(p, tok, l, p.depth, k, v, static_cast<T*>(nullptr));
    A* s = tile.scalars(l);  // the probabilities s_i, then the logits' gradients gl_i
    A* ga = slot_scratch + l.token * kMaxSlots;  // gA_i
    slot_probs(p, tok, l, k, s);

    // Through the softmax.
    Row<A, V> gk, gv;
    fill(gk, A(0));
    fill(gv, A(0));
    A weighted = A(0);  // sum_i s_i gA_i
#pragma unroll 1
    for (int i = 0; i < K; ++i) {
      Row<A, V> gvi;
      load_row(g_v + i * C, l, true, gvi);
      A gai = group_sum(lane_dot(gvi, v, l), l.size);
      if (tok.active) {
        gai += static_cast<A>(g.attn[(b * K + i) * N + n]) + static_cast<A>(g.sum[b * K + i]);
      }
      if (l.lane == 0) ga[i] = gai;
      const A si = s[i];
      weighted += si * gai;
      const A a = si + attn_eps;
#pragma unroll
      for (int r = 0; r < V; ++r) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) gv.x[r][e] += a * gvi.x[r][e];
      }
    }
    __syncwarp();
#pragma unroll 1
    for (int i = 0; i < K; ++i) {
      const A gl = s[i] * (ga[i] - weighted);
      Row<A, V> qi;
      load_row(q + i * C, l, true, qi);
#pragma unroll
      for (int r = 0; r < V; ++r) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) gk.x[r][e] += gl * qi.x[r][e];
      }
    }
    __syncwarp();  // every lane has read s and ga
    for (int i = l.lane; i < K; i += l.size) s[i] = tok.active ? s[i] * (ga[i] - weighted) : A(0);
    tile.put_row(l, tok.active, k);
    tile.flush(K, partial);

    for (int d = p.depth - 1; d >= 0; --d) stage_backward(p, g, d, tok, l, tile, partial, gk, gv);
    store_row(g.k_in + tok.row() * C, l, tok.active, gk);
    store_row(g.v_in + tok.row() * C, l, tok.active, gv);
  }
}

// ---------------------------------------------------------------- host

// Checks every argument (the CPU kernel's checks, plus the CUDA layout's limits)
// and fills `p` with aligned contiguous data kept alive by `storage`. A block's
// partial slice for the backward: queries [K,C] at 0, norms [4,D,C] at K * C, then
// the tables; returns its size.
template <typename T>
int64_t make_pass(const char* op, const at::Tensor& k_in, const at::Tensor& v_in,
                  const at::Tensor& norm_k_weight, const at::Tensor& norm_k_bias,
                  const at::Tensor& norm_v_weight, const at::Tensor& norm_v_bias,
                  at::TensorList stage_bases, at::IntArrayRef base_stages,
                  at::TensorList factor_masks, at::TensorList factor_tables,
                  at::IntArrayRef factor_stages, const at::Tensor& queries,
                  const std::optional<at::Tensor>& stats, double norm_eps, double attn_eps,
                  std::vector<at::Tensor>& storage, PassArgs<T>& p) {
  const at::ScalarType dtype = k_in.scalar_type();
  const at::Device device = k_in.device();
  TORCH_CHECK(k_in.dim() == 3, op, ": k_in must be [B, N, C], got shape ", k_in.sizes());
  const int64_t B = k_in.size(0), N = k_in.size(1), C = k_in.size(2);
  const int64_t D = norm_k_weight.dim() == 2 ? norm_k_weight.size(0) : 0;
  const int64_t K = queries.dim() == 3 ? queries.size(1) : 0;
  check_float_cuda(op, "v_in", v_in, dtype, "k_in", device);
  check_shape(op, "v_in", v_in, k_in.sizes(), "[B, N, C] like k_in");
  TORCH_CHECK(D >= 1, op, ": norm_k_weight must be [D, C] with D >= 1 stages, got shape ",
              norm_k_weight.sizes());
  TORCH_CHECK(D <= kMaxStages, op, ": the CUDA kernels take at most ", kMaxStages,
              " stages, got D = ", D);
  const std::pair<const char*, const at::Tensor*> norms[] = {
      {"norm_k_weight", &norm_k_weight}, {"norm_k_bias", &norm_k_bias},
      {"norm_v_weight", &norm_v_weight}, {"norm_v_bias", &norm_v_bias}};
  for (const auto& [name, t] : norms) {
    check_float_cuda(op, name, *t, dtype, "k_in", device);
    check_shape(op, name, *t, {D, C}, "[D, C] (C from k_in)");
  }
  check_float_cuda(op, "queries", queries, dtype, "k_in", device);
  TORCH_CHECK(K >= 1, op, ": queries must be [B, K, C] with K >= 1, got shape ", queries.sizes());
  check_shape(op, "queries", queries, {B, K, C}, "[B, K, C] (B, C from k_in)");
  check_slots(op, "queries", K);
  check_limits(op, B, N, C, "k_in");
  TORCH_CHECK(N >= 1, op, ": k_in must hold at least one token, got shape ", k_in.sizes());
  TORCH_CHECK(factor_stages.size() == factor_masks.size(), op, ": factor_stages has ",
              factor_stages.size(), " entries but there are ", factor_masks.size(), " factors");
  TORCH_CHECK(stage_bases.size() == base_stages.size(), op, ": base_stages has ",
              base_stages.size(), " entries but there are ", stage_bases.size(), " stage_bases");
  for (size_t j = 0; j < base_stages.size(); ++j) {
    TORCH_CHECK(base_stages[j] >= 0 && base_stages[j] < D &&
                    (j == 0 || base_stages[j] > base_stages[j - 1]),
                op, ": base_stages must be increasing stage indices in [0, ", D, "), got ",
                base_stages);
  }
  for (size_t j = 0; j < factor_stages.size(); ++j) {
    const int64_t stage = factor_stages[j];
    TORCH_CHECK(stage >= 0 && stage < D, op, ": factor_stages[", j, "] = ", stage,
                " is not a stage in [0, ", D, ")");
    TORCH_CHECK(j == 0 || stage >= factor_stages[j - 1], op,
                ": factor_stages must be sorted (factors grouped by stage), got ", factor_stages);
  }
  int64_t partial_end = K * C + 4 * D * C;
  make_factors<T>(op, factor_masks, factor_tables, B, N, C, dtype, device, storage, p.factors,
                  partial_end);
  for (int64_t d = 0; d < D; ++d) {
    int begin = 0, end = 0;
    for (const int64_t stage : factor_stages) {
      begin += stage < d;
      end += stage <= d;
    }
    const T* base = nullptr;
    for (size_t j = 0; j < base_stages.size(); ++j) {
      if (base_stages[j] != d) continue;
      const std::string name = "stage_bases[" + std::to_string(j) + "]";
      base = make_dense<T>(op, name.c_str(), stage_bases[j], B, N, C, dtype, device, storage);
    }
    p.stages[d] = {base, nullptr, begin, end};
  }

  auto keep = [&](const at::Tensor& t) {
    storage.push_back(aligned(t));
    return storage.back().const_data_ptr<T>();
  };
  p.k_in = keep(k_in);
  p.v_in = keep(v_in);
  for (int q = 0; q < 4; ++q) p.norms[q] = keep(*norms[q].second);
  p.queries = keep(queries);
  p.known_stats = nullptr;
  p.known_stages = 0;
  if (stats.has_value()) {
    check_float_cuda(op, "stats", *stats, dtype, "k_in", device);
    TORCH_CHECK(stats->dim() == 4 && stats->size(0) == B && stats->size(1) == N &&
                    stats->size(2) <= D && stats->size(3) == 4,
                op, ": stats must be [B, N, S, 4] with S <= D = ", D,
                " (a previous pass's stats output), got shape ", stats->sizes());
    p.known_stats = keep(*stats);
    p.known_stages = static_cast<int>(stats->size(2));
  }
  p.tokens = N;
  p.channels = static_cast<int>(C);
  p.slots = static_cast<int>(K);
  p.depth = static_cast<int>(D);
  p.norm_eps = norm_eps;
  p.attn_eps = attn_eps;
  return partial_end;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> slot_attention_pass_cuda(
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, double norm_eps,
    double attn_eps) {
  const char* op = "slot_attention_pass";
  at::Tensor attn, attn_sum, attn_v, stats_out;
  check_float_cuda(op, "k_in", k_in, k_in.scalar_type(), "k_in", k_in.device());
  const c10::cuda::CUDAGuard guard(k_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_in.scalar_type(),
                                  "slot_attention_pass_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVectors<A>;
    std::vector<at::Tensor> storage;
    PassArgs<scalar_t> p;
    make_pass<scalar_t>(op, k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                        stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                        queries, stats, norm_eps, attn_eps, storage, p);
    const int64_t B = k_in.size(0), N = p.tokens, C = p.channels, K = p.slots;
    attn = at::empty({B, K, N}, k_in.options());
    attn_sum = at::empty({B, K}, k_in.options());
    attn_v = at::empty({B, K, C}, k_in.options());
    stats_out = at::empty({B, N, p.depth, 4}, k_in.options());
    if (B == 0) return;
    p.group = group_size(C, V);
    const Chunking chunks(B, N, p.group);
    const at::Tensor partials = at::empty(
        {chunks.count, K + K * C}, k_in.options().dtype(c10::CppTypeToScalarType<A>::value));
    slot_attention_pass_kernel<scalar_t, V><<<chunks.grid(), kThreads, 0, stream>>>(
        p, attn.mutable_data_ptr<scalar_t>(), stats_out.mutable_data_ptr<scalar_t>(),
        partials.mutable_data_ptr<A>(), chunks.length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_partials<A, scalar_t>(partials, chunks, 0, K, true,
                                 attn_sum.mutable_data_ptr<scalar_t>(), stream);
    reduce_partials<A, scalar_t>(partials, chunks, K, K * C, true,
                                 attn_v.mutable_data_ptr<scalar_t>(), stream);
  });
  return {attn, attn_sum, attn_v, stats_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
slot_attention_pass_backward_cuda(
    const at::Tensor& grad_attn, const at::Tensor& grad_attn_sum, const at::Tensor& grad_attn_v,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, const at::Tensor& attn,
    double norm_eps, double attn_eps) {
  const char* op = "slot_attention_pass_backward";
  at::Tensor grad_k_in, grad_v_in, grad_queries;
  std::array<at::Tensor, 4> grad_norms;  // separate tensors: the schema's outputs never alias
  std::vector<at::Tensor> grad_bases, grad_masks, grad_tables;
  check_float_cuda(op, "k_in", k_in, k_in.scalar_type(), "k_in", k_in.device());
  const c10::cuda::CUDAGuard guard(k_in.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k_in.scalar_type(),
                                  "slot_attention_pass_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kBackwardVectors<A>;
    std::vector<at::Tensor> storage;
    PassArgs<scalar_t> p;
    const int64_t stride = make_pass<scalar_t>(
        op, k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
        base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
        attn_eps, storage, p);
    const int64_t B = k_in.size(0), N = p.tokens, C = p.channels, K = p.slots, D = p.depth;
    const at::Device device = k_in.device();
    check_float_cuda(op, "grad_attn", grad_attn, k_in.scalar_type(), "k_in", device);
    check_float_cuda(op, "grad_attn_sum", grad_attn_sum, k_in.scalar_type(), "k_in", device);
    check_float_cuda(op, "grad_attn_v", grad_attn_v, k_in.scalar_type(), "k_in", device);
    check_shape(op, "grad_attn", grad_attn, {B, K, N}, "[B, K, N]");
    check_shape(op, "grad_attn_sum", grad_attn_sum, {B, K}, "[B, K]");
    check_shape(op, "grad_attn_v", grad_attn_v, {B, K, C}, "[B, K, C]");
    // The forward's attn is only checked: the kernel recomputes the softmax from the
    // k row it holds (reading attn instead is for a session with a GPU to measure).
    check_float_cuda(op, "attn", attn, k_in.scalar_type(), "k_in", device);
    check_shape(op, "attn", attn, {B, K, N}, "[B, K, N] (the forward's attn)");
    const at::Tensor g_attn = grad_attn.contiguous();
    const at::Tensor g_sum = grad_attn_sum.contiguous();
    const at::Tensor g_v = aligned(grad_attn_v);

    grad_k_in = at::empty({B, N, C}, k_in.options());
    grad_v_in = at::empty({B, N, C}, k_in.options());
    for (at::Tensor& t : grad_norms) t = at::empty({D, C}, k_in.options());
    grad_queries = at::empty({B, K, C}, k_in.options());
    for (size_t j = 0; j < factor_masks.size(); ++j) {
      grad_masks.push_back(at::empty(factor_masks[j].sizes(), k_in.options()));
      grad_tables.push_back(at::empty(factor_tables[j].sizes(), k_in.options()));
      p.factors[j].grad_masks = grad_masks.back().mutable_data_ptr<scalar_t>();
    }
    for (int64_t d = 0; d < D; ++d) {
      if (p.stages[d].base == nullptr) continue;
      grad_bases.push_back(at::empty({B, N, C}, k_in.options()));
      p.stages[d].grad_base = grad_bases.back().mutable_data_ptr<scalar_t>();
    }
    if (B == 0) {  // no token: the shared gradients are empty sums
      for (at::Tensor& t : grad_norms) t.zero_();
      for (at::Tensor& t : grad_tables) t.zero_();
      return;
    }
    p.group = group_size(C, V);
    const GradArgs<scalar_t> g{g_attn.const_data_ptr<scalar_t>(), g_sum.const_data_ptr<scalar_t>(),
                               g_v.const_data_ptr<scalar_t>(), grad_k_in.mutable_data_ptr<scalar_t>(),
                               grad_v_in.mutable_data_ptr<scalar_t>(), K * C};
    const Chunking chunks(B, N, p.group);
    const at::Tensor partials =
        at::empty({chunks.count, stride}, k_in.options().dtype(c10::CppTypeToScalarType<A>::value));
    slot_attention_pass_backward_kernel<scalar_t, V><<<chunks.grid(), kThreads, 0, stream>>>(
        p, g, partials.mutable_data_ptr<A>(), stride, chunks.length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_partials<A, scalar_t>(partials, chunks, 0, K * C, true,
                                 grad_queries.mutable_data_ptr<scalar_t>(), stream);
    for (int q = 0; q < 4; ++q) {  // k weight, k bias, v weight, v bias
      reduce_partials<A, scalar_t>(partials, chunks, g.norm + q * D * C, D * C, false,
                                   grad_norms[q].mutable_data_ptr<scalar_t>(), stream);
    }
    reduce_table_grads(p.factors, static_cast<int>(factor_masks.size()), partials, chunks, C,
                       grad_tables, stream);
  });
  return {grad_k_in,     grad_v_in,  grad_norms[0], grad_norms[1], grad_norms[2],
          grad_norms[3], grad_bases, grad_masks,    grad_tables,   grad_queries};
}

}  // namespace
}  // namespace exposure_slot::cuda

TORCH_LIBRARY_IMPL(exposure_slot, CUDA, m) {
  m.impl("slot_attention_pass", &exposure_slot::cuda::slot_attention_pass_cuda);
  m.impl("slot_attention_pass_backward", &exposure_slot::cuda::slot_attention_pass_backward_cuda);
}
