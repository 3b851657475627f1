"""One slot-attention pass of one level, with the level's inputs computed on the fly.

A level at depth D-1 of a slot-in-slot tree sees the top level's token features
through a chain of D stages, one per level from the top down to itself: stage d
applies level d's input LayerNorm and then multiplies by a modulation: its base (a
[B, N, C] tensor, or none) and its factors (mask-weighted fusions, see
``mask_fusion``):

    x_{-1} = k_in;  x_d = LayerNorm_d(x_{d-1}) * base_d * prod_{j in stage d} mix_j;
    k = x_{D-1}

(and likewise ``v`` from ``v_in`` with the v LayerNorms and the same factors). SPEC
section 1: a level LayerNorms its input; after each iteration it multiplies its own
k and v by ``pf * b_c``; and it hands its child ``k * pf``. With queries ``q``
[B, K, C] (already multiplied by ``scale``) the pass returns

    attn     = softmax over slots of q . k, plus attn_eps        [B, K, N]
    attn_sum = sum over tokens of attn                           [B, K]
    attn_v   = sum over tokens of attn * v                       [B, K, C]

so the level's slot update input is ``attn_v / attn_sum``, and ``stats`` [B, N, D, 4],
each stage's LayerNorm statistics per token (mean and 1/std of the k row, then of
the v row). A later pass through the same leading stages (the level's next
iterations, its descendants) takes them as its ``stats`` input ([B, N, S, 4], any
S <= D) and skips recomputing them; ``stats`` is a cache, not differentiable. The
backward op takes the forward's ``stats`` and ``attn`` (the autograd formula saves
them: D * 4 + K values a token; the CPU kernel reads the softmax from ``attn``
rather than recomputing the logits) and recomputes everything else. The compiled
kernels never write a [B, N, C] tensor: every stage is recomputed per token from
``k_in``, ``v_in``, the stage bases and the small [B, K_j, N] masks.

Arguments: ``norm_{k,v}_{weight,bias}`` [D, C] (row d is stage d); ``stage_bases``
a list of [B, N, C] tensors and ``base_stages`` their stages, increasing (a stage
has at most one base); ``factor_masks``/``factor_tables`` lists of [B, K_j, N] /
[B or 1, K_j, C] and ``factor_stages`` the stage of each factor, sorted. (Lists
plus stage indices rather than one optional entry per stage: torch.library's
autograd does not differentiate lists with None entries.)

A parent level's pass in training (backend "cpu") is ``slot_attention_pass_rows``:
the same pass, which also returns its child's input rows ``rows_k = k * pf`` and
``rows_v = v * pf`` ([B, N, C], ``k`` and ``v`` the chain's output), with ``pf =
sum_i attn_i * prompts_i``; like the hand-down below, its norms have the child's
LayerNorm as one more row and ``stats`` that stage's statistics (of the rows). The
child's passes then run one stage over the rows instead of recomputing, and
differentiating, every ancestor's stage per token; its backward
(``slot_attention_pass_rows_backward``) takes the rows' gradients too.

A parent level's pass under inference (backend "cpu") is
``slot_attention_pass_hand_down``: the same pass, which also hands its child its
input. Its norms have one more row, [D + 1, C], the child's LayerNorm (stage D).
With ``m`` the modulation of the pass's last stage (its base times its factors, or
1) and ``pf = sum_i attn_i * prompts_i``, it writes ``m * pf`` into ``hand_down``
(which may be that stage's base: the level's running modulation, updated in place)
and returns ``stats`` with one more stage, [B, N, D + 1, 4]: the statistics of the
child's first LayerNorm, whose input is ``k * pf`` and ``v * pf``. Given
``child_queries`` [B, K_c, C] (a child starts every call from its slots_mu, so its
first queries are known before its parent's pass), it also runs the child's first
pass on the same tokens, ``k^c = LayerNorm_D(k * pf)`` and ``v^c`` likewise, while
their rows are in cache, and returns its ``child_attn``, ``child_attn_sum`` and
``child_attn_v`` (with K_c = 0 slots without ``child_queries``). A child whose
first pass must hand down in turn (a middle level) runs it itself. No autograd
(training hands the child ``pf`` as a factor instead).

This module is the ops' Python side: the reference twins, argument checks, fake
kernels and autograd (backward by recomputation, ``slot_attention_pass_backward``).
The C++ kernels are in ``csrc/cpu/slot_attention_pass.cpp``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .checks import check_tensors
from .mask_fusion import KERNEL_DTYPES, check_factors, mask_fusion_reference

NORM_NAMES = ("norm_k_weight", "norm_k_bias", "norm_v_weight", "norm_v_bias")


def stacked_norms(levels: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The input LayerNorms of ``SlotLevel``s (top first) as the passes take them:
    the four NORM_NAMES tensors, [L, C] each, row d level d's."""
    return [torch.stack([getattr(getattr(level, norm), attr) for level in levels])
            for norm in ("norm_k_inp", "norm_v_inp") for attr in ("weight", "bias")]


