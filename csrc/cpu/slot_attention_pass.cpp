// One slot-attention pass of one level on the CPU: forward and backward of
// exposure_slot::slot_attention_pass and of exposure_slot::slot_attention_pass_rows
// (a parent's pass in training), and the forward of
// exposure_slot::slot_attention_pass_hand_down (a parent's pass under inference).
//
// Formula. A level at depth D-1 sees the top level's inputs through a chain of D
// stages (SPEC section 1: every level LayerNorms its input, and a parent hands its
// child k * pf and multiplies its own k by the child's b after each iteration):
//   x_{-1}   = k_in[b,n]                                  (and v_in for the v chain)
//   h_d      = (x_{d-1} - mean) / sqrt(var + norm_eps)    LayerNorm of stage d
//   y_d      = h_d * weight_d + bias_d
//   x_d      = y_d * m_d,  m_d = the stage's modulation (mixtures.h): its base
//                             [B,N,C] (if any) times its factors (1 if neither)
//   k = x^k_{D-1}, v = x^v_{D-1}                          (k and v share every m_d)
// then, with queries q [B,K,C] (already multiplied by scale):
//   s_i = softmax_i(q_i . k),  A_i = s_i + attn_eps
//   attn[b,i,n] = A_i,  attn_sum[b,i] = sum_n A_i,  attn_v[b,i,:] = sum_n A_i * v
// so that the level's update is U = attn_v / attn_sum. Nothing of size [B,N,C] is
// written: the chain is recomputed per token from k_in, v_in, the small [B,K,N]
// masks of earlier passes and the stages' bases (a level's running modulation,
// kept as one [B,N,C] tensor per level rather than as a growing list of factors).
//
// Hand-down (a level with a child, inference): once a tile's A is known, per token
//   pf = sum_i A_i prompts_i;   hand_down = m_{D-1} * pf
//   stats[D] = LayerNorm statistics of k * pf and of v * pf
// that is, the child's modulation of its parent's stage and the statistics of its
// own first LayerNorm (its input is y_{D-1} * m_{D-1} * pf), which the child's
// passes then read instead of computing. hand_down may be the last stage's base
// (the level's running modulation, updated in place): a token's row is read by its
// chain before its tile writes it. This replaces a separate product of mixtures
// over [B,N,C] and the statistics every child's first pass computed. Instead of the
// modulation, slot_in_slot_inference's hand-downs write the child's input rows
// themselves, rows_k = k * pf and rows_v = v * pf (which may be k_in, v_in): the
// child's passes then read two rows a token and no chain. With the
// child's first queries q^c (a child starts every call from its slots_mu, so they
// are known before its parent's pass), the hand-down also runs the child's first
// pass on the tile's tokens, from rows already in L1:
//   k^c = LayerNorm_D(k * pf) * weight_D + bias_D   (and v^c from v * pf)
//   child_attn, child_attn_sum, child_attn_v        as above, with q^c, k^c, v^c
// (the child's own pass would compute (y_{D-1} * (m_{D-1} * pf)), the same values up
// to rounding). That saves the child's first pass its reads of k_in, v_in and its
// bases and its chain: a leaf child only, whose first pass has nothing to hand down.
// The child's LayerNorm is folded into its attention rather than applied to the
// rows (FoldedNorm, below), as is the LayerNorm of any pass of one stage without
// modulation (the leaf's passes on the rows its parent handed down), which then
// reads its input's rows in place.
//
// In training (slot_attention_pass_rows) a parent's pass hands down its child's
// input rows the same way, rows_k = k * pf and rows_v = v * pf, into fresh [B,N,C]
// outputs: the child's passes then run one stage over them (their own LayerNorm and
// modulation) rather than each recomputing, and differentiating, every ancestor's
// stage per token, and the rows' gradients join this pass's backward.
//
// Backward, for gradients g_attn, g_sum, g_v of the three outputs (and g_rk, g_rv
// of the rows handed down, if any):
//   gpf  = g_rk * k + g_rv * v;   g_prompts_i += A_i gpf     (the rows' mixture pf)
//   gA_i = g_attn[i,n] + g_sum[i] + g_v[i] . v + prompts_i . gpf
//   gl_i = s_i (gA_i - sum_j s_j gA_j);   gk = sum_i gl_i q_i + g_rk * pf;   gq_i += gl_i k
//   gv   = sum_i A_i g_v[i] + g_rv * pf
// then back through the chain, stage D-1 down to 0:
//   gm_d = gx^k * y^k_d + gx^v * y^v_d       -> modulation_backward_block (mixtures.h):
//                                               grad of the base, masks, tables
//   gy = gx * m_d;  g weight_d += gy * h_d;  g bias_d += gy
//   gh = gy * weight_d;  gx_{d-1} = rstd * (gh - mean(gh) - h_d * mean(gh * h_d))
// The backward recomputes the forward chain per token (D LayerNorms and the
// mixtures) instead of storing it: that would be 2D+J tensors of [B,N,C]. What comes
// stored is small: the LayerNorm statistics, the forward's `stats` output (D*4
// values a token), when the caller passes them, and the softmax, s_i = attn[i,n] -
// attn_eps from the forward's `attn` (K values a token; renormalised to sum to 1)
// instead of the K logits again (a backward ~8% faster). A pass of one stage
// without modulation that hands nothing down (a leaf's) folds its LayerNorm into
// the backward as its forward does (folded_backward_kernel).
//
// Memory layout: k_in, v_in [B,N,C] and the gradients of that shape are contiguous
// rows of C values per token; norm weights [D,C]; queries [B,K,C]; attn [B,K,N].
// The per-token chain runs one block of channels at a time through every stage in
// registers (chain_block); its output rows, and in the backward the rows it keeps,
// live in per-thread scratch of a few D*C values (L1).
//
// Parallelisation and determinism: OpenMP over the token chunks of common.h; the
// sums over tokens (attn_sum, attn_v; in the backward the query, norm and table
// gradients) go through per-chunk partials reduced in chunk order, so results are
// bitwise independent of the thread count.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <optional>
#include <type_traits>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"
#include "mixtures.h"

namespace exposure_slot::cpu {
namespace {

// What a parent level's pass hands its child, per token, with pf = (the pass's
// attn, prompts): the parent's last-stage modulation times pf
// (slot_attention_pass_hand_down), or the child's input rows k * pf and v * pf
// (slot_attention_pass_hand_down_rows_cpu).
template <typename T>
struct HandDown {
  T* modulation = nullptr;  // [B,N,C], written (may be the last stage's base)
  T* rows_k = nullptr;      // or [B,N,C] each, written (may be k_in, v_in)
  T* rows_v = nullptr;
  bool stream_rows = false;  // rows_k, rows_v written in non-temporal stores (streams)
  Factor<T> pf;             // masks: the attn output (hand_down_tile reads the same A
                            // from the tile's compact [K, kTile] block)
  const T* child_queries = nullptr;  // [B,K_c,C]: the child's first pass, or null
  int64_t child_slots = 0;           // K_c
};

// An output fusion run in the pass: out = the product of `factors`' mixtures, the
// last of which is the pass's own (attn, table), per token once its attention is
// known (slot_in_slot_inference's last leaf pass writes one of the module's outputs
// so, into the k rows the token's attention has just read).
template <typename T>
struct FusedOutput {
  std::vector<Factor<T>> factors;
  T* out = nullptr;  // [B,N,C]
};

template <typename T>
struct Pass {
  int64_t batch, tokens, channels, slots, depth;
  const T* k_in;
  const T* v_in;
  const T* norm_k_weight;  // [D,C], a hand-down's [D+1,C] (row D: its child's stage)
  const T* norm_k_bias;
  const T* norm_v_weight;
  const T* norm_v_bias;
  const T* queries;  // [B,K,C]
  const T* known_stats;  // [B,N,S,4] LayerNorm statistics of stages 0..S-1, or null
  int64_t known_stages;  // S
  T norm_eps, attn_eps;
  std::vector<Factor<T>> factors;
  std::vector<Modulation<T>> stages;  // [D]
  HandDown<T> hand_down;              // slot_attention_pass_hand_down only
  FusedOutput<T> output;              // slot_attention_pass_with_output_cpu only

  bool hands_down() const {
    return hand_down.modulation != nullptr || hand_down.rows_k != nullptr;
  }

  // Stages of the `stats` output: the pass's own, and with a hand-down its child's
  // first.
  int64_t stats_stages() const { return depth + hands_down(); }
};

// LayerNorm statistics of a token's k and v rows at one stage. Stored per token
// and stage as 4 values (the op's `stats` output), so that later passes through
// the same stage (a level's next iterations, its descendants' passes) skip them.
template <typename T>
struct NormStats {
  T mean_k, rstd_k, mean_v, rstd_v;
};

// What the backward keeps of one token's chain (one per token of a tile).
template <typename T>
struct Scratch {
  int64_t C;
  AlignedVector<T> h_k, h_v;        // [D,C] normalised inputs of each stage (backward)
  std::vector<NormStats<T>> stats;  // [D] (backward)
  AlignedVector<T> mod;             // [D,C] stage modulations made of factors
  std::vector<const T*> mod_rows;   // [D] each stage's modulation: in `mod`, its base
                                    // row itself (no factors), or null (neither)
  AlignedVector<T> values;          // [J,C] factor mixtures (backward)

