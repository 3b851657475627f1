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
//   - per level and iteration one pass, then the slot update, then the child's
//     call. A level with a child runs the hand-down pass: it writes its child's
//     input rows k * pf and v * pf into the forward's one pair of rows, hands the
//     child the statistics of the child's first LayerNorm and, where the child is
//     the leaf, runs the child's first pass on the same tokens;
//   - where a pass reads: the leaf reads the rows its parent handed down (two rows
//     a token, its LayerNorm folded into its attention). Its parent's later
//     iterations read them too: the parent's k is its child's input times the
//     child's b of the previous iteration (SPEC: k = k * pf, then k = k * b), so
//     that pass is a stage of no LayerNorm (an identity one: mean 0, rstd 1,
//     weight 1, bias 0) modulated by that b, and it writes the next input in place.
//     Every other pass (the top level's, a middle level's after its first) runs
//     the chain from k_in, v_in through its ancestors' LayerNorms and modulations,
//     each stage's modulation the product of the factors pf and b of its earlier
//     iterations (mixtures of their [B,K,N] maps);
//   - the outputs, a level's pair crossed over with its child's: products of the
//     levels' mixtures. The one that holds the leaf's own (attn, prompts) has all
//     its other factors known once every ancestor is in its last iteration (their
//     last attention and final slots), so the leaf's last pass writes it, per token
//     once the token's attention is known, over the k rows it has just read and
//     which nothing reads after that pass. The other output is one mask_fusion.
//
// Why rows rather than running modulations: a leaf pass's chain from k_in read
// four rows a token (k_in, v_in and one modulation per ancestor) and ran every
// ancestor's LayerNorm; from its parent's rows it reads two and runs none. The
// level-3 forward went ~49 -> ~41 ms (benchmarks/HISTORY.md, seventeenth session)
// in the same memory: the rows take the two [B,N,C] tensors that level 3's two
// running modulations took (level 2 had one).
//
// Why one op: a level-2 forward is 23 kernel calls and a level-3 forward 71.
// Driven from Python, the interpreter's own work between the calls (building each
// pass's stage lists, the calls) took 0.7 ms of a 12 ms level-2 forward at
// N = 16384 and 2 ms of a 54 ms level-3 one: more than at small N, since every
// pass streams its tokens through the caches and evicts the interpreter's data.
//
// Memory beyond the inputs and outputs: the rows, two [B,N,C] tensors (levels >= 2;
// the first output is written into one of them), the [B,K,N] attention maps and
// the [B,N,S,4] LayerNorm statistics.

#include <ATen/ops/cat.h>
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

// Each ancestor's stage of a chain from k_in: the factors of its modulation.
using FactorStages = std::vector<std::vector<Factor>>;

class Forward {
 public:
  Forward(const at::Tensor& k_in, const at::Tensor& v_in, std::vector<at::Tensor> norms,
          std::vector<Level> levels, int64_t iters, double attn_eps)
      : k_in_(k_in), v_in_(v_in), norms_(std::move(norms)), levels_(std::move(levels)),
        iters_(iters), attn_eps_(attn_eps) {
    const int64_t L = static_cast<int64_t>(levels_.size());
    if (L >= 2) {
      const int64_t C = k_in.size(2);
      rows_k_ = at::empty(k_in.sizes(), k_in.options());
      rows_v_ = at::empty(k_in.sizes(), k_in.options());
      // The leaf's parent's passes on the rows: an identity stage, then its child's.
      for (int64_t i = 0; i < 4; ++i) {
        at::Tensor rows = at::empty({2, C}, k_in.options());
        rows[0].fill_(i % 2 == 0 ? 1.0 : 0.0);
        rows[1].copy_(norms_[i][L - 1]);
        identity_norms_.push_back(rows);
      }
      identity_stats_ = at::empty({k_in.size(0), k_in.size(1), 1, 4}, k_in.options());
      for (int64_t j = 0; j < 4; ++j) identity_stats_.select(3, j).fill_(j % 2 == 0 ? 0.0 : 1.0);
    }
  }

  std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>> run() {
    LevelOutputs top = level(0, {}, std::nullopt, std::nullopt, nullptr, &no_factors_);
    // Free before the other output is made (within the peak of three [B,N,C]).
    rows_v_ = at::Tensor();
    if (!leaf_output_.is_same(rows_k_)) rows_k_ = at::Tensor();
    at::Tensor a = leaf_a_in_a(0) && leaf_output_.defined() ? leaf_output_ : fuse(top.a);
    at::Tensor b = !leaf_a_in_a(0) && leaf_output_.defined() ? leaf_output_ : fuse(top.b);
    return {a, b, std::move(top.masks)};
  }

 private:
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

  // Rows [first, first + count) of the stacked LayerNorm parameters.
  std::vector<at::Tensor> norm_rows(int64_t first, int64_t count) const {
    std::vector<at::Tensor> rows;
    for (const at::Tensor& n : norms_) rows.push_back(n.narrow(0, first, count));
    return rows;
  }

