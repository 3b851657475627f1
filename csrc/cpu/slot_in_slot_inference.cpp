// The slot-in-slot module's whole forward under inference, on the CPU, as one op:
// exposure_slot::slot_in_slot_inference.
//
// What it computes: SlotInSlotAttention's forward (SPEC sections 1 and 2) for L
// levels of K_d slots and T iterations, without autograd: (prompt_map, slot_map,
// masks), the outputs of the reference backend. The schedule is the fused
// backend's (exposure_slot/slot_attention.py has the algebra; here each step is
// one call of a CPU kernel's entry point, ops.h):
//   - a level's first queries, to_q(LayerNorm_slots(slots_mu)) * scale, once per
//     forward (every call of a level starts from its slots_mu);
//   - per level and iteration one pass through the chain of its ancestors'
//     LayerNorms and modulations. A level with a child runs the hand-down pass:
//     it multiplies pf and its child's b of the previous iteration into its running
//     modulation in place (so its own stage's modulation is that one [B,N,C]
//     tensor and those pending factors), hands the child the statistics of the
//     child's first LayerNorm and, where the child is a leaf, runs the child's
//     first pass on the same tokens. Then the slot update, then the child's call;
//   - the outputs, a level's pair crossed over with its child's: products of the
//     levels' mixtures. The one that holds the leaf's own (attn, prompts) has all
//     its other factors known once every ancestor is in its last iteration (their
//     last attention and final slots), so the leaf's last pass writes it, per token
//     once the token's attention is known, over the top level's running
//     modulation, whose row the token's chain has just read and which nothing
//     reads after that pass. The other output is one mask_fusion.
//
// Why one op: a level-2 forward is 23 kernel calls and a level-3 forward 71.
// Driven from Python, the interpreter's own work between the calls (building each
// pass's stage lists, the calls) took 0.7 ms of a 12 ms level-2 forward at
// N = 16384 and 2 ms of a 54 ms level-3 one: more than at small N, since every
// pass streams its tokens through the caches and evicts the interpreter's data.
//
// Memory beyond the inputs and outputs: one running modulation [B,N,C] per level
// with a child (per call of that level), the [B,K,N] attention maps and the
// [B,N,D,4] LayerNorm statistics.

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "common.h"
#include "ops.h"

namespace exposure_slot::cpu {
namespace {

constexpr const char* kOp = "slot_in_slot_inference";
constexpr int64_t kUpdateWeights = 14;  // slot_update's weights, per level
constexpr int64_t kNormSlotsWeight = 10, kToQWeight = 12;  // their places among them

// A mixture, sum_i masks[b,i,n] * table[tb,i,:]: masks [B,K,N], table [B or 1,K,C].
using Factor = std::pair<at::Tensor, at::Tensor>;

// A factor list as the kernels take it: (masks, tables).
std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> split(
    const std::vector<Factor>& factors) {
  std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>> lists;
  for (const auto& [m, t] : factors) {
    lists.first.push_back(m);
    lists.second.push_back(t);
  }
  return lists;
}

// What an ancestor multiplies into the tokens it hands down: its running
// modulation (undefined for none) and factors.
struct Stage {
  at::Tensor base;
  std::vector<Factor> factors;
};

// A level's pair (a, b) as factor lists, and its last attention then its
// descendants'.
struct LevelOutputs {
  std::vector<Factor> a, b;
  std::vector<at::Tensor> masks;
};

// A pass's attention and sums: (attn, attn_sum, attn_v).
struct Attention {
  at::Tensor attn, sum, weighted;
};

// One level's parameters.
struct Level {
  at::Tensor slots_mu, prompts;
  at::ArrayRef<at::Tensor> weights;  // slot_update's, in its argument order
  double scale, norm_eps, update_eps;
  at::Tensor first_queries;          // [1,K,C]
};

class Forward {
 public:
  Forward(const at::Tensor& k_in, const at::Tensor& v_in, std::vector<at::Tensor> norms,
          std::vector<Level> levels, int64_t iters, double attn_eps)
      : k_in_(k_in), v_in_(v_in), norms_(std::move(norms)), levels_(std::move(levels)),
        iters_(iters), attn_eps_(attn_eps) {}

  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> run() {
    const std::vector<Factor> no_ancestors;
    LevelOutputs top = level(0, {}, std::nullopt, nullptr, &no_ancestors);
    at::Tensor a = leaf_a_in_a(0) && leaf_output_.defined() ? leaf_output_ : fuse(top.a);
    at::Tensor b = !leaf_a_in_a(0) && leaf_output_.defined() ? leaf_output_ : fuse(top.b);
    return {a, b, std::move(top.masks)};
  }

 private:
  // The rows of the stacked LayerNorm parameters of stages [0, stages).
  std::vector<at::Tensor> norms_down_to(int64_t stages) const {
    std::vector<at::Tensor> rows;
    for (const at::Tensor& n : norms_) rows.push_back(n.narrow(0, 0, stages));
    return rows;
  }

