// Mask-weighted fusion on the CPU: forward and backward of exposure_slot::mask_fusion.
//
// Formula: a modulation (mixtures.h), the product of J mixtures and an optional
// dense base:
//   out[b,n,c] = (base[b,n,c] or 1) * prod_j sum_i masks_j[b,i,n] * tables_j[tb,i,c]
// SPEC section 1's per-token products are of this form: a leaf level returns
// PF = mix(A, prompts) and SF = mix(A, S); a parent returns PF * b_c and SF * a_c,
// where the child's pair is itself a product of mixtures, so a whole level tree's
// prompt_map and slot_map are each one call; and a level's running modulation of
// its k and v is updated as M <- M * pf * b_c.
// Backward, for the output gradient grad: modulation_backward_block() with gm = grad.
// mask_fusion_ writes the result into base (no autograd): a level's running
// modulation under no_grad, which would otherwise hold its old and new values at
// once for a moment.
//
// Memory layout: masks [B,K_j,N], tables [TB,K_j,C], base, out and grad [B,N,C],
// all contiguous (mixtures.h). Each pass reads the masks and the base and writes
// (backward: reads) one [B,N,C] tensor, with sum_j K_j multiply-adds per output
// value. Numbers are in benchmarks/README.md.
//
// Parallelisation: OpenMP over the chunks of common.h. Every output value depends
// on its own token only; grad_tables are sums over tokens, reduced in two stages,
// so all results are bitwise independent of the thread count.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"
#include "mixtures.h"

namespace exposure_slot::cpu {
namespace {

struct FusionDims {
  int64_t batch, tokens, channels;
};

FusionDims check_first(const char* op, at::TensorList masks, at::TensorList tables) {
  // J = 0 factors would need B, N and C from base alone: the Python wrapper
  // multiplies nothing into nothing and never calls the kernel that way.
  TORCH_CHECK(!masks.empty(), op, ": needs at least one (masks, table) factor, got none");
  check_float_cpu(op, "masks[0]", masks[0], masks[0].scalar_type(), "masks[0]");
  TORCH_CHECK(masks[0].dim() == 3, op, ": masks[0] must be [B, K, N], got shape ",
              masks[0].sizes());
  TORCH_CHECK(!tables.empty() && tables[0].dim() == 3, op,
              ": tables[0] must be [B or 1, K, C]");
  return {masks[0].size(0), masks[0].size(2), tables[0].size(2)};
}

template <typename T>
int64_t slot_sum(const std::vector<Factor<T>>& factors) {
  int64_t sum = 0;
  for (const auto& f : factors) sum += f.slots;
  return sum;
}

template <typename T>
void forward_kernel(const std::vector<Factor<T>>& factors, const T* base, const FusionDims& d,
                    T* out) {
  const int64_t N = d.tokens, C = d.channels;
  const Modulation<T> m{base, 0, static_cast<int64_t>(factors.size())};
  const int64_t tokens = d.batch * N;
#pragma omp parallel for schedule(static) if (tokens * C * slot_sum(factors) >= kMinParallelWork)
  for (int64_t t = 0; t < tokens; ++t) {
    modulation<T, 4 * kBlock<T>>(factors, m, t / N, t % N, N, C, static_cast<T*>(nullptr),
                                 out + t * C);
  }
}

template <typename T>
void backward_kernel(const std::vector<Factor<T>>& factors, const T* base, const FusionDims& d,
                     const T* grad, std::vector<at::Tensor>& grad_masks,
                     std::vector<at::Tensor>& grad_tables, T* grad_base) {
  const int64_t N = d.tokens, C = d.channels, J = static_cast<int64_t>(factors.size());
  const Modulation<T> m{base, 0, J};
  const bool parallel = d.batch * N * C * slot_sum(factors) >= kMinParallelWork;
  const Chunking chunks(d.batch, N);
  std::vector<int64_t> offsets;
  Partials<T> partials(chunks.count, table_partial_offsets(factors, C, 0, offsets));
  std::vector<T*> grad_mask_ptrs;
  for (auto& g : grad_masks) grad_mask_ptrs.push_back(g.mutable_data_ptr<T>());

#pragma omp parallel if (parallel)
  {
    AlignedVector<T> values(J * C);
    ModulationGrad<T> scratch(J, C);
    std::vector<T*> table_partials(J);
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
      const int64_t b = chunks.item(chunk);
      for (int64_t j = 0; j < J; ++j) table_partials[j] = partials.chunk(chunk) + offsets[j];
      const int64_t chunk_end = chunks.end(chunk, N);
      for (int64_t n0 = chunks.begin(chunk); n0 < chunk_end; n0 += kTile) {
        const int64_t count = std::min(kTile, chunk_end - n0);
        for (int64_t t = 0; t < count; ++t) {
          // The mixtures are recomputed: cheaper than storing J [B,N,C] tensors.
          const int64_t n = n0 + t, row = (b * N + n) * C;
          if (n + kTile < chunk_end) {
            prefetch_row(grad + row + kTile * C, C);
            if (base != nullptr) prefetch_row(base + row + kTile * C, C);
          }
          for_each_block<T>(C, [&](int64_t c0, auto blk) {
            using Block = decltype(blk);
            using U = typename Block::Unit;
            U mod[Block::kCapacity], gm[Block::kCapacity];
            modulation_block(factors, m, b, n, N, C, c0, blk, values.data(), mod);
            for (int64_t u = 0; u < blk.units; ++u) gm[u] = load<U>(grad + row + c0 + u * Block::kStride);
            modulation_backward_block(factors, m, b, n, N, c0, blk, values.data(), gm,
                                      base != nullptr ? grad_base + row : nullptr, t, scratch);
          });
        }
        finish_modulation_grads(factors, m, b, n0, count, N, grad_mask_ptrs.data(),
                                table_partials.data(), scratch);
      }
    }
  }
  reduce_table_grads(factors, partials, chunks, offsets, C, grad_tables, parallel);
}

// The factors and the base, checked and contiguous (kept alive by `storage`).
template <typename T>
std::pair<std::vector<Factor<T>>, const T*> fusion_inputs(
    const char* op, const FusionDims& d, at::TensorList masks, at::TensorList tables,
    const std::optional<at::Tensor>& base, std::vector<at::Tensor>& storage) {
  const at::ScalarType dtype = masks[0].scalar_type();
  auto factors = make_factors<T>(op, masks, tables, d.batch, d.tokens, d.channels, dtype, storage);
  const T* base_data = make_dense<T>(op, "base", base, d.batch, d.tokens, d.channels, dtype, storage);
  return {std::move(factors), base_data};
}

// out = (base or 1) * the mixtures; out may be base itself (the in-place op).
void fuse_into(const char* op, const FusionDims& d, at::TensorList masks, at::TensorList tables,
               const std::optional<at::Tensor>& base, at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES(masks[0].scalar_type(), "mask_fusion_cpu", [&] {
    std::vector<at::Tensor> storage;
    const auto [factors, base_data] =
        fusion_inputs<scalar_t>(op, d, masks, tables, base, storage);
    forward_kernel<scalar_t>(factors, base_data, d, out.mutable_data_ptr<scalar_t>());
  });
}

}  // namespace