  // The level at `depth`, given its ancestors' stages (`chain`) and the statistics
  // of their LayerNorms (`chain_stats`) and of its own first one (`own_stats`: its
  // parent's hand-down computed them); `first_pass`: its first pass where its
  // parent's hand-down ran it; `output_factors`, while every ancestor is in its
  // last iteration: their factors of the output that will hold the leaf's a (null
  // otherwise).
  LevelOutputs level(int64_t depth, const FactorStages& chain,
                     const std::optional<at::Tensor>& chain_stats,
                     const std::optional<at::Tensor>& own_stats, const Attention* first_pass,
                     const std::vector<Factor>* output_factors) {
    const Level& lv = levels_[depth];
    const int64_t L = static_cast<int64_t>(levels_.size());
    const bool has_child = depth + 1 < L, leaf_parent = depth + 2 == L;
    const int64_t B = k_in_.size(0), K = lv.slots_mu.size(1), C = k_in_.size(2);
    at::Tensor slots = lv.slots_mu.expand({B, K, C});
    at::Tensor queries = lv.first_queries.expand({B, K, C});
    std::optional<at::Tensor> child_queries;
    if (leaf_parent) child_queries = levels_[depth + 1].first_queries.expand({B, -1, C});
    // The statistics of the chain from k_in through this level's own stage.
    std::optional<at::Tensor> stats;
    if (depth > 0 && has_child && !leaf_parent) stats = at::cat({*chain_stats, *own_stats}, 2);

    // This level's own stage: the factors pf and b of its iterations so far (the
    // leaf's parent, on its rows: its child's last b).
    std::vector<Factor> pending;
    LevelOutputs child;
    Attention att;
    for (int64_t iteration = 0; iteration < iters_; ++iteration) {
      // Where the pass reads: the leaf's parent after its first iteration, its child's
      // last input (an identity stage, modulated by the child's b); below the top,
      // a level's first pass and the leaf's, the rows its parent handed down
      // (its LayerNorm, the statistics known); otherwise the chain from k_in.
      const bool from_child_input = leaf_parent && iteration > 0;
      const bool from_rows = depth > 0 && (iteration == 0 || !has_child || leaf_parent);
      std::vector<at::Tensor> masks, tables, norms;
      std::vector<int64_t> factor_stages;
      std::optional<at::Tensor> pass_stats;
      const auto add_stage = [&](int64_t d, const std::vector<Factor>& factors) {
        for (const auto& [m, t] : factors) {
          masks.push_back(m);
          tables.push_back(t);
          factor_stages.push_back(d);
        }
      };
      int64_t D = 1;
      if (from_child_input) {
        norms = identity_norms_;
        pass_stats = identity_stats_;
        add_stage(0, pending);
      } else if (from_rows) {
        norms = norm_rows(depth, 1 + has_child);
        pass_stats = own_stats;
      } else {
        D = depth + 1;
        norms = norm_rows(0, D + has_child);
        pass_stats = stats;
        for (int64_t d = 0; d < depth; ++d) add_stage(d, chain[d]);
        add_stage(depth, pending);
      }
      const std::vector<at::Tensor> no_bases;
      const std::vector<int64_t> no_stages;
      const bool rows = from_rows || from_child_input;  // else k_in, v_in
      const PassArgs args{rows ? rows_k_ : k_in_, rows ? rows_v_ : v_in_, norms[0], norms[1],
                          norms[2], norms[3], no_bases, no_stages, masks, tables, factor_stages,
                          queries, pass_stats, lv.norm_eps, attn_eps_};
      std::optional<at::Tensor> child_stats;
      Attention child_first;
      if (iteration == 0 && first_pass != nullptr) {
        att = *first_pass;
      } else if (has_child) {
        auto [attn, attn_sum, attn_v, handed_stats, c_attn, c_sum, c_v] =
            slot_attention_pass_hand_down_rows_cpu(args, lv.prompts, rows_k_, rows_v_,
                                                   child_queries);
        att = {attn, attn_sum, attn_v};
        child_first = {c_attn, c_sum, c_v};
        child_stats = handed_stats.narrow(2, D, 1).contiguous();
        // The top level's own stage, for its next passes.
        if (!stats.has_value()) stats = handed_stats.narrow(2, 0, D).contiguous();
      } else if (output_factors != nullptr && iteration + 1 == iters_) {
        const auto [out_masks, out_tables] = split(*output_factors);
        leaf_output_ = rows ? rows_k_ : at::empty(k_in_.sizes(), k_in_.options());
        auto [attn, attn_sum, attn_v, s] = slot_attention_pass_with_output_cpu(
            args, out_masks, out_tables, lv.prompts, leaf_output_);
        att = {attn, attn_sum, attn_v};
      } else {
        auto [attn, attn_sum, attn_v, s] = slot_attention_pass_cpu(args);
        att = {attn, attn_sum, attn_v};
        if (!stats.has_value()) stats = s;
      }
      const auto& w = lv.weights;
      std::tie(slots, queries) = slot_update_cpu(
          slots, att.sum, att.weighted, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7], w[8],
          w[9], w[10], w[11], w[12], w[13], lv.scale, lv.update_eps);
      if (has_child) {
        // In the last iteration this level's attention and slots are final: its
        // factor of the leaf's output is (attn, prompts) if the leaf's a reaches
        // this level's a, (attn, slots) if its b.
        std::vector<Factor> child_output_factors;
        const bool last = output_factors != nullptr && iteration + 1 == iters_;
        if (last) {
          child_output_factors = *output_factors;
          child_output_factors.emplace_back(att.attn, leaf_a_in_a(depth) ? lv.prompts : slots);
        }
        FactorStages child_chain = chain;
        child_chain.push_back(pending);
        child_chain.back().emplace_back(att.attn, lv.prompts);
        child = level(depth + 1, child_chain, stats, child_stats,
                      leaf_parent ? &child_first : nullptr,
                      last ? &child_output_factors : nullptr);
        if (leaf_parent) {
          pending = child.b;  // its rows hold all the earlier factors
        } else {
          pending.emplace_back(att.attn, lv.prompts);
          pending.insert(pending.end(), child.b.begin(), child.b.end());
        }
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
  const std::vector<Factor> no_factors_;
  std::vector<at::Tensor> identity_norms_;  // [2,C] each
  at::Tensor identity_stats_;               // [B,N,1,4]: mean 0, rstd 1
  at::Tensor rows_k_, rows_v_;              // [B,N,C]: the leaf's input
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