  Scratch(const Pass<T>& p)
      : C(p.channels),
        h_k(p.depth * C), h_v(p.depth * C), stats(p.depth),
        mod(p.depth * C), mod_rows(p.depth), values(std::max<size_t>(p.factors.size(), 1) * C) {}
};

// The statistics from the sums over C of x - shift and of its squares, for k
// (sums[0], sums[1]) and v (sums[2], sums[3]).
template <typename T>
inline NormStats<T> finish_norm_stats(T shift_k, T shift_v, const T (&sums)[4], int64_t C,
                                      T eps) {
  auto finish = [&](T shift, T sum, T squares, T& mean, T& rstd) {
    const T shifted_mean = sum / T(C);
    const T var = std::max(squares / T(C) - shifted_mean * shifted_mean, T(0));
    mean = shift + shifted_mean;
    rstd = T(1) / std::sqrt(var + eps);
  };
  NormStats<T> st;
  finish(shift_k, sums[0], sums[1], st.mean_k, st.rstd_k);
  finish(shift_v, sums[2], sums[3], st.mean_v, st.rstd_v);
  return st;
}

// Both rows' statistics in one pass over them: sums of x - x[0] and of its
// squares (shifting by the row's first value keeps the cancellation in
// E[d^2] - E[d]^2 to that of the row's own spread). The four sums are
// independent, so their latencies overlap.
template <typename T>
inline NormStats<T> norm_stats(const T* __restrict__ xk, const T* __restrict__ xv, int64_t C,
                               T eps) {
  const T shift_k = xk[0], shift_v = xv[0];
  T acc[4][kLanes<T>] = {};
  auto add = [&](int64_t w, int64_t c) {
    const T dk = xk[c] - shift_k, dv = xv[c] - shift_v;
    acc[0][w] += dk;
    acc[1][w] += dk * dk;
    acc[2][w] += dv;
    acc[3][w] += dv * dv;
  };
  int64_t c = 0;
  for (; c + kLanes<T> <= C; c += kLanes<T>) {
    for (int64_t w = 0; w < kLanes<T>; ++w) add(w, c + w);
  }
  for (int64_t w = 0; c < C; ++c, ++w) add(w, c);
  T sums[4];
  for (int r = 0; r < 4; ++r) {
    fold<kLanes<T>>(acc[r]);
    sums[r] = sum_lanes(acc[r]);
  }
  return finish_norm_stats(shift_k, shift_v, sums, C, eps);
}

// The statistics of token `row`'s one stage (a pass of one stage): the pass's known
// ones, or from its rows xk, xv (the same values either way).
template <typename T>
inline NormStats<T> one_stage_stats(const Pass<T>& p, int64_t row, const T* xk, const T* xv) {
  if (p.known_stages == 1) {
    const T* known = p.known_stats + row * 4;
    return {known[0], known[1], known[2], known[3]};
  }
  return norm_stats(xk, xv, p.channels, p.norm_eps);
}

// What a token's chain keeps besides its output rows: nothing (a pass), its last
// stage's modulation when that has factors (a hand-down of a modulation, into a row
// `last_mod`; a hand-down of rows passes none), or
// everything the backward needs (h_d, the modulation rows, the factors' mixtures,
// into the Scratch).
enum class Kept { nothing, last_modulation, chain };

// Stages [d0, d1) of one block of channels (from c0) of a token's chain, from the
// rows xk, xv (the input of stage d0) to k_out, v_out (which may be xk, xv: a
// block is read before it is written). The block's k, v and modulation stay in
// registers from stage to stage; every stage's statistics are known.
template <Kept What, typename T, typename Block>
inline void chain_block(const Pass<T>& p, int64_t b, int64_t n, const NormStats<T>* st,
                        int64_t d0, int64_t d1, int64_t c0, Block blk, const T* xk,
                        const T* xv, Scratch<T>* s, T* last_mod, T* k_out, T* v_out) {
  using U = typename Block::Unit;
  constexpr int64_t S = Block::kStride;
  constexpr bool kChain = What == Kept::chain;
  const int64_t C = p.channels, N = p.tokens;
  U k[Block::kCapacity], v[Block::kCapacity], mod[Block::kCapacity];
  for (int64_t u = 0; u < blk.units; ++u) {
    k[u] = load<U>(xk + c0 + u * S);
    v[u] = load<U>(xv + c0 + u * S);
  }
  for (int64_t d = d0; d < d1; ++d) {
    const NormStats<T> sd = st[d];
    const int64_t at = d * C + c0;
    for (int64_t u = 0; u < blk.units; ++u) {
      const U hk = (k[u] - sd.mean_k) * sd.rstd_k, hv = (v[u] - sd.mean_v) * sd.rstd_v;
      if constexpr (kChain) {
        store(s->h_k.data() + at + u * S, hk);
        store(s->h_v.data() + at + u * S, hv);
      }
      k[u] = hk * load<U>(p.norm_k_weight + at + u * S) + load<U>(p.norm_k_bias + at + u * S);
      v[u] = hv * load<U>(p.norm_v_weight + at + u * S) + load<U>(p.norm_v_bias + at + u * S);
    }
    const Modulation<T>& m = p.stages[d];
    if (m.end > m.begin) {
      modulation_block(p.factors, m, b, n, N, C, c0, blk,
                       kChain ? s->values.data() + m.begin * C : nullptr, mod);
      const bool keep_last = last_mod != nullptr && d == p.depth - 1;
      for (int64_t u = 0; u < blk.units; ++u) {
        if constexpr (kChain) store(s->mod.data() + at + u * S, mod[u]);
        if (keep_last) store(last_mod + c0 + u * S, mod[u]);
        k[u] *= mod[u];
        v[u] *= mod[u];
      }
    } else if (m.base != nullptr) {
      const T* base = m.base + (b * N + n) * C + c0;
      for (int64_t u = 0; u < blk.units; ++u) {
        const U m_u = load<U>(base + u * S);
        k[u] *= m_u;
        v[u] *= m_u;
      }
    }
  }
  for (int64_t u = 0; u < blk.units; ++u) {
    store(k_out + c0 + u * S, k[u]);
    store(v_out + c0 + u * S, v[u]);
  }
}

// Runs the token's chain into k_out, v_out ([C] each). A stage whose statistics are
// not known takes them from its input rows, which the stages before it must have
// written first; the stages from there up to the next unknown one run block by
// block in registers. The forward takes the statistics of the first known_stages
// stages from the pass and writes every stage's to `st` (its [D] entries of the
// `stats` output); the backward (Kept::chain) takes them into `st` the same way
// and keeps what it needs in its scratch `s` (null in the forward); a hand-down's
// forward keeps its last stage's modulation in `last_mod`. The cache holds exactly
// what a pass computes (the same code on the same rows), so a result never depends
// on whether statistics came from it.
template <Kept What, typename T>
inline void run_chain(const Pass<T>& p, int64_t b, int64_t n, Scratch<T>* s, NormStats<T>* st,
                      T* last_mod, T* k_out, T* v_out) {
  const int64_t C = p.channels, N = p.tokens, D = p.depth;
  const int64_t row = b * N + n;
  const int64_t known = p.known_stages;
  const T* xk = p.k_in + row * C;
  const T* xv = p.v_in + row * C;
  for (int64_t d = 0; d < known; ++d) {
    const T* cached = p.known_stats + (row * known + d) * 4;
    st[d] = {cached[0], cached[1], cached[2], cached[3]};
  }
  for (int64_t d0 = 0; d0 < D;) {
    if (d0 >= known) st[d0] = norm_stats(xk, xv, C, p.norm_eps);
    const int64_t d1 = d0 < known ? known : d0 + 1;
    for_each_block<T>(C, [&](int64_t c0, auto blk) {
      chain_block<What>(p, b, n, st, d0, d1, c0, blk, xk, xv, s, last_mod, k_out, v_out);
    });
    xk = k_out;
    xv = v_out;
    d0 = d1;
  }
  if constexpr (What == Kept::chain) {
    for (int64_t d = 0; d < D; ++d) {
      const Modulation<T>& m = p.stages[d];
      s->mod_rows[d] = m.end > m.begin ? s->mod.data() + d * C
                      : m.base != nullptr ? m.base + row * C
                                          : nullptr;
    }
  }
}

// x[i * Width + t] <- softmax over the K slots i of each of the Width columns t
// (tokens: with the slots as rows, every step is a vector op over the tokens, in
// GCC's vector types: as loops over t the compiler left the maximum and the
// normalisation one value at a time).
template <int64_t Width, typename T>
inline void softmax_columns(T* __restrict__ x, int64_t K) {
  using V = Vec<T>;
  constexpr int64_t L = kVectorLanes<T>;
  static_assert(Width % L == 0, "the columns are whole vectors");
  for (int64_t t = 0; t < Width; t += L) {
    V top = load<V>(x + t);
    for (int64_t i = 1; i < K; ++i) {
      const V y = load<V>(x + i * Width + t);
      top = top < y ? y : top;
    }
    V total{};
    for (int64_t i = 0; i < K; ++i) {
      const V e = exp_nonpositive(load<V>(x + i * Width + t) - top);
      store(x + i * Width + t, e);
      total += e;
    }
    const V inverse = T(1) / total;
    for (int64_t i = 0; i < K; ++i) store(x + i * Width + t, load<V>(x + i * Width + t) * inverse);
  }
}

// ---------------------------------------------------------------- forward

// Both passes take the tokens of a chunk in tiles of kTile. In the forward the
// chain runs token by token (into the tile's rows of k and of v), then the tile's
// logits are a small matrix product (queries x keys, blocks of 4 slots x 4 tokens,
// dot_block; 4 x 2 with AVX2's 16 registers, where 4 x 4 spilled: its slot
// forwards ~8% faster), its softmax runs vectorised over its tokens (logits stored
// slot-major), and its A * v sums are another: kSlotGroup slots against one vector
// of channels, accumulated in registers over the tile's tokens, so that a row of
// the chunk's partial is loaded and stored once per tile rather than once per
// token. The backward sums the query gradient gl * k the same way.
constexpr int64_t kSlotGroup = 4;
constexpr int64_t kTokenGroup = kVectorRegisters == 32 ? 4 : 2;  // a logits block's tokens
static_assert(kTile % kTokenGroup == 0);

template <typename T>
struct Tile {
  int64_t slot_stride, channel_stride;  // K and C rounded up to kSlotGroup and kBlock
  AlignedVector<T> attn;                // [slot_stride, kTile]: logits, then A
  AlignedVector<T> rows;                // [kTile, channel_stride] (0 past C): the tokens'
                                        // v in the forward, their k in the backward
  AlignedVector<T> keys;                // [kTile, C]: the tokens' k (forward)
  AlignedVector<T> queries;             // [slot_stride, C]: the batch item's queries,
                                        // 0 past K (forward)
  AlignedVector<T> last_mod;            // [kTile, C]: the tokens' last-stage modulation
                                        // (a hand-down's forward)

  // The buffers of a forward (what its chains keep: nothing, or the last stage's
  // modulation) or of the backward (Kept::chain), for K slots and C channels.
  Tile(int64_t K, int64_t C, Kept what)
      : slot_stride(round_up(K, kSlotGroup)),
        channel_stride(round_up(C, kBlock<T>)),
        attn(kTile * slot_stride, T(0)),
        rows(kTile * channel_stride, T(0)),
        keys(what != Kept::chain ? kTile * C : 0, T(0)),
        queries(what != Kept::chain ? slot_stride * C : 0, T(0)),
        last_mod(what == Kept::last_modulation ? kTile * C : 0) {}
};

// Where a tile's attention reads its tokens' k and v: the tile's own rows, or (a
// pass whose LayerNorm is folded, below) the input's rows themselves.
template <typename T>
struct TileRows {
  const T* keys;    // [kTile, C]
  const T* values;  // [kTile, value_stride]
  int64_t value_stride;

  static TileRows own(const Tile<T>& tile) {
    return {tile.keys.data(), tile.rows.data(), tile.channel_stride};
  }
};

// Rows a tile's attention brings into L1 for what follows it: up to kRegions runs
// of lines (its own v, the next tile's k), a few lines after each block of its
// logits and of its A * v sums, so that the next reads find them there. A pass
// reads each token's rows once, in tiles: without this the first block of a tile's
// logits (and of its sums) waited on its rows, which the hardware prefetchers
// fetched no further ahead than a few lines (a leaf pass at N = 16384: 86-91 ->
// 77-78 ns a token on one thread, 47 -> 42 on two). Spread over the blocks rather
// than issued at once, the prefetches do not hold up the tile's own loads (all at
// the start of a tile, the leaf pass was 5-10% slower: benchmarks/HISTORY.md,
// seventeenth session).
template <typename T>
class TilePrefetch {
 public:
  static constexpr int kRegions = 2;
  static constexpr int64_t kLine = 64;

  // The `values` values from `first`.
  void add(const T* first, int64_t values) {
    if (regions_ == kRegions) return;
    begin_[regions_] = reinterpret_cast<const char*>(first);
    lines_[regions_] = (values * int64_t(sizeof(T)) + kLine - 1) / kLine;
    total_ += lines_[regions_++];
  }

  // Spread the lines over `steps` calls of step().
  void plan(int64_t steps) { per_step_ = steps > 0 ? (total_ + steps - 1) / steps : total_; }

  void step() {
    for (int64_t i = 0; i < per_step_ && region_ < regions_; ++i) {
      __builtin_prefetch(begin_[region_] + line_ * kLine, 0, 3);
      if (++line_ == lines_[region_]) {
        ++region_;
        line_ = 0;
      }
    }
  }