at::Tensor mask_fusion_cpu(at::TensorList masks, at::TensorList tables,
                           const std::optional<at::Tensor>& base) {
  const FusionDims d = check_first("mask_fusion", masks, tables);
  at::Tensor out = at::empty({d.batch, d.tokens, d.channels}, masks[0].options());
  fuse_into("mask_fusion", d, masks, tables, base, out);
  return out;
}

namespace {

void mask_fusion_inplace_cpu(at::TensorList masks, at::TensorList tables, at::Tensor& base) {
  const FusionDims d = check_first("mask_fusion_", masks, tables);
  // Contiguous, so make_dense reads base's own memory, which the kernel overwrites.
  TORCH_CHECK(base.is_contiguous(), "mask_fusion_: base must be contiguous to be updated in place");
  fuse_into("mask_fusion_", d, masks, tables, base, base);
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>>
mask_fusion_backward_cpu(const at::Tensor& grad, at::TensorList masks, at::TensorList tables,
                         const std::optional<at::Tensor>& base) {
  const char* op = "mask_fusion_backward";
  const FusionDims d = check_first(op, masks, tables);
  check_float_cpu(op, "grad", grad, masks[0].scalar_type(), "masks[0]");
  check_shape(op, "grad", grad, {d.batch, d.tokens, d.channels}, "[B, N, C]");
  const at::Tensor grad_c = grad.contiguous();
  std::vector<at::Tensor> grad_masks, grad_tables;
  for (size_t j = 0; j < masks.size(); ++j) {
    grad_masks.push_back(at::empty(masks[j].sizes(), masks[j].options()));
    grad_tables.push_back(at::empty(tables[j].sizes(), tables[j].options()));
  }
  std::optional<at::Tensor> grad_base;
  if (base.has_value()) grad_base = at::empty({d.batch, d.tokens, d.channels}, grad.options());
  AT_DISPATCH_FLOATING_TYPES(masks[0].scalar_type(), "mask_fusion_backward_cpu", [&] {
    std::vector<at::Tensor> storage;
    const auto [factors, base_data] =
        fusion_inputs<scalar_t>(op, d, masks, tables, base, storage);
    backward_kernel<scalar_t>(factors, base_data, d, grad_c.const_data_ptr<scalar_t>(),
                              grad_masks, grad_tables,
                              grad_base.has_value() ? grad_base->mutable_data_ptr<scalar_t>()
                                                    : nullptr);
  });
  return {grad_masks, grad_tables, grad_base};
}

}  // namespace
}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("mask_fusion", &exposure_slot::cpu::mask_fusion_cpu);
  m.impl("mask_fusion_", &exposure_slot::cpu::mask_fusion_inplace_cpu);
  m.impl("mask_fusion_backward", &exposure_slot::cpu::mask_fusion_backward_cpu);
}
