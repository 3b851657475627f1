// The exposure_slot operator library: every op's schema, in one place.
//
// Kernels register against these schemas per device in csrc/<device>/*.cpp
// (TORCH_LIBRARY_IMPL). The Python side of each op -- its fake (meta) kernel for
// torch.compile and its autograd formula -- lives in exposure_slot/ops/<op>.py;
// set_python_module tells torch which module that is, so torch can point a user
// at it (or import it) when an op is traced before the module was imported.

#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(exposure_slot, m) {
  // The product of J >= 1 mask-weighted fusions ("mixtures") and an optional base:
  //   out[b,n,c] = (base[b,n,c] or 1) * prod_j sum_i masks[j][b,i,n] * tables[j][tb,i,c],
  // masks[j] [B,K_j,N], tables[j] [B or 1,K_j,C], base [B,N,C] -> out [B,N,C].
  // base has no default: torch.library's autograd for ops with tensor lists
  // matches gradients to the arguments actually passed, which a default varies.
  m.set_python_module("exposure_slot.ops.mask_fusion");
  m.def("mask_fusion(Tensor[] masks, Tensor[] tables, Tensor? base) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // In place, base <- base * prod_j mixture_j; not differentiable.
  m.def("mask_fusion_(Tensor[] masks, Tensor[] tables, Tensor(a!) base) -> ()",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "mask_fusion_backward(Tensor grad, Tensor[] masks, Tensor[] tables, Tensor? base)"
      " -> (Tensor[] grad_masks, Tensor[] grad_tables, Tensor? grad_base)",
      {at::Tag::pt2_compliant_tag});

  // One slot-attention pass of one level, its inputs seen through a chain of D
  // LayerNorm + modulation stages (csrc/cpu/slot_attention_pass.cpp has the
  // formula; the stages listed in base_stages multiply the matching stage_bases,
  // and every stage its factors):
  // attn [B,K,N] (softmax over slots, + attn_eps), attn_sum [B,K] and attn_v
  // [B,K,C], the sums over tokens of attn and attn * v; and stats [B,N,D,4], the
  // LayerNorm statistics of every stage, which a later pass through the same
  // stages takes as its `stats` input (any leading S <= D of them) instead of
  // recomputing. stats is a cache, not differentiable; the backward takes the
  // forward's stats and attn (the CPU kernel then skips recomputing the statistics
  // and the softmax; the CUDA and Triton kernels check them and recompute).
  m.set_python_module("exposure_slot.ops.slot_attention_pass");
  m.def(
      "slot_attention_pass(Tensor k_in, Tensor v_in, Tensor norm_k_weight, "
      "Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, Tensor[] stage_bases, "
      "int[] base_stages, Tensor[] factor_masks, Tensor[] factor_tables, "
      "int[] factor_stages, Tensor queries, Tensor? stats, float norm_eps, float attn_eps) "
      "-> (Tensor attn, Tensor attn_sum, Tensor attn_v, Tensor stats)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "slot_attention_pass_backward(Tensor grad_attn, Tensor grad_attn_sum, "
      "Tensor grad_attn_v, Tensor k_in, Tensor v_in, Tensor norm_k_weight, "
      "Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, Tensor[] stage_bases, "
      "int[] base_stages, Tensor[] factor_masks, Tensor[] factor_tables, "
      "int[] factor_stages, Tensor queries, Tensor? stats, Tensor attn, float norm_eps, "
      "float attn_eps) -> (Tensor grad_k_in, Tensor grad_v_in, "
      "Tensor grad_norm_k_weight, Tensor grad_norm_k_bias, Tensor grad_norm_v_weight, "
      "Tensor grad_norm_v_bias, Tensor[] grad_stage_bases, Tensor[] grad_factor_masks, "
      "Tensor[] grad_factor_tables, Tensor grad_queries)",
      {at::Tag::pt2_compliant_tag});

  // A parent level's pass for inference: slot_attention_pass, and what it hands
  // its child: hand_down <- m * pf with m the modulation of the pass's last stage
  // and pf = sum_i attn_i * prompts_i, per token (hand_down may be that stage's
  // base, its running modulation, updated in place: a token's row is read before
  // it is written); stats gets one more stage, the statistics of the child's
  // first LayerNorm, whose input is the last stage's affine output times m * pf.
  // The norms have that stage too ([D + 1, C]); with child_queries [B, K_c, C] the
  // pass also runs its child's first pass (child_attn, _sum, _v; K_c = 0 without).
  m.def(
      "slot_attention_pass_hand_down(Tensor k_in, Tensor v_in, Tensor norm_k_weight, "
      "Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, Tensor[] stage_bases, "
      "int[] base_stages, Tensor[] factor_masks, Tensor[] factor_tables, "
      "int[] factor_stages, Tensor queries, Tensor? stats, float norm_eps, float attn_eps, "
      "Tensor prompts, Tensor(a!) hand_down, Tensor? child_queries) "
      "-> (Tensor attn, Tensor attn_sum, Tensor attn_v, Tensor stats, Tensor child_attn, "
      "Tensor child_attn_sum, Tensor child_attn_v)",
      {at::Tag::pt2_compliant_tag});

  // A parent level's pass in training: slot_attention_pass, and its child's input
  // rows, rows_k = k * pf and rows_v = v * pf [B,N,C] with k, v the chain's output
  // (the pass's attention's input) and pf = sum_i attn_i * prompts_i, per token. As
  // for the hand-down above, the norms have the child's row ([D + 1, C]) and stats
  // the statistics of the child's first LayerNorm (its input is the rows); the
  // backward takes the rows' gradients too and returns the prompts' as well.
  m.def(
      "slot_attention_pass_rows(Tensor k_in, Tensor v_in, Tensor norm_k_weight, "
      "Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, Tensor[] stage_bases, "
      "int[] base_stages, Tensor[] factor_masks, Tensor[] factor_tables, "
      "int[] factor_stages, Tensor queries, Tensor? stats, float norm_eps, float attn_eps, "
      "Tensor prompts) -> (Tensor attn, Tensor attn_sum, Tensor attn_v, Tensor stats, "
      "Tensor rows_k, Tensor rows_v)",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "slot_attention_pass_rows_backward(Tensor grad_attn, Tensor grad_attn_sum, "
      "Tensor grad_attn_v, Tensor grad_rows_k, Tensor grad_rows_v, Tensor k_in, Tensor v_in, "
      "Tensor norm_k_weight, Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, "
      "Tensor[] stage_bases, int[] base_stages, Tensor[] factor_masks, "
      "Tensor[] factor_tables, int[] factor_stages, Tensor queries, Tensor? stats, "
      "Tensor attn, float norm_eps, float attn_eps, Tensor prompts) -> (Tensor grad_k_in, "
      "Tensor grad_v_in, Tensor grad_norm_k_weight, Tensor grad_norm_k_bias, "
      "Tensor grad_norm_v_weight, Tensor grad_norm_v_bias, Tensor[] grad_stage_bases, "
      "Tensor[] grad_factor_masks, Tensor[] grad_factor_tables, Tensor grad_queries, "
      "Tensor grad_prompts)",
      {at::Tag::pt2_compliant_tag});

  // A slot level's update between two passes, for inference: from the slots
  // [B,K,C] and the pass's attn_sum [B,K] and attn_v [B,K,C], the GRU, the
  // refining MLP (pre-LayerNorm, residual) and the next pass's queries
  // (LayerNorm, to_q, times scale); the weights in nn.Linear/nn.GRUCell layout.
  // csrc/cpu/slot_update.cpp has the formula.
  m.set_python_module("exposure_slot.ops.slot_update");
  m.def(
      "slot_update(Tensor slots, Tensor attn_sum, Tensor attn_v, Tensor gru_weight_ih, "
      "Tensor gru_weight_hh, Tensor gru_bias_ih, Tensor gru_bias_hh, Tensor norm_pre_ff_weight, "
      "Tensor norm_pre_ff_bias, Tensor mlp_weight_1, Tensor mlp_bias_1, Tensor mlp_weight_2, "
      "Tensor mlp_bias_2, Tensor norm_slots_weight, Tensor norm_slots_bias, "
      "Tensor to_q_weight, Tensor to_q_bias, float scale, float norm_eps) "
      "-> (Tensor slots, Tensor queries)",
      {at::Tag::pt2_compliant_tag});
  // Its backward (the autograd formula's; training): from the gradients of the new
  // slots and the queries, those of slots, attn_sum, attn_v and the 14 weights.
  m.def(
      "slot_update_backward(Tensor grad_slots, Tensor grad_queries, Tensor slots, "
      "Tensor attn_sum, Tensor attn_v, Tensor gru_weight_ih, Tensor gru_weight_hh, "
      "Tensor gru_bias_ih, Tensor gru_bias_hh, Tensor norm_pre_ff_weight, "
      "Tensor norm_pre_ff_bias, Tensor mlp_weight_1, Tensor mlp_bias_1, Tensor mlp_weight_2, "
      "Tensor mlp_bias_2, Tensor norm_slots_weight, Tensor norm_slots_bias, "
      "Tensor to_q_weight, Tensor to_q_bias, float scale, float norm_eps) "
      "-> (Tensor grad_slots, Tensor grad_attn_sum, Tensor grad_attn_v, Tensor[] grad_weights)",
      {at::Tag::pt2_compliant_tag});

  // SlotInSlotAttention's whole forward for inference (no autograd), L levels of
  // K_d slots and `iters` iterations: (prompt_map [B,N,C], slot_map [B,N,C],
  // masks: per level, top first, its last attention [B,K_d,N]). The levels'
  // parameters: the input LayerNorms stacked [L,C]; per level slots_mu and prompts
  // [1,K_d,C], slot_update's 14 weights (flattened, level by level), its scale, its
  // input norms' eps and its slot norms' eps. csrc/cpu/slot_in_slot_inference.cpp
  // has the schedule.
  m.set_python_module("exposure_slot.ops.slot_in_slot_inference");
  m.def(
      "slot_in_slot_inference(Tensor k_in, Tensor v_in, Tensor norm_k_weight, "
      "Tensor norm_k_bias, Tensor norm_v_weight, Tensor norm_v_bias, Tensor[] slots_mu, "
      "Tensor[] prompts, Tensor[] update_weights, float[] scales, float[] norm_eps, "
      "float[] update_eps, int iters, float attn_eps) "
      "-> (Tensor prompt_map, Tensor slot_map, Tensor[] masks)",
      {at::Tag::pt2_compliant_tag});

  // A 3x3 convolution (stride 1, padding 1: zeros, or by reflection) by Winograd's
  // F(4x4, 3x3), for inference: filter [36, Ci, Co] is the Winograd transform of
  // the weight (exposure_slot.ops.winograd_conv3x3.winograd_filter); x is
  // [B, Cx, H, W], pixel-unshuffled by `unshuffle` (1 or 2) into the convolution's
  // input; its output is pixel-shuffled by `shuffle` into out; then bias and GELU.
  // The underscore variant adds into out (channels-last) before the GELU.
  // csrc/cpu/winograd_conv3x3.cpp has the formula and the channel orders.
  m.set_python_module("exposure_slot.ops.winograd_conv3x3");
  m.def("winograd_conv3x3(Tensor x, Tensor filter, Tensor? bias, bool reflect, int unshuffle, "
        "int shuffle, bool gelu) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def("winograd_conv3x3_(Tensor(a!) out, Tensor x, Tensor filter, Tensor? bias, bool reflect, "
        "int unshuffle, int shuffle, bool gelu) -> ()",
        {at::Tag::pt2_compliant_tag});
}

// `import exposure_slot._C` only has to run the static registrations above (and
// those of the kernel files linked into the same library); the module itself
// exposes nothing. Import torch first: the extension links against libtorch.
static PyModuleDef exposure_slot_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "Registers the torch.ops.exposure_slot operators and their C++ kernels.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&exposure_slot_module); }