def _reference_chain(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                     stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                     norm_eps):
    """The chain's k and v, every stage's statistics (a list of [B, N] tensors: mean
    and 1/std of k, then of v, stage by stage), and its last stage's affine outputs
    and modulation (None for 1)."""
    k, v = k_in, v_in
    channels = k_in.shape[-1]
    all_stats = []
    for d in range(norm_k_weight.shape[0]):
        all_stats += _row_stats(k, v, norm_eps)
        k = F.layer_norm(k, (channels,), norm_k_weight[d], norm_k_bias[d], norm_eps)
        v = F.layer_norm(v, (channels,), norm_v_weight[d], norm_v_bias[d], norm_eps)
        stage = [j for j, s in enumerate(factor_stages) if s == d]
        base = next((t for t, s in zip(stage_bases, base_stages) if s == d), None)
        mod = mask_fusion_reference([factor_masks[j] for j in stage],
                                    [factor_tables[j] for j in stage], base)
        last = (k, v, mod)
        if mod is not None:
            k, v = k * mod, v * mod
    return k, v, all_stats, last


def _row_stats(k, v, norm_eps):
    out = []
    for x in (k, v):
        var, mean = torch.var_mean(x.detach(), dim=-1, correction=0)
        out += [mean, (var + norm_eps).rsqrt()]
    return out


def _stack_stats(all_stats):
    return torch.stack(all_stats, dim=-1).unflatten(-1, (-1, 4))  # [B, N, S, 4]


def slot_attention_pass_reference(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight,
                                  norm_v_bias, stage_bases: Sequence[torch.Tensor],
                                  base_stages: Sequence[int],
                                  factor_masks: Sequence[torch.Tensor],
                                  factor_tables: Sequence[torch.Tensor],
                                  factor_stages: Sequence[int], queries, stats, norm_eps: float,
                                  attn_eps: float):
    """The pass in plain PyTorch (differentiable, any device): (attn, attn_sum,
    attn_v, stats). It ignores the ``stats`` input (a cache) and computes all."""
    k, v, all_stats, _ = _reference_chain(
        k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
        base_stages, factor_masks, factor_tables, factor_stages, norm_eps)
    attn = torch.bmm(queries, k.transpose(1, 2)).softmax(dim=1) + attn_eps
    return attn, attn.sum(dim=-1), torch.bmm(attn, v), _stack_stats(all_stats)


def slot_attention_pass_hand_down_reference(k_in, v_in, norm_k_weight, norm_k_bias,
                                            norm_v_weight, norm_v_bias, stage_bases,
                                            base_stages, factor_masks, factor_tables,
                                            factor_stages, queries, stats, norm_eps: float,
                                            attn_eps: float, prompts, hand_down,
                                            child_queries=None):
    """The hand-down pass in plain PyTorch: the pass's outputs, with the child's first
    stage appended to ``stats``, and the child's first pass (empty without
    ``child_queries``); writes the child's modulation into ``hand_down``."""
    norms = (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias)
    k, v, all_stats, (y_k, y_v, mod) = _reference_chain(
        k_in, v_in, *(n[:-1] for n in norms), stage_bases, base_stages, factor_masks,
        factor_tables, factor_stages, norm_eps)
    attn = torch.bmm(queries, k.transpose(1, 2)).softmax(dim=1) + attn_eps
    handed = mask_fusion_reference([attn], [prompts], mod)
    all_stats += _row_stats(y_k * handed, y_v * handed, norm_eps)
    hand_down.copy_(handed)
    if child_queries is None:
        child_queries = queries.new_empty((queries.shape[0], 0, queries.shape[2]))
    child_k = F.layer_norm(y_k * handed, k.shape[-1:], norm_k_weight[-1], norm_k_bias[-1],
                           norm_eps)
    child_v = F.layer_norm(y_v * handed, v.shape[-1:], norm_v_weight[-1], norm_v_bias[-1],
                           norm_eps)
    child_attn = torch.bmm(child_queries, child_k.transpose(1, 2)).softmax(dim=1) + attn_eps
    return (attn, attn.sum(dim=-1), torch.bmm(attn, v), _stack_stats(all_stats),
            child_attn, child_attn.sum(dim=-1), torch.bmm(child_attn, child_v))


