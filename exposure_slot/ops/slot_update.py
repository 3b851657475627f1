"""A slot level's update between two slot-attention passes:

    u  = attn_v / attn_sum
    s' = h + mlp(LayerNorm_pre_ff(h)),   h = GRUCell(input=u, hidden=slots)
    q  = to_q(LayerNorm_slots(s')) * scale

returning ``(s', q)``: the level's new slots and the queries of its next pass (SPEC
section 1). The fused backend ``cpu`` calls this op once per iteration instead of
a few dozen small ATen ops (and as many autograd nodes in training); its backward,
``slot_update_backward``, takes the gradients of every input from those of ``s'``
and ``q``.

This module is the op's Python side: the reference twin, argument checks, the
fake kernels and the autograd formula of ``torch.ops.exposure_slot.slot_update``,
which ``register()`` attaches. The C++ kernels are ``csrc/cpu/slot_update.cpp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_tensors

KERNEL_DTYPES = (torch.float32, torch.float64)

# The op's weight arguments, in order, and the SlotLevel parameter each one is.
WEIGHT_NAMES = (
    ("gru_weight_ih", "gru.weight_ih"), ("gru_weight_hh", "gru.weight_hh"),
    ("gru_bias_ih", "gru.bias_ih"), ("gru_bias_hh", "gru.bias_hh"),
    ("norm_pre_ff_weight", "norm_pre_ff.weight"), ("norm_pre_ff_bias", "norm_pre_ff.bias"),
    ("mlp_weight_1", "mlp.0.weight"), ("mlp_bias_1", "mlp.0.bias"),
    ("mlp_weight_2", "mlp.2.weight"), ("mlp_bias_2", "mlp.2.bias"),
    ("norm_slots_weight", "norm_slots.weight"), ("norm_slots_bias", "norm_slots.bias"),
    ("to_q_weight", "to_q.weight"), ("to_q_bias", "to_q.bias"),
)


def level_weights(level: torch.nn.Module) -> list[torch.Tensor]:
    """A ``SlotLevel``'s parameters in the op's argument order. (getattr by getattr:
    torch.compile traces that, not operator.attrgetter.)"""
    weights = []
    for _, name in WEIGHT_NAMES:
        value = level
        for part in name.split("."):
            value = getattr(value, part)
        weights.append(value)
    return weights


def slot_update_reference(slots, attn_sum, attn_v, gru_weight_ih, gru_weight_hh, gru_bias_ih,
                          gru_bias_hh, norm_pre_ff_weight, norm_pre_ff_bias, mlp_weight_1,
                          mlp_bias_1, mlp_weight_2, mlp_bias_2, norm_slots_weight,
                          norm_slots_bias, to_q_weight, to_q_bias, scale: float,
                          norm_eps: float):
    """The op in plain PyTorch (any device, differentiable): (new slots, queries)."""
    batch, num_slots, channels = slots.shape
    updates = (attn_v / attn_sum.unsqueeze(-1)).reshape(-1, channels)
    h = torch.gru_cell(updates, slots.reshape(-1, channels), gru_weight_ih, gru_weight_hh,
                       gru_bias_ih, gru_bias_hh).view(batch, num_slots, channels)
    normed = F.layer_norm(h, (channels,), norm_pre_ff_weight, norm_pre_ff_bias, norm_eps)
    new_slots = h + F.linear(F.relu(F.linear(normed, mlp_weight_1, mlp_bias_1)), mlp_weight_2,
                             mlp_bias_2)
    normed = F.layer_norm(new_slots, (channels,), norm_slots_weight, norm_slots_bias, norm_eps)
    return new_slots, F.linear(normed, to_q_weight, to_q_bias) * scale


def check_args(slots, attn_sum, attn_v, *weights, dtypes=KERNEL_DTYPES,
               op: str = "slot_update") -> None:
    """Raise TypeError or ValueError naming the problem."""
    if len(weights) != len(WEIGHT_NAMES):
        raise TypeError(f"{op}: takes {len(WEIGHT_NAMES)} weights "
                        f"({', '.join(name for name, _ in WEIGHT_NAMES)}), got {len(weights)}")
    named = {"slots": slots, "attn_sum": attn_sum, "attn_v": attn_v}
    named.update((name, w) for (name, _), w in zip(WEIGHT_NAMES, weights))
    check_tensors(named, op=op, dtypes=dtypes)
    if slots.dim() != 3:
        raise ValueError(f"{op}: slots must be [B, K, C], got shape {list(slots.shape)}")
    batch, num_slots, channels = slots.shape
    expected = {"attn_sum": [batch, num_slots], "attn_v": [batch, num_slots, channels]}
    for name, _ in WEIGHT_NAMES:
        if name.startswith("gru_"):
            expected[name] = [3 * channels, channels] if "weight" in name else [3 * channels]
        elif name.startswith("norm_") or "bias" in name:
            expected[name] = [channels]
        else:
            expected[name] = [channels, channels]
    for name, shape in expected.items():
        if list(named[name].shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape} (B, K, C from slots "
                             f"{list(slots.shape)}), got {list(named[name].shape)}")


# ---------------------------------------------------------------- torch.library


def _fake(slots, attn_sum, attn_v, *weights_and_scalars):
    check_args(slots, attn_sum, attn_v, *weights_and_scalars[:-2])
    return slots.new_empty(slots.shape), slots.new_empty(slots.shape)


def _fake_backward(grad_slots, grad_queries, slots, attn_sum, attn_v, *weights_and_scalars):
    weights = weights_and_scalars[:-2]
    check_args(slots, attn_sum, attn_v, *weights, op="slot_update_backward")
    return (slots.new_empty(slots.shape), attn_sum.new_empty(attn_sum.shape),
            attn_v.new_empty(attn_v.shape), [w.new_empty(w.shape) for w in weights])


def _setup_context(ctx, inputs, output):
    slots, attn_sum, attn_v, *weights, scale, norm_eps = inputs
    ctx.scalars = (scale, norm_eps)
    ctx.save_for_backward(slots, attn_sum, attn_v, *weights)


def _backward_of(namespace: str):
    backward_op = getattr(torch.ops, namespace).slot_update_backward

    def backward(ctx, grad_slots, grad_queries):
        slots, *rest = ctx.saved_tensors
        # An output nothing used (a level's last queries) has no gradient.
        grad_slots = torch.zeros_like(slots) if grad_slots is None else grad_slots
        grad_queries = torch.zeros_like(slots) if grad_queries is None else grad_queries
        g_slots, g_attn_sum, g_attn_v, g_weights = backward_op(grad_slots, grad_queries, slots,
                                                               *rest, *ctx.scalars)
        return (g_slots, g_attn_sum, g_attn_v, *g_weights, None, None)

    return backward


def register(namespace: str = "exposure_slot") -> None:
    """Attach the fake kernels and the autograd formula to ``namespace::slot_update``
    (see ``mask_fusion.register``)."""
    torch.library.register_fake(f"{namespace}::slot_update", _fake)
    torch.library.register_fake(f"{namespace}::slot_update_backward", _fake_backward)
    torch.library.register_autograd(f"{namespace}::slot_update", _backward_of(namespace),
                                    setup_context=_setup_context)