 private:
  const char* begin_[kRegions] = {};
  int64_t lines_[kRegions] = {};
  int regions_ = 0, region_ = 0;
  int64_t line_ = 0, total_ = 0, per_step_ = 0;
};

// The blocks tile_logits computes (dot_block calls).
template <typename T>
int64_t logit_blocks(const Tile<T>& tile, int64_t count) {
  return (count + kTokenGroup - 1) / kTokenGroup * (tile.slot_stride / kSlotGroup);
}

// tile.attn[i, t] = queries_i . keys_t for every slot (the padding's are 0) and the
// tile's tokens, rounded up to kTokenGroup (rows past `count` hold an earlier
// token's k or zeros: finite, and never read back). A group of tokens at a time,
// every slot group: each token's k is read from beyond L1 once, by the first
// block, and those reads are spread over the tile's blocks.
template <typename T>
inline void tile_logits(Tile<T>& tile, const T* keys, int64_t count, int64_t C,
                        TilePrefetch<T>& ahead) {
  for (int64_t t0 = 0; t0 < count; t0 += kTokenGroup) {
    for (int64_t i0 = 0; i0 < tile.slot_stride; i0 += kSlotGroup) {
      T dots[kSlotGroup][kTokenGroup];
      dot_block<kSlotGroup, kTokenGroup>(tile.queries.data() + i0 * C,
                                         keys + t0 * C, C, dots);
      ahead.step();
      for (int64_t g = 0; g < kSlotGroup; ++g) {
        for (int64_t r = 0; r < kTokenGroup; ++r) tile.attn[(i0 + g) * kTile + t0 + r] = dots[g][r];
      }
    }
  }
}

// The blocks tile_weighted_sums computes (weighted_row_sums' steps).
template <typename T>
int64_t weighted_sum_blocks(int64_t K, int64_t C) {
  static_assert(kSlotGroup == 4, "weighted_row_sums takes the slots four at a time");
  return (C + kBlock<T> - 1) / kBlock<T> * ((K + kSlotGroup - 1) / kSlotGroup);
}

// partial[i, :] += sum over the tile's `count` tokens t of attn[i, t] * rows[t, :]
// (rows `stride` apart), weighted_row_sums with the tile's A (or the logits'
// gradients) as the weights; `ahead` steps once per block of channels and slot group.
template <typename T>
inline void tile_weighted_sums(const Tile<T>& tile, const T* rows, int64_t stride,
                               int64_t count, int64_t K, int64_t C, T* __restrict__ partial,
                               TilePrefetch<T>& ahead) {
  weighted_row_sums(tile.attn.data(), kTile, rows, stride, count, K, C, partial,
                    [&] { ahead.step(); });
}

// A LayerNorm folded into the attention that follows it. The hand-down keeps each
// token's input to its child's LayerNorm shifted by its first value, d = x - x[0],
// rather than normalised; with mu' = mean(d), r = 1/std and the norm's w, b:
//   q . LayerNorm(x)            = r * ((q * w) . d - mu' * sum(q * w)) + q . b
//   sum_t A_t LayerNorm(v_t)    = w * (sum_t A_t r_t d_t - sum_t A_t r_t mu'_t)
//                                 + b * sum_t A_t
// So the tile's logits take the queries q * w and a correction per token and slot,
// its A * v sums the weights A * r, each chunk also sums A * r * mu' per slot, and
// the pass finishes attn_v with w and b once the chunks are reduced. The shift (as
// in the statistics) keeps d and mu' to the row's own spread rather than its mean;
// and the normalised rows are never written (a sweep over each token's rows less).
template <typename T>
struct FoldedNorm {
  const T* weight_sums = nullptr;  // [K] of the chunk's batch item: sum(q_i * w_k)
  const T* bias_dots = nullptr;    // [K]: q_i . b_k
  AlignedVector<T> mean_k, rstd_k, mean_v, rstd_v;  // [kTile]: each token's mu', r

  FoldedNorm()
      : mean_k(kTile, T(0)), rstd_k(kTile, T(0)), mean_v(kTile, T(0)), rstd_v(kTile, T(0)) {}
};

// The queries of a folded norm, once per pass: q * w_k [B,K,C], and per slot
// sum(q * w_k) and q . b_k [B,K].
template <typename T>
struct FoldedQueries {
  AlignedVector<T> queries;
  std::vector<T> weight_sums, bias_dots;

  FoldedQueries(const T* q, int64_t rows, int64_t C, const T* weight_k, const T* bias_k)
      : queries(rows * C), weight_sums(rows), bias_dots(rows) {
    for (int64_t r = 0; r < rows; ++r) {
      T weight_sum = 0, bias_dot = 0;
      for (int64_t c = 0; c < C; ++c) {
        const T qw = q[r * C + c] * weight_k[c];
        queries[r * C + c] = qw;
        weight_sum += qw;
        bias_dot += q[r * C + c] * bias_k[c];
      }
      weight_sums[r] = weight_sum;
      bias_dots[r] = bias_dot;
    }
  }
};

// The attention of a tile whose keys and rows (v) are in: its logits, the softmax
// over the K slots, + attn_eps; writes the tile's columns of attn (`attn_out` at its
// first token, rows N apart) and adds its sums over tokens to the chunk's partials
// (`v_partial` [K,C], `sum_partial` [K]; with a folded norm, `v_partial` gets the
// sums of A * r * d and `fold_partial` [K] those of A * r * mu').
template <typename T>
inline void attend_tile(Tile<T>& tile, const TileRows<T>& rows, int64_t count, int64_t K,
                        int64_t C, int64_t N, T attn_eps, T* attn_out, T* v_partial,
                        T* sum_partial, TilePrefetch<T>& ahead,
                        const FoldedNorm<T>* fold = nullptr, T* fold_partial = nullptr) {
  ahead.plan(logit_blocks(tile, count) + weighted_sum_blocks<T>(K, C));
  tile_logits(tile, rows.keys, count, C, ahead);
  if (fold != nullptr) {
    for (int64_t i = 0; i < K; ++i) {
      T* l = tile.attn.data() + i * kTile;
      const T weight_sum = fold->weight_sums[i], bias_dot = fold->bias_dots[i];
#pragma omp simd
      for (int64_t t = 0; t < kTile; ++t) {
        l[t] = fold->rstd_k[t] * (l[t] - fold->mean_k[t] * weight_sum) + bias_dot;
      }
    }
  }
  softmax_columns<kTile>(tile.attn.data(), K);
  // A slot's row of the tile in whole vectors (kTile / L of them), the tokens past
  // `count` weighted 0 in its sums. (As loops over t with a test per token, or with
  // fold's rows not known apart from attn, the compiler took them one value at a
  // time.)
  using V = Vec<T>;
  constexpr int64_t L = kVectorLanes<T>, kUnits = kTile / L;
  V counted[kUnits];
  for (int64_t u = 0; u < kUnits; ++u) {
    for (int64_t l = 0; l < L; ++l) counted[u][l] = T(u * L + l < count);
  }
  for (int64_t i = 0; i < K; ++i) {
    T* a = tile.attn.data() + i * kTile;
    T* out = attn_out + i * N;
    V total{}, shifted{};
    T partial_tile[kTile];  // A of a tile short of kTile tokens, `count` of them written
    for (int64_t u = 0; u < kUnits; ++u) {
      V x = load<V>(a + u * L) + attn_eps;
      store((count == kTile ? out : partial_tile) + u * L, x);
      x *= counted[u];
      total += x;
      if (fold != nullptr) {  // A is written: its weights become A * r
        x *= load<V>(fold->rstd_v.data() + u * L);
        shifted += x * load<V>(fold->mean_v.data() + u * L);
      }
      store(a + u * L, x);
    }
    if (count < kTile) std::copy_n(partial_tile, count, out);
    sum_partial[i] += sum_lanes(reinterpret_cast<const T*>(&total));
    if (fold != nullptr) fold_partial[i] += sum_lanes(reinterpret_cast<const T*>(&shifted));
  }
  tile_weighted_sums(tile, rows.values, rows.value_stride, count, K, C, v_partial, ahead);
}

// A hand-down for the tile's tokens, once their A is known: with
// pf = sum_i A_i * prompts_i, the child's modulation m * pf (m: the last stage's)
// into hand_down.modulation or its input rows k * pf, v * pf into hand_down.rows_k,
// rows_v, and into each token's `st` entry D the LayerNorm
// statistics of the child's first stage, whose inputs are k * pf and v * pf (the
// child computes them as y * (m * pf): the same values up to rounding). With a
// child tile, also its keys and rows: k * pf and v * pf shifted by their first
// values, and their mu' and r in `fold`.
template <typename T>
inline void hand_down_tile(const Pass<T>& p, const Tile<T>& tile, const T* attn,
                           int64_t attn_stride, int64_t b, int64_t n0, int64_t count,
                           NormStats<T>* stats, Tile<T>* child, FoldedNorm<T>* fold) {
  const int64_t N = p.tokens, C = p.channels, K = p.slots, D = p.depth;
  const T* prompts = p.hand_down.pf.rows(b, C);
  const Modulation<T>& last = p.stages[D - 1];
  for (int64_t t = 0; t < count; ++t) {
    const int64_t row = b * N + n0 + t;
    // A_i at weights[i * attn_stride]: the tile's copy of pf's masks, whose K values
    // of a token lie in one or two cache lines rather than K lines N apart (~0.1 ms
    // a pass on one thread at N = 16384), or after a folded attention, which scaled
    // the tile's, the attn output.
    const T* weights = attn + t;
    const T* mod = last.end > last.begin ? tile.last_mod.data() + t * C
                   : last.base != nullptr ? last.base + row * C
                                          : nullptr;
    const T* k = tile.keys.data() + t * C;
    const T* v = tile.rows.data() + t * tile.channel_stride;
    T* out = p.hand_down.modulation != nullptr ? p.hand_down.modulation + row * C : nullptr;
    T* out_k = p.hand_down.rows_k != nullptr ? p.hand_down.rows_k + row * C : nullptr;
    T* out_v = p.hand_down.rows_v != nullptr ? p.hand_down.rows_v + row * C : nullptr;
    T* child_k = child != nullptr ? child->keys.data() + t * C : nullptr;
    T* child_v = child != nullptr ? child->rows.data() + t * child->channel_stride : nullptr;
    // Sums shifted by each row's first value, as norm_stats takes them.
    T pf0 = 0;
    for (int64_t i = 0; i < K; ++i) pf0 += weights[i * attn_stride] * prompts[i * C];
    const T shift_k = k[0] * pf0, shift_v = v[0] * pf0;
    Vec<T> acc[4] = {};
    for_each_block<T>(C, [&](int64_t c0, auto blk) {
      using Block = decltype(blk);
      using U = typename Block::Unit;
      constexpr int64_t S = Block::kStride;
      U pf[Block::kCapacity];
      mix_block(weights, attn_stride, prompts + c0, K, C, blk, pf);
      for (int64_t u = 0; u < blk.units; ++u) {
        const int64_t c = c0 + u * S;
        const U kp = load<U>(k + c) * pf[u], vp = load<U>(v + c) * pf[u];
        if (out != nullptr) {
          store(out + c, mod != nullptr ? load<U>(mod + c) * pf[u] : pf[u]);
        } else if (p.hand_down.stream_rows) {
          store_streaming(out_k + c, kp);
          store_streaming(out_v + c, vp);
        } else {
          store(out_k + c, kp);
          store(out_v + c, vp);
        }
        const U dk = kp - shift_k, dv = vp - shift_v;
        if (child != nullptr) {
          store(child_k + c, dk);
          store(child_v + c, dv);
        }
        add_lanes<T>(acc[0], dk);
        add_lanes<T>(acc[1], dk * dk);
        add_lanes<T>(acc[2], dv);
        add_lanes<T>(acc[3], dv * dv);
      }
    });
    T sums[4];
    for (int r = 0; r < 4; ++r) sums[r] = sum_lanes(reinterpret_cast<const T*>(&acc[r]));
    const NormStats<T> st = finish_norm_stats(shift_k, shift_v, sums, C, p.norm_eps);
    stats[(n0 + t) * (D + 1) + D] = st;
    if (fold != nullptr) {
      fold->mean_k[t] = sums[0] / T(C);
      fold->rstd_k[t] = st.rstd_k;
      fold->mean_v[t] = sums[2] / T(C);
      fold->rstd_v[t] = st.rstd_v;
    }
  }
}

// A folded hand-down's tile after its attention: its k and v rows, the one stage's
// LayerNorm of the input rows `rows` with the statistics in `fold` (unshifted:
// folded_tile's), into the tile's keys and rows for the hand-down, by the chain's
// own code.
template <typename T>
inline void normalise_tile(const Pass<T>& p, int64_t b, int64_t n0, const TileRows<T>& rows,
                           int64_t count, const FoldedNorm<T>& fold, Tile<T>& tile) {
  const int64_t C = p.channels;
  for (int64_t t = 0; t < count; ++t) {
    const NormStats<T> st{fold.mean_k[t], fold.rstd_k[t], fold.mean_v[t], fold.rstd_v[t]};
    for_each_block<T>(C, [&](int64_t c0, auto blk) {
      chain_block<Kept::nothing>(p, b, n0 + t, &st, 0, 1, c0, blk, rows.keys + t * C,
                                 rows.values + t * rows.value_stride,
                                 static_cast<Scratch<T>*>(nullptr), static_cast<T*>(nullptr),
                                 tile.keys.data() + t * C,
                                 tile.rows.data() + t * tile.channel_stride);
    });
  }
}

// A folded pass's tile (forward_kernel): each token's statistics (known, or from
// its rows: the same values either way) into `fold` and into the `stats` output (its
// one stage), and where its attention reads the rows: the input's own, or copies in the
// tile where reading in place would run past the chunk (a tile short of kTile
// tokens) or past a row (C not a whole number of blocks).
template <typename T>
TileRows<T> folded_tile(const Pass<T>& p, int64_t b, int64_t n0, int64_t count, Tile<T>& tile,
                        NormStats<T>* stats, FoldedNorm<T>& fold) {
  const int64_t C = p.channels, row0 = b * p.tokens + n0;
  const T* k = p.k_in + row0 * C;
  const T* v = p.v_in + row0 * C;
  for (int64_t t = 0; t < count; ++t) {
    const NormStats<T> st = one_stage_stats(p, row0 + t, k + t * C, v + t * C);
    stats[(n0 + t) * p.stats_stages()] = st;
    fold.mean_k[t] = st.mean_k;
    fold.rstd_k[t] = st.rstd_k;
    fold.mean_v[t] = st.mean_v;
    fold.rstd_v[t] = st.rstd_v;
  }
  if (count == kTile && C % kBlock<T> == 0) return {k, v, C};
  for (int64_t t = 0; t < count; ++t) {
    std::copy_n(k + t * C, C, tile.keys.data() + t * C);
    std::copy_n(v + t * C, C, tile.rows.data() + t * tile.channel_stride);
  }
  return TileRows<T>::own(tile);
}

// A folded attention's attn_v from its chunks' sums: w_v * (sum A r v - sum A r mu)
// + b_v * sum A (FoldedNorm), for K slots of every batch item; `offset`: where a
// chunk's partial holds the sums of A r mu.
template <typename T>
void finish_folded_sums(const Partials<T>& partials, const Chunking& chunks, int64_t offset,
                        int64_t K, int64_t C, const T* weight_v, const T* bias_v,
                        const T* attn_sum, T* attn_v) {
  const int64_t rows = chunks.count / chunks.per_item * K;
  std::vector<T> shifted(rows);
  partials.reduce(chunks, offset, K, true, shifted.data(), false);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = attn_v + r * C;
    for (int64_t c = 0; c < C; ++c) {
      row[c] = weight_v[c] * (row[c] - shifted[r]) + bias_v[c] * attn_sum[r];
    }
  }
}

// The pass's outputs, and with a hand-down that runs its child's first pass
// (child_queries), the child's attn, attn_sum and attn_v.
template <typename T>
struct Outputs {
  T *attn, *attn_sum, *attn_v, *stats;
  T *child_attn = nullptr, *child_attn_sum = nullptr, *child_attn_v = nullptr;
};

template <Kept What, typename T>
void forward_kernel(const Pass<T>& p, const Outputs<T>& out) {
  const int64_t N = p.tokens, C = p.channels, K = p.slots;
  const int64_t Kc = p.hand_down.child_slots;
  const bool child_pass = What == Kept::last_modulation && p.hand_down.child_queries != nullptr;
  const int64_t stats_stages = p.stats_stages();
  const Chunking chunks(p.batch, N);
  // A pass of one stage without modulation (a leaf's passes on its parent's rows in
  // slot_in_slot_inference, a top level's first) folds its LayerNorm into its
  // attention, which reads the input's rows in place: no chain, and no copy of the
  // rows. Its means are not shifted (FoldedNorm): the rows are used as they are. A
  // hand-down does so too (its own outputs are the plain pass's, bit for bit), then
  // normalises the rows it hands down.
  const bool folded = What != Kept::chain && p.depth == 1 && p.stages[0].empty();
  // A chunk's partial: attn_v [K,C] (on a cache line) then attn_sum [K] (and a
  // folded pass's sums of A * r * mu [K]); the child's likewise, then its folded
  // norm's sums of A * r * mu' [K_c].
  Partials<T> partials(chunks.count, K + K * C + (folded ? K : 0));
  Partials<T> child_partials(child_pass ? chunks.count : 0, Kc * C + 2 * Kc);
  const int64_t D = p.depth;
  const T* child_norm[4] = {p.norm_k_weight + D * C, p.norm_k_bias + D * C,
                            p.norm_v_weight + D * C, p.norm_v_bias + D * C};
  std::optional<FoldedQueries<T>> own_queries, child_queries;
  if (folded) own_queries.emplace(p.queries, p.batch * K, C, p.norm_k_weight, p.norm_k_bias);
  if (child_pass) {
    child_queries.emplace(p.hand_down.child_queries, p.batch * Kc, C, child_norm[0],
                          child_norm[1]);
  }
  const bool parallel = p.batch * N * C * (K + Kc + 4 * p.depth) >= kMinParallelWork;
#pragma omp parallel if (parallel)
  {
    Tile<T> tile(K, C, What);
    std::optional<Tile<T>> child;
    std::optional<FoldedNorm<T>> fold, own_fold;
    if (child_pass) {
      child.emplace(Kc, C, Kept::nothing);
      fold.emplace();
    }
    if (folded) own_fold.emplace();
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
      const int64_t b = chunks.item(chunk);
      NormStats<T>* item_stats = reinterpret_cast<NormStats<T>*>(out.stats) + b * N * stats_stages;
      if (folded) {
        std::copy_n(own_queries->queries.data() + b * K * C, K * C, tile.queries.data());
        own_fold->weight_sums = own_queries->weight_sums.data() + b * K;
        own_fold->bias_dots = own_queries->bias_dots.data() + b * K;
      } else {
        std::copy_n(p.queries + b * K * C, K * C, tile.queries.data());
      }
      if (child) {
        std::copy_n(child_queries->queries.data() + b * Kc * C, Kc * C, child->queries.data());
        fold->weight_sums = child_queries->weight_sums.data() + b * Kc;
        fold->bias_dots = child_queries->bias_dots.data() + b * Kc;
      }
      T* v_partial = partials.chunk(chunk);
      const int64_t chunk_end = chunks.end(chunk, N);
      for (int64_t n0 = chunks.begin(chunk); n0 < chunk_end; n0 += kTile) {
        const int64_t count = std::min(kTile, chunk_end - n0);
        TileRows<T> rows = TileRows<T>::own(tile);
        if (folded) {
          rows = folded_tile(p, b, n0, count, tile, item_stats, *own_fold);
        } else {
          for (int64_t t = 0; t < count; ++t) {
            const int64_t n = n0 + t;
            T* last_mod = What == Kept::last_modulation && p.hand_down.modulation != nullptr
                              ? tile.last_mod.data() + t * C
                              : nullptr;
            run_chain<What, T>(p, b, n, nullptr, item_stats + n * stats_stages, last_mod,
                               tile.keys.data() + t * C,
                               tile.rows.data() + t * tile.channel_stride);
          }
        }
        // A tile read in place prefetches its own v (its sums come after its logits)
        // and the next tile's k. (A chain's rows, prefetched likewise for the next
        // tile, or its outputs for writing: nothing or slower.)
        TilePrefetch<T> ahead;
        if (rows.keys != tile.keys.data()) {
          ahead.add(rows.values, count * C);
          const int64_t next_count = std::min(kTile, chunk_end - n0 - kTile);
          if (next_count > 0) ahead.add(rows.keys + kTile * C, next_count * C);
        }
        attend_tile(tile, rows, count, K, C, N, p.attn_eps, out.attn + b * K * N + n0, v_partial,
                    v_partial + K * C, ahead, folded ? &*own_fold : nullptr,
                    folded ? v_partial + K * C + K : nullptr);
        if constexpr (What == Kept::last_modulation) {
          if (folded) normalise_tile(p, b, n0, rows, count, *own_fold, tile);
          const T* attn = folded ? out.attn + b * K * N + n0 : tile.attn.data();
          hand_down_tile(p, tile, attn, folded ? N : kTile, b, n0, count, item_stats,
                         child ? &*child : nullptr, fold ? &*fold : nullptr);
          if (child) {
            T* child_partial = child_partials.chunk(chunk);
            TilePrefetch<T> in_l1;  // the child's tile is the tile's own
            attend_tile(*child, TileRows<T>::own(*child), count, Kc, C, N, p.attn_eps,
                        out.child_attn + b * Kc * N + n0, child_partial, child_partial + Kc * C,
                        in_l1, &*fold, child_partial + Kc * C + Kc);
          }
        }
        if (p.output.out != nullptr) {  // the tile's attn is written: its mixture is known
          const Modulation<T> all{nullptr, 0, static_cast<int64_t>(p.output.factors.size())};
          for (int64_t t = 0; t < count; ++t) {
            modulation<T, 4 * kBlock<T>>(p.output.factors, all, b, n0 + t, N, C, nullptr,
                                         p.output.out + (b * N + n0 + t) * C);
          }
        }
      }
    }
    stream_fence();  // the hand-down's rows
  }
  partials.reduce(chunks, 0, K * C, true, out.attn_v, parallel);
  partials.reduce(chunks, K * C, K, true, out.attn_sum, parallel);
  if (folded) {
    finish_folded_sums(partials, chunks, K * C + K, K, C, p.norm_v_weight,
                       p.norm_v_bias, out.attn_sum, out.attn_v);
  }
  if (child_pass) {
    child_partials.reduce(chunks, 0, Kc * C, true, out.child_attn_v, parallel);
    child_partials.reduce(chunks, Kc * C, Kc, true, out.child_attn_sum, parallel);
    finish_folded_sums(child_partials, chunks, Kc * C + Kc, Kc, C, child_norm[2],
                       child_norm[3], out.child_attn_sum, out.child_attn_v);
  }
}

