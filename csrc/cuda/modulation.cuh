// Modulations on the GPU: products of mask-weighted fusions ("mixtures") and an
// optional dense factor, one token per lane group (common.cuh). The per-token
// arithmetic shared by mask_fusion.cu and slot_attention_pass.cu; the same maths
// as csrc/cpu/mixtures.h.
//
// A factor j is a pair (masks_j [B,K_j,N], table_j [B or 1,K_j,C]); its mixture at
// token (b, n) is the C-vector
//   f_j[c] = sum_i masks_j[b,i,n] * table_j[tb,i,c]        tb = b, or 0 if shared,
// and a stage's modulation multiplies its factors and, optionally, a dense row
// base[b,n,:] of a [B,N,C] tensor:  m = base * prod_j f_j.
// Backward, for an upstream gradient gm of m:
//   g_base               = gm * prod_j f_j
//   gf_j                 = gm * base * prod_{l != j} f_l
//   grad_masks_j[b,i,n]  = sum_c gf_j[c] * table_j[tb,i,c]
//   grad_table_j[tb,i,c] = sum over tokens of masks_j[b,i,n] * gf_j[c]
// The products leaving one factor out are recomputed, mixtures and all, rather
// than kept: that would hold J rows per lane, and a factor may be 0 (no division).
//
// Layout: masks [B,K,N] contiguous, so the groups of a warp, on consecutive tokens,
// read consecutive mask entries; tables [TB,K,C] are small and stay in L1.

#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "common.cuh"

namespace exposure_slot::cuda {

template <typename T>
struct Factor {
  const T* masks;    // [B,K,N]
  const T* table;    // [TB,K,C]
  T* grad_masks;     // [B,K,N] (backward)
  int64_t partial;   // offset of its [K,C] grad_table partial in a block's slice (backward)
  int slots;         // K
  bool batched;      // TB = B (else 1)
};

// A stage's modulation: its base (or null) and its factors [begin, end).
template <typename T>
struct Stage {
  const T* base;  // [B,N,C] or null
  T* grad_base;   // [B,N,C] (backward; null without a base)
  int begin, end;

  __host__ __device__ bool empty() const { return base == nullptr && end == begin; }
};

// out = this token's mixture of factor f.
template <typename T, typename A, int V>
__device__ inline void mixture(const Factor<T>& f, const Token& tok, const Lanes& l,
                               Row<A, V>& out) {
  const int64_t C = l.channels;
  const T* weights = f.masks + static_cast<int64_t>(tok.b * f.slots) * tok.N + tok.n;
  const T* rows = f.table + (f.batched ? tok.b * f.slots * C : 0);
  fill(out, A(0));
  for (int i = 0; i < f.slots; ++i) {
    const A w = tok.active ? static_cast<A>(weights[static_cast<int64_t>(i) * tok.N]) : A(0);
#pragma unroll
    for (int r = 0; r < V; ++r) {
      A t[kVec];
      load_vector(rows + i * C, l, r, true, t);
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.x[r][e] += w * t[e];
    }
  }
}

// out = (the stage's base row, if with_base) * prod of its factors but `skip`
// (-1: none); all ones when that leaves nothing.
template <typename T, typename A, int V>
__device__ inline void product(const Stage<T>& st, const Factor<T>* factors, const Token& tok,
                               const Lanes& l, bool with_base, int skip, Row<A, V>& out) {
  if (with_base && st.base != nullptr) {
    load_row(st.base + tok.row() * l.channels, l, tok.active, out);
  } else {
    fill(out, A(1));
  }
  for (int j = st.begin; j < st.end; ++j) {
    if (j == skip) continue;
    Row<A, V> f;
    mixture(factors[j], tok, l, f);
#pragma unroll
    for (int r = 0; r < V; ++r) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) out.x[r][e] *= f.x[r][e];
    }
  }
}

