"""The slot-in-slot module's whole forward under inference, as one CPU op.

``torch.ops.exposure_slot.slot_in_slot_inference(k_in, v_in, norm_k_weight,
norm_k_bias, norm_v_weight, norm_v_bias, slots_mu, prompts, update_weights, scales,
norm_eps, update_eps, iters, attn_eps) -> (prompt_map, slot_map, masks)`` computes
``SlotInSlotAttention.forward`` without autograd for L levels: the input LayerNorms
stacked ``[L, C]``; per level ``slots_mu`` and ``prompts`` ``[1, K_d, C]``,
``slot_update``'s 14 weights (``slot_update.WEIGHT_NAMES``, flattened level by
level), the attention scale, the input norms' eps and the slot norms' eps. It runs
the fused backend's schedule (hand-down passes, slot updates, output fusions) in C++,
so that no Python runs between the ~20-70 kernel calls of a forward
(``csrc/cpu/slot_in_slot_inference.cpp``). ``SlotInSlotAttention`` calls it on
backend "cpu" when autograd is off; its oracle is the module's "reference" backend
(``tests/test_slot_in_slot_fused.py``).

This module builds the op's arguments from the module's levels and holds its
argument checks and fake kernel (for torch.compile), which ``register()`` attaches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_tensors
from .slot_attention_pass import NORM_NAMES, stacked_norms
from .slot_update import WEIGHT_NAMES, level_weights

KERNEL_DTYPES = (torch.float32, torch.float64)


def level_args(levels: Sequence[torch.nn.Module]) -> tuple:
    """The op's arguments after k_in and v_in and before iters and attn_eps, from a
    ``SlotInSlotAttention``'s ``SlotLevel``s (top first)."""
    return (*stacked_norms(levels), [level.slots_mu for level in levels],
            [level.prompts for level in levels],
            [w for level in levels for w in level_weights(level)],
            [level.scale for level in levels], [level.norm_k_inp.eps for level in levels],
            [level.norm_slots.eps for level in levels])


def check_args(k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, slots_mu,
               prompts, update_weights, scales, norm_eps, update_eps, iters, attn_eps,
               *, dtypes=KERNEL_DTYPES, op: str = "slot_in_slot_inference") -> list[int]:
    """Raise TypeError or ValueError naming the problem. Returns the slot counts."""
    levels = len(slots_mu)
    if levels < 1:
        raise ValueError(f"{op}: needs at least one level, got no slots_mu")
    counts = {"prompts": len(prompts), "scales": len(scales), "norm_eps": len(norm_eps),
              "update_eps": len(update_eps)}
    for name, count in counts.items():
        if count != levels:
            raise ValueError(f"{op}: {name} needs one entry per level ({levels}, from "
                             f"slots_mu), got {count}")
    if len(update_weights) != len(WEIGHT_NAMES) * levels:
        raise ValueError(f"{op}: update_weights needs {len(WEIGHT_NAMES)} per level "
                         f"({len(WEIGHT_NAMES) * levels} for {levels}), got {len(update_weights)}")
    if iters < 1:
        raise ValueError(f"{op}: iters must be >= 1, got {iters}")
    named = {"k_in": k_in, "v_in": v_in}
    named.update(zip(NORM_NAMES, (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias)))
    for d in range(levels):
        named[f"slots_mu[{d}]"], named[f"prompts[{d}]"] = slots_mu[d], prompts[d]
        for j, (name, _) in enumerate(WEIGHT_NAMES):
            named[f"{name}[{d}]"] = update_weights[d * len(WEIGHT_NAMES) + j]
    check_tensors(named, op=op, dtypes=dtypes)
    if k_in.dim() != 3 or v_in.shape != k_in.shape:
        raise ValueError(f"{op}: k_in and v_in must be [B, N, C] alike, got shapes "
                         f"{list(k_in.shape)} and {list(v_in.shape)}")
    channels = k_in.shape[2]
    for name in NORM_NAMES:
        if list(named[name].shape) != [levels, channels]:
            raise ValueError(f"{op}: {name} must be [L, C] = [{levels}, {channels}] (a row "
                             f"per level), got shape {list(named[name].shape)}")
    slots = []
    for d in range(levels):
        mu = slots_mu[d]
        if mu.dim() != 3 or mu.shape[0] != 1 or mu.shape[1] < 1 or mu.shape[2] != channels:
            raise ValueError(f"{op}: slots_mu[{d}] must be [1, K, {channels}] with K >= 1, got "
                             f"shape {list(mu.shape)}")
        if prompts[d].shape != mu.shape:
            raise ValueError(f"{op}: prompts[{d}] must be shaped like slots_mu[{d}], "
                             f"{list(mu.shape)}, got {list(prompts[d].shape)}")
        slots.append(mu.shape[1])
    return slots


# ---------------------------------------------------------------- torch.library


def _fake(k_in, v_in, *args):
    slots = check_args(k_in, v_in, *args)
    batch, tokens, _ = k_in.shape
    return (k_in.new_empty(k_in.shape), k_in.new_empty(k_in.shape),
            [k_in.new_empty((batch, k, tokens)) for k in slots])


def register(namespace: str = "exposure_slot") -> None:
    """Attach the fake kernel to ``namespace::slot_in_slot_inference``."""
    torch.library.register_fake(f"{namespace}::slot_in_slot_inference", _fake)