// ---------------------------------------------------------------- backward

struct GradPartialLayout {
  int64_t queries;                    // [K,C] of the chunk's batch item
  int64_t prompts;                    // [K,C] (a pass handing down rows)
  int64_t norm;                       // [4,D,C]: k weight, k bias, v weight, v bias
  std::vector<int64_t> tables;        // [K_j,C] each
  int64_t size;
};

template <typename T>
GradPartialLayout grad_partial_layout(const Pass<T>& p, bool rows) {
  GradPartialLayout l;
  const int64_t C = p.channels;
  l.queries = 0;
  l.prompts = p.slots * C;
  l.norm = l.prompts + (rows ? p.slots * C : 0);
  l.size = table_partial_offsets(p.factors, C, l.norm + 4 * p.depth * C, l.tables);
  return l;
}

// Back through one LayerNorm + affine: gx (in: gradient of y; out: gradient of
// the stage input x_{d-1}); adds to the weight and bias partials. One sweep over
// the blocks does the affine and both sums LayerNorm's backward needs, a second
// finishes it.
template <typename T>
inline void affine_norm_backward(const T* __restrict__ h, T rstd, const T* __restrict__ weight,
                                 int64_t C, T* __restrict__ gx, T* __restrict__ g_weight,
                                 T* __restrict__ g_bias) {
  Vec<T> sums[2] = {};  // of gh and gh * h, a vector of lanes each
  for_each_block<T>(C, [&](int64_t c0, auto blk) {
    using U = typename decltype(blk)::Unit;
    constexpr int64_t S = decltype(blk)::kStride;
    for (int64_t u = 0; u < blk.units; ++u) {
      const int64_t c = c0 + u * S;
      const U g = load<U>(gx + c), hc = load<U>(h + c);
      store(g_weight + c, load<U>(g_weight + c) + g * hc);
      store(g_bias + c, load<U>(g_bias + c) + g);
      const U gh = g * load<U>(weight + c);
      store(gx + c, gh);
      add_lanes<T>(sums[0], gh);
      add_lanes<T>(sums[1], gh * hc);
    }
  });
  const T mean_gh = sum_lanes(reinterpret_cast<const T*>(&sums[0])) / T(C);
  const T mean_ghh = sum_lanes(reinterpret_cast<const T*>(&sums[1])) / T(C);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) gx[c] = rstd * (gx[c] - mean_gh - h[c] * mean_ghh);
}

// The gradients of the rows a pass handed down, and where the prompts' goes.
template <typename T>
struct RowGrads {
  const T* k = nullptr;  // [B,N,C] each, or null: the pass handed nothing down
  const T* v = nullptr;
  T* prompts = nullptr;  // [B or 1,K,C]
};

