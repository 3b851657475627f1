// Mask-weighted fusion on the CPU: forward and backward of
// exposure_slot::mask_fusion.
//
// Formula (SPEC section 1: pf = sum_i A[i,n] * prompts[i,:], and the products
// k * pf, PF * b_c, SF * a_c)
//   mix[b,n,c] = sum_i masks[b,i,n] * table[tb,i,c]    tb = b, or 0 if table has batch 1
//   out[b,n,c] = base[b,n,c] * mix[b,n,c]              (out = mix without base)
// Backward, for the output gradient grad[b,n,c]:
//   gb                 = grad * base                   (grad without base)
//   grad_base          = grad * mix                    (mix recomputed, not stored)
//   grad_masks[b,i,n]  = sum_c gb[b,n,c] * table[tb,i,c]
//   grad_table[tb,i,c] = sum_{b,n} masks[b,i,n] * gb[b,n,c]  (b summed too if batch 1)
//
// Memory layout: every tensor is made contiguous (row-major) first.
//   masks [B,K,N]        one token's K weights lie N apart. K is small (3 to 16 in
//                        the model), so the per-token reads are K forward streams,
//                        which the hardware prefetcher follows.
//   table [TB,K,C]       K*C values, stays in L1 for the whole pass.
//   base, out, grad [B,N,C]
//                        one token's C channels are contiguous, so every inner loop
//                        runs over c with unit stride and __restrict__ pointers: the
//                        compiler vectorises each of them (checked with
//                        -fopt-info-vec-optimized at -O3 -march=native, gcc 12).
// Each pass streams its [B,N,C] tensors once. The forward does 2K+1 flops per
// output value and runs near the copy-bandwidth floor at the model's K (3, 7); the
// backward does 6K+2 (it recomputes the mixture) and is bound by loads and
// multiply-adds, about 2x its bandwidth floor at K = 7. benchmarks/README.md has the
// numbers.
//
// Parallelisation: OpenMP over tokens (batch and token index flattened), static
// schedule, skipped for small problems. Everything per token depends on that token
// only, so out, grad_masks and grad_base do not depend on the thread count.
// grad_table is a sum over tokens. To keep its bits independent of the thread count
// it is reduced in two stages: the tokens of each batch item are cut into chunks of
// kChunk (a constant, never derived from the thread count), each chunk sums its own
// [K,C] partial in token order, and the partials are then added in chunk order.
// The partials take K/kChunk of the memory of grad.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace exposure_slot::cpu {
namespace {

// Tokens per grad_table partial. Large enough that the partials are small next to
// grad; small enough that a 128x128 map (16384 tokens) still gives 64 chunks to share.
constexpr int64_t kChunk = 256;

// Below this many multiply-adds, starting a parallel region costs more than it saves.
constexpr int64_t kMinParallelWork = int64_t{1} << 16;

struct FusionDims {
  int64_t batch;
  int64_t slots;     // K
  int64_t tokens;    // N
  int64_t channels;  // C
  bool table_batched;  // table is [B,K,C]; otherwise [1,K,C], shared by the batch
};

// ---------------------------------------------------------------- argument checks

void check_float_cpu(const char* op, const char* name, const at::Tensor& t,
                     at::ScalarType dtype) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name,
              " must be a CPU tensor for the CPU kernel, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
              name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": all tensors must share one dtype, but ",
              name, " is ", t.scalar_type(), " and masks is ", dtype);
}

void check_shape(const char* op, const char* name, const at::Tensor& t,
                 const std::array<int64_t, 3>& expected, const char* layout) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name, " must be ", layout,
              " = ", at::IntArrayRef(expected), ", got shape ", t.sizes());
}

FusionDims check_inputs(const char* op, const at::Tensor& masks, const at::Tensor& table,
                        const std::optional<at::Tensor>& base) {
  const at::ScalarType dtype = masks.scalar_type();
  check_float_cpu(op, "masks", masks, dtype);
  check_float_cpu(op, "table", table, dtype);
  TORCH_CHECK(masks.dim() == 3, op, ": masks must be 3-D [B, K, N], got shape ",
              masks.sizes());
  TORCH_CHECK(table.dim() == 3, op, ": table must be 3-D [B, K, C] or [1, K, C], got shape ",
              table.sizes());
  const FusionDims d{masks.size(0), masks.size(1), masks.size(2), table.size(2),
                     table.size(0) != 1};
  TORCH_CHECK(d.slots >= 1, op, ": masks must have at least one slot (K >= 1), got shape ",
              masks.sizes());
  TORCH_CHECK(table.size(1) == d.slots, op, ": table has ", table.size(1),
              " slots but masks has K = ", d.slots, " (table ", table.sizes(), ", masks ",
              masks.sizes(), ")");
  TORCH_CHECK(table.size(0) == 1 || table.size(0) == d.batch, op,
              ": table batch must be 1 or B = ", d.batch, " (from masks), got table shape ",
              table.sizes());
  if (base.has_value()) {
    check_float_cpu(op, "base", *base, dtype);
    check_shape(op, "base", *base, {d.batch, d.tokens, d.channels}, "[B, N, C]");
  }
  return d;
}