def slot_attention_pass_rows_reference(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight,
                                       norm_v_bias, stage_bases, base_stages, factor_masks,
                                       factor_tables, factor_stages, queries, stats,
                                       norm_eps: float, attn_eps: float, prompts):
    """The rows pass in plain PyTorch (differentiable, any device): the pass's
    outputs, with the child's first stage appended to ``stats``, and the child's
    input rows k * pf, v * pf."""
    norms = (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias)
    k, v, all_stats, _ = _reference_chain(
        k_in, v_in, *(n[:-1] for n in norms), stage_bases, base_stages, factor_masks,
        factor_tables, factor_stages, norm_eps)
    attn = torch.bmm(queries, k.transpose(1, 2)).softmax(dim=1) + attn_eps
    pf = mask_fusion_reference([attn], [prompts])
    rows_k, rows_v = k * pf, v * pf
    all_stats += _row_stats(rows_k, rows_v, norm_eps)
    return (attn, attn.sum(dim=-1), torch.bmm(attn, v), _stack_stats(all_stats), rows_k,
            rows_v)


def check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
               stage_bases, base_stages, factor_masks, factor_tables, factor_stages, queries,
               stats=None, *, grads=None, row_grads=None, attn=None, child_stages: int = 0,
               dtypes: tuple[torch.dtype, ...] | None = None, op: str = "slot_attention_pass") -> tuple[int, int, int, int]:
    """Raise TypeError or ValueError naming the problem; ``grads`` are the backward
    op's three output gradients, ``row_grads`` a rows pass's two more (its rows'),
    and ``attn`` the forward's attention it takes; the
    norms have ``child_stages`` rows past the pass's D stages (a hand-down's: its
    child's first). Returns (B, N, C, K)."""
    named = {"k_in": k_in, "v_in": v_in, "queries": queries}
    if stats is not None:
        named["stats"] = stats
    named.update(zip(NORM_NAMES, (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias)))
    named.update((f"stage_bases[{j}]", t) for j, t in enumerate(stage_bases))
    named.update((f"factor_masks[{j}]", m) for j, m in enumerate(factor_masks))
    named.update((f"factor_tables[{j}]", t) for j, t in enumerate(factor_tables))
    if grads is not None:
        named.update(zip(("grad_attn", "grad_attn_sum", "grad_attn_v"), grads))
    if row_grads is not None:
        named.update(zip(("grad_rows_k", "grad_rows_v"), row_grads))
    if attn is not None:
        named["attn"] = attn
    check_tensors(named, op=op, dtypes=dtypes)

    if k_in.dim() != 3:
        raise ValueError(f"{op}: k_in must be [B, N, C], got shape {list(k_in.shape)}")
    batch, tokens, channels = k_in.shape
    if v_in.shape != k_in.shape:
        raise ValueError(f"{op}: v_in must be [B, N, C] like k_in {list(k_in.shape)}, "
                         f"got shape {list(v_in.shape)}")
    if tokens < 1:
        raise ValueError(f"{op}: k_in must hold at least one token, got shape {list(k_in.shape)}")
    depth = norm_k_weight.shape[0] - child_stages if norm_k_weight.dim() == 2 else 0
    rows = "D" if child_stages == 0 else "D + 1"
    for name in NORM_NAMES:
        if depth < 1 or list(named[name].shape) != [depth + child_stages, channels]:
            raise ValueError(f"{op}: {name} must be [{rows}, C] with D >= 1 stages and C = "
                             f"{channels} (from k_in), got shape {list(named[name].shape)}")
    if queries.dim() != 3 or queries.shape[0] != batch or queries.shape[1] < 1 \
            or queries.shape[2] != channels:
        raise ValueError(f"{op}: queries must be [B, K, C] = [{batch}, K >= 1, {channels}] "
                         f"(B, C from k_in), got shape {list(queries.shape)}")
    slots = queries.shape[1]
    base_stages = list(base_stages)
    if len(base_stages) != len(stage_bases):
        raise ValueError(f"{op}: base_stages has {len(base_stages)} entries but there are "
                         f"{len(stage_bases)} stage_bases")
    if any(not 0 <= s < depth for s in base_stages) or \
            any(a >= b for a, b in zip(base_stages, base_stages[1:])):
        raise ValueError(f"{op}: base_stages must be increasing stage indices in [0, {depth}), "
                         f"got {base_stages}")
    for j, t in enumerate(stage_bases):
        if t.shape != k_in.shape:
            raise ValueError(f"{op}: stage_bases[{j}] must be [B, N, C] like k_in "
                             f"{list(k_in.shape)}, got shape {list(t.shape)}")
    check_factors(factor_masks, factor_tables, batch=batch, tokens=tokens, channels=channels, op=op)
    stages = list(factor_stages)
    if len(stages) != len(factor_masks):
        raise ValueError(f"{op}: factor_stages has {len(stages)} entries but there are "
                         f"{len(factor_masks)} factors")
    if any(not 0 <= s < depth for s in stages) or stages != sorted(stages):
        raise ValueError(f"{op}: factor_stages must be sorted stage indices in [0, {depth}), "
                         f"got {stages}")
    # A backward takes its forward's stats, whose hand-down has its child's stage.
    most = depth + (child_stages if attn is not None else 0)
    if stats is not None and (stats.dim() != 4 or list(stats.shape[:2]) != [batch, tokens]
                              or stats.shape[2] > most or stats.shape[3] != 4):
        raise ValueError(f"{op}: stats must be [B, N, S, 4] = [{batch}, {tokens}, S <= {most}, 4] "
                         f"(a previous pass's stats output), got shape {list(stats.shape)}")
    shaped = []  # the backward's tensors of known shape
    if grads is not None:
        shaped += zip(("grad_attn", "grad_attn_sum", "grad_attn_v"), grads,
                      ([batch, slots, tokens], [batch, slots], [batch, slots, channels]))
    if row_grads is not None:
        shaped += [(name, t, [batch, tokens, channels])
                   for name, t in zip(("grad_rows_k", "grad_rows_v"), row_grads)]
    if attn is not None:
        shaped.append(("attn", attn, [batch, slots, tokens]))
    for name, t, shape in shaped:
        if list(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {list(t.shape)}")
    return batch, tokens, channels, slots


def check_hand_down(k_in, queries, prompts, hand_down=None, child_queries=None,
                    op: str = "slot_attention_pass_hand_down") -> None:
    """The hand-down's own arguments, after ``check_args`` has checked the rest
    (a rows pass's: ``prompts`` alone)."""
    named = {"k_in": k_in, "prompts": prompts}
    if hand_down is not None:
        named["hand_down"] = hand_down
    if child_queries is not None:
        named["child_queries"] = child_queries
    check_tensors(named, op=op)
    batch, _, channels = k_in.shape
    slots = queries.shape[1]
    if prompts.dim() != 3 or prompts.shape[0] not in (1, batch) or \
            list(prompts.shape[1:]) != [slots, channels]:
        raise ValueError(f"{op}: prompts must be [B or 1, K, C] = [{batch} or 1, {slots}, "
                         f"{channels}] (K from queries, B and C from k_in), got shape "
                         f"{list(prompts.shape)}")
    if hand_down is None:
        return
    if hand_down.shape != k_in.shape:
        raise ValueError(f"{op}: hand_down must be [B, N, C] like k_in {list(k_in.shape)}, "
                         f"got shape {list(hand_down.shape)}")
    if not hand_down.is_contiguous():
        raise ValueError(f"{op}: hand_down must be contiguous to be written in place")
    if child_queries is not None and (
            child_queries.dim() != 3 or child_queries.shape[0] != batch
            or child_queries.shape[1] < 1 or child_queries.shape[2] != channels):
        raise ValueError(f"{op}: child_queries must be [B, K_c, C] = [{batch}, K_c >= 1, "
                         f"{channels}] (B, C from k_in), got shape {list(child_queries.shape)}")


# ---------------------------------------------------------------- torch.library


def _fake(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
          base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
          attn_eps, *, op: str = "slot_attention_pass", child_stages: int = 0):
    """The outputs' shapes; ``stats`` has a stage per row of the norms (a hand-down's
    ``child_stages``: its child's first too)."""
    batch, tokens, channels, slots = check_args(
        k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
        base_stages, factor_masks, factor_tables, factor_stages, queries, stats,
        child_stages=child_stages, dtypes=KERNEL_DTYPES, op=op)
    return (k_in.new_empty((batch, slots, tokens)), k_in.new_empty((batch, slots)),
            k_in.new_empty((batch, slots, channels)),
            k_in.new_empty((batch, tokens, norm_k_weight.shape[0], 4)))


def _fake_hand_down(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                    stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                    queries, stats, norm_eps, attn_eps, prompts, hand_down, child_queries):
    op = "slot_attention_pass_hand_down"
    outputs = _fake(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                    stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                    queries, stats, norm_eps, attn_eps, op=op, child_stages=1)
    check_hand_down(k_in, queries, prompts, hand_down, child_queries, op=op)
    batch, tokens, channels = k_in.shape
    child_slots = 0 if child_queries is None else child_queries.shape[1]
    return (*outputs, k_in.new_empty((batch, child_slots, tokens)),
            k_in.new_empty((batch, child_slots)), k_in.new_empty((batch, child_slots, channels)))


def _fake_rows(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
               base_stages, factor_masks, factor_tables, factor_stages, queries, stats, norm_eps,
               attn_eps, prompts):
    op = "slot_attention_pass_rows"
    outputs = _fake(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                    stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                    queries, stats, norm_eps, attn_eps, op=op, child_stages=1)
    check_hand_down(k_in, queries, prompts, op=op)
    return (*outputs, torch.empty_like(k_in, memory_format=torch.contiguous_format),
            torch.empty_like(v_in, memory_format=torch.contiguous_format))


def _fake_backward(grad_attn, grad_attn_sum, grad_attn_v, k_in, v_in, norm_k_weight,
                   norm_k_bias, norm_v_weight, norm_v_bias, stage_bases, base_stages,
                   factor_masks, factor_tables, factor_stages, queries, stats, attn, norm_eps,
                   attn_eps):
    check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
               base_stages, factor_masks, factor_tables, factor_stages, queries, stats,
               grads=(grad_attn, grad_attn_sum, grad_attn_v), attn=attn, dtypes=KERNEL_DTYPES,
               op="slot_attention_pass_backward")
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return (new(k_in), new(v_in), new(norm_k_weight), new(norm_k_bias), new(norm_v_weight),
            new(norm_v_bias), [new(t) for t in stage_bases],
            [new(m) for m in factor_masks], [new(t) for t in factor_tables], new(queries))