// The attention's backward for one block of channels (from c0) of the tile's token
// t: gk = sum_i gl[i, t] k_rows_i (the logits' gradients times the queries) and
// gv = sum_i a[i, t] v_rows_i (A times the slots' gradients), [K, kTile] weights and
// [K, C] rows.
template <typename T, typename Block>
inline void slot_sums_block(const T* gl, const T* a, int64_t t, const T* __restrict__ k_rows,
                            const T* __restrict__ v_rows, int64_t K, int64_t C, int64_t c0,
                            Block blk, typename Block::Unit* __restrict__ gk,
                            typename Block::Unit* __restrict__ gv) {
  using U = typename Block::Unit;
  constexpr int64_t S = Block::kStride;
  for (int64_t u = 0; u < blk.units; ++u) gk[u] = gv[u] = U{};
  for (int64_t i = 0; i < K; ++i) {
    const T g = gl[i * kTile + t], w = a[i * kTile + t];
    for (int64_t u = 0; u < blk.units; ++u) {
      gk[u] += g * load<U>(k_rows + i * C + c0 + u * S);
      gv[u] += w * load<U>(v_rows + i * C + c0 + u * S);
    }
  }
}

// Through the softmax, for the `count` tokens of a tile from n0 at once (slots as
// rows, as softmax_columns): a[i, t] = A_i from attn, s_i = A_i - attn_eps
// renormalised (attn - attn_eps sums to 1 only up to rounding; with one slot the
// exact 1 keeps that slot's logit gradient exactly 0), gA_i = g_attn + slot_terms[i]
// + dots[i, t] (+ more_dots[i, t]), and into gl[i, t] the logits' gradient
// s_i (gA_i - sum_j s_j gA_j). [K, kTile] each; the tokens past `count` get A = 1
// and no gradient of their own (finite, and never summed).
template <typename T>
inline void softmax_backward_tile(const T* attn, const T* g_attn, int64_t N, int64_t count,
                                  int64_t K, T attn_eps, const T* slot_terms, const T* dots,
                                  const T* more_dots, T* __restrict__ a, T* __restrict__ s,
                                  T* __restrict__ gl) {
  using V = Vec<T>;
  constexpr int64_t L = kVectorLanes<T>;
  static_assert(kTile % L == 0, "a tile's tokens are whole vectors");
  for (int64_t i = 0; i < K; ++i) {
    std::copy_n(attn + i * N, count, a + i * kTile);
    std::copy_n(g_attn + i * N, count, gl + i * kTile);
    std::fill(a + i * kTile + count, a + (i + 1) * kTile, T(1));
    std::fill(gl + i * kTile + count, gl + (i + 1) * kTile, T(0));
  }
  for (int64_t t0 = 0; t0 < kTile; t0 += L) {
    V total{};
    for (int64_t i = 0; i < K; ++i) total += load<V>(a + i * kTile + t0) - attn_eps;
    V weighted{};
    for (int64_t i = 0; i < K; ++i) {
      const int64_t at = i * kTile + t0;
      const V s_i = (load<V>(a + at) - attn_eps) / total;
      V g_a = load<V>(gl + at) + load<V>(dots + at) + slot_terms[i];
      if (more_dots != nullptr) g_a += load<V>(more_dots + at);
      store(s + at, s_i);
      store(gl + at, g_a);
      weighted += s_i * g_a;
    }
    for (int64_t i = 0; i < K; ++i) {
      const int64_t at = i * kTile + t0;
      store(gl + at, load<V>(s + at) * (load<V>(gl + at) - weighted));
    }
  }
}

template <typename T>
void backward_kernel(const Pass<T>& p, const T* attn, const T* g_attn, const T* g_sum,
                     const T* g_v, const RowGrads<T>& g_rows, T* grad_k_in, T* grad_v_in,
                     const std::array<T*, 4>& grad_norms, T* grad_queries,
                     const std::vector<T*>& grad_bases, std::vector<at::Tensor>& grad_masks,
                     std::vector<at::Tensor>& grad_tables) {
  const int64_t N = p.tokens, C = p.channels, K = p.slots, D = p.depth;
  const int64_t J = static_cast<int64_t>(p.factors.size());
  const bool rows = g_rows.k != nullptr;
  const Chunking chunks(p.batch, N);
  const GradPartialLayout layout = grad_partial_layout(p, rows);
  Partials<T> partials(chunks.count, layout.size);
  std::vector<T*> grad_mask_ptrs;
  for (auto& g : grad_masks) grad_mask_ptrs.push_back(g.mutable_data_ptr<T>());
  const bool parallel = p.batch * N * C * (K + 4 * D) >= kMinParallelWork;
  const int64_t out_bytes = 2 * p.batch * N * C * int64_t(sizeof(T));  // gk and gv
  bool stream = streams(grad_k_in, C, out_bytes) && streams(grad_v_in, C, out_bytes);
  for (const T* g : grad_bases) stream = stream && (g == nullptr || streams(g, C, out_bytes));

#pragma omp parallel if (parallel)
  {
    std::vector<Scratch<T>> chains(kTile, Scratch<T>(p));  // the tile's tokens'
    Tile<T> tile(K, C, Kept::chain);  // k rows; attn: the logits' gradients gl
    // [kTile, C]: the tokens' v; with rows, their pf and the rows' gradient gpf.
    AlignedVector<T> v_rows(kTile * C), pf(rows ? kTile * C : 0), g_pf(rows ? kTile * C : 0);
    // [K, kTile]: g_v . v, prompts . gpf, A, s
    AlignedVector<T> v_dots(K * kTile), pf_dots(rows ? K * kTile : 0), a(K * kTile),
        probs(K * kTile);
    ModulationGrad<T> mod_grad(J, C);
    std::vector<T*> table_partials(J);
    AlignedVector<T> g_scratch(stream ? 3 * C : 0);  // a token's gk, gv and base gradient
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
      const int64_t b = chunks.item(chunk);
      T* partial = partials.chunk(chunk);
      T* gq_partial = partial + layout.queries;
      T* norm_partial = partial + layout.norm;
      for (int64_t j = 0; j < J; ++j) table_partials[j] = partial + layout.tables[j];
      const T* q = p.queries + b * K * C;
      const T* gv_b = g_v + b * K * C;
      const T* prompts = rows ? p.hand_down.pf.rows(b, C) : nullptr;
      for (int64_t n0 = chunks.begin(chunk); n0 < chunks.end(chunk, N); n0 += kTile) {
        const int64_t count = std::min(kTile, chunks.end(chunk, N) - n0);
        // Each token's chain (its k and v into the tile, what its backward needs into
        // its Scratch); with rows, pf and gpf = g_rk * k + g_rv * v.
        for (int64_t t = 0; t < count; ++t) {
          const int64_t n = n0 + t;
          if (n + kTile < chunks.end(chunk, N)) {  // the rows the token a tile ahead reads
            const int64_t ahead = (b * N + n + kTile) * C;
            prefetch_row(p.k_in + ahead, C);
            prefetch_row(p.v_in + ahead, C);
            for (const Modulation<T>& m : p.stages) {
              if (m.base != nullptr) prefetch_row(m.base + ahead, C);
            }
            if (rows) {
              prefetch_row(g_rows.k + ahead, C);
              prefetch_row(g_rows.v + ahead, C);
            }
          }
          Scratch<T>& s = chains[t];
          T* k = tile.rows.data() + t * tile.channel_stride;
          T* v = v_rows.data() + t * C;
          run_chain<Kept::chain, T>(p, b, n, &s, s.stats.data(), nullptr, k, v);
          if (rows) {
            const T* g_rk = g_rows.k + (b * N + n) * C;
            const T* g_rv = g_rows.v + (b * N + n) * C;
            T* pf_t = pf.data() + t * C;
            T* gpf = g_pf.data() + t * C;
            for_each_block<T>(C, [&](int64_t c0, auto blk) {
              using Block = decltype(blk);
              using U = typename Block::Unit;
              constexpr int64_t S = Block::kStride;
              U mix[Block::kCapacity];
              mix_block(attn + b * K * N + n, N, prompts + c0, K, C, blk, mix);
              for (int64_t u = 0; u < blk.units; ++u) {
                const int64_t c = c0 + u * S;
                store(pf_t + c, mix[u]);
                store(gpf + c,
                      load<U>(g_rk + c) * load<U>(k + c) + load<U>(g_rv + c) * load<U>(v + c));
              }
            });
          }
        }
        // gA's dots for the whole tile (g_v[i] . v; prompts_i . gpf, the rows' mixture
        // pf's share), then the softmax's backward: the logits' gradients gl into the
        // tile, for the query gradient (a product over the tile's tokens, below).
        row_dots(gv_b, v_rows.data(), K, count, C, v_dots.data(), kTile);
        if (rows) row_dots(prompts, g_pf.data(), K, count, C, pf_dots.data(), kTile);
        softmax_backward_tile(attn + b * K * N + n0, g_attn + b * K * N + n0, N, count, K,
                              p.attn_eps, g_sum + b * K, v_dots.data(),
                              rows ? pf_dots.data() : nullptr, a.data(), probs.data(),
                              tile.attn.data());

        for (int64_t t = 0; t < count; ++t) {
          const int64_t n = n0 + t;
          const Scratch<T>& s = chains[t];
          T* const gk_out = grad_k_in + (b * N + n) * C;
          T* const gv_out = grad_v_in + (b * N + n) * C;
          T* __restrict__ gk = stream ? g_scratch.data() : gk_out;  // streamed from scratch
          T* __restrict__ gv = stream ? g_scratch.data() + C : gv_out;
          const T* g_rk = rows ? g_rows.k + (b * N + n) * C : nullptr;
          const T* g_rv = rows ? g_rows.v + (b * N + n) * C : nullptr;
          for_each_block<T>(C, [&](int64_t c0, auto blk) {
            using Block = decltype(blk);
            using U = typename Block::Unit;
            constexpr int64_t S = Block::kStride;
            U gk_sum[Block::kCapacity], gv_sum[Block::kCapacity];
            slot_sums_block(tile.attn.data(), a.data(), t, q, gv_b, K, C, c0, blk, gk_sum, gv_sum);
            if (rows) {
              for (int64_t u = 0; u < blk.units; ++u) {
                const U pf_c = load<U>(pf.data() + t * C + c0 + u * S);
                gk_sum[u] += load<U>(g_rk + c0 + u * S) * pf_c;
                gv_sum[u] += load<U>(g_rv + c0 + u * S) * pf_c;
              }
            }
            for (int64_t u = 0; u < blk.units; ++u) {
              store(gk + c0 + u * S, gk_sum[u]);
              store(gv + c0 + u * S, gv_sum[u]);
            }
          });

          // Back through the chain, last stage first; gk, gv hold the gradients of
          // x_d and end as those of k_in, v_in.
          for (int64_t d = D - 1; d >= 0; --d) {
            const T* hk = s.h_k.data() + d * C;
            const T* hv = s.h_v.data() + d * C;
            const T* wk = p.norm_k_weight + d * C;
            const T* bk = p.norm_k_bias + d * C;
            const T* wv = p.norm_v_weight + d * C;
            const T* bv = p.norm_v_bias + d * C;
            const Modulation<T>& m = p.stages[d];
            if (!m.empty()) {
              const T* mod = s.mod_rows[d];
              T* g_base_out = grad_bases[d] != nullptr ? grad_bases[d] + (b * N + n) * C : nullptr;
              T* g_base = stream && g_base_out != nullptr ? g_scratch.data() + 2 * C : g_base_out;
              // Per block: the modulation's gradient gm (straight into its backward),
              // then gk, gv times the modulation (the gradients of the affine's output).
              for_each_block<T>(C, [&](int64_t c0, auto blk) {
                using U = typename decltype(blk)::Unit;
                constexpr int64_t S = decltype(blk)::kStride;
                U gm[decltype(blk)::kCapacity];
                for (int64_t u = 0; u < blk.units; ++u) {
                  const int64_t c = c0 + u * S;
                  const U gk_c = load<U>(gk + c), gv_c = load<U>(gv + c), mod_c = load<U>(mod + c);
                  gm[u] = gk_c * (load<U>(hk + c) * load<U>(wk + c) + load<U>(bk + c)) +
                          gv_c * (load<U>(hv + c) * load<U>(wv + c) + load<U>(bv + c));
                  store(gk + c, gk_c * mod_c);
                  store(gv + c, gv_c * mod_c);
                }
                modulation_backward_block(p.factors, m, b, n, N, c0, blk,
                                          s.values.data() + m.begin * C, gm, g_base, t,
                                          mod_grad);
              });
              if (g_base != g_base_out) stream_row(g_base_out, g_base, C);
            }
            T* gnorm = norm_partial + d * C;
            affine_norm_backward(hk, s.stats[d].rstd_k, wk, C, gk, gnorm, gnorm + D * C);
            affine_norm_backward(hv, s.stats[d].rstd_v, wv, C, gv, gnorm + 2 * D * C, gnorm + 3 * D * C);
          }
          if (stream) {
            stream_row(gk_out, gk, C);
            stream_row(gv_out, gv, C);
          }
        }
        for (const Modulation<T>& m : p.stages) {
          finish_modulation_grads(p.factors, m, b, n0, count, N, grad_mask_ptrs.data(),
                                  table_partials.data(), mod_grad);
        }
        TilePrefetch<T> nothing;
        tile_weighted_sums(tile, tile.rows.data(), tile.channel_stride, count, K, C, gq_partial,
                           nothing);
        if (rows) {  // the prompts' gradient: [K, count] A x [count, C] gpf
          weighted_row_sums(attn + b * K * N + n0, N, g_pf.data(), C, count, K, C,
                            partial + layout.prompts, [] {});
        }
      }
    }
    stream_fence();
  }
  partials.reduce(chunks, layout.queries, K * C, true, grad_queries, parallel);
  if (rows) {
    partials.reduce(chunks, layout.prompts, K * C, p.hand_down.pf.table_batched,
                    g_rows.prompts, parallel);
  }
  for (int64_t r = 0; r < 4; ++r) {  // k weight, k bias, v weight, v bias: [D,C] each
    partials.reduce(chunks, layout.norm + r * D * C, D * C, false, grad_norms[r], parallel);
  }
  reduce_table_grads(p.factors, partials, chunks, layout.tables, C, grad_tables, parallel);
}

