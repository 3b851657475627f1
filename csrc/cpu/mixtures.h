// Modulations: products of mask-weighted fusions ("mixtures") and an optional dense
// factor, one token at a time. The per-token arithmetic shared by mask_fusion.cpp
// and slot_attention_pass.cpp.
//
// A factor j is a pair (masks_j [B,K_j,N], table_j [B or 1,K_j,C]) and its mixture
// at token (b, n) is the C-vector
//   f_j[c] = sum_i masks_j[b,i,n] * table_j[tb,i,c]        tb = b, or 0 if shared.
// A modulation multiplies a run of factors and, optionally, a dense row
// base[b,n,:] of a [B,N,C] tensor:
//   m = base * prod_j f_j
// (SPEC section 1: pf, the child's b, the running product pf * b_c * ... that a
// level multiplies into its k and v, and its outputs PF * b_c, SF * a_c.)
// Backward, for an upstream gradient gm [C] of m:
//   g_base             = gm * prod_j f_j
//   gf_j               = gm * base * prod_{l != j} f_l   (prefix and suffix products;
//                                                        no division: a factor may be 0)
//   grad_masks_j[b,i,n] = sum_c gf_j[c] * table_j[tb,i,c]
//   grad_table_j[tb,i,c] += masks_j[b,i,n] * gf_j[c]     (into a per-chunk partial)
// The last two are products over a tile of kTile tokens (common.h): the tokens'
// gf_j rows are kept, then the tile's mask gradients are a [K_j, C] x [C, tile]
// product (row_dots) and its table gradients a [K_j, tile] x [tile, C] one
// (weighted_row_sums), rather than K_j dots and K_j row updates per token.
//
// Layout: masks [B,K,N] contiguous, so a token's K weights lie N apart; tables
// [TB,K,C] contiguous and small (they stay in L1 for a whole pass); every per-token
// vector is C contiguous values. Channels are processed in blocks (common.h), so a
// block's mixture and product stay in vector registers across the K slots and J
// factors instead of going through memory once per slot.

#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace exposure_slot::cpu {

template <typename T>
struct Factor {
  const T* masks;  // [B,K,N]
  const T* table;  // [TB,K,C]
  int64_t slots;   // K
  bool table_batched;

  const T* weights(int64_t b, int64_t n, int64_t N) const { return masks + b * slots * N + n; }
  const T* rows(int64_t b, int64_t C) const { return table + (table_batched ? b * slots * C : 0); }
};

// A run of factors [begin, end) and an optional dense [B,N,C] tensor.
template <typename T>
struct Modulation {
  const T* base;  // nullptr: no dense factor
  int64_t begin, end;

  bool empty() const { return base == nullptr && end == begin; }
};

// One factor (masks, table), checked against [B,N,C] (errors name them `mname`,
// `tname`) and made contiguous; `storage` keeps the contiguous copies alive.
template <typename T>
Factor<T> make_factor(const char* op, const at::Tensor& masks, const char* mname,
                      const at::Tensor& table, const char* tname, int64_t B, int64_t N,
                      int64_t C, at::ScalarType dtype, std::vector<at::Tensor>& storage) {
  check_float_cpu(op, mname, masks, dtype, "the first input");
  check_float_cpu(op, tname, table, dtype, "the first input");
  TORCH_CHECK(masks.dim() == 3 && masks.size(0) == B && masks.size(2) == N && masks.size(1) >= 1,
              op, ": ", mname, " must be [B, K, N] with B = ", B, ", N = ", N,
              " and K >= 1, got shape ", masks.sizes());
  const int64_t K = masks.size(1);
  TORCH_CHECK(table.dim() == 3 && (table.size(0) == 1 || table.size(0) == B) &&
                  table.size(1) == K && table.size(2) == C,
              op, ": ", tname, " must be [B or 1, K, C] with B = ", B, ", K = ", K, " (from ",
              mname, ") and C = ", C, ", got shape ", table.sizes());
  storage.push_back(masks.contiguous());
  storage.push_back(table.contiguous());
  return {storage[storage.size() - 2].const_data_ptr<T>(), storage.back().const_data_ptr<T>(), K,
          table.size(0) != 1};
}

// The factors of a list of (masks, table) tensors (make_factor).
template <typename T>
std::vector<Factor<T>> make_factors(const char* op, at::TensorList masks, at::TensorList tables,
                                    int64_t B, int64_t N, int64_t C, at::ScalarType dtype,
                                    std::vector<at::Tensor>& storage) {
  TORCH_CHECK(masks.size() == tables.size(), op, ": got ", masks.size(), " masks but ",
              tables.size(), " tables; each factor needs one of each");
  std::vector<Factor<T>> factors;
  for (size_t j = 0; j < masks.size(); ++j) {
    const std::string mname = "masks[" + std::to_string(j) + "]";
    const std::string tname = "tables[" + std::to_string(j) + "]";
    factors.push_back(make_factor<T>(op, masks[j], mname.c_str(), tables[j], tname.c_str(), B, N,
                                     C, dtype, storage));
  }
  return factors;
}

