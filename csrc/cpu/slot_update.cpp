// A slot level's update between two passes, on the CPU: exposure_slot::slot_update,
// for inference (no autograd; training runs the same steps as ATen ops).
//
// Formula (SPEC section 1), for each of the R = B*K slots, rows of C values:
//   u  = attn_v / attn_sum                           the pass's weighted mean of v
//   gi = W_ih u + b_ih,  gh = W_hh s + b_hh          GRUCell, gates ordered r, z, n
//   r  = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z)
//   n  = tanh(gi_n + r * gh_n),  h = (1 - z) * n + z * s
//   s' = h + W_2 relu(W_1 LN_pre_ff(h) + b_1) + b_2  the refining MLP
//   q  = (W_q LN_slots(s') + b_q) * scale            the next pass's queries
// and returns (s', q). The ATen form of these steps is a few dozen calls on
// [R, C] matrices, each costing more to launch than to compute, and the
// weights (9 C x C, 590 kB at C = 128) arrive cold after a pass has streamed
// its tokens through the cache: ~200 us per update, against ~30 us here.
//
// Memory layout: slots, attn_v [B,K,C], attn_sum [B,K]; the weights as
// nn.Linear / nn.GRUCell hold them, [out, in] row-major, so each output value is
// the dot product of a weight row with an input row (common.h's `dot`).
//
// Parallelisation: one OpenMP region; each matrix product splits its output
// features over the threads (a weight row is read once for all R rows), each
// row-wise step its rows. Every value is computed by one thread in a fixed order,
// so the results do not depend on the thread count.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "common.h"
#include "ops.h"