// The backward of a pass of one stage without modulation that hands nothing down
// (a leaf's passes: on its parent's rows, or on a one-level module's inputs), with
// its LayerNorm folded in. With h = (x - mu) * r each row's normalised input,
// k = h_k * w_k + b_k, v = h_v * w_v + b_v, queries q and per slot qw_i = q_i * w_k,
// gw_i = g_v[i] * w_v:
//   g_v[i] . v        = gw_i . h_v + g_v[i] . b_v
//   gh_k = gk * w_k   = sum_i gl_i qw_i,        gh_v = gv * w_v = sum_i A_i gw_i
//   gx = r * (gh - mean(gh) - h * mean(gh * h))       (LayerNorm's backward)
// where for v both means are known per token without a sweep over gh_v:
// mean(gh_v) = sum_i A_i sum(gw_i) / C and mean(gh_v * h_v) = sum_i A_i (gw_i . h_v)
// / C, the dots gA already took. The parameters' gradients are products over
// tokens of the normalised rows, per slot (tile products, as a forward's A * v):
//   G_i = sum_n gl_i h_k,  H_i = sum_n A_i h_v,  and the sums of gl_i and of A_i;
//   g q_i = w_k * G_i + b_k sum gl_i,   g w_k = sum_i q_i * G_i,  g b_k = sum_i q_i sum gl_i,
//   g w_v = sum_i g_v[i] * H_i,  g b_v = sum_i g_v[i] sum A_i.
// Against the chain's backward this never forms k, v or their gradients, and
// takes the norms' gradients once per slot and batch item instead of per token:
// per token five products of K x C multiply-adds (gw . h_v, gh_k, gh_v, and the
// tile products G and H) where the chain's backward had those four, the chain
// recomputed and two LayerNorm backwards with their weight sums (a level-2 leaf
// pass backward, K = 7, one thread: 380 -> 250 ns a token at B = 8, N = 4096;
// 170 with its rows in the last-level cache). The tile's scalar work (the softmax's
// backward) runs over its tokens as vectors, and each token prefetches its row of
// the next tile (~10% at B = 8: the rows come from memory).
template <typename T>
void folded_backward_kernel(const Pass<T>& p, const T* attn, const T* g_attn, const T* g_sum,
                            const T* g_v, T* grad_k_in, T* grad_v_in,
                            const std::array<T*, 4>& grad_norms, T* grad_queries) {
  const int64_t B = p.batch, N = p.tokens, C = p.channels, K = p.slots;
  const Chunking chunks(B, N);
  const T* w_k = p.norm_k_weight;
  const T* b_k = p.norm_k_bias;
  const T* w_v = p.norm_v_weight;
  const T* b_v = p.norm_v_bias;
  const FoldedQueries<T> qw(p.queries, B * K, C, w_k, b_k);
  const FoldedQueries<T> gw(g_v, B * K, C, w_v, b_v);  // bias_dots: g_v[i] . b_v
  // A chunk's partial: G [K,C], H [K,C], sum gl [K], sum A [K].
  const int64_t at_h = K * C, at_gl = 2 * K * C, at_a = 2 * K * C + K;
  Partials<T> partials(chunks.count, 2 * K * C + 2 * K);
  const bool parallel = B * N * C * K >= kMinParallelWork;
  const int64_t out_bytes = 2 * B * N * C * int64_t(sizeof(T));  // gk and gv
  const bool stream = streams(grad_k_in, C, out_bytes) && streams(grad_v_in, C, out_bytes);
  // A token's sweep keeps two accumulators a unit, each a chain of K multiply-adds:
  // eight chains each in flight with AVX-512's 32 registers, four with AVX2's 16.
  constexpr int64_t kWidth = (kVectorRegisters == 32 ? 4 : 2) * kBlock<T>;
  using V = Vec<T>;
  constexpr int64_t L = kVectorLanes<T>;
  static_assert(kTile % L == 0, "a tile's tokens are whole vectors");

#pragma omp parallel if (parallel)
  {
    AlignedVector<T> h_k(kTile * C), h_v(kTile * C);  // the tile's normalised rows
    // [K, kTile] each: gw_i . h_v, gl, A, s; [K]: gA's slot terms; [kTile]: v's means
    AlignedVector<T> dots(K * kTile), gl(K * kTile), a(K * kTile), s(K * kTile), slot_terms(K);
    AlignedVector<T> mean_gh_v(kTile), mean_ghh_v(kTile), ghk_row(C);  // a token's gh_k
    AlignedVector<T> g_scratch(stream ? 2 * C : 0);  // a token's gk and gv, streamed
    std::array<T, kTile> rstd_k{}, rstd_v{};
    V counted[kTile / L];
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
      const int64_t b = chunks.item(chunk);
      T* partial = partials.chunk(chunk);
      const T* qw_b = qw.queries.data() + b * K * C;
      const T* gw_b = gw.queries.data() + b * K * C;
      for (int64_t n0 = chunks.begin(chunk); n0 < chunks.end(chunk, N); n0 += kTile) {
        const int64_t count = std::min(kTile, chunks.end(chunk, N) - n0);
        for (int64_t u = 0; u < kTile / L; ++u) {
          for (int64_t l = 0; l < L; ++l) counted[u][l] = T(u * L + l < count);
        }
        for (int64_t t = 0; t < count; ++t) {
          const int64_t row = b * N + n0 + t;
          const T* xk = p.k_in + row * C;
          const T* xv = p.v_in + row * C;
          const NormStats<T> st = one_stage_stats(p, row, xk, xv);
          rstd_k[t] = st.rstd_k;
          rstd_v[t] = st.rstd_v;
          T* hk = h_k.data() + t * C;
          T* hv = h_v.data() + t * C;
          for_each_block<T>(C, [&](int64_t c0, auto blk) {
            using U = typename decltype(blk)::Unit;
            constexpr int64_t S = decltype(blk)::kStride;
            for (int64_t u = 0; u < blk.units; ++u) {
              const int64_t c = c0 + u * S;
              store(hk + c, (load<U>(xk + c) - st.mean_k) * st.rstd_k);
              store(hv + c, (load<U>(xv + c) - st.mean_v) * st.rstd_v);
            }
          });
        }
        row_dots(gw_b, h_v.data(), K, count, C, dots.data(), kTile);  // gw_i . h_v
        // Through the softmax (gA's slot terms: g_sum + g_v[i] . b_v), then v's means
        // per token.
        for (int64_t i = 0; i < K; ++i) slot_terms[i] = g_sum[b * K + i] + gw.bias_dots[b * K + i];
        softmax_backward_tile(attn + b * K * N + n0, g_attn + b * K * N + n0, N, count, K,
                              p.attn_eps, slot_terms.data(), dots.data(),
                              static_cast<const T*>(nullptr), a.data(), s.data(), gl.data());
        for (int64_t t0 = 0; t0 < kTile; t0 += L) {
          V gh_v{}, ghh_v{};
          for (int64_t i = 0; i < K; ++i) {
            const V a_i = load<V>(a.data() + i * kTile + t0);
            gh_v += a_i * gw.weight_sums[b * K + i];
            ghh_v += a_i * load<V>(dots.data() + i * kTile + t0);
          }
          store(mean_gh_v.data() + t0, gh_v * (T(1) / T(C)));
          store(mean_ghh_v.data() + t0, ghh_v * (T(1) / T(C)));
        }
        // The tokens past `count` are left out of the sums by `counted`.
        for (int64_t i = 0; i < K; ++i) {
          V gl_total{}, a_total{};
          for (int64_t t0 = 0; t0 < kTile; t0 += L) {
            gl_total += load<V>(gl.data() + i * kTile + t0) * counted[t0 / L];
            a_total += load<V>(a.data() + i * kTile + t0) * counted[t0 / L];
          }
          partial[at_gl + i] += sum_lanes(reinterpret_cast<const T*>(&gl_total));
          partial[at_a + i] += sum_lanes(reinterpret_cast<const T*>(&a_total));
        }

        for (int64_t t = 0; t < count; ++t) {
          const int64_t n = n0 + t;
          const T* hk = h_k.data() + t * C;
          const T* hv = h_v.data() + t * C;
          T* const gk_out = grad_k_in + (b * N + n) * C;
          T* const gv_out = grad_v_in + (b * N + n) * C;
          T* __restrict__ gk = stream ? g_scratch.data() : gk_out;  // streamed from scratch
          T* __restrict__ gv = stream ? g_scratch.data() + C : gv_out;
          const T rk = rstd_k[t], rv = rstd_v[t];
          if (n + kTile < chunks.end(chunk, N)) {
            prefetch_row(p.k_in + (b * N + n + kTile) * C, C);
            prefetch_row(p.v_in + (b * N + n + kTile) * C, C);
          }
          Vec<T> sums[2] = {};  // of gh_k and gh_k * h_k
          for_each_block<T, kWidth>(C, [&](int64_t c0, auto blk) {
            using Block = decltype(blk);
            using U = typename Block::Unit;
            constexpr int64_t S = Block::kStride;
            U ghk[Block::kCapacity], ghv[Block::kCapacity];
            slot_sums_block(gl.data(), a.data(), t, qw_b, gw_b, K, C, c0, blk, ghk, ghv);
            for (int64_t u = 0; u < blk.units; ++u) {
              const int64_t c = c0 + u * S;
              const U h = load<U>(hk + c);
              store(ghk_row.data() + c, ghk[u]);
              add_lanes<T>(sums[0], ghk[u]);
              add_lanes<T>(sums[1], ghk[u] * h);
              store(gv + c, rv * (ghv[u] - mean_gh_v[t] - load<U>(hv + c) * mean_ghh_v[t]));
            }
          });
          const T mean_gh_k = sum_lanes(reinterpret_cast<const T*>(&sums[0])) / T(C);
          const T mean_ghh_k = sum_lanes(reinterpret_cast<const T*>(&sums[1])) / T(C);
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            gk[c] = rk * (ghk_row[c] - mean_gh_k - hk[c] * mean_ghh_k);
          }
          if (stream) {
            stream_row(gk_out, gk, C);
            stream_row(gv_out, gv, C);
          }
        }
        weighted_row_sums(gl.data(), kTile, h_k.data(), C, count, K, C, partial, [] {});
        weighted_row_sums(a.data(), kTile, h_v.data(), C, count, K, C, partial + at_h, [] {});
      }
    }
    stream_fence();
  }

  // Per batch item G, H and the sums; then the queries' and the norms' gradients.
  AlignedVector<T> g_sums(B * K * C), h_sums(B * K * C);
  std::vector<T> gl_sums(B * K), a_sums(B * K);
  partials.reduce(chunks, 0, K * C, true, g_sums.data(), parallel);
  partials.reduce(chunks, at_h, K * C, true, h_sums.data(), parallel);
  partials.reduce(chunks, at_gl, K, true, gl_sums.data(), false);
  partials.reduce(chunks, at_a, K, true, a_sums.data(), false);
  for (T* g : grad_norms) std::fill_n(g, C, T(0));
  for (int64_t r = 0; r < B * K; ++r) {
    const T* G = g_sums.data() + r * C;
    const T* H = h_sums.data() + r * C;
    const T* q = p.queries + r * C;
    const T* gvr = g_v + r * C;
    T* gq = grad_queries + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      gq[c] = w_k[c] * G[c] + b_k[c] * gl_sums[r];
      grad_norms[0][c] += q[c] * G[c];
      grad_norms[1][c] += q[c] * gl_sums[r];
      grad_norms[2][c] += gvr[c] * H[c];
      grad_norms[3][c] += gvr[c] * a_sums[r];
    }
  }
}