// A dense [B,N,C] factor, checked and made contiguous (nullptr when absent).
template <typename T>
const T* make_dense(const char* op, const char* name, const std::optional<at::Tensor>& t,
                    int64_t B, int64_t N, int64_t C, at::ScalarType dtype,
                    std::vector<at::Tensor>& storage) {
  if (!t.has_value()) return nullptr;
  check_float_cpu(op, name, *t, dtype, "the first input");
  check_shape(op, name, *t, {B, N, C}, "[B, N, C]");
  storage.push_back(t->contiguous());
  return storage.back().const_data_ptr<T>();
}

// f = sum_i weights[i * N] * rows[i * C + ...], one block of one token's mixture.
// The even and the odd slots are summed apart: a block is only a few registers, so
// one chain of dependent multiply-adds per register would wait on each one's
// latency (four cycles) for most of a long mixture.
// (Inlined by force: called once a block, GCC left some calls out of line, which
// passed the block through the stack; the rows pass ~10% faster inlined.)
template <typename T, typename Block>
__attribute__((always_inline)) inline void mix_block(const T* weights, int64_t N,
                                                     const T* __restrict__ rows, int64_t K,
                                                     int64_t C, Block blk,
                                                     typename Block::Unit* __restrict__ f) {
  using U = typename Block::Unit;
  constexpr int64_t S = Block::kStride;
  const T w0 = weights[0];
  for (int64_t u = 0; u < blk.units; ++u) f[u] = w0 * load<U>(rows + u * S);
  if (K == 1) return;
  U odd[Block::kCapacity];
  const T w1 = weights[N];
  for (int64_t u = 0; u < blk.units; ++u) odd[u] = w1 * load<U>(rows + C + u * S);
  int64_t i = 2;
  for (; i + 1 < K; i += 2) {
    const T we = weights[i * N], wo = weights[(i + 1) * N];
    const T* __restrict__ even_row = rows + i * C;
    const T* __restrict__ odd_row = even_row + C;
    for (int64_t u = 0; u < blk.units; ++u) {
      f[u] += we * load<U>(even_row + u * S);
      odd[u] += wo * load<U>(odd_row + u * S);
    }
  }
  if (i < K) {
    const T wi = weights[i * N];
    for (int64_t u = 0; u < blk.units; ++u) f[u] += wi * load<U>(rows + i * C + u * S);
  }
  for (int64_t u = 0; u < blk.units; ++u) f[u] += odd[u];
}

// mod = the block of channels from c0 of token (b, n)'s modulation `m` (at least
// one factor): the product of its factors, times its base row if it has one. With
// `values` non-null, each factor's mixture is kept in
// values[(j - m.begin) * C + c0 ...] for the backward.
template <typename T, typename Block>
inline void modulation_block(const std::vector<Factor<T>>& factors, const Modulation<T>& m,
                             int64_t b, int64_t n, int64_t N, int64_t C, int64_t c0, Block blk,
                             T* __restrict__ values, typename Block::Unit* __restrict__ mod) {
  using U = typename Block::Unit;
  for (int64_t j = m.begin; j < m.end; ++j) {
    const Factor<T>& fac = factors[j];
    U f[Block::kCapacity];
    mix_block(fac.weights(b, n, N), N, fac.rows(b, C) + c0, fac.slots, C, blk, f);
    for (int64_t u = 0; u < blk.units; ++u) {
      if (values != nullptr) store(values + (j - m.begin) * C + c0 + u * Block::kStride, f[u]);
      mod[u] = j == m.begin ? f[u] : mod[u] * f[u];
    }
  }
  if (m.base != nullptr) {
    const T* base = m.base + (b * N + n) * C + c0;
    for (int64_t u = 0; u < blk.units; ++u) mod[u] *= load<U>(base + u * Block::kStride);
  }
}

// mod = this token's modulation, for `m` with at least one factor (values: as
// modulation_block). `mod` may be the token's base row itself (mask_fusion_
// updates in place): each block reads its base values before it writes them.
template <typename T, int64_t Width = kBlock<T>>
inline void modulation(const std::vector<Factor<T>>& factors, const Modulation<T>& m, int64_t b,
                       int64_t n, int64_t N, int64_t C, T* __restrict__ values, T* mod) {
  for_each_block<T, Width>(C, [&](int64_t c0, auto blk) {
    using Block = decltype(blk);
    typename Block::Unit block_mod[Block::kCapacity];
    modulation_block(factors, m, b, n, N, C, c0, blk, values, block_mod);
    for (int64_t u = 0; u < blk.units; ++u) store(mod + c0 + u * Block::kStride, block_mod[u]);
  });
}

// Per-thread scratch of the modulation backward: a block's suffix products, and
// the factor gradients gf_j of a tile's tokens for finish_modulation_grads.
template <typename T>
struct ModulationGrad {
  int64_t channels;
  AlignedVector<T> suffix;  // [J, kBlock]
  AlignedVector<T> gf;      // [J, kTile, C]