def _fake_rows_backward(grad_attn, grad_attn_sum, grad_attn_v, grad_rows_k, grad_rows_v, k_in,
                        v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                        stage_bases, base_stages, factor_masks, factor_tables, factor_stages,
                        queries, stats, attn, norm_eps, attn_eps, prompts):
    op = "slot_attention_pass_rows_backward"
    check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, stage_bases,
               base_stages, factor_masks, factor_tables, factor_stages, queries, stats,
               grads=(grad_attn, grad_attn_sum, grad_attn_v), row_grads=(grad_rows_k, grad_rows_v),
               attn=attn, child_stages=1, dtypes=KERNEL_DTYPES, op=op)
    check_hand_down(k_in, queries, prompts, op=op)
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return (new(k_in), new(v_in), new(norm_k_weight), new(norm_k_bias), new(norm_v_weight),
            new(norm_v_bias), [new(t) for t in stage_bases],
            [new(m) for m in factor_masks], [new(t) for t in factor_tables], new(queries),
            new(prompts))


def _setup_context(ctx, inputs, output):
    # The inputs, the LayerNorm statistics and the attention: the backward
    # recomputes the chain. A rows pass's inputs end with its prompts.
    (k_in, v_in, nkw, nkb, nvw, nvb, bases, base_stages, masks, tables, factor_stages, queries,
     _stats, norm_eps, attn_eps, *prompts) = inputs
    ctx.mark_non_differentiable(output[3])
    ctx.lengths = (len(bases), len(masks))
    ctx.stages = (list(base_stages), list(factor_stages))
    ctx.eps = (norm_eps, attn_eps)
    ctx.save_for_backward(k_in, v_in, nkw, nkb, nvw, nvb, queries, output[3], output[0], *prompts,
                          *bases, *masks, *tables)