// Backward of a stage's modulation at this token, for its gradient gm: writes
// grad_base and the factors' grad_masks, and adds the grad_table terms into the
// block's partial (through the tile: block-wide, every thread must call it).
template <typename T, typename A, int V>
__device__ void modulation_backward(const Stage<T>& st, const Factor<T>* factors,
                                    const Token& tok, const Lanes& l, const Row<A, V>& gm,
                                    const Tile<A, V>& tile, A* partial) {
  const int64_t C = l.channels;
  if (st.grad_base != nullptr) {
    Row<A, V> g;
    product(st, factors, tok, l, false, -1, g);
#pragma unroll
    for (int r = 0; r < V; ++r) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) g.x[r][e] *= gm.x[r][e];
    }
    store_row(st.grad_base + tok.row() * C, l, tok.active, g);
  }
  for (int j = st.begin; j < st.end; ++j) {
    const Factor<T>& f = factors[j];
    Row<A, V> gf;
    product(st, factors, tok, l, true, j, gf);
#pragma unroll
    for (int r = 0; r < V; ++r) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) gf.x[r][e] *= gm.x[r][e];
    }
    const T* rows = f.table + (f.batched ? tok.b * f.slots * C : 0);
    T* grad_masks = f.grad_masks + static_cast<int64_t>(tok.b * f.slots) * tok.N + tok.n;
    for (int i = 0; i < f.slots; ++i) {
      A g = A(0);
#pragma unroll
      for (int r = 0; r < V; ++r) {
        A t[kVec];
        load_vector(rows + i * C, l, r, true, t);  // zeros where invalid
#pragma unroll
        for (int e = 0; e < kVec; ++e) g += gf.x[r][e] * t[e];
      }
      g = group_sum(g, l.size);
      if (tok.active && l.lane == 0) grad_masks[static_cast<int64_t>(i) * tok.N] = static_cast<T>(g);
    }
    const T* weights = f.masks + static_cast<int64_t>(tok.b * f.slots) * tok.N + tok.n;
    tile.put_scalars(l, f.slots, tok.active,
                     [&](int i) { return static_cast<A>(weights[static_cast<int64_t>(i) * tok.N]); });
    tile.put_row(l, tok.active, gf);
    tile.flush(f.slots, partial + f.partial);
  }
}

// ---------------------------------------------------------------- host

// Checks the (masks, table) pairs against [B,N,C] and fills factors[0, J) with
// aligned contiguous data (kept alive by `storage`); each factor's grad_table
// partial gets the next K_j * C values of a block's slice from `partial_end` on,
// which is advanced past them.
template <typename T>
void make_factors(const char* op, at::TensorList masks, at::TensorList tables, int64_t B,
                  int64_t N, int64_t C, at::ScalarType dtype, const at::Device& device,
                  std::vector<at::Tensor>& storage, Factor<T>* factors, int64_t& partial_end) {
  TORCH_CHECK(masks.size() == tables.size(), op, ": got ", masks.size(), " masks but ",
              tables.size(), " tables; each factor needs one of each");
  TORCH_CHECK(masks.size() <= static_cast<size_t>(kMaxFactors), op,
              ": the CUDA kernels take at most ", kMaxFactors, " factors, got ", masks.size());
  for (size_t j = 0; j < masks.size(); ++j) {
    const std::string mname = "masks[" + std::to_string(j) + "]";
    const std::string tname = "tables[" + std::to_string(j) + "]";
    check_float_cuda(op, mname.c_str(), masks[j], dtype, "the first input", device);
    check_float_cuda(op, tname.c_str(), tables[j], dtype, "the first input", device);
    TORCH_CHECK(masks[j].dim() == 3 && masks[j].size(0) == B && masks[j].size(2) == N &&
                    masks[j].size(1) >= 1,
                op, ": ", mname, " must be [B, K, N] with B = ", B, ", N = ", N,
                " and K >= 1, got shape ", masks[j].sizes());
    const int64_t K = masks[j].size(1);
    check_slots(op, mname.c_str(), K);
    TORCH_CHECK(tables[j].dim() == 3 && (tables[j].size(0) == 1 || tables[j].size(0) == B) &&
                    tables[j].size(1) == K && tables[j].size(2) == C,
                op, ": ", tname, " must be [B or 1, K, C] with B = ", B, ", K = ", K, " (from ",
                mname, ") and C = ", C, ", got shape ", tables[j].sizes());
    storage.push_back(masks[j].contiguous());
    storage.push_back(aligned(tables[j]));
    factors[j] = {storage[storage.size() - 2].const_data_ptr<T>(), storage.back().const_data_ptr<T>(),
                  nullptr, partial_end, static_cast<int>(K), tables[j].size(0) != 1};
    partial_end += K * C;
  }
}

// A dense [B,N,C] factor, checked, aligned and contiguous (null when absent).
template <typename T>
const T* make_dense(const char* op, const char* name, const std::optional<at::Tensor>& t,
                    int64_t B, int64_t N, int64_t C, at::ScalarType dtype,
                    const at::Device& device, std::vector<at::Tensor>& storage) {
  if (!t.has_value()) return nullptr;
  check_float_cuda(op, name, *t, dtype, "the first input", device);
  check_shape(op, name, *t, {B, N, C}, "[B, N, C]");
  storage.push_back(aligned(*t));
  return storage.back().const_data_ptr<T>();
}

// Stage 2 of every grad_table: the blocks' partials added per batch item for a
// batched table, over the whole batch for a shared one.
template <typename T>
void reduce_table_grads(const Factor<T>* factors, int count, const at::Tensor& partials,
                        const Chunking& chunks, int64_t C, std::vector<at::Tensor>& grad_tables,
                        cudaStream_t stream) {
  for (int j = 0; j < count; ++j) {
    reduce_partials<acc_t<T>, T>(partials, chunks, factors[j].partial, factors[j].slots * C,
                                 factors[j].batched, grad_tables[j].mutable_data_ptr<T>(), stream);
  }
}

}  // namespace exposure_slot::cuda
