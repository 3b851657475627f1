// A slot level's update between two passes, on the CPU: exposure_slot::slot_update
// and its backward, exposure_slot::slot_update_backward.
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
// Backward (the autograd formula of slot_update, for training): the gradients of
// every input from those of s' and q, by the chain rule through the steps above
// (LayerNorms by ATen's own backward), recomputing the forward's intermediates.
// Its products are on [R, C] and [R, 3C] matrices: ATen calls from here (about 45,
// a few microseconds each), where the same steps under autograd cost a node and a
// Python frame each.
//
// Memory layout: slots, attn_v [B,K,C], attn_sum [B,K]; the weights as
// nn.Linear / nn.GRUCell hold them, [out, in] row-major, so each output value is
// the dot product of a weight row with an input row (common.h's `dot`).
//
// Parallelisation: one OpenMP region; each matrix product splits its output
// features over the threads (a weight row is read once for all R rows), each
// row-wise step its rows. Every value is computed by one thread in a fixed order,
// so the results do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <tuple>
#include <utility>
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

void check_weight(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
                  at::ScalarType dtype) {
  check_float_cpu(op, name, t, dtype, "slots");
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

// The inputs of slot_update and of its backward (`op`): B, K, C from slots.
void check_update_args(const char* op, const at::Tensor& slots, const at::Tensor& attn_sum,
                       const at::Tensor& attn_v, const Weights& w) {
  const at::ScalarType dtype = slots.scalar_type();
  check_float_cpu(op, "slots", slots, dtype, "slots");
  TORCH_CHECK(slots.dim() == 3, op, ": slots must be [B, K, C], got shape ", slots.sizes());
  const int64_t B = slots.size(0), K = slots.size(1), C = slots.size(2);
  check_weight(op, "attn_v", attn_v, {B, K, C}, dtype);
  check_weight(op, "attn_sum", attn_sum, {B, K}, dtype);
  check_weight(op, "gru_weight_ih", w.gru_weight_ih, {3 * C, C}, dtype);
  check_weight(op, "gru_weight_hh", w.gru_weight_hh, {3 * C, C}, dtype);
  check_weight(op, "gru_bias_ih", w.gru_bias_ih, {3 * C}, dtype);
  check_weight(op, "gru_bias_hh", w.gru_bias_hh, {3 * C}, dtype);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"norm_pre_ff_weight", w.norm_pre_ff_weight},
                                {"norm_pre_ff_bias", w.norm_pre_ff_bias},
                                {"mlp_bias_1", w.mlp_bias_1}, {"mlp_bias_2", w.mlp_bias_2},
                                {"norm_slots_weight", w.norm_slots_weight},
                                {"norm_slots_bias", w.norm_slots_bias}, {"to_q_bias", w.to_q_bias}}) {
    check_weight(op, name, t, {C}, dtype);
  }
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"mlp_weight_1", w.mlp_weight_1},
                                {"mlp_weight_2", w.mlp_weight_2}, {"to_q_weight", w.to_q_weight}}) {
    check_weight(op, name, t, {C, C}, dtype);
  }
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
  const Weights given{gru_weight_ih,      gru_weight_hh,     gru_bias_ih,     gru_bias_hh,
                      norm_pre_ff_weight, norm_pre_ff_bias,  mlp_weight_1,    mlp_bias_1,
                      mlp_weight_2,       mlp_bias_2,        norm_slots_weight, norm_slots_bias,
                      to_q_weight,        to_q_bias};
  check_update_args(kOp, slots, attn_sum, attn_v, given);
  const at::ScalarType dtype = slots.scalar_type();
  const int64_t B = slots.size(0), K = slots.size(1), C = slots.size(2);

  // Contiguous copies where needed (the first iteration's slots are slots_mu
  // expanded over the batch).
  const auto dense = [](const at::Tensor& t) { return t.contiguous(); };
  const Weights dw{dense(given.gru_weight_ih),      dense(given.gru_weight_hh),
                   dense(given.gru_bias_ih),        dense(given.gru_bias_hh),
                   dense(given.norm_pre_ff_weight), dense(given.norm_pre_ff_bias),
                   dense(given.mlp_weight_1),       dense(given.mlp_bias_1),
                   dense(given.mlp_weight_2),       dense(given.mlp_bias_2),
                   dense(given.norm_slots_weight),  dense(given.norm_slots_bias),
                   dense(given.to_q_weight),        dense(given.to_q_bias)};
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