template <typename T>
const T* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------- per-token loops
//
// A token's C channels are processed in blocks of kBlock values. Full blocks get a
// compile-time width, so the compiler unrolls them and keeps the block's running
// sums in vector registers across the K slots instead of re-loading and re-storing
// an output row once per slot (1.6x faster forward at K = 7, C = 128). The last,
// partial block runs the same code with a runtime width.

template <typename T>
constexpr int64_t kBlock = 256 / sizeof(T);  // 8 AVX2 registers' worth

template <typename T, typename Body>
inline void for_each_block(int64_t C, const Body& body) {
  int64_t c0 = 0;
  for (; c0 + kBlock<T> <= C; c0 += kBlock<T>) {
    body(c0, std::integral_constant<int64_t, kBlock<T>>{});
  }
  if (c0 < C) body(c0, C - c0);
}

// mix[w] = sum_i m[i * m_stride] * table[i * C + w] for w < width: one block of
// one token's mixture. m points at the token's weight for slot 0.
template <typename T, typename Width>
inline void mix_block(const T* __restrict__ m, int64_t m_stride, const T* __restrict__ table,
                      int64_t K, int64_t C, Width width, T* __restrict__ mix) {
  const T m0 = m[0];
  for (int64_t w = 0; w < width; ++w) mix[w] = m0 * table[w];
  for (int64_t i = 1; i < K; ++i) {
    const T mi = m[i * m_stride];
    const T* __restrict__ row = table + i * C;
    for (int64_t w = 0; w < width; ++w) mix[w] += mi * row[w];
  }
}

template <typename T, typename Width>
inline void store_block(const T* __restrict__ mix, const T* __restrict__ base, T* __restrict__ out,
                        Width width) {
  if (base != nullptr) {
    for (int64_t w = 0; w < width; ++w) out[w] = base[w] * mix[w];
  } else {
    for (int64_t w = 0; w < width; ++w) out[w] = mix[w];
  }
}

// The two gradients of out = base * mix.
template <typename T, typename Width>
inline void product_grads(const T* __restrict__ grad, const T* __restrict__ mix,
                          const T* __restrict__ base, T* __restrict__ grad_base,
                          T* __restrict__ grad_mix, Width width) {
  for (int64_t w = 0; w < width; ++w) {
    grad_base[w] = grad[w] * mix[w];
    grad_mix[w] = grad[w] * base[w];
  }
}

// Returns sum_c gb[c] * row[c] and adds m * gb to acc, in one pass over gb: the
// slot's grad_masks entry and its contribution to the grad_table partial. The simd
// reduction lets the compiler split the sum across vector lanes; its order then
// depends on the build, never on the thread count.
template <typename T>
inline T dot_and_add_scaled(const T* __restrict__ gb, const T* __restrict__ row, T m,
                            T* __restrict__ acc, int64_t C) {
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < C; ++c) {
    dot += gb[c] * row[c];
    acc[c] += m * gb[c];
  }
  return dot;
}

template <typename T>
inline void add_into(const T* __restrict__ x, T* __restrict__ acc, int64_t C) {
  for (int64_t c = 0; c < C; ++c) acc[c] += x[c];
}

// ---------------------------------------------------------------- kernels

template <typename T>
void forward_kernel(const T* masks, const T* table, const T* base, T* out,
                    const FusionDims& d) {
  const int64_t K = d.slots, N = d.tokens, C = d.channels;
  const int64_t tokens = d.batch * N;
#pragma omp parallel for schedule(static) if (tokens * K * C >= kMinParallelWork)
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t b = t / N, n = t % N;
    const T* m = masks + b * K * N + n;
    const T* table_b = table + (d.table_batched ? b * K * C : 0);
    const T* base_row = base != nullptr ? base + t * C : nullptr;
    for_each_block<T>(C, [&](int64_t c0, auto width) {
      T mix[kBlock<T>];
      mix_block(m, N, table_b + c0, K, C, width, mix);
      store_block(mix, base_row != nullptr ? base_row + c0 : nullptr, out + t * C + c0, width);
    });
  }
}

