// The CPU kernels' entry points, for CPU code that calls them directly: the
// slot-in-slot inference op (slot_in_slot_inference.cpp) runs a whole forward
// through them without going back to Python or the dispatcher. Each op's CPU kernel
// calls its entry point; csrc/exposure_slot.cpp has the schemas and what they compute.

#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace exposure_slot::cpu {

at::Tensor mask_fusion_cpu(at::TensorList masks, at::TensorList tables,
                           const std::optional<at::Tensor>& base);

// A pass's arguments, as slot_attention_pass's schema lists them (csrc/exposure_slot.cpp),
// by reference: they must outlive the call that takes them.
struct PassArgs {
  const at::Tensor& k_in;
  const at::Tensor& v_in;
  const at::Tensor& norm_k_weight;
  const at::Tensor& norm_k_bias;
  const at::Tensor& norm_v_weight;
  const at::Tensor& norm_v_bias;
  at::TensorList stage_bases;
  at::IntArrayRef base_stages;
  at::TensorList factor_masks;
  at::TensorList factor_tables;
  at::IntArrayRef factor_stages;
  const at::Tensor& queries;
  const std::optional<at::Tensor>& stats;
  double norm_eps;
  double attn_eps;
};

// (attn, attn_sum, attn_v, stats)
using PassOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

PassOutputs slot_attention_pass_cpu(const PassArgs& args);

// slot_attention_pass_cpu that also writes out = prod_j mix(out_masks[j],
// out_tables[j]) * mix(attn, own_table) per token, once the token's attention is
// known: an output fusion in the same sweep. `out` [B,N,C] may be k_in or one of
// the stage bases (a token's row is read before it is written). Not an op: for
// slot_in_slot_inference's last leaf pass.
PassOutputs slot_attention_pass_with_output_cpu(const PassArgs& args, at::TensorList out_masks,
                                                at::TensorList out_tables,
                                                const at::Tensor& own_table, at::Tensor& out);

// (attn, attn_sum, attn_v, stats, child_attn, child_attn_sum, child_attn_v)
using HandDownOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

HandDownOutputs slot_attention_pass_hand_down_cpu(const PassArgs& args, const at::Tensor& prompts,
                                                  at::Tensor& hand_down,
                                                  const std::optional<at::Tensor>& child_queries);

// slot_attention_pass_hand_down_cpu that hands its child the child's input rows,
// rows_k = k * pf and rows_v = v * pf [B,N,C] (which may be k_in, v_in: a token's rows
// are read before they are written), rather than its modulation. Not an op: for
// slot_in_slot_inference, which keeps its leaf's input so.
HandDownOutputs slot_attention_pass_hand_down_rows_cpu(
    const PassArgs& args, const at::Tensor& prompts, at::Tensor& rows_k, at::Tensor& rows_v,
    const std::optional<at::Tensor>& child_queries);

// (new slots, next queries)
std::tuple<at::Tensor, at::Tensor> slot_update_cpu(
    const at::Tensor& slots, const at::Tensor& attn_sum, const at::Tensor& attn_v,
    const at::Tensor& gru_weight_ih, const at::Tensor& gru_weight_hh,
    const at::Tensor& gru_bias_ih, const at::Tensor& gru_bias_hh,
    const at::Tensor& norm_pre_ff_weight, const at::Tensor& norm_pre_ff_bias,
    const at::Tensor& mlp_weight_1, const at::Tensor& mlp_bias_1,
    const at::Tensor& mlp_weight_2, const at::Tensor& mlp_bias_2,
    const at::Tensor& norm_slots_weight, const at::Tensor& norm_slots_bias,
    const at::Tensor& to_q_weight, const at::Tensor& to_q_bias, double scale,
    double norm_eps);

// (grad slots, grad attn_sum, grad attn_v, the 14 weights' gradients)
std::tuple<at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> slot_update_backward_cpu(
    const at::Tensor& grad_slots, const at::Tensor& grad_queries, const at::Tensor& slots,
    const at::Tensor& attn_sum, const at::Tensor& attn_v, const at::Tensor& gru_weight_ih,
    const at::Tensor& gru_weight_hh, const at::Tensor& gru_bias_ih,
    const at::Tensor& gru_bias_hh, const at::Tensor& norm_pre_ff_weight,
    const at::Tensor& norm_pre_ff_bias, const at::Tensor& mlp_weight_1,
    const at::Tensor& mlp_bias_1, const at::Tensor& mlp_weight_2, const at::Tensor& mlp_bias_2,
    const at::Tensor& norm_slots_weight, const at::Tensor& norm_slots_bias,
    const at::Tensor& to_q_weight, const at::Tensor& to_q_bias, double scale,
    double norm_eps);

// The queries of slots [B,K,C], (W_q LayerNorm_slots(slots) + b_q) * scale: the
// slot update's last step alone (a level's first queries, from its slots_mu).
at::Tensor slot_queries_cpu(const at::Tensor& slots, const at::Tensor& norm_slots_weight,
                            const at::Tensor& norm_slots_bias, const at::Tensor& to_q_weight,
                            const at::Tensor& to_q_bias, double scale, double norm_eps);

}  // namespace exposure_slot::cpu