  at::Tensor fuse(const std::vector<Factor>& factors) const {
    const auto [masks, tables] = split(factors);
    return mask_fusion_cpu(masks, tables, std::nullopt);
  }

  // Whether the leaf's a (its own attn and prompts) lands in the a of the level at
  // `depth` (else in its b): a parent crosses its child's pair over, so it does
  // when the levels below `depth` are even in number.
  bool leaf_a_in_a(int64_t depth) const {
    return (static_cast<int64_t>(levels_.size()) - 1 - depth) % 2 == 0;
  }

  // The level at `depth`, given its ancestors' stages and the statistics of their
  // LayerNorms and of its own first one (its parent's hand-down computed them);
  // `first_pass`: its first pass where its parent's hand-down ran it;
  // `output_factors`, while every ancestor is in its last iteration: their factors
  // of the output that will hold the leaf's a (null otherwise).
  LevelOutputs level(int64_t depth, const std::vector<Stage>& chain,
                     const std::optional<at::Tensor>& parent_stats,
                     const Attention* first_pass, const std::vector<Factor>* output_factors) {
    const Level& lv = levels_[depth];
    const int64_t L = static_cast<int64_t>(levels_.size());
    const bool has_child = depth + 1 < L;
    const int64_t B = k_in_.size(0), K = lv.slots_mu.size(1), C = k_in_.size(2);
    at::Tensor slots = lv.slots_mu.expand({B, K, C});
    at::Tensor queries = lv.first_queries.expand({B, K, C});
    std::optional<at::Tensor> stats = parent_stats;
    std::optional<at::Tensor> child_queries;
    if (depth + 2 == L) child_queries = levels_[depth + 1].first_queries.expand({B, -1, C});
    const std::vector<at::Tensor> norms = norms_down_to(depth + (has_child ? 2 : 1));

    at::Tensor running;               // this level's modulation: prod of pf * b_c so far
    std::vector<Factor> pending;      // the child's b of the previous iteration
    LevelOutputs child;
    Attention att;
    for (int64_t iteration = 0; iteration < iters_; ++iteration) {
      std::vector<at::Tensor> bases, masks, tables;
      std::vector<int64_t> base_stages, factor_stages;
      const auto add_stage = [&](int64_t d, const at::Tensor& base,
                                 const std::vector<Factor>& factors) {
        if (base.defined()) {
          bases.push_back(base);
          base_stages.push_back(d);
        }
        for (const auto& [m, t] : factors) {
          masks.push_back(m);
          tables.push_back(t);
          factor_stages.push_back(d);
        }
      };
      for (int64_t d = 0; d < depth; ++d) add_stage(d, chain[d].base, chain[d].factors);
      add_stage(depth, running, pending);

      const PassArgs args{k_in_, v_in_, norms[0], norms[1], norms[2], norms[3], bases,
                          base_stages, masks, tables, factor_stages, queries, stats,
                          lv.norm_eps, attn_eps_};
      std::optional<at::Tensor> child_stats;
      Attention child_first;
      if (iteration == 0 && first_pass != nullptr) {
        att = *first_pass;
      } else if (has_child) {
        if (!running.defined()) running = at::empty(k_in_.sizes(), k_in_.options());
        auto [attn, attn_sum, attn_v, handed_stats, c_attn, c_sum, c_v] =
            slot_attention_pass_hand_down_cpu(args, lv.prompts, running, child_queries);
        att = {attn, attn_sum, attn_v};
        child_first = {c_attn, c_sum, c_v};
        child_stats = handed_stats;
        // The top level's own stage, for its next passes.
        if (!stats.has_value()) stats = handed_stats.narrow(2, 0, depth + 1).contiguous();
      } else if (output_factors != nullptr && iteration + 1 == iters_) {
        const auto [out_masks, out_tables] = split(*output_factors);
        leaf_output_ = depth > 0 ? chain[0].base : at::empty(k_in_.sizes(), k_in_.options());
        auto [attn, attn_sum, attn_v, pass_stats] = slot_attention_pass_with_output_cpu(
            args, out_masks, out_tables, lv.prompts, leaf_output_);
        att = {attn, attn_sum, attn_v};
        stats = pass_stats;
      } else {
        auto [attn, attn_sum, attn_v, pass_stats] = slot_attention_pass_cpu(args);
        att = {attn, attn_sum, attn_v};
        stats = pass_stats;
      }
      const auto& w = lv.weights;
      std::tie(slots, queries) = slot_update_cpu(
          slots, att.sum, att.weighted, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8],
          w[9], w[10], w[11], w[12], w[13], lv.scale, lv.update_eps);
      if (has_child) {
        std::vector<Stage> child_chain = chain;
        child_chain.push_back({running, {}});
        // In the last iteration this level's attention and slots are final: its
        // factor of the leaf's output is (attn, prompts) if the leaf's a reaches
        // this level's a, (attn, slots) if its b.
        std::vector<Factor> child_output_factors;
        const bool last = output_factors != nullptr && iteration + 1 == iters_;
        if (last) {
          child_output_factors = *output_factors;
          child_output_factors.emplace_back(att.attn, leaf_a_in_a(depth) ? lv.prompts : slots);
        }
        child = level(depth + 1, child_chain, child_stats,
                      child_queries.has_value() ? &child_first : nullptr,
                      last ? &child_output_factors : nullptr);
        if (iteration + 1 < iters_) pending = child.b;  // the last one is never used
      }
    }
    // The cross-over: the prompts meet the child's b, the slots its a.
    LevelOutputs out;
    out.a.emplace_back(att.attn, lv.prompts);
    out.a.insert(out.a.end(), child.b.begin(), child.b.end());
    out.b.emplace_back(att.attn, slots);
    out.b.insert(out.b.end(), child.a.begin(), child.a.end());
    out.masks.push_back(att.attn);
    out.masks.insert(out.masks.end(), child.masks.begin(), child.masks.end());
    return out;
  }

