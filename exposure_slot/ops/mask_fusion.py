"""Mask-weighted fusion: per-slot vectors spread over the tokens by soft region masks,
multiplied together and into an optional base.

    out[b, n, c] = (base[b, n, c] or 1) * prod_j sum_i masks[j][b, i, n] * tables[j][tb, i, c]

Each factor j is a pair: ``masks[j]`` [B, K_j, N], slot-attention maps (softmax over
the K_j slots), and ``tables[j]`` [B, K_j, C] or [1, K_j, C], one vector per slot
(tb = b, or 0 for a table shared by the batch); ``base`` is [B, N, C]; the result is
[B, N, C]. With one factor this is SPEC section 1's mixture (``pf``, ``PF``, ``SF``);
a parent level's outputs ``PF * b_c`` and ``SF * a_c`` are products of several,
since its child's pair is one too; and a level's running modulation of its k and v
is updated as ``M * pf * b_c`` (``base=M``).

This module is the op's Python side:

- ``mask_fusion_reference``: the pure PyTorch twin, the "reference" backend and the
  tests' oracle;
- ``check_args``: argument validation shared by the public wrapper and the fake
  kernels;
- the fake kernels (for torch.compile) and the autograd formula of
  ``torch.ops.exposure_slot.mask_fusion`` / ``mask_fusion_backward`` (and the fake
  kernel of ``mask_fusion_``, the in-place update of ``base``), which
  ``register()`` attaches once the extension has defined the ops.

The C++ kernels are in ``csrc/cpu/mask_fusion.cpp`` (per-token arithmetic in
``csrc/cpu/mixtures.h``), the schemas in ``csrc/exposure_slot.cpp``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .checks import check_tensors

# The dtypes some compiled kernel implements (the fake kernels accept these; each
# backend's own list is exposure_slot.ops.BACKEND_DTYPES).
KERNEL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def mask_fusion_reference(masks: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                          base: torch.Tensor | None = None) -> torch.Tensor:
    """``base`` times the product of ``masks[j]^T @ tables[j]`` in plain PyTorch
    (differentiable, any device)."""
    out = base
    for m, t in zip(masks, tables):
        mix = m.transpose(1, 2) @ t  # [B,N,K] @ [B or 1,K,C]: the batch broadcasts
        out = mix if out is None else out * mix
    return out


def mask_fusion_reference_(masks: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                           base: torch.Tensor) -> torch.Tensor:
    """The in-place twin: ``base *= prod_j masks[j]^T @ tables[j]``; returns base."""
    return base.mul_(mask_fusion_reference(masks, tables))


def check_factors(masks, tables, *, batch=None, tokens=None, channels=None,
                  op: str = "mask_fusion") -> tuple[int | None, int | None, int | None]:
    """Raise TypeError or ValueError naming the problem unless ``masks``/``tables`` are lists of
    matching factors: masks[j] [B, K_j, N], tables[j] [B or 1, K_j, C]. B, N, C are
    taken from the first factor unless given. Returns (B, N, C) (None for what an
    empty list leaves unknown)."""
    if not isinstance(masks, (list, tuple)) or not isinstance(tables, (list, tuple)):
        raise TypeError(f"{op}: masks and tables must be lists of tensors (one entry per "
                        f"factor), got {type(masks).__name__} and {type(tables).__name__}")
    if len(masks) != len(tables):
        raise ValueError(f"{op}: got {len(masks)} masks but {len(tables)} tables; each "
                         "factor needs one of each")
    for j, (m, t) in enumerate(zip(masks, tables)):
        if not isinstance(m, torch.Tensor) or m.dim() != 3:
            raise ValueError(f"{op}: masks[{j}] must be a 3-D tensor [B, K, N], got "
                             f"{list(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__}")
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{op}: tables[{j}] must be a 3-D tensor [B or 1, K, C], got "
                             f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        batch = m.shape[0] if batch is None else batch
        tokens = m.shape[2] if tokens is None else tokens
        channels = t.shape[2] if channels is None else channels
        slots = m.shape[1]
        if slots < 1 or m.shape[0] != batch or m.shape[2] != tokens:
            raise ValueError(f"{op}: masks[{j}] must be [B, K, N] = [{batch}, K >= 1, {tokens}], "
                             f"got shape {list(m.shape)}")
        if t.shape[0] not in (1, batch) or t.shape[1] != slots or t.shape[2] != channels:
            raise ValueError(f"{op}: tables[{j}] must be [B or 1, K, C] = "
                             f"[{batch} or 1, {slots}, {channels}] (K from masks[{j}]), "
                             f"got shape {list(t.shape)}")
    return batch, tokens, channels


def check_args(masks, tables, base=None, grad=None, *, dtypes: tuple[torch.dtype, ...] | None = None,
               op: str = "mask_fusion") -> tuple[int, int, int]:
    """Raise TypeError (not a tensor, dtype) or ValueError (device, shape) naming the
    problem; ``grad`` is the backward op's output gradient [B, N, C]; ``dtypes``, when
    given, are the dtypes the chosen kernels implement. Returns (B, N, C)."""
    shape = check_factors(masks, tables, op=op)
    if not masks:
        raise ValueError(f"{op}: needs at least one (masks, table) factor, got none")
    named = {f"masks[{j}]": m for j, m in enumerate(masks)}
    named.update({f"tables[{j}]": t for j, t in enumerate(tables)})
    named.update((name, t) for name, t in (("base", base), ("grad", grad)) if t is not None)
    check_tensors(named, op=op, dtypes=dtypes)
    for name in ("base", "grad"):
        if name in named and list(named[name].shape) != list(shape):
            raise ValueError(f"{op}: {name} must be [B, N, C] = {list(shape)} (B, N from "
                             f"masks, C from tables), got shape {list(named[name].shape)}")
    return shape


# ---------------------------------------------------------------- torch.library


def _fake(masks, tables, base):
    batch, tokens, channels = check_args(masks, tables, base, dtypes=KERNEL_DTYPES)
    return masks[0].new_empty((batch, tokens, channels))


def _fake_inplace(masks, tables, base):
    check_args(masks, tables, base, dtypes=KERNEL_DTYPES, op="mask_fusion_")


def _fake_backward(grad, masks, tables, base):
    check_args(masks, tables, base, grad, dtypes=KERNEL_DTYPES, op="mask_fusion_backward")
    new = lambda t: torch.empty_like(t, memory_format=torch.contiguous_format)
    return [new(m) for m in masks], [new(t) for t in tables], None if base is None else new(base)


def _setup_context(ctx, inputs, output):
    # The backward recomputes the mixtures from masks and tables instead of saving them.
    masks, tables, base = inputs
    ctx.factors = len(masks)
    ctx.has_base = base is not None
    ctx.save_for_backward(*masks, *tables, *([base] if ctx.has_base else []))


def _backward_of(namespace: str):
    backward_op = getattr(torch.ops, namespace).mask_fusion_backward

    def backward(ctx, grad):
        saved = ctx.saved_tensors
        j = ctx.factors
        masks, tables = list(saved[:j]), list(saved[j:2 * j])
        base = saved[2 * j] if ctx.has_base else None
        grad_masks, grad_tables, grad_base = backward_op(grad, masks, tables, base)
        return grad_masks, grad_tables, grad_base

    return backward


def register(namespace: str = "exposure_slot", *, fake: bool = True) -> None:
    """Attach the fake kernels (unless ``fake`` is False: Triton ops traced by
    torch.compile need none) and the autograd formula to the ops ``mask_fusion``,
    ``mask_fusion_`` and ``mask_fusion_backward`` of ``namespace``, which must already
    be defined: by ``exposure_slot._C`` ("exposure_slot") or by the Triton kernels
    ("exposure_slot_triton")."""
    if fake:
        torch.library.register_fake(f"{namespace}::mask_fusion", _fake)
        torch.library.register_fake(f"{namespace}::mask_fusion_", _fake_inplace)
        torch.library.register_fake(f"{namespace}::mask_fusion_backward", _fake_backward)
    torch.library.register_autograd(f"{namespace}::mask_fusion", _backward_of(namespace),
                                    setup_context=_setup_context)