def _backward_of(namespace: str, op: str = "slot_attention_pass"):
    """The autograd formula of ``op``, slot_attention_pass or slot_attention_pass_rows
    (whose output gradients and inputs have the rows' and the prompts too)."""
    backward_op = getattr(getattr(torch.ops, namespace), op + "_backward")
    rows = op == "slot_attention_pass_rows"

    def backward(ctx, grad_attn, grad_attn_sum, grad_attn_v, _grad_stats, *grad_rows):
        k_in, v_in, nkw, nkb, nvw, nvb, queries, stats, attn, *lists = ctx.saved_tensors
        prompts, lists = (lists[:1], lists[1:]) if rows else ([], lists)
        num_bases, num_factors = ctx.lengths
        bases = lists[:num_bases]
        masks = lists[num_bases:num_bases + num_factors]
        tables = lists[num_bases + num_factors:]
        base_stages, factor_stages = ctx.stages
        grads = backward_op(grad_attn, grad_attn_sum, grad_attn_v, *grad_rows, k_in, v_in, nkw,
                            nkb, nvw, nvb, bases, base_stages, masks, tables, factor_stages,
                            queries, stats, attn, *ctx.eps, *prompts)
        (g_k, g_v, g_nkw, g_nkb, g_nvw, g_nvb, g_bases, g_masks, g_tables, g_queries,
         *g_prompts) = grads
        return (g_k, g_v, g_nkw, g_nkb, g_nvw, g_nvb, g_bases, _no_grad(base_stages), g_masks,
                g_tables, _no_grad(factor_stages), g_queries, None, None, None, *g_prompts)

    return backward