namespace exposure_slot::cpu {
namespace {

constexpr const char* kOp = "slot_update";

// Rows [r0, r0 + Rb) of y for the weight rows [j0, j0 + Jb).
template <int Jb, int Rb, typename T, typename Act>
inline void linear_block(const T* x, int64_t r0, int64_t in, const T* w, const T* bias,
                         int64_t j0, int64_t out, T* y, const Act& act) {
  T sums[Jb][Rb];
  dot_block<Jb, Rb>(w + j0 * in, x + r0 * in, in, sums);
  for (int j = 0; j < Jb; ++j) {
    for (int r = 0; r < Rb; ++r) y[(r0 + r) * out + j0 + j] = act(sums[j][r] + bias[j0 + j]);
  }
}

// y[r, j] = act(dot(w[j], x[r]) + bias[j]) for r < R, j < out: blocks of 4 weight
// rows x up to 4 input rows (the rows left after the groups of four as one group, so
// that a weight row is loaded once per group rather than once per row left), then
// the weight rows left one at a time; threads split the weight rows.
template <typename T, typename Act>
void linear(const T* x, int64_t R, int64_t in, const T* w, const T* bias, int64_t out, T* y,
            const Act& act) {
  constexpr int kJ = 4;
#pragma omp for schedule(static)
  for (int64_t j0 = 0; j0 < out; j0 += kJ) {
    if (j0 + kJ <= out) {
      for_each_group_of_4(R, [&]<int G>(int64_t r0) {
        linear_block<kJ, G>(x, r0, in, w, bias, j0, out, y, act);
      });
    } else {
      for (int64_t j = j0; j < out; ++j) {
        for_each_group_of_4(R, [&]<int G>(int64_t r0) {
          linear_block<1, G>(x, r0, in, w, bias, j, out, y, act);
        });
      }
    }
  }
}

// out = LayerNorm(x) * weight + bias over one row of C values (two passes over the
// row: the mean first, so the variance does not cancel).
template <typename T>
void layer_norm_row(const T* x, int64_t C, const T* weight, const T* bias, T eps, T* out) {
  T mean = 0;
  for (int64_t c = 0; c < C; ++c) mean += x[c];
  mean /= T(C);
  T var = 0;
  for (int64_t c = 0; c < C; ++c) var += (x[c] - mean) * (x[c] - mean);
  const T rstd = T(1) / std::sqrt(var / T(C) + eps);
  for (int64_t c = 0; c < C; ++c) out[c] = (x[c] - mean) * rstd * weight[c] + bias[c];
}

// The GRU's gate functions through exp(-|x|) (common.h's exp_nonpositive; libm's
// exp and tanh are a call per value, and were most of the op's time): never an
// overflow, and tanh keeps its absolute accuracy near 0. On a value or a whole
// vector (X = T or Vec<T>): written as a loop of scalars, g++ left the gates
// unvectorised for AVX2 (benchmarks/README.md, "Vectorisation report").
template <typename X>
inline X sigmoid(X x) {
  const X negative_abs = x < 0 ? x : -x;
  const X e = exp_nonpositive(negative_abs);
  const X s = 1 / (1 + e);
  return x >= 0 ? s : e * s;
}

template <typename X>
inline X tanh_of(X x) {
  const X e = exp_nonpositive(2 * (x < 0 ? x : -x));
  const X magnitude = (1 - e) / (1 + e);
  return x < 0 ? -magnitude : magnitude;
}

// The level's parameters, contiguous.
struct Weights {
  at::Tensor gru_weight_ih, gru_weight_hh, gru_bias_ih, gru_bias_hh;
  at::Tensor norm_pre_ff_weight, norm_pre_ff_bias;
  at::Tensor mlp_weight_1, mlp_bias_1, mlp_weight_2, mlp_bias_2;
  at::Tensor norm_slots_weight, norm_slots_bias, to_q_weight, to_q_bias;
};

// queries = (W_q LayerNorm_slots(slots) + b_q) * scale for R rows, `normed` their
// scratch: the update's last step, and a level's first queries (from slots_mu).
// Inside a parallel region its loops are shared out; outside, one thread runs them.
template <typename T>
void queries_step(const T* slots, int64_t R, int64_t C, const T* norm_weight,
                  const T* norm_bias, const T* to_q_weight, const T* to_q_bias, T scale, T eps,
                  T* normed, T* queries) {
  const auto scaled = [scale](T x) { return x * scale; };
#pragma omp for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    layer_norm_row(slots + r * C, C, norm_weight, norm_bias, eps, normed + r * C);
  }
  linear(normed, R, C, to_q_weight, to_q_bias, C, queries, scaled);
}

template <typename T>
void update_kernel(const T* slots, const T* attn_sum, const T* attn_v, const Weights& w,
                   int64_t R, int64_t C, T scale, T eps, T* new_slots, T* queries) {
  const auto p = [](const at::Tensor& t) { return t.const_data_ptr<T>(); };
  AlignedVector<T> u(R * C), gi(R * 3 * C), gh(R * 3 * C), h(R * C), normed(R * C),
      hidden(R * C);
  const auto identity = [](T x) { return x; };
  const auto relu = [](T x) { return x > T(0) ? x : T(0); };
  const bool parallel = R * 9 * C * C >= kMinParallelWork;
#pragma omp parallel if (parallel)
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) u[r * C + c] = attn_v[r * C + c] / attn_sum[r];
    }
    linear(u.data(), R, C, p(w.gru_weight_ih), p(w.gru_bias_ih), 3 * C, gi.data(), identity);
    linear(slots, R, C, p(w.gru_weight_hh), p(w.gru_bias_hh), 3 * C, gh.data(), identity);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      const T *i = gi.data() + r * 3 * C, *g = gh.data() + r * 3 * C;
      for_each_block<T>(C, [&](int64_t c0, auto blk) {
        using U = typename decltype(blk)::Unit;
        constexpr int64_t S = decltype(blk)::kStride;
        for (int64_t unit = 0; unit < blk.units; ++unit) {
          const int64_t c = c0 + unit * S;
          const U reset = sigmoid(load<U>(i + c) + load<U>(g + c));
          const U keep = sigmoid(load<U>(i + C + c) + load<U>(g + C + c));
          const U candidate = tanh_of(load<U>(i + 2 * C + c) + reset * load<U>(g + 2 * C + c));
          store(h.data() + r * C + c, (1 - keep) * candidate + keep * load<U>(slots + r * C + c));
        }
      });
      layer_norm_row(h.data() + r * C, C, p(w.norm_pre_ff_weight), p(w.norm_pre_ff_bias), eps,
                     normed.data() + r * C);
    }
    linear(normed.data(), R, C, p(w.mlp_weight_1), p(w.mlp_bias_1), C, hidden.data(), relu);
    // new_slots = h + the MLP's output: its second product, then the sum row-wise.
    linear(hidden.data(), R, C, p(w.mlp_weight_2), p(w.mlp_bias_2), C, new_slots, identity);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t c = 0; c < C; ++c) new_slots[r * C + c] += h[r * C + c];
    }
    queries_step(new_slots, R, C, p(w.norm_slots_weight), p(w.norm_slots_bias),
                 p(w.to_q_weight), p(w.to_q_bias), scale, eps, normed.data(), queries);
  }
}

