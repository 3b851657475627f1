// Mask-weighted fusion on the GPU: forward, in-place and backward kernels of
// exposure_slot::mask_fusion (the CPU twin is csrc/cpu/mask_fusion.cpp).
//
// Formula: the product of J mixtures (modulation.cuh) and an optional dense base:
//   out[b,n,c] = (base[b,n,c] or 1) * prod_j sum_i masks_j[b,i,n] * tables_j[tb,i,c]
// Backward, for the output gradient grad: modulation_backward() with gm = grad.
//
// Memory layout: masks [B,K_j,N], tables [TB,K_j,C], base, out and grad [B,N,C],
// all contiguous (rows 16-byte aligned, common.cuh).
//
// Launch: a group of lanes per token (common.cuh). The forward is one block per
// kThreads / G consecutive tokens of the flattened [B*N] token axis, nothing shared
// between tokens. The backward is a grid (blocks per item, B) of blocks, each
// over a range of whole tiles of one batch item: grad_masks and grad_base are per
// token; grad_tables are sums over tokens, built per block in the tile's fixed
// order and then reduced in block order, so results are bitwise repeatable.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common.cuh"
#include "modulation.cuh"

namespace exposure_slot::cuda {
namespace {

template <typename T>
struct FusionArgs {
  Factor<T> factors[kMaxFactors];
  Stage<T> stage;  // the base and factors [0, J)
  int64_t batch, tokens;
  int channels, group;
};

// ---------------------------------------------------------------- kernels

// out = the token's modulation; out may be the base itself (each lane reads its
// base values before it writes the same addresses).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) mask_fusion_kernel(FusionArgs<T> a, T* out) {
  using A = acc_t<T>;
  const Lanes l = Lanes::of_thread(a.channels, a.group);
  const int64_t index = static_cast<int64_t>(blockIdx.x) * (kThreads / a.group) + l.token;
  if (index >= a.batch * a.tokens) return;  // no barrier or shuffle below
  const Token tok = Token::at(index / a.tokens, index % a.tokens, a.tokens, true);
  Row<A, V> m;
  product(a.stage, a.factors, tok, l, true, -1, m);
  store_row(out + tok.row() * a.channels, l, true, m);
}

// partials [blocks, stride]: each block's grad_table sums (stride = sum_j K_j * C).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    mask_fusion_backward_kernel(FusionArgs<T> a, const T* grad, acc_t<T>* partials,
                                int64_t stride, int64_t length) {
  using A = acc_t<T>;
  __shared__ TileStorage<A, V> storage;
  const Lanes l = Lanes::of_thread(a.channels, a.group);
  const Tile<A, V> tile{storage, kThreads / a.group, a.channels};
  const int64_t b = blockIdx.y, C = a.channels;
  A* partial = partials + (b * gridDim.x + blockIdx.x) * stride;
  tile.zero(partial, stride);
  const int64_t begin = blockIdx.x * length, end = std::min(begin + length, a.tokens);
  for (int64_t n0 = begin; n0 < end; n0 += tile.tokens) {
    const int64_t n = n0 + l.token;
    const Token tok = Token::at(b, n, a.tokens, n < end);
    Row<A, V> gm;
    load_row(grad + tok.row() * C, l, tok.active, gm);
    modulation_backward(a.stage, a.factors, tok, l, gm, tile, partial);
  }
}

// ---------------------------------------------------------------- host

struct FusionDims {
  int64_t batch, tokens, channels;
};

FusionDims check_first(const char* op, at::TensorList masks, at::TensorList tables) {
  TORCH_CHECK(!masks.empty(), op, ": needs at least one (masks, table) factor, got none");
  TORCH_CHECK(masks[0].dim() == 3, op, ": masks[0] must be [B, K, N], got shape ",
              masks[0].sizes());
  TORCH_CHECK(!tables.empty() && tables[0].dim() == 3, op, ": tables[0] must be [B or 1, K, C]");
  const FusionDims d{masks[0].size(0), masks[0].size(2), tables[0].size(2)};
  check_limits(op, d.batch, d.tokens, d.channels, "tables[0]");
  return d;
}

// The kernels' arguments, checked; `storage` keeps contiguous copies alive.
// Returns the size of a block's grad_table partials.
template <typename T>
int64_t fusion_args(const char* op, const FusionDims& d, at::TensorList masks,
                    at::TensorList tables, const std::optional<at::Tensor>& base,
                    std::vector<at::Tensor>& storage, FusionArgs<T>& a) {
  const at::ScalarType dtype = masks[0].scalar_type();
  const at::Device device = masks[0].device();
  int64_t partial_end = 0;
  make_factors<T>(op, masks, tables, d.batch, d.tokens, d.channels, dtype, device, storage,
                  a.factors, partial_end);
  a.stage = {make_dense<T>(op, "base", base, d.batch, d.tokens, d.channels, dtype, device, storage),
             nullptr, 0, static_cast<int>(masks.size())};
  a.batch = d.batch;
  a.tokens = d.tokens;
  a.channels = static_cast<int>(d.channels);
  return partial_end;
}

