"""Slot-in-slot attention (SPEC section 1 and 2), any number of levels.

Each level owns K slots that compete for tokens (softmax over the slot axis), are
updated by a GRU and an MLP, and hand a modulated copy of the tokens to the next
level down. A level returns two per-token maps: the mixture of its prompts and the
mixture of its slots, weighted by its last attention; a parent crosses its child's
pair over (SPEC: the released code unpacks the child's outputs in swapped order).

Two implementations of the same computation:

- backend "reference" runs SPEC literally in PyTorch, materialising every modulated
  k and v (the oracle of every test);
- the fused backends never materialise a modulated or normalised k or v of a
  level's own. Every per-token quantity SPEC multiplies into k and v, and both
  outputs, are products of "mixtures" (per-slot vectors weighted by a level's
  attention, [B, K, N] masks and a [K, C] table). The fused path keeps them
  symbolic, as lists of (masks, table) factors, and hands them to two ops:
  ``slot_attention_pass`` (a level's attention, with the chain of LayerNorms and
  modulations from the top level's inputs recomputed per token) and
  ``mask_fusion`` (a product of mixtures, for a level's running modulation and the
  two outputs). In training on "cpu" a level with a child hands the child its
  input rows k * pf and v * pf ([B, N, C] each, once per call of the child:
  ``slot_attention_pass_rows``), so that every pass runs one stage, its level's
  own LayerNorm and modulation, over its level's input (the GPU backends recompute
  the chain from the top level's inputs in every pass), and each slot update is
  one differentiable op, ``slot_update``. Under inference on "cpu"
  the whole forward is one op,
  ``slot_in_slot_inference``, which runs this schedule in C++ (no Python between
  its kernel calls) with more fusions: a level with a child hands the child its
  input rows k * pf and v * pf (one [B, N, C] pair for the whole forward, updated
  in place), the statistics of the child's first LayerNorm and, for a leaf child,
  runs the child's first pass on the same tokens; the leaf's passes read those two
  rows a token instead of recomputing its ancestors' chain, and so do its parent's
  later ones (its k is its child's last input times the child's b); each slot
  update is one op, ``slot_update``; and the leaf's last pass writes the output
  that holds its own mixture, into the k rows. Memory beyond the inputs: the two
  [B, N, C] rows (the outputs, at the end), the [B, K, N] attention maps and the
  per-token LayerNorm statistics.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from . import ops
from .backends import resolve_backend, validate_backend
from .ops import mask_fusion_reference, slot_in_slot_inference
from .ops.slot_attention_pass import stacked_norms
from .ops.slot_update import level_weights

EPS = 1e-8  # added to the attention after the softmax, as released


class SlotAttentionOutput(NamedTuple):
    prompt_map: torch.Tensor  # [B, N, C]
    slot_map: torch.Tensor  # [B, N, C]
    masks: list[torch.Tensor]  # per level, top first: [B, K, N] last-iteration attention


class SlotLevel(nn.Module):
    """Parameters and per-slot updates of one level; the parameter names are
    SPEC's state_dict leaf names."""

    def __init__(self, dim: int, num_slots: int):
        super().__init__()
        self.num_slots = num_slots
        self.scale = dim ** -0.5
        self.slots_mu = nn.Parameter(torch.empty(1, num_slots, dim))
        self.prompts = nn.Parameter(torch.empty(1, num_slots, dim))
        self.to_q = nn.Linear(dim, dim)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.norm_k_inp = nn.LayerNorm(dim)
        self.norm_v_inp = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_pre_ff = nn.LayerNorm(dim)
        nn.init.xavier_uniform_(self.slots_mu)
        nn.init.xavier_uniform_(self.prompts)

    def attend(self, slots, k, v):
        """Attention ``A`` [B,K,N] (softmax over slots, +eps) and the per-slot
        weighted means of ``v`` [B,K,C]."""
        q = self.to_q(self.norm_slots(slots))
        attn = torch.bmm(q, k.transpose(1, 2)).mul_(self.scale).softmax(dim=1) + EPS
        weights = attn / attn.sum(dim=-1, keepdim=True)
        return attn, torch.bmm(weights, v)

    def update(self, slots_prev, updates):
        batch, num_slots, dim = slots_prev.shape
        return self.gru(updates.reshape(-1, dim), slots_prev.reshape(-1, dim)).view(
            batch, num_slots, dim)

    def refine(self, slots):
        return slots + self.mlp(self.norm_pre_ff(slots))


