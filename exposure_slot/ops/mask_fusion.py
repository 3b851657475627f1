"""Mask-weighted fusion: per-slot vectors spread over the tokens by soft region masks.

    out[b, n, c] = base[b, n, c] * sum_i masks[b, i, n] * table[tb, i, c]

``masks`` [B, K, N] are slot-attention maps (softmax over the K slots), ``table``
[B, K, C] or [1, K, C] holds one vector per slot (tb = b, or 0 for a table shared by
the batch), ``base`` [B, N, C] is optional (a factor of 1 when absent); the result is
[B, N, C]. SPEC section 1 uses it for ``pf``, ``k * pf``, ``v * pf``, ``PF * b_c`` and
``SF * a_c``.

This module is the op's Python side:

- ``mask_fusion_reference``: the pure PyTorch twin, the "reference" backend and the
  tests' oracle;
- ``check_args``: argument validation shared by the public wrapper and the fake
  kernels;
- the fake kernels (for torch.compile) and the autograd formula of
  ``torch.ops.exposure_slot.mask_fusion`` / ``mask_fusion_backward``, which
  ``register()`` attaches once the extension has defined the ops.

The C++ kernels are in ``csrc/cpu/mask_fusion.cpp``, the schemas in
``csrc/exposure_slot.cpp``.
"""

from __future__ import annotations

import torch

# The dtypes the compiled kernels implement.
KERNEL_DTYPES = (torch.float32, torch.float64)


def mask_fusion_reference(masks: torch.Tensor, table: torch.Tensor,
                          base: torch.Tensor | None = None) -> torch.Tensor:
    """``base * (masks^T @ table)`` in plain PyTorch (differentiable, any device)."""
    mix = masks.transpose(1, 2) @ table  # [B,N,K] @ [B or 1,K,C]: the batch broadcasts
    return mix if base is None else base * mix


def check_args(masks, table, base=None, grad=None, *, kernel: bool = False,
               op: str = "mask_fusion") -> None:
    """Raise TypeError (not a tensor, dtype) or ValueError (device, shape) naming the
    problem. ``grad`` is the output gradient of the backward op; ``kernel`` also
    requires a dtype the compiled kernels implement."""
    named = {"masks": masks, "table": table, "base": base, "grad": grad}
    named = {name: t for name, t in named.items() if t is not None}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if kernel and t.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{op}: the compiled kernels implement float32 and float64, "
                            f"got {name} of dtype {t.dtype}")
    if len({t.dtype for t in named.values()}) > 1:
        raise TypeError(f"{op}: all tensors must share one dtype, got "
                        + ", ".join(f"{name} {t.dtype}" for name, t in named.items()))
    if len({t.device for t in named.values()}) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in named.items()))

    if masks.dim() != 3:
        raise ValueError(f"{op}: masks must be [B, K, N], got shape {list(masks.shape)}")
    if table.dim() != 3:
        raise ValueError(f"{op}: table must be [B, K, C] or [1, K, C], "
                         f"got shape {list(table.shape)}")
    batch, slots, tokens = masks.shape
    channels = table.shape[2]
    if slots < 1:
        raise ValueError(f"{op}: masks must have at least one slot (K >= 1), "
                         f"got shape {list(masks.shape)}")
    if table.shape[1] != slots:
        raise ValueError(f"{op}: table has {table.shape[1]} slots but masks has K = {slots} "
                         f"(table {list(table.shape)}, masks {list(masks.shape)})")
    if table.shape[0] not in (1, batch):
        raise ValueError(f"{op}: table batch must be 1 or B = {batch} (from masks), "
                         f"got table shape {list(table.shape)}")
    for name in ("base", "grad"):
        if name in named and list(named[name].shape) != [batch, tokens, channels]:
            raise ValueError(f"{op}: {name} must be [B, N, C] = {[batch, tokens, channels]} "
                             f"(B, N from masks, C from table), "
                             f"got shape {list(named[name].shape)}")


# ---------------------------------------------------------------- torch.library


def _fake(masks, table, base=None):
    check_args(masks, table, base, kernel=True)
    return masks.new_empty((masks.shape[0], masks.shape[2], table.shape[2]))


def _fake_backward(grad, masks, table, base):
    check_args(masks, table, base, grad, kernel=True, op="mask_fusion_backward")
    return (torch.empty_like(masks, memory_format=torch.contiguous_format),
            torch.empty_like(table, memory_format=torch.contiguous_format),
            None if base is None else torch.empty_like(base, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    # The backward recomputes the mixture from masks and table instead of saving it.
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    masks, table, base = ctx.saved_tensors
    return torch.ops.exposure_slot.mask_fusion_backward(grad, masks, table, base)


def register() -> None:
    """Attach the fake kernels and the autograd formula to the compiled ops. Called
    once by ``exposure_slot.ops`` after ``exposure_slot._C`` has defined them."""
    torch.library.register_fake("exposure_slot::mask_fusion", _fake)
    torch.library.register_fake("exposure_slot::mask_fusion_backward", _fake_backward)
    torch.library.register_autograd("exposure_slot::mask_fusion", _backward,
                                    setup_context=_setup_context)