void check_weight(const char* name, const at::Tensor& t, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  check_float_cpu(kOp, name, t, dtype, "slots");
  TORCH_CHECK(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> slot_update_cpu(
    const at::Tensor& slots, const at::Tensor& attn_sum, const at::Tensor& attn_v,
    const at::Tensor& gru_weight_ih, const at::Tensor& gru_weight_hh,
    const at::Tensor& gru_bias_ih, const at::Tensor& gru_bias_hh,
    const at::Tensor& norm_pre_ff_weight, const at::Tensor& norm_pre_ff_bias,
    const at::Tensor& mlp_weight_1, const at::Tensor& mlp_bias_1,
    const at::Tensor& mlp_weight_2, const at::Tensor& mlp_bias_2,
    const at::Tensor& norm_slots_weight, const at::Tensor& norm_slots_bias,
    const at::Tensor& to_q_weight, const at::Tensor& to_q_bias, double scale,
    double norm_eps) {
  const at::ScalarType dtype = slots.scalar_type();
  check_float_cpu(kOp, "slots", slots, dtype, "slots");
  TORCH_CHECK(slots.dim() == 3, kOp, ": slots must be [B, K, C], got shape ", slots.sizes());
  const int64_t B = slots.size(0), K = slots.size(1), C = slots.size(2);
  check_weight("attn_v", attn_v, {B, K, C}, dtype);
  check_weight("attn_sum", attn_sum, {B, K}, dtype);
  check_weight("gru_weight_ih", gru_weight_ih, {3 * C, C}, dtype);
  check_weight("gru_weight_hh", gru_weight_hh, {3 * C, C}, dtype);
  check_weight("gru_bias_ih", gru_bias_ih, {3 * C}, dtype);
  check_weight("gru_bias_hh", gru_bias_hh, {3 * C}, dtype);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"norm_pre_ff_weight", norm_pre_ff_weight},
                                {"norm_pre_ff_bias", norm_pre_ff_bias},
                                {"mlp_bias_1", mlp_bias_1}, {"mlp_bias_2", mlp_bias_2},
                                {"norm_slots_weight", norm_slots_weight},
                                {"norm_slots_bias", norm_slots_bias}, {"to_q_bias", to_q_bias}}) {
    check_weight(name, t, {C}, dtype);
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mlp_weight_1", mlp_weight_1},
                                {"mlp_weight_2", mlp_weight_2}, {"to_q_weight", to_q_weight}}) {
    check_weight(name, t, {C, C}, dtype);
  }

  // Contiguous copies where needed (the first iteration's slots are slots_mu
  // expanded over the batch).
  const auto dense = [](const at::Tensor& t) { return t.contiguous(); };
  const Weights dw{dense(gru_weight_ih), dense(gru_weight_hh), dense(gru_bias_ih),
                   dense(gru_bias_hh), dense(norm_pre_ff_weight), dense(norm_pre_ff_bias),
                   dense(mlp_weight_1), dense(mlp_bias_1), dense(mlp_weight_2),
                   dense(mlp_bias_2), dense(norm_slots_weight), dense(norm_slots_bias),
                   dense(to_q_weight), dense(to_q_bias)};
  const at::Tensor s = dense(slots), sums = dense(attn_sum), weighted = dense(attn_v);
  at::Tensor new_slots = at::empty({B, K, C}, slots.options());
  at::Tensor queries = at::empty({B, K, C}, slots.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, kOp, [&] {
    update_kernel<scalar_t>(s.const_data_ptr<scalar_t>(), sums.const_data_ptr<scalar_t>(),
                            weighted.const_data_ptr<scalar_t>(), dw, B * K, C,
                            static_cast<scalar_t>(scale), static_cast<scalar_t>(norm_eps),
                            new_slots.mutable_data_ptr<scalar_t>(),
                            queries.mutable_data_ptr<scalar_t>());
  });
  return {new_slots, queries};
}

at::Tensor slot_queries_cpu(const at::Tensor& slots, const at::Tensor& norm_slots_weight,
                            const at::Tensor& norm_slots_bias, const at::Tensor& to_q_weight,
                            const at::Tensor& to_q_bias, double scale, double norm_eps) {
  const at::ScalarType dtype = slots.scalar_type();
  check_float_cpu(kOp, "slots", slots, dtype, "slots");
  TORCH_CHECK(slots.dim() == 3, kOp, ": slots must be [B, K, C], got shape ", slots.sizes());
  const int64_t R = slots.size(0) * slots.size(1), C = slots.size(2);
  check_weight("norm_slots_weight", norm_slots_weight, {C}, dtype);
  check_weight("norm_slots_bias", norm_slots_bias, {C}, dtype);
  check_weight("to_q_weight", to_q_weight, {C, C}, dtype);
  check_weight("to_q_bias", to_q_bias, {C}, dtype);
  const at::Tensor s = slots.contiguous(), nw = norm_slots_weight.contiguous(),
                   nb = norm_slots_bias.contiguous(), qw = to_q_weight.contiguous(),
                   qb = to_q_bias.contiguous();
  at::Tensor queries = at::empty(slots.sizes(), slots.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, kOp, [&] {
    AlignedVector<scalar_t> normed(R * C);
    queries_step(s.const_data_ptr<scalar_t>(), R, C, nw.const_data_ptr<scalar_t>(),
                 nb.const_data_ptr<scalar_t>(), qw.const_data_ptr<scalar_t>(),
                 qb.const_data_ptr<scalar_t>(), static_cast<scalar_t>(scale),
                 static_cast<scalar_t>(norm_eps), normed.data(),
                 queries.mutable_data_ptr<scalar_t>());
  });
  return queries;
}

}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("slot_update", &exposure_slot::cpu::slot_update_cpu);
}