// ---------------------------------------------------------------- host wrappers

// Checks every argument and fills `p` with contiguous data; `storage` keeps the
// contiguous copies alive. The norms have `child_stages` rows past the pass's
// stages (a hand-down's: its child's first).
template <typename T>
Pass<T> make_pass(const char* op, const PassArgs& args, int64_t child_stages,
                  std::vector<at::Tensor>& storage) {
  const auto& [k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
               base_stages, factor_masks, factor_tables, factor_stages, queries, stats,
               norm_eps, attn_eps] = args;
  const at::ScalarType dtype = k_in.scalar_type();
  TORCH_CHECK(k_in.dim() == 3, op, ": k_in must be [B, N, C], got shape ", k_in.sizes());
  Pass<T> p;
  p.batch = k_in.size(0);
  p.tokens = k_in.size(1);
  p.channels = k_in.size(2);
  p.depth = norm_k_weight.dim() == 2 ? norm_k_weight.size(0) - child_stages : 0;
  p.slots = queries.dim() == 3 ? queries.size(1) : 0;
  const int64_t B = p.batch, N = p.tokens, C = p.channels, D = p.depth;
  check_float_cpu(op, "k_in", k_in, dtype, "k_in");
  check_float_cpu(op, "v_in", v_in, dtype, "k_in");
  check_shape(op, "v_in", v_in, k_in.sizes(), "[B, N, C] like k_in");
  const char* norm_shape = child_stages == 0 ? "[D, C] with D >= 1 stages"
                                             : "[D + 1, C]: D >= 1 stages and the child's";
  TORCH_CHECK(D >= 1, op, ": norm_k_weight must be ", norm_shape, ", got shape ",
              norm_k_weight.sizes());
  const std::pair<const char*, const at::Tensor*> norms[] = {
      {"norm_k_weight", &norm_k_weight}, {"norm_k_bias", &norm_k_bias},
      {"norm_v_weight", &norm_v_weight}, {"norm_v_bias", &norm_v_bias}};
  for (const auto& [name, t] : norms) {
    check_float_cpu(op, name, *t, dtype, "k_in");
    check_shape(op, name, *t, {D + child_stages, C},
                child_stages == 0 ? "[D, C] (C from k_in)" : "[D + 1, C] (C from k_in)");
  }
  check_float_cpu(op, "queries", queries, dtype, "k_in");
  TORCH_CHECK(p.slots >= 1, op, ": queries must be [B, K, C] with K >= 1, got shape ",
              queries.sizes());
  check_shape(op, "queries", queries, {B, p.slots, C}, "[B, K, C] (B, C from k_in)");
  TORCH_CHECK(N >= 1, op, ": k_in must hold at least one token, got shape ", k_in.sizes());
  TORCH_CHECK(static_cast<int64_t>(factor_stages.size()) ==
                  static_cast<int64_t>(factor_masks.size()),
              op, ": factor_stages has ", factor_stages.size(), " entries but there are ",
              factor_masks.size(), " factors");
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
                ": factor_stages must be sorted (factors grouped by stage), got ",
                factor_stages);
  }
  p.factors = make_factors<T>(op, factor_masks, factor_tables, B, N, C, dtype, storage);
  for (int64_t d = 0; d < D; ++d) {
    int64_t begin = 0, end = 0;
    for (const int64_t stage : factor_stages) {
      begin += stage < d;
      end += stage <= d;
    }
    const T* base = nullptr;
    for (size_t j = 0; j < base_stages.size(); ++j) {
      if (base_stages[j] != d) continue;
      const std::string name = "stage_bases[" + std::to_string(j) + "]";
      base = make_dense<T>(op, name.c_str(), stage_bases[j], B, N, C, dtype, storage);
    }
    p.stages.push_back({base, begin, end});
  }

  auto keep = [&](const at::Tensor& t) {
    storage.push_back(t.contiguous());
    return storage.back().const_data_ptr<T>();
  };
  p.k_in = keep(k_in);
  p.v_in = keep(v_in);
  p.norm_k_weight = keep(norm_k_weight);
  p.norm_k_bias = keep(norm_k_bias);
  p.norm_v_weight = keep(norm_v_weight);
  p.norm_v_bias = keep(norm_v_bias);
  p.queries = keep(queries);
  p.known_stats = nullptr;
  p.known_stages = 0;
  if (stats.has_value()) {
    check_float_cpu(op, "stats", *stats, dtype, "k_in");
    TORCH_CHECK(stats->dim() == 4 && stats->size(0) == B && stats->size(1) == N &&
                    stats->size(2) <= D && stats->size(3) == 4,
                op, ": stats must be [B, N, S, 4] with S <= D = ", D,
                " (a previous pass's stats output), got shape ", stats->sizes());
    p.known_stats = keep(*stats);
    p.known_stages = stats->size(2);
  }
  p.norm_eps = static_cast<T>(norm_eps);
  p.attn_eps = static_cast<T>(attn_eps);
  return p;
}

// What a hand-down takes besides a pass's arguments.
// With hand_down_v, hand_down and it get the child's input rows rather than its
// modulation.
struct HandDownArgs {
  const at::Tensor& prompts;
  at::Tensor& hand_down;
  const std::optional<at::Tensor>& child_queries;
  at::Tensor* hand_down_v = nullptr;
};

// What a pass with an output fusion takes besides a pass's arguments.
struct FusedOutputArgs {
  at::TensorList masks, tables;  // the factors before the pass's own
  const at::Tensor& own_table;   // the pass's own factor is (attn, own_table)
  at::Tensor& out;
};

// The forward of both ops: with `hd`, the hand-down's, whose last three outputs are
// its child's first pass (K_c = 0 slots without child_queries); with `fused`, a
// pass that also writes an output fusion.
HandDownOutputs forward(const char* op, const PassArgs& args, const HandDownArgs* hd,
                        const FusedOutputArgs* fused = nullptr) {
  const at::Tensor& k_in = args.k_in;
  at::Tensor attn, attn_sum, attn_v, stats_out, child_attn, child_attn_sum, child_attn_v;
  check_float_cpu(op, "k_in", k_in, k_in.scalar_type(), "k_in");
  AT_DISPATCH_FLOATING_TYPES(k_in.scalar_type(), "slot_attention_pass_cpu", [&] {
    std::vector<at::Tensor> storage;
    Pass<scalar_t> p = make_pass<scalar_t>(op, args, hd != nullptr ? 1 : 0, storage);
    const int64_t B = p.batch, N = p.tokens, C = p.channels;
    attn = at::empty({B, p.slots, N}, k_in.options());
    // A [B,N,C] tensor the pass writes in place.
    const auto check_written = [&](const char* name, const at::Tensor& t) {
      check_float_cpu(op, name, t, k_in.scalar_type(), "k_in");
      check_shape(op, name, t, k_in.sizes(), "[B, N, C] like k_in");
      TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous to be written in place");
    };
    if (hd != nullptr) {
      check_written("hand_down", hd->hand_down);
      if (hd->hand_down_v != nullptr) {
        check_written("hand_down_v", *hd->hand_down_v);
        p.hand_down.rows_k = hd->hand_down.mutable_data_ptr<scalar_t>();
        p.hand_down.rows_v = hd->hand_down_v->mutable_data_ptr<scalar_t>();
        // Fresh rows (training's) stream; rows over the inputs (inference's) are
        // lines the pass has just read.
        const int64_t bytes = 2 * B * N * C * int64_t(sizeof(scalar_t));
        p.hand_down.stream_rows = p.hand_down.rows_k != p.k_in && p.hand_down.rows_v != p.v_in &&
                                  streams(p.hand_down.rows_k, C, bytes) &&
                                  streams(p.hand_down.rows_v, C, bytes);
      } else {
        p.hand_down.modulation = hd->hand_down.mutable_data_ptr<scalar_t>();
      }
      p.hand_down.pf = make_factor<scalar_t>(op, attn, "attn", hd->prompts, "prompts", B, N, C,
                                             k_in.scalar_type(), storage);
      if (hd->child_queries.has_value()) {
        const at::Tensor& q = *hd->child_queries;
        check_float_cpu(op, "child_queries", q, k_in.scalar_type(), "k_in");
        TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) >= 1 && q.size(2) == C, op,
                    ": child_queries must be [B, K_c, C] with K_c >= 1 (B, C from k_in), got "
                    "shape ", q.sizes());
        storage.push_back(q.contiguous());
        p.hand_down.child_queries = storage.back().const_data_ptr<scalar_t>();
        p.hand_down.child_slots = q.size(1);
      }
    }
    if (fused != nullptr) {
      check_written("out", fused->out);
      p.output.factors = make_factors<scalar_t>(op, fused->masks, fused->tables, B, N, C,
                                                k_in.scalar_type(), storage);
      p.output.factors.push_back(make_factor<scalar_t>(op, attn, "attn", fused->own_table,
                                                       "own_table", B, N, C,
                                                       k_in.scalar_type(), storage));
      p.output.out = fused->out.mutable_data_ptr<scalar_t>();
    }
    const int64_t Kc = p.hand_down.child_slots;
    attn_sum = at::empty({B, p.slots}, k_in.options());
    attn_v = at::empty({B, p.slots, C}, k_in.options());
    stats_out = at::empty({B, N, p.stats_stages(), 4}, k_in.options());
    child_attn = at::empty({B, Kc, N}, k_in.options());
    child_attn_sum = at::empty({B, Kc}, k_in.options());
    child_attn_v = at::empty({B, Kc, C}, k_in.options());
    const Outputs<scalar_t> out{attn.mutable_data_ptr<scalar_t>(),
                                attn_sum.mutable_data_ptr<scalar_t>(),
                                attn_v.mutable_data_ptr<scalar_t>(),
                                stats_out.mutable_data_ptr<scalar_t>(),
                                child_attn.mutable_data_ptr<scalar_t>(),
                                child_attn_sum.mutable_data_ptr<scalar_t>(),
                                child_attn_v.mutable_data_ptr<scalar_t>()};
    if (hd != nullptr) {
      forward_kernel<Kept::last_modulation, scalar_t>(p, out);
    } else {
      forward_kernel<Kept::nothing, scalar_t>(p, out);
    }
  });
  return {attn, attn_sum, attn_v, stats_out, child_attn, child_attn_sum, child_attn_v};
}

}  // namespace

PassOutputs slot_attention_pass_cpu(const PassArgs& args) {
  auto [attn, attn_sum, attn_v, stats_out, _a, _s, _v] =
      forward("slot_attention_pass", args, nullptr);
  return {attn, attn_sum, attn_v, stats_out};
}

PassOutputs slot_attention_pass_with_output_cpu(const PassArgs& args, at::TensorList out_masks,
                                                at::TensorList out_tables,
                                                const at::Tensor& own_table, at::Tensor& out) {
  const FusedOutputArgs fused{out_masks, out_tables, own_table, out};
  auto [attn, attn_sum, attn_v, stats_out, _a, _s, _v] =
      forward("slot_attention_pass", args, nullptr, &fused);
  return {attn, attn_sum, attn_v, stats_out};
}