// out = (base or 1) * the mixtures; out may be base itself (the in-place op).
void fuse_into(const char* op, const FusionDims& d, at::TensorList masks, at::TensorList tables,
               const std::optional<at::Tensor>& base, at::Tensor& out) {
  const c10::cuda::CUDAGuard guard(masks[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks[0].scalar_type(),
                                  "mask_fusion_cuda", [&] {
    constexpr int V = kVectors<acc_t<scalar_t>>;
    std::vector<at::Tensor> storage;
    FusionArgs<scalar_t> a;
    fusion_args<scalar_t>(op, d, masks, tables, base, storage, a);
    a.group = group_size(d.channels, V);
    const int64_t tokens_per_block = kThreads / a.group;
    const auto blocks =
        static_cast<unsigned>((d.batch * d.tokens + tokens_per_block - 1) / tokens_per_block);
    mask_fusion_kernel<scalar_t, V><<<blocks, kThreads, 0, stream>>>(
        a, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor mask_fusion_cuda(at::TensorList masks, at::TensorList tables,
                            const std::optional<at::Tensor>& base) {
  const FusionDims d = check_first("mask_fusion", masks, tables);
  at::Tensor out = at::empty({d.batch, d.tokens, d.channels}, masks[0].options());
  if (out.numel() > 0) fuse_into("mask_fusion", d, masks, tables, base, out);
  return out;
}

void mask_fusion_inplace_cuda(at::TensorList masks, at::TensorList tables, at::Tensor& base) {
  const char* op = "mask_fusion_";
  const FusionDims d = check_first(op, masks, tables);
  TORCH_CHECK(base.is_contiguous(), op, ": base must be contiguous to be updated in place");
  if (base.numel() == 0) return;
  if (aligned(base).data_ptr() == base.data_ptr()) {
    fuse_into(op, d, masks, tables, base, base);
  } else {  // rows off the vector boundary: compute aside, then copy in
    at::Tensor out = at::empty(base.sizes(), base.options());
    fuse_into(op, d, masks, tables, base, out);
    base.copy_(out);
  }
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::optional<at::Tensor>>
mask_fusion_backward_cuda(const at::Tensor& grad, at::TensorList masks, at::TensorList tables,
                          const std::optional<at::Tensor>& base) {
  const char* op = "mask_fusion_backward";
  const FusionDims d = check_first(op, masks, tables);
  check_float_cuda(op, "grad", grad, masks[0].scalar_type(), "masks[0]", masks[0].device());
  check_shape(op, "grad", grad, {d.batch, d.tokens, d.channels}, "[B, N, C]");
  const c10::cuda::CUDAGuard guard(masks[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor grad_c = aligned(grad);
  std::vector<at::Tensor> grad_masks, grad_tables;
  for (size_t j = 0; j < masks.size(); ++j) {
    grad_masks.push_back(at::empty(masks[j].sizes(), masks[j].options()));
    grad_tables.push_back(at::empty(tables[j].sizes(), tables[j].options()));
  }
  std::optional<at::Tensor> grad_base;
  if (base.has_value()) grad_base = at::empty({d.batch, d.tokens, d.channels}, grad.options());
  if (d.batch * d.tokens == 0) {  // no token: the table gradients are empty sums
    for (at::Tensor& g : grad_tables) g.zero_();
    return {grad_masks, grad_tables, grad_base};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks[0].scalar_type(),
                                  "mask_fusion_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    constexpr int V = kVectors<A>;
    std::vector<at::Tensor> storage;
    FusionArgs<scalar_t> a;
    const int64_t stride = fusion_args<scalar_t>(op, d, masks, tables, base, storage, a);
    for (size_t j = 0; j < masks.size(); ++j) {
      a.factors[j].grad_masks = grad_masks[j].mutable_data_ptr<scalar_t>();
    }
    if (grad_base.has_value()) a.stage.grad_base = grad_base->mutable_data_ptr<scalar_t>();
    a.group = group_size(d.channels, V);
    const Chunking chunks(d.batch, d.tokens, a.group);
    const at::Tensor partials =
        at::empty({chunks.count, stride}, grad.options().dtype(c10::CppTypeToScalarType<A>::value));
    mask_fusion_backward_kernel<scalar_t, V><<<chunks.grid(), kThreads, 0, stream>>>(
        a, grad_c.const_data_ptr<scalar_t>(), partials.mutable_data_ptr<A>(), stride,
        chunks.length);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reduce_table_grads(a.factors, static_cast<int>(masks.size()), partials, chunks, d.channels,
                       grad_tables, stream);
  });
  return {grad_masks, grad_tables, grad_base};
}

}  // namespace
}  // namespace exposure_slot::cuda

TORCH_LIBRARY_IMPL(exposure_slot, CUDA, m) {
  m.impl("mask_fusion", &exposure_slot::cuda::mask_fusion_cuda);
  m.impl("mask_fusion_", &exposure_slot::cuda::mask_fusion_inplace_cuda);
  m.impl("mask_fusion_backward", &exposure_slot::cuda::mask_fusion_backward_cuda);
}