  const at::Tensor& k_in_;
  const at::Tensor& v_in_;
  const std::vector<at::Tensor> norms_;  // norm_k weight, bias, norm_v weight, bias: [L, C]
  const std::vector<Level> levels_;
  const int64_t iters_;
  const double attn_eps_;
  at::Tensor leaf_output_;  // the output the leaf's last pass wrote, if it ran one
};

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> slot_in_slot_inference_cpu(
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& norm_k_weight,
    const at::Tensor& norm_k_bias, const at::Tensor& norm_v_weight,
    const at::Tensor& norm_v_bias, at::TensorList slots_mu, at::TensorList prompts,
    at::TensorList update_weights, at::ArrayRef<double> scales, at::ArrayRef<double> norm_eps,
    at::ArrayRef<double> update_eps, int64_t iters, double attn_eps) {
  const int64_t L = static_cast<int64_t>(slots_mu.size());
  TORCH_CHECK(L >= 1, kOp, ": needs at least one level (slots_mu has none)");
  TORCH_CHECK(static_cast<int64_t>(prompts.size()) == L &&
                  static_cast<int64_t>(update_weights.size()) == kUpdateWeights * L &&
                  static_cast<int64_t>(scales.size()) == L &&
                  static_cast<int64_t>(norm_eps.size()) == L &&
                  static_cast<int64_t>(update_eps.size()) == L,
              kOp, ": one entry per level in slots_mu, prompts, scales, norm_eps and "
              "update_eps and ", kUpdateWeights, " per level in update_weights; got ", L, ", ",
              prompts.size(), ", ", scales.size(), ", ", norm_eps.size(), ", ",
              update_eps.size(), " and ", update_weights.size());
  TORCH_CHECK(iters >= 1, kOp, ": iters must be >= 1, got ", iters);
  check_float_cpu(kOp, "k_in", k_in, k_in.scalar_type(), "k_in");
  TORCH_CHECK(k_in.dim() == 3, kOp, ": k_in must be [B, N, C], got shape ", k_in.sizes());
  const int64_t C = k_in.size(2);
  for (const auto& [name, n] : {std::pair<const char*, const at::Tensor&>{"norm_k_weight", norm_k_weight},
                                {"norm_k_bias", norm_k_bias}, {"norm_v_weight", norm_v_weight},
                                {"norm_v_bias", norm_v_bias}}) {
    check_float_cpu(kOp, name, n, k_in.scalar_type(), "k_in");
    check_shape(kOp, name, n, {L, C}, "[L, C] (a row per level)");
  }
  std::vector<Level> levels;
  for (int64_t d = 0; d < L; ++d) {
    const at::Tensor& mu = slots_mu[d];
    check_float_cpu(kOp, "slots_mu", mu, k_in.scalar_type(), "k_in");
    TORCH_CHECK(mu.dim() == 3 && mu.size(0) == 1 && mu.size(1) >= 1 && mu.size(2) == C, kOp,
                ": slots_mu[", d, "] must be [1, K, C] with K >= 1 and C = ", C,
                " (from k_in), got shape ", mu.sizes());
    const at::ArrayRef<at::Tensor> w = update_weights.slice(d * kUpdateWeights, kUpdateWeights);
    // Every call of a level starts from slots_mu: its queries once per forward.
    const at::Tensor first_queries =
        slot_queries_cpu(mu, w[kNormSlotsWeight], w[kNormSlotsWeight + 1], w[kToQWeight],
                         w[kToQWeight + 1], scales[d], update_eps[d]);
    levels.push_back({mu, prompts[d], w, scales[d], norm_eps[d], update_eps[d], first_queries});
  }
  Forward forward(k_in, v_in, {norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias},
                  std::move(levels), iters, attn_eps);
  return forward.run();
}

}  // namespace
}  // namespace exposure_slot::cpu

TORCH_LIBRARY_IMPL(exposure_slot, CPU, m) {
  m.impl("slot_in_slot_inference", &exposure_slot::cpu::slot_in_slot_inference_cpu);
}