HandDownOutputs slot_attention_pass_hand_down_cpu(const PassArgs& args, const at::Tensor& prompts,
                                                  at::Tensor& hand_down,
                                                  const std::optional<at::Tensor>& child_queries) {
  const HandDownArgs hd{prompts, hand_down, child_queries};
  return forward("slot_attention_pass_hand_down", args, &hd);
}

HandDownOutputs slot_attention_pass_hand_down_rows_cpu(
    const PassArgs& args, const at::Tensor& prompts, at::Tensor& rows_k, at::Tensor& rows_v,
    const std::optional<at::Tensor>& child_queries) {
  const HandDownArgs hd{prompts, rows_k, child_queries, &rows_v};
  return forward("slot_attention_pass_hand_down", args, &hd);
}

namespace {

// What slot_attention_pass_rows' backward takes besides a pass's: the gradients of
// the rows it handed down and the prompts of their mixture.
struct RowsBackwardArgs {
  const at::Tensor& grad_rows_k;
  const at::Tensor& grad_rows_v;
  const at::Tensor& prompts;
};

// The gradients of a pass's inputs: k_in, v_in, the four norms (separate tensors:
// the schemas' outputs never alias; a rows pass's have its child's row, zero), the
// stage bases, the factors' masks and tables, the queries, and a rows pass's prompts
// (undefined otherwise).
struct PassGrads {
  at::Tensor k_in, v_in;
  std::array<at::Tensor, 4> norms;
  std::vector<at::Tensor> bases, masks, tables;
  at::Tensor queries, prompts;
};

// Both backward ops: with `rows`, slot_attention_pass_rows', whose norms have their
// child's row and whose forward's stats its child's stage.
PassGrads backward(const char* op, const at::Tensor& grad_attn, const at::Tensor& grad_attn_sum,
                   const at::Tensor& grad_attn_v, const PassArgs& args, const at::Tensor& attn,
                   const RowsBackwardArgs* rows) {
  const at::Tensor& k_in = args.k_in;
  PassGrads grads;
  check_float_cpu(op, "k_in", k_in, k_in.scalar_type(), "k_in");
  AT_DISPATCH_FLOATING_TYPES(k_in.scalar_type(), "slot_attention_pass_backward_cpu", [&] {
    std::vector<at::Tensor> storage;
    // A rows pass's forward's stats end with its child's stage, past its chain's.
    std::optional<at::Tensor> chain_stats = args.stats;
    const int64_t depth = args.norm_k_weight.dim() == 2 ? args.norm_k_weight.size(0) - 1 : 0;
    if (rows != nullptr && chain_stats && chain_stats->dim() == 4 && depth >= 1 &&
        chain_stats->size(2) == depth + 1) {
      chain_stats = chain_stats->narrow(2, 0, depth);
    }
    Pass<scalar_t> p = make_pass<scalar_t>(
        op,
        PassArgs{args.k_in, args.v_in, args.norm_k_weight, args.norm_k_bias, args.norm_v_weight,
                 args.norm_v_bias, args.stage_bases, args.base_stages, args.factor_masks,
                 args.factor_tables, args.factor_stages, args.queries, chain_stats,
                 args.norm_eps, args.attn_eps},
        rows != nullptr ? 1 : 0, storage);
    const int64_t B = p.batch, K = p.slots, N = p.tokens, C = p.channels;
    check_float_cpu(op, "grad_attn", grad_attn, k_in.scalar_type(), "k_in");
    check_float_cpu(op, "grad_attn_sum", grad_attn_sum, k_in.scalar_type(), "k_in");
    check_float_cpu(op, "grad_attn_v", grad_attn_v, k_in.scalar_type(), "k_in");
    check_shape(op, "grad_attn", grad_attn, {B, K, N}, "[B, K, N]");
    check_shape(op, "grad_attn_sum", grad_attn_sum, {B, K}, "[B, K]");
    check_shape(op, "grad_attn_v", grad_attn_v, {B, K, C}, "[B, K, C]");
    check_float_cpu(op, "attn", attn, k_in.scalar_type(), "k_in");
    check_shape(op, "attn", attn, {B, K, N}, "[B, K, N] (the forward's attn)");
    const at::Tensor attn_c = attn.contiguous();
    const at::Tensor g_attn = grad_attn.contiguous();
    const at::Tensor g_sum = grad_attn_sum.contiguous();
    const at::Tensor g_v = grad_attn_v.contiguous();
    RowGrads<scalar_t> g_rows;
    at::Tensor g_rk, g_rv;
    if (rows != nullptr) {
      check_float_cpu(op, "grad_rows_k", rows->grad_rows_k, k_in.scalar_type(), "k_in");
      check_float_cpu(op, "grad_rows_v", rows->grad_rows_v, k_in.scalar_type(), "k_in");
      check_shape(op, "grad_rows_k", rows->grad_rows_k, {B, N, C}, "[B, N, C] like k_in");
      check_shape(op, "grad_rows_v", rows->grad_rows_v, {B, N, C}, "[B, N, C] like k_in");
      g_rk = rows->grad_rows_k.contiguous();
      g_rv = rows->grad_rows_v.contiguous();
      g_rows.k = g_rk.const_data_ptr<scalar_t>();
      g_rows.v = g_rv.const_data_ptr<scalar_t>();
      p.hand_down.pf = make_factor<scalar_t>(op, attn_c, "attn", rows->prompts, "prompts", B, N, C,
                                             k_in.scalar_type(), storage);
      grads.prompts = at::empty(rows->prompts.sizes(), k_in.options());
      g_rows.prompts = grads.prompts.mutable_data_ptr<scalar_t>();
    }

    const int64_t norm_rows = p.depth + (rows != nullptr ? 1 : 0);
    grads.k_in = at::empty({B, N, C}, k_in.options());
    grads.v_in = at::empty({B, N, C}, k_in.options());
    for (at::Tensor& g : grads.norms) {
      g = at::empty({norm_rows, C}, k_in.options());
      // The child's row, past the chain's: the rows do not depend on it.
      if (norm_rows > p.depth) g[p.depth].zero_();
    }
    grads.queries = at::empty({B, K, C}, k_in.options());
    for (size_t j = 0; j < args.factor_masks.size(); ++j) {
      grads.masks.push_back(at::empty(args.factor_masks[j].sizes(), k_in.options()));
      grads.tables.push_back(at::empty(args.factor_tables[j].sizes(), k_in.options()));
    }
    std::vector<scalar_t*> grad_base_ptrs;
    for (const Modulation<scalar_t>& m : p.stages) {
      if (m.base == nullptr) {
        grad_base_ptrs.push_back(nullptr);
      } else {
        grads.bases.push_back(at::empty({B, N, C}, k_in.options()));
        grad_base_ptrs.push_back(grads.bases.back().mutable_data_ptr<scalar_t>());
      }
    }
    const std::array<scalar_t*, 4> grad_norms{
        grads.norms[0].mutable_data_ptr<scalar_t>(), grads.norms[1].mutable_data_ptr<scalar_t>(),
        grads.norms[2].mutable_data_ptr<scalar_t>(), grads.norms[3].mutable_data_ptr<scalar_t>()};
    if (rows == nullptr && p.depth == 1 && p.stages[0].empty() && p.factors.empty()) {
      folded_backward_kernel<scalar_t>(
          p, attn_c.const_data_ptr<scalar_t>(), g_attn.const_data_ptr<scalar_t>(),
          g_sum.const_data_ptr<scalar_t>(), g_v.const_data_ptr<scalar_t>(),
          grads.k_in.mutable_data_ptr<scalar_t>(), grads.v_in.mutable_data_ptr<scalar_t>(),
          grad_norms, grads.queries.mutable_data_ptr<scalar_t>());
      return;
    }
    backward_kernel<scalar_t>(p, attn_c.const_data_ptr<scalar_t>(),
                              g_attn.const_data_ptr<scalar_t>(),
                              g_sum.const_data_ptr<scalar_t>(), g_v.const_data_ptr<scalar_t>(),
                              g_rows, grads.k_in.mutable_data_ptr<scalar_t>(),
                              grads.v_in.mutable_data_ptr<scalar_t>(),
                              grad_norms,
                              grads.queries.mutable_data_ptr<scalar_t>(), grad_base_ptrs,
                              grads.masks, grads.tables);
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor>
slot_attention_pass_backward_cpu(
    const at::Tensor& grad_attn, const at::Tensor& grad_attn_sum, const at::Tensor& grad_attn_v,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, const at::Tensor& attn,
    double norm_eps, double attn_eps) {
  PassGrads g = backward(
      "slot_attention_pass_backward", grad_attn, grad_attn_sum, grad_attn_v,
      {k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
       base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
       attn_eps},
      attn, nullptr);
  return {g.k_in,     g.v_in,  g.norms[0], g.norms[1], g.norms[2],
          g.norms[3], g.bases, g.masks,    g.tables,   g.queries};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
           at::Tensor>
slot_attention_pass_rows_backward_cpu(
    const at::Tensor& grad_attn, const at::Tensor& grad_attn_sum, const at::Tensor& grad_attn_v,
    const at::Tensor& grad_rows_k, const at::Tensor& grad_rows_v, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& norm_k_weight, const at::Tensor& norm_k_bias,
    const at::Tensor& norm_v_weight, const at::Tensor& norm_v_bias, at::TensorList stage_bases,
    at::IntArrayRef base_stages, at::TensorList factor_masks, at::TensorList factor_tables,
    at::IntArrayRef factor_stages, const at::Tensor& queries,
    const std::optional<at::Tensor>& stats, const at::Tensor& attn, double norm_eps,
    double attn_eps, const at::Tensor& prompts) {
  const RowsBackwardArgs rows{grad_rows_k, grad_rows_v, prompts};
  PassGrads g = backward(
      "slot_attention_pass_rows_backward", grad_attn, grad_attn_sum, grad_attn_v,
      {k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
       base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
       attn_eps},
      attn, &rows);
  return {g.k_in,  g.v_in,  g.norms[0], g.norms[1], g.norms[2], g.norms[3],
          g.bases, g.masks, g.tables,   g.queries,  g.prompts};
}

// The forward ops' kernels: their schemas' arguments, as PassArgs.
PassOutputs slot_attention_pass_op(
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, double norm_eps,
    double attn_eps) {
  return slot_attention_pass_cpu({k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight,
                                  norm_v_bias, stage_bases, base_stages, factor_masks,
                                  factor_tables, factor_stages, queries, stats, norm_eps,
                                  attn_eps});
}

HandDownOutputs slot_attention_pass_hand_down_op(
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, double norm_eps,
    double attn_eps, const at::Tensor& prompts, at::Tensor& hand_down,
    const std::optional<at::Tensor>& child_queries) {
  return slot_attention_pass_hand_down_cpu(
      {k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
       base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
       attn_eps},
      prompts, hand_down, child_queries);
}

// slot_attention_pass_rows: the pass's outputs and the child's input rows it hands
// down, fresh [B,N,C] tensors (the inputs stay as autograd saved them).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
slot_attention_pass_rows_op(
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList stage_bases, at::IntArrayRef base_stages,
    at::TensorList factor_masks, at::TensorList factor_tables, at::IntArrayRef factor_stages,
    const at::Tensor& queries, const std::optional<at::Tensor>& stats, double norm_eps,
    double attn_eps, const at::Tensor& prompts) {
  at::Tensor rows_k = at::empty(k_in.sizes(), k_in.options());
  at::Tensor rows_v = at::empty(k_in.sizes(), k_in.options());
  auto [attn, attn_sum, attn_v, stats_out, _a, _s, _v] = slot_attention_pass_hand_down_rows_cpu(
      {k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
       base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
       attn_eps},
      prompts, rows_k, rows_v, std::nullopt);
  return {attn, attn_sum, attn_v, stats_out, rows_k, rows_v};
}

}  // namespace
}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("slot_attention_pass", &exposure_slot::cpu::slot_attention_pass_op);
  m.impl("slot_attention_pass_backward", &exposure_slot::cpu::slot_attention_pass_backward_cpu);
  m.impl("slot_attention_pass_hand_down", &exposure_slot::cpu::slot_attention_pass_hand_down_op);
  m.impl("slot_attention_pass_rows", &exposure_slot::cpu::slot_attention_pass_rows_op);
  m.impl("slot_attention_pass_rows_backward",
         &exposure_slot::cpu::slot_attention_pass_rows_backward_cpu);
}
