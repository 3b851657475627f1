"""Slot-in-slot attention (SPEC section 1 and 2), any number of levels.

Each level owns K slots that compete for tokens (softmax over the slot axis), are
updated by a GRU and an MLP, and hand a modulated copy of the tokens to the next
level down. A level returns two per-token maps: the mixture of its prompts and the
mixture of its slots, weighted by its last attention; a parent crosses its child's
pair over (SPEC: the released code unpacks the child's outputs in swapped order).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import nn

from .backends import resolve_backend, validate_backend
from .ops import mask_fusion

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
        prompt_map, slot_map, masks = self._run_level(0, k, v, backend)
        return SlotAttentionOutput(prompt_map, slot_map, masks)

    def _run_level(self, depth: int, k_in, v_in, backend: str):
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
                k = mask_fusion(attn, level.prompts, k, backend=backend)
                v = mask_fusion(attn, level.prompts, v, backend=backend)
                child_a, child_b, child_masks = self._run_level(depth + 1, k, v, backend)
            slots = level.refine(slots)
            if has_child:
                k = k * child_b
                v = v * child_b
        # The cross-over: prompts meet the child's slot map and slots its prompt map.
        prompt_map = mask_fusion(attn, level.prompts, child_b, backend=backend)
        slot_map = mask_fusion(attn, slots, child_a, backend=backend)
        return prompt_map, slot_map, [attn] + child_masks

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