class SlotInSlotAttention(nn.Module):
    """Nested slot attention: ``slots=(3,)`` is plain slot attention, ``(3, 7)`` the
    level-2 and ``(3, 7, 10)`` the level-3 Exposure-slot module.

    ``forward(k, v)`` takes token features ``[B, N, dim]`` and returns
    ``SlotAttentionOutput(prompt_map, slot_map, masks)``.
    """

    def __init__(self, dim: int = 128, slots: Sequence[int] = (3, 7), iters: int = 3,
                 backend: str = "auto"):
        super().__init__()
        if len(slots) < 1 or any(int(k) < 1 for k in slots):
            raise ValueError(f"slots must be a non-empty sequence of positive slot counts, got {slots!r}")
        if iters < 1:
            raise ValueError(f"iters must be >= 1, got {iters}")
        self.dim = dim
        self.iters = iters
        self.levels = nn.ModuleList(SlotLevel(dim, int(k)) for k in slots)
        self.backend = backend

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(level.num_slots for level in self.levels)

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        self._backend = validate_backend(name)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, slots={self.slots}, iters={self.iters}, backend={self.backend!r}"

    def forward(self, k: torch.Tensor, v: torch.Tensor) -> SlotAttentionOutput:
        self._check_inputs(k, v)
        backend = resolve_backend(self.backend, k.device)
        if backend == "reference":
            prompt_map, slot_map, masks = self._run_level(0, k, v)
        elif backend == "cpu" and not torch.is_grad_enabled():
            prompt_map, slot_map, masks = self._run_cpu_inference(k, v)
        else:
            prompt_map, slot_map, masks = self._run_fused(k, v, backend)
        return SlotAttentionOutput(prompt_map, slot_map, masks)

    def _run_level(self, depth: int, k_in, v_in):
        """SPEC section 1, literally: returns the level's pair (a, b) and its masks."""
        level = self.levels[depth]
        has_child = depth + 1 < len(self.levels)
        k = level.norm_k_inp(k_in)
        v = level.norm_v_inp(v_in)
        slots = level.slots_mu.expand(k.shape[0], -1, -1)
        child_a = child_b = None
        child_masks: list[torch.Tensor] = []
        for _ in range(self.iters):
            attn, updates = level.attend(slots, k, v)
            slots = level.update(slots, updates)
            if has_child:
                pf = mask_fusion_reference([attn], [level.prompts])
                k = k * pf
                v = v * pf
                child_a, child_b, child_masks = self._run_level(depth + 1, k, v)
            slots = level.refine(slots)
            if has_child:
                k = k * child_b
                v = v * child_b
        # The cross-over: prompts meet the child's slot map and slots its prompt map.
        prompt_map = mask_fusion_reference([attn], [level.prompts])
        slot_map = mask_fusion_reference([attn], [slots])
        if has_child:
            prompt_map = prompt_map * child_b
            slot_map = slot_map * child_a
        return prompt_map, slot_map, [attn] + child_masks

    def _run_cpu_inference(self, k_in, v_in):
        """The whole forward as one op (exposure_slot/ops/slot_in_slot_inference.py):
        the same schedule as _run_fused under inference, with the hand-down passes
        and the fused slot updates, run in C++ without returning to Python between
        its kernel calls."""
        self._check_dtype(k_in, "cpu")
        return torch.ops.exposure_slot.slot_in_slot_inference(
            k_in, v_in, *slot_in_slot_inference.level_args(self.levels), self.iters, EPS)

    def _check_dtype(self, k_in, backend: str):
        dtypes = ops.BACKEND_DTYPES[backend]
        if dtypes is not None and k_in.dtype not in dtypes:
            raise TypeError(f"SlotInSlotAttention: backend {backend!r}: the compiled kernels "
                            f"implement {', '.join(str(d).removeprefix('torch.') for d in dtypes)}; "
                            f"got k and v of dtype {k_in.dtype}")

    def _run_fused(self, k_in, v_in, backend: str):
        # The ops run without their Python checks (validate_args=False): the module
        # builds their arguments, and checks here what it cannot vouch for.
        self._check_dtype(k_in, backend)
        stacked = stacked_norms(self.levels)
        # Every call of a level starts from its slots_mu: its first queries, once
        # per forward rather than once per call (13 calls at level 3).
        first_queries = [level.to_q(level.norm_slots(level.slots_mu)) * level.scale
                         for level in self.levels]
        prompt_factors, slot_factors, masks = self._fused_level(
            0, [], None, k_in, v_in, stacked, first_queries, backend)
        prompt_map = ops.mask_fusion(*zip(*prompt_factors), backend=backend, validate_args=False)
        slot_map = ops.mask_fusion(*zip(*slot_factors), backend=backend, validate_args=False)
        return prompt_map, slot_map, masks

    def _fused_level(self, depth: int, chain: list[tuple], parent_stats, k_in, v_in, stacked,
                     first_queries, backend: str):
        """The level at ``depth`` on the fused ops. Its input is ``k_in``, ``v_in``
        seen through the stages of ``chain``: ``chain[i] = (base, factors)`` is what
        the i-th ancestor from ``k_in``'s level multiplies into the tokens it hands
        down: its running modulation (a [B, N, C] tensor, or None for 1) and (masks,
        table) factors; ``parent_stats`` caches the LayerNorm statistics of those
        stages; ``stacked`` is every level's LayerNorms ([L, C] each) and
        ``first_queries[depth]`` ([1, K, C]) the queries of its slots_mu, where every
        call of the level starts. The GPU backends hand the chain down and every pass
        recomputes it per token from the top level's input. In training the cpu
        backend (which _run_fused runs in training only) instead has each parent's
        pass hand its child its input rows ``k * pf``, ``v * pf``
        (``slot_attention_pass_rows``), so that ``chain`` is always empty and every
        pass runs one stage: a pass's chain, and its backward's, cost more with each
        stage, and a child's passes (three per call) would each recompute and
        differentiate the same ancestors' stages. Returns the level's pair (a, b) as
        factor lists, and its masks."""
        level = self.levels[depth]
        has_child = depth + 1 < len(self.levels)
        hands_down_rows = backend == "cpu" and has_child
        # The LayerNorms of the pass's stages; a pass handing down rows takes its
        # child's too (its stats output ends with the statistics of the rows, the
        # child's first stage).
        norms = [n[depth - len(chain):depth + 1 + hands_down_rows] for n in stacked]
        running = None  # this level's modulation of its k and v: prod of pf * b_c so far
        stats = parent_stats  # after the first pass, also this level's own stage
        slots = level.slots_mu.expand(k_in.shape[0], -1, -1)
        child_a = child_b = []
        child_masks: list[torch.Tensor] = []
        inference = not torch.is_grad_enabled()
        queries = first_queries[depth].expand(k_in.shape[0], -1, -1)

        def fuse_into(base, factors):
            masks, tables = [m for m, _ in factors], [t for _, t in factors]
            if base is not None and inference:
                # Nothing saves the old value for a backward: overwrite it rather
                # than hold the old and the new [B, N, C] modulation at once.
                return ops.mask_fusion_(masks, tables, base, backend=backend, validate_args=False)
            return ops.mask_fusion(masks, tables, base, backend=backend, validate_args=False)

        for iteration in range(self.iters):
            stages = _stage_args(chain + [(running, [])])
            if hands_down_rows:
                attn, attn_sum, attn_v, stats, child_k, child_v = ops.slot_attention_pass_rows(
                    k_in, v_in, *norms, *stages, queries, stats, level.norm_k_inp.eps, EPS,
                    level.prompts, backend=backend, validate_args=False)
                stats, child_stats = stats[:, :, :-1], stats[:, :, -1:]
            else:
                attn, attn_sum, attn_v, stats = ops.slot_attention_pass(
                    k_in, v_in, *norms, *stages, queries, stats, level.norm_k_inp.eps, EPS,
                    backend=backend, validate_args=False)
            if backend == "cpu":  # one op (and one autograd node) for the whole update
                slots, queries = ops.slot_update(slots, attn_sum, attn_v, level_weights(level),
                                                 level.scale, level.norm_slots.eps,
                                                 backend=backend, validate_args=False)
            else:
                slots = level.refine(level.update(slots, attn_v / attn_sum.unsqueeze(-1)))
                queries = level.to_q(level.norm_slots(slots)) * level.scale
            if has_child:
                pf = (attn, level.prompts)
                if hands_down_rows:  # the pass has handed the child its input rows
                    child_input = ([], child_stats, child_k, child_v)
                elif inference:
                    # The child's modulation running * pf, made once for all its
                    # passes (and its descendants'), where its passes would each
                    # recompute the mixture per token; running = running * pf * b_c
                    # then needs only the child's factors.
                    running = fuse_into(running, [pf])
                    child_input = (chain + [(running, [])], stats, k_in, v_in)
                else:
                    child_input = (chain + [(running, [pf])], stats, k_in, v_in)
                child_a, child_b, child_masks = self._fused_level(
                    depth + 1, *child_input, stacked, first_queries, backend)
            if has_child and iteration + 1 < self.iters:  # the last one is never used
                running = fuse_into(running, child_b if inference else [pf] + child_b)
        return ([(attn, level.prompts)] + child_b, [(attn, slots)] + child_a,
                [attn] + child_masks)

    def _check_inputs(self, k, v):
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 3 or t.shape[-1] != self.dim:
                raise ValueError(f"{name} must be [B, N, {self.dim}], got {list(t.shape)}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {list(k.shape)} and {list(v.shape)}")
        if k.shape[1] < 1:
            raise ValueError("k and v must hold at least one token (N >= 1)")
        param = self.levels[0].slots_mu
        for name, t in (("k", k), ("v", v)):
            if t.dtype != param.dtype or t.device != param.device:
                raise ValueError(
                    f"{name} is {t.dtype} on {t.device} but the module's parameters are "
                    f"{param.dtype} on {param.device}; cast one to match (e.g. module.double())")


def _stage_args(stages: list[tuple]) -> tuple[list, list, list, list[int]]:
    """A chain's stages, ``(base or None, [(masks, table), ...])`` each, as the ops
    take them: the bases (one entry per stage), then the factors' masks, tables and
    stages."""
    factors = [f for _, stage_factors in stages for f in stage_factors]
    return ([base for base, _ in stages], [m for m, _ in factors], [t for _, t in factors],
            [d for d, (_, stage_factors) in enumerate(stages) for _ in stage_factors])