std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> slot_update_backward_cpu(
    const at::Tensor& grad_slots, const at::Tensor& grad_queries, const at::Tensor& slots,
    const at::Tensor& attn_sum, const at::Tensor& attn_v, const at::Tensor& gru_weight_ih,
    const at::Tensor& gru_weight_hh, const at::Tensor& gru_bias_ih,
    const at::Tensor& gru_bias_hh, const at::Tensor& norm_pre_ff_weight,
    const at::Tensor& norm_pre_ff_bias, const at::Tensor& mlp_weight_1,
    const at::Tensor& mlp_bias_1, const at::Tensor& mlp_weight_2, const at::Tensor& mlp_bias_2,
    const at::Tensor& norm_slots_weight, const at::Tensor& norm_slots_bias,
    const at::Tensor& to_q_weight, const at::Tensor& to_q_bias, double scale,
    double norm_eps) {
  const char* op = "slot_update_backward";
  check_update_args(op, slots, attn_sum, attn_v,
                    {gru_weight_ih, gru_weight_hh, gru_bias_ih, gru_bias_hh, norm_pre_ff_weight,
                     norm_pre_ff_bias, mlp_weight_1, mlp_bias_1, mlp_weight_2, mlp_bias_2,
                     norm_slots_weight, norm_slots_bias, to_q_weight, to_q_bias});
  const int64_t B = slots.size(0), K = slots.size(1), C = slots.size(2), R = B * K;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_slots", grad_slots},
                                {"grad_queries", grad_queries}}) {
    check_float_cpu(op, name, t, slots.scalar_type(), "slots");
    check_shape(op, name, t, {B, K, C}, "[B, K, C] like slots");
  }

  // The forward again, keeping what the backward needs.
  const at::Tensor s = slots.reshape({R, C}), sums = attn_sum.reshape({R, 1});
  const at::Tensor u = attn_v.reshape({R, C}) / sums;
  const at::Tensor gi = at::addmm(gru_bias_ih, u, gru_weight_ih.t());
  const at::Tensor gh = at::addmm(gru_bias_hh, s, gru_weight_hh.t());
  const auto gi_gates = gi.chunk(3, 1), gh_gates = gh.chunk(3, 1);
  const at::Tensor r = at::sigmoid(gi_gates[0] + gh_gates[0]);
  const at::Tensor z = at::sigmoid(gi_gates[1] + gh_gates[1]);
  const at::Tensor n = at::tanh(gi_gates[2] + r * gh_gates[2]);
  const at::Tensor h = n + z * (s - n);
  const auto [normed_h, mean_h, rstd_h] =
      at::native_layer_norm(h, {C}, norm_pre_ff_weight, norm_pre_ff_bias, norm_eps);
  const at::Tensor pre_relu = at::addmm(mlp_bias_1, normed_h, mlp_weight_1.t());
  const at::Tensor hidden = at::relu(pre_relu);
  const at::Tensor new_slots = h + at::addmm(mlp_bias_2, hidden, mlp_weight_2.t());
  const auto [normed_s, mean_s, rstd_s] =
      at::native_layer_norm(new_slots, {C}, norm_slots_weight, norm_slots_bias, norm_eps);

  const std::array<bool, 3> all{true, true, true};
  // q = (W_q normed_s + b_q) * scale
  const at::Tensor g_q = grad_queries.reshape({R, C}) * scale;
  const at::Tensor g_to_q_weight = g_q.t().mm(normed_s), g_to_q_bias = g_q.sum(0);
  auto [g_new_slots, g_norm_slots_weight, g_norm_slots_bias] = at::native_layer_norm_backward(
      g_q.mm(to_q_weight), new_slots, {C}, mean_s, rstd_s, norm_slots_weight, norm_slots_bias,
      all);
  g_new_slots += grad_slots.reshape({R, C});
  // s' = h + W_2 relu(W_1 normed_h + b_1) + b_2
  const at::Tensor g_mlp_weight_2 = g_new_slots.t().mm(hidden);
  const at::Tensor g_mlp_bias_2 = g_new_slots.sum(0);
  const at::Tensor g_pre_relu = at::threshold_backward(g_new_slots.mm(mlp_weight_2), pre_relu, 0);
  const at::Tensor g_mlp_weight_1 = g_pre_relu.t().mm(normed_h);
  const at::Tensor g_mlp_bias_1 = g_pre_relu.sum(0);
  auto [g_h, g_norm_pre_ff_weight, g_norm_pre_ff_bias] = at::native_layer_norm_backward(
      g_pre_relu.mm(mlp_weight_1), h, {C}, mean_h, rstd_h, norm_pre_ff_weight, norm_pre_ff_bias,
      all);
  g_h += g_new_slots;
  // h = n + z (s - n): the gates' pre-activations (r's through n's r * gh_n)
  const at::Tensor g_pre_n = g_h * (1 - z) * (1 - n * n);
  const at::Tensor g_pre_z = g_h * (s - n) * z * (1 - z);
  const at::Tensor g_pre_r = g_pre_n * gh_gates[2] * r * (1 - r);
  const at::Tensor g_gi = at::cat({g_pre_r, g_pre_z, g_pre_n}, 1);
  const at::Tensor g_gh = at::cat({g_pre_r, g_pre_z, g_pre_n * r}, 1);
  const at::Tensor g_u = g_gi.mm(gru_weight_ih);
  const at::Tensor g_slots = g_h * z + g_gh.mm(gru_weight_hh);
  // u = attn_v / attn_sum
  const at::Tensor g_attn_v = g_u / sums;
  const at::Tensor g_attn_sum = -(g_u * u).sum(1) / sums.squeeze(1);
  std::vector<at::Tensor> g_weights{
      g_gi.t().mm(u), g_gh.t().mm(s), g_gi.sum(0), g_gh.sum(0),
      g_norm_pre_ff_weight, g_norm_pre_ff_bias, g_mlp_weight_1, g_mlp_bias_1,
      g_mlp_weight_2, g_mlp_bias_2, g_norm_slots_weight, g_norm_slots_bias,
      g_to_q_weight, g_to_q_bias};
  return {g_slots.view({B, K, C}), g_attn_sum.view({B, K}), g_attn_v.view({B, K, C}),
          std::move(g_weights)};
}

at::Tensor slot_queries_cpu(const at::Tensor& slots, const at::Tensor& norm_slots_weight,
                            const at::Tensor& norm_slots_bias, const at::Tensor& to_q_weight,
                            const at::Tensor& to_q_bias, double scale, double norm_eps) {
  const at::ScalarType dtype = slots.scalar_type();
  check_float_cpu(kOp, "slots", slots, dtype, "slots");
  TORCH_CHECK(slots.dim() == 3, kOp, ": slots must be [B, K, C], got shape ", slots.sizes());
  const int64_t R = slots.size(0) * slots.size(1), C = slots.size(2);
  check_weight(kOp, "norm_slots_weight", norm_slots_weight, {C}, dtype);
  check_weight(kOp, "norm_slots_bias", norm_slots_bias, {C}, dtype);
  check_weight(kOp, "to_q_weight", to_q_weight, {C, C}, dtype);
  check_weight(kOp, "to_q_bias", to_q_bias, {C}, dtype);
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
  m.impl("slot_update_backward", &exposure_slot::cpu::slot_update_backward_cpu);
}