def _no_grad(int_list):
    # torch.library matches the returned structure against the inputs' pytree, where a
    # non-empty int list is one leaf but an empty list is an empty node.
    return None if int_list else []


def register(namespace: str = "exposure_slot", *, fake: bool = True) -> None:
    """Attach the fake kernels (unless ``fake`` is False) and the autograd formula to
    the ops ``slot_attention_pass`` and ``slot_attention_pass_backward`` of
    ``namespace``, which must already be defined (see ``mask_fusion.register``), and
    where it has them (the compiled extension's, CPU only: Triton has none), the fake
    kernel to its ``slot_attention_pass_hand_down`` and both to its
    ``slot_attention_pass_rows``."""
    if fake:
        torch.library.register_fake(f"{namespace}::slot_attention_pass", _fake)
        torch.library.register_fake(f"{namespace}::slot_attention_pass_backward",
                                    _fake_backward)
        if hasattr(getattr(torch.ops, namespace), "slot_attention_pass_hand_down"):
            torch.library.register_fake(f"{namespace}::slot_attention_pass_hand_down",
                                        _fake_hand_down)
            torch.library.register_fake(f"{namespace}::slot_attention_pass_rows", _fake_rows)
            torch.library.register_fake(f"{namespace}::slot_attention_pass_rows_backward",
                                        _fake_rows_backward)
    torch.library.register_autograd(f"{namespace}::slot_attention_pass",
                                    _backward_of(namespace), setup_context=_setup_context)
    if hasattr(getattr(torch.ops, namespace), "slot_attention_pass_rows"):
        torch.library.register_autograd(
            f"{namespace}::slot_attention_pass_rows",
            _backward_of(namespace, "slot_attention_pass_rows"), setup_context=_setup_context)