  ModulationGrad(int64_t factors, int64_t C)
      : channels(C),
        suffix(std::max<int64_t>(factors, 1) * kBlock<T>),
        gf(std::max<int64_t>(factors, 1) * kTile * C) {}
  // Factor j's gf rows, from the tile's token t.
  T* rows(int64_t j, int64_t t) { return gf.data() + (j * kTile + t) * channels; }
  const T* rows(int64_t j, int64_t t) const { return gf.data() + (j * kTile + t) * channels; }
};

// Backward of modulation_block, one block of channels of token (b, n), the tile's
// token t, for the block gm of the gradient of the modulation `m` (which has a
// base or factors). `values` are the token's factor mixtures as modulation_block
// kept them. Writes the block of the base's gradient into the row g_base (when `m`
// has a base) and keeps gf_j's block for finish_modulation_grads, which takes the
// mask and table gradients once the tile's tokens are done. Blockwise, the
// products stay in registers.
template <typename T, typename Block>
inline void modulation_backward_block(const std::vector<Factor<T>>& factors,
                                      const Modulation<T>& m, int64_t b, int64_t n, int64_t N,
                                      int64_t c0, Block blk, const T* values,
                                      const typename Block::Unit* gm, T* g_base, int64_t t,
                                      ModulationGrad<T>& grad) {
  using U = typename Block::Unit;
  constexpr int64_t S = Block::kStride;
  const int64_t J = m.end - m.begin, C = grad.channels;
  // suffix_j = prod_{l > j} f_l; then gf_j = gm * base * prefix_j * suffix_j with the
  // prefix prod_{l < j} f_l carried along (no division: a mixture may be 0).
  T* suffix = grad.suffix.data();
  U prefix[Block::kCapacity], total[Block::kCapacity];
  for (int64_t u = 0; u < blk.units; ++u) total[u] = U{} + T(1);
  for (int64_t j = J - 1; j >= 0; --j) {
    for (int64_t u = 0; u < blk.units; ++u) {
      store(suffix + j * kBlock<T> + u * S, total[u]);
      total[u] *= load<U>(values + j * C + c0 + u * S);
    }
  }
  const T* base = m.base != nullptr ? m.base + (b * N + n) * C + c0 : nullptr;
  for (int64_t u = 0; u < blk.units; ++u) {
    if (base != nullptr) {
      store(g_base + c0 + u * S, gm[u] * total[u]);
      prefix[u] = gm[u] * load<U>(base + u * S);
    } else {
      prefix[u] = gm[u];
    }
  }
  for (int64_t j = 0; j < J; ++j) {
    T* gf = grad.rows(m.begin + j, t) + c0;
    for (int64_t u = 0; u < blk.units; ++u) {
      store(gf + u * S, prefix[u] * load<U>(suffix + j * kBlock<T> + u * S));
      prefix[u] *= load<U>(values + j * C + c0 + u * S);
    }
  }
}

// The mask and table gradients of the `count` tokens of a tile from token n0,
// from the gf_j rows modulation_backward_block kept: grad_masks_j[b, i, n0 + t] =
// gf_j[t] . table_j[tb, i], and table_partials[j] (this chunk's [K_j, C] partial:
// a chunk holds one batch item's tokens) += sum_t masks_j[b, i, n0 + t] * gf_j[t].
template <typename T>
inline void finish_modulation_grads(const std::vector<Factor<T>>& factors,
                                    const Modulation<T>& m, int64_t b, int64_t n0, int64_t count,
                                    int64_t N, T* const* grad_masks, T* const* table_partials,
                                    const ModulationGrad<T>& grad) {
  const int64_t C = grad.channels;
  for (int64_t j = m.begin; j < m.end; ++j) {
    const Factor<T>& f = factors[j];
    const T* gf = grad.rows(j, 0);
    row_dots(f.rows(b, C), gf, f.slots, count, C, grad_masks[j] + b * f.slots * N + n0, N);
    weighted_row_sums(f.weights(b, n0, N), N, gf, C, count, f.slots, C, table_partials[j],
                      [] {});
  }
}

// Appends the offset of each factor's [K_j, C] grad_table partial inside a chunk's
// Partials block, starting at `offset`; returns the end offset.
template <typename T>
int64_t table_partial_offsets(const std::vector<Factor<T>>& factors, int64_t C, int64_t offset,
                              std::vector<int64_t>& offsets) {
  for (const Factor<T>& f : factors) {
    offsets.push_back(offset);
    offset += f.slots * C;
  }
  return offset;
}

// Stage 2 of every grad_table: adds the chunks' partials in chunk order, per batch
// item for a batched table, over all chunks for a shared one.
template <typename T>
void reduce_table_grads(const std::vector<Factor<T>>& factors, const Partials<T>& partials,
                        const Chunking& chunks, const std::vector<int64_t>& offsets, int64_t C,
                        std::vector<at::Tensor>& grad_tables, bool parallel) {
  for (size_t j = 0; j < factors.size(); ++j) {
    partials.reduce(chunks, offsets[j], factors[j].slots * C, factors[j].table_batched,
                    grad_tables[j].mutable_data_ptr<T>(), parallel);
  }
}

}  // namespace exposure_slot::cpu