template <typename T>
void backward_kernel(const T* grad, const T* masks, const T* table, const T* base,
                     T* grad_masks, T* grad_table, T* grad_base, const FusionDims& d) {
  const int64_t K = d.slots, N = d.tokens, C = d.channels;
  const int64_t chunks_per_item = (N + kChunk - 1) / kChunk;
  const int64_t chunks = d.batch * chunks_per_item;
  const bool parallel = d.batch * N * K * C >= kMinParallelWork;
  std::vector<T> partials(chunks * K * C);  // [chunk, K, C]

  // Stage 1: everything per token, plus one grad_table partial per chunk.
#pragma omp parallel if (parallel)
  {
    std::vector<T> gb_row(base != nullptr ? C : 0);  // this thread's grad * base
#pragma omp for schedule(static)
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t b = chunk / chunks_per_item;
      const int64_t n_begin = (chunk % chunks_per_item) * kChunk;
      const int64_t n_end = std::min(n_begin + kChunk, N);
      const T* masks_b = masks + b * K * N;
      const T* table_b = table + (d.table_batched ? b * K * C : 0);
      T* grad_masks_b = grad_masks + b * K * N;
      T* partial = partials.data() + chunk * K * C;
      for (int64_t n = n_begin; n < n_end; ++n) {
        const int64_t row = (b * N + n) * C;
        const T* gb = grad + row;
        if (base != nullptr) {
          for_each_block<T>(C, [&](int64_t c0, auto width) {
            T mix[kBlock<T>];  // recomputed: cheaper than storing it in the forward
            mix_block(masks_b + n, N, table_b + c0, K, C, width, mix);
            product_grads(grad + row + c0, mix, base + row + c0, grad_base + row + c0,
                          gb_row.data() + c0, width);
          });
          gb = gb_row.data();
        }
        for (int64_t i = 0; i < K; ++i) {
          grad_masks_b[i * N + n] =
              dot_and_add_scaled(gb, table_b + i * C, masks_b[i * N + n], partial + i * C, C);
        }
      }
    }
  }

  // Stage 2: each grad_table row adds its chunks' partials in chunk order. A shared
  // table ([1,K,C]) collects the chunks of every batch item.
  const int64_t table_batch = d.table_batched ? d.batch : 1;
  const int64_t chunks_per_table_item = d.table_batched ? chunks_per_item : chunks;
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t r = 0; r < table_batch * K; ++r) {
    const int64_t tb = r / K, i = r % K;
    T* out = grad_table + r * C;
    std::fill(out, out + C, T(0));
    for (int64_t j = tb * chunks_per_table_item; j < (tb + 1) * chunks_per_table_item; ++j) {
      add_into(partials.data() + (j * K + i) * C, out, C);
    }
  }
}

// ---------------------------------------------------------------- host wrappers

at::Tensor mask_fusion_cpu(const at::Tensor& masks, const at::Tensor& table,
                           const std::optional<at::Tensor>& base) {
  const FusionDims d = check_inputs("mask_fusion", masks, table, base);
  const at::Tensor masks_c = masks.contiguous();
  const at::Tensor table_c = table.contiguous();
  const std::optional<at::Tensor> base_c =
      base.has_value() ? std::optional<at::Tensor>(base->contiguous()) : std::nullopt;
  at::Tensor out = at::empty({d.batch, d.tokens, d.channels}, masks.options());
  AT_DISPATCH_FLOATING_TYPES(masks.scalar_type(), "mask_fusion_cpu", [&] {
    forward_kernel<scalar_t>(masks_c.const_data_ptr<scalar_t>(),
                             table_c.const_data_ptr<scalar_t>(),
                             optional_data<scalar_t>(base_c), out.mutable_data_ptr<scalar_t>(),
                             d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, std::optional<at::Tensor>> mask_fusion_backward_cpu(
    const at::Tensor& grad, const at::Tensor& masks, const at::Tensor& table,
    const std::optional<at::Tensor>& base) {
  const FusionDims d = check_inputs("mask_fusion_backward", masks, table, base);
  check_float_cpu("mask_fusion_backward", "grad", grad, masks.scalar_type());
  check_shape("mask_fusion_backward", "grad", grad, {d.batch, d.tokens, d.channels},
              "[B, N, C]");
  const at::Tensor grad_c = grad.contiguous();
  const at::Tensor masks_c = masks.contiguous();
  const at::Tensor table_c = table.contiguous();
  const std::optional<at::Tensor> base_c =
      base.has_value() ? std::optional<at::Tensor>(base->contiguous()) : std::nullopt;

  at::Tensor grad_masks = at::empty(masks_c.sizes(), masks.options());
  at::Tensor grad_table = at::empty(table_c.sizes(), table.options());
  std::optional<at::Tensor> grad_base;
  if (base.has_value()) grad_base = at::empty(base_c->sizes(), base->options());

  AT_DISPATCH_FLOATING_TYPES(masks.scalar_type(), "mask_fusion_backward_cpu", [&] {
    backward_kernel<scalar_t>(
        grad_c.const_data_ptr<scalar_t>(), masks_c.const_data_ptr<scalar_t>(),
        table_c.const_data_ptr<scalar_t>(), optional_data<scalar_t>(base_c),
        grad_masks.mutable_data_ptr<scalar_t>(), grad_table.mutable_data_ptr<scalar_t>(),
        grad_base.has_value() ? grad_base->mutable_data_ptr<scalar_t>() : nullptr, d);
  });
  return {grad_masks, grad_table, grad_base};
}

}  // namespace
}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("mask_fusion", &exposure_slot::cpu::mask_fusion_cpu);
  m.impl("mask_fusion_backward", &exposure_slot::cpu::mask_fusion_backward_cpu);
}
