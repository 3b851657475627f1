"""The project's fused operators, each with a pure-PyTorch twin.

Every op ``name`` has three parts:

- ``torch.ops.exposure_slot.<name>``: the compiled op, defined in
  ``csrc/exposure_slot.cpp`` with kernels in ``csrc/<device>/<name>.cpp``; it exists
  only when the extension ``exposure_slot._C`` is built;
- ``exposure_slot/ops/<name>.py``: its reference twin, argument checks, fake kernel
  and autograd formula;
- the public wrapper below, which validates the arguments (unless
  ``validate_args=False``: for callers that build them themselves, such as
  ``SlotInSlotAttention``, whose every pass would otherwise spend ~40 us in Python
  checks; the compiled kernels still check shapes, dtypes and devices) and runs the
  backend the caller has already resolved (see ``exposure_slot.backends``):
  "reference" -> the twin; "cpu" and "cuda" -> the compiled op (its CPU or CUDA
  kernel, csrc/cpu or csrc/cuda); "triton" -> ``torch.ops.exposure_slot_triton.<name>``,
  the same op as Triton kernels (``kernels/<name>.py``, installed as
  ``exposure_slot.kernels``), on CUDA tensors, or on CPU tensors under Triton's
  interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported).

One op has no wrapper here: ``slot_in_slot_inference``, a whole
``SlotInSlotAttention`` forward for inference on the CPU, whose public face is that
module (``exposure_slot/ops/slot_in_slot_inference.py``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence

import torch  # first: the extension links against torch's libraries

try:
    from .. import _C
except ImportError as exc:
    _C = None
    _C_IMPORT_ERROR: ImportError | None = exc
else:
    _C_IMPORT_ERROR = None

# The public functions below take the op modules' names in this namespace; the modules
# stay importable by their full names (exposure_slot.ops.mask_fusion), which is where
# csrc/exposure_slot.cpp tells torch to find their fake kernels.
from . import mask_fusion as _mask_fusion
from . import slot_attention_pass as _slot_attention_pass
from . import slot_in_slot_inference as _slot_in_slot_inference
from . import slot_update as _slot_update
from . import winograd_conv3x3 as _winograd_conv3x3
from .mask_fusion import mask_fusion_reference, mask_fusion_reference_
from .slot_attention_pass import (slot_attention_pass_hand_down_reference,
                                  slot_attention_pass_reference,
                                  slot_attention_pass_rows_reference)
from .slot_update import slot_update_reference

if _C is not None:
    _mask_fusion.register()
    _slot_attention_pass.register()
    _slot_in_slot_inference.register()
    _slot_update.register()
    _winograd_conv3x3.register()

__all__ = ["cpu_kernels_available", "cuda_kernels_available", "triton_kernels_available",
           "BACKEND_DTYPES", "mask_fusion", "mask_fusion_", "mask_fusion_reference",
           "slot_attention_pass", "slot_attention_pass_hand_down",
           "slot_attention_pass_hand_down_reference", "slot_attention_pass_reference",
           "slot_attention_pass_rows", "slot_attention_pass_rows_reference",
           "slot_update",
           "slot_update_reference"]


# The dtypes each backend's kernels implement (None: any floating dtype).
BACKEND_DTYPES: dict[str, tuple[torch.dtype, ...] | None] = {
    "reference": None,
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
}


def cpu_kernels_available() -> bool:
    """True iff the compiled extension ``exposure_slot._C`` imported."""
    return _C is not None


def cuda_kernels_available() -> bool:
    """True iff the extension was built with its CUDA kernels (csrc/cuda)."""
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "exposure_slot::slot_attention_pass", "CUDA")


def triton_interpreting() -> bool:
    """True iff Triton kernels run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_kernels_available() -> bool:
    """True iff the Triton kernels (``exposure_slot.kernels``) import, which needs the
    ``triton`` package; whether they can run also needs a GPU or the interpreter."""
    return triton_import_error() is None


@functools.cache
def triton_import_error() -> ImportError | None:
    """Why the Triton kernels, which define ``torch.ops.exposure_slot_triton``, do not
    import, or None once they have. Imported on first use: importing triton takes a
    second."""
    try:
        from .. import kernels  # noqa: F401  (defines the ops)
    except ImportError as exc:
        return exc
    return None


def mask_fusion(masks: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                base: torch.Tensor | None = None, *, backend: str = "reference",
                validate_args: bool = True) -> torch.Tensor:
    """``out[b,n,c] = base[b,n,c] * prod_j sum_i masks[j][b,i,n] * tables[j][tb,i,c]``.

    masks[j] [B,K_j,N], tables[j] [B,K_j,C] or [1,K_j,C] (shared by the batch), at
    least one factor; base [B,N,C] or None (a factor of 1); returns [B,N,C].
    Differentiable in every input on every backend. Raises TypeError/ValueError for
    bad arguments, RuntimeError when the backend is not built.
    """
    if validate_args:
        _mask_fusion.check_args(masks, tables, base, dtypes=_dtypes(backend))
    return _select("mask_fusion", backend, mask_fusion_reference, masks[0].device)(
        list(masks), list(tables), base)


def mask_fusion_(masks: Sequence[torch.Tensor], tables: Sequence[torch.Tensor],
                 base: torch.Tensor, *, backend: str = "reference",
                 validate_args: bool = True) -> torch.Tensor:
    """``mask_fusion`` written into ``base`` (contiguous), which it returns. Not
    differentiable: refuses tensors that require grad while grad mode is on."""
    if validate_args:
        _mask_fusion.check_args(masks, tables, base, dtypes=_dtypes(backend),
                                op="mask_fusion_")
    if torch.is_grad_enabled() and any(t.requires_grad for t in (*masks, *tables, base)):
        raise RuntimeError("mask_fusion_: in-place and not differentiable; use mask_fusion "
                           "when gradients are needed (or call it under torch.no_grad())")
    _select("mask_fusion_", backend, mask_fusion_reference_, masks[0].device)(
        list(masks), list(tables), base)
    return base


def slot_attention_pass(k_in: torch.Tensor, v_in: torch.Tensor, norm_k_weight: torch.Tensor,
                        norm_k_bias: torch.Tensor, norm_v_weight: torch.Tensor,
                        norm_v_bias: torch.Tensor, stage_bases: Sequence[torch.Tensor | None],
                        factor_masks: Sequence[torch.Tensor],
                        factor_tables: Sequence[torch.Tensor], factor_stages: Sequence[int],
                        queries: torch.Tensor, stats: torch.Tensor | None = None,
                        norm_eps: float = 1e-5, attn_eps: float = 1e-8, *,
                        backend: str = "reference", validate_args: bool = True):
    """One slot-attention pass of a level whose inputs pass through D LayerNorm and
    modulation stages (see ``exposure_slot.ops.slot_attention_pass``); ``stage_bases``
    has one entry per stage, a [B,N,C] tensor or None; ``stats`` is a previous
    pass's ``stats`` output for the same leading stages, or None. Returns ``(attn
    [B,K,N], attn_sum [B,K], attn_v [B,K,C], stats [B,N,D,4])``. Differentiable in
    every tensor but ``stats`` on every backend."""
    args = _pass_args("slot_attention_pass", k_in, v_in, norm_k_weight, norm_k_bias,
                      norm_v_weight, norm_v_bias, stage_bases, factor_masks, factor_tables,
                      factor_stages, queries, stats, backend, validate_args)
    return _select("slot_attention_pass", backend, slot_attention_pass_reference, k_in.device)(
        *args, float(norm_eps), float(attn_eps))


def _pass_args(op, k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
               stage_bases, factor_masks, factor_tables, factor_stages, queries, stats,
               backend, validate_args, child_stages: int = 0) -> tuple:
    """The compiled ops' leading arguments from the wrappers' (one ``stage_bases``
    entry per stage becomes the bases and their stages), checked unless
    ``validate_args`` is False; the norms have ``child_stages`` rows past the pass's
    stages."""
    bases = [t for t in stage_bases if t is not None]
    base_stages = [d for d, t in enumerate(stage_bases) if t is not None]
    args = (k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias, bases,
            base_stages, list(factor_masks), list(factor_tables),
            [int(s) for s in factor_stages], queries, stats)
    if validate_args:
        depth = len(stage_bases)
        rows = "D" if child_stages == 0 else "D + 1"
        for name, norm in zip(_slot_attention_pass.NORM_NAMES,
                              (norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias)):
            if norm.dim() != 2 or norm.shape[0] != depth + child_stages:
                child = " and one for the child's" if child_stages else ""
                raise ValueError(f"{op}: {name} must be [{rows}, C], a row per stage{child}, "
                                 f"with D = {depth} stages (one per stage_bases entry); got "
                                 f"shape {list(norm.shape)}")
        _slot_attention_pass.check_args(*args, dtypes=_dtypes(backend), op=op,
                                        child_stages=child_stages)
    return args


def slot_attention_pass_hand_down(k_in: torch.Tensor, v_in: torch.Tensor,
                                  norm_k_weight: torch.Tensor, norm_k_bias: torch.Tensor,
                                  norm_v_weight: torch.Tensor, norm_v_bias: torch.Tensor,
                                  stage_bases: Sequence[torch.Tensor | None],
                                  factor_masks: Sequence[torch.Tensor],
                                  factor_tables: Sequence[torch.Tensor],
                                  factor_stages: Sequence[int], queries: torch.Tensor,
                                  stats: torch.Tensor | None, norm_eps: float,
                                  attn_eps: float, prompts: torch.Tensor,
                                  hand_down: torch.Tensor,
                                  child_queries: torch.Tensor | None = None, *,
                                  backend: str = "reference", validate_args: bool = True):
    """A parent level's pass, for inference: ``slot_attention_pass``, and what the
    parent hands its child. The norms have a row per stage and one more, the child's
    LayerNorm: [D + 1, C] (``stage_bases`` has D entries). With ``m`` the modulation
    of the pass's last stage (its base times its factors; 1 if it has neither) and
    ``pf = sum_i attn_i * prompts_i`` (prompts [B or 1, K, C]), writes ``m * pf``
    into ``hand_down`` [B, N, C] (contiguous; it may be the last stage's base, which
    is then updated in place) and returns ``(attn, attn_sum, attn_v, stats,
    child_attn, child_attn_sum, child_attn_v)``: ``stats`` with one more stage,
    [B, N, D + 1, 4], the statistics of the child's first LayerNorm, which its passes
    then take instead of computing; and, given ``child_queries`` [B, K_c, C], the
    child's first pass with those queries ([B, K_c, N], [B, K_c], [B, K_c, C]; K_c =
    0 without). Compiled for the "cpu" backend only; no autograd (refuses tensors
    that require grad while grad mode is on); "reference" runs the twin anywhere."""
    op = "slot_attention_pass_hand_down"
    args = _pass_args(op, k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                      stage_bases, factor_masks, factor_tables, factor_stages, queries, stats,
                      backend, validate_args, child_stages=1)
    if validate_args:
        _slot_attention_pass.check_hand_down(k_in, queries, prompts, hand_down, child_queries,
                                             op=op)
    if backend not in ("reference", "cpu"):
        raise ValueError(f"{op}: compiled for the 'cpu' backend only; got backend {backend!r}")
    tensors = (*args[:6], *args[6], *factor_masks, *factor_tables, queries, prompts, hand_down,
               *([] if child_queries is None else [child_queries]))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{op}: for inference, with no autograd; use slot_attention_pass and "
                           "mask_fusion when gradients are needed (or call it under "
                           "torch.no_grad())")
    return _select(op, backend, slot_attention_pass_hand_down_reference, k_in.device)(
        *args, float(norm_eps), float(attn_eps), prompts, hand_down, child_queries)


def slot_attention_pass_rows(k_in: torch.Tensor, v_in: torch.Tensor,
                             norm_k_weight: torch.Tensor, norm_k_bias: torch.Tensor,
                             norm_v_weight: torch.Tensor, norm_v_bias: torch.Tensor,
                             stage_bases: Sequence[torch.Tensor | None],
                             factor_masks: Sequence[torch.Tensor],
                             factor_tables: Sequence[torch.Tensor], factor_stages: Sequence[int],
                             queries: torch.Tensor, stats: torch.Tensor | None, norm_eps: float,
                             attn_eps: float, prompts: torch.Tensor, *,
                             backend: str = "reference", validate_args: bool = True):
    """A parent level's pass, for training: ``slot_attention_pass`` and its child's
    input rows. The norms have a row per stage and one more, the child's LayerNorm:
    [D + 1, C] (``stage_bases`` has D entries). With ``k``, ``v`` the chain's output
    (the attention's input) and ``pf = sum_i attn_i * prompts_i`` (prompts [B or 1,
    K, C]), returns ``(attn, attn_sum, attn_v, stats, rows_k, rows_v)``: ``stats``
    with one more stage, [B, N, D + 1, 4], the statistics of the child's first
    LayerNorm, and ``rows_k = k * pf``, ``rows_v = v * pf`` [B, N, C], the child's
    input. Differentiable in every tensor but ``stats``. Compiled for the "cpu"
    backend only; "reference" runs the twin anywhere."""
    op = "slot_attention_pass_rows"
    if backend not in ("reference", "cpu"):
        raise ValueError(f"{op}: compiled for the 'cpu' backend only; got backend {backend!r}")
    args = _pass_args(op, k_in, v_in, norm_k_weight, norm_k_bias, norm_v_weight, norm_v_bias,
                      stage_bases, factor_masks, factor_tables, factor_stages, queries, stats,
                      backend, validate_args, child_stages=1)
    if validate_args:
        _slot_attention_pass.check_hand_down(k_in, queries, prompts, op=op)
    return _select(op, backend, slot_attention_pass_rows_reference, k_in.device)(
        *args, float(norm_eps), float(attn_eps), prompts)


def slot_update(slots: torch.Tensor, attn_sum: torch.Tensor, attn_v: torch.Tensor,
                weights: Sequence[torch.Tensor], scale: float, norm_eps: float = 1e-5, *,
                backend: str = "reference",
                validate_args: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot level's update after a pass: ``(new slots, next queries)`` from the slots
    [B,K,C], the pass's ``attn_sum`` [B,K] and ``attn_v`` [B,K,C] and the level's
    ``weights`` (``exposure_slot.ops.slot_update.level_weights(level)``); see
    ``exposure_slot.ops.slot_update``. Differentiable in every tensor: the compiled op
    (backend "cpu") has its own backward; "reference" runs the twin on any device."""
    weights = list(weights)
    if validate_args:
        _slot_update.check_args(slots, attn_sum, attn_v, *weights, dtypes=_dtypes(backend))
    if backend == "reference":
        return slot_update_reference(slots, attn_sum, attn_v, *weights, float(scale),
                                     float(norm_eps))
    if backend != "cpu":
        raise ValueError(f"slot_update: compiled for the 'cpu' backend only (on CUDA, a CUDA "
                         f"graph removes the small ops' launch cost); got backend {backend!r}")
    return _select("slot_update", backend, slot_update_reference, slots.device)(
        slots, attn_sum, attn_v, *weights, float(scale), float(norm_eps))


def _dtypes(backend: str) -> tuple[torch.dtype, ...] | None:
    if backend not in BACKEND_DTYPES:
        raise ValueError(f"unknown backend {backend!r}; expected one of "
                         f"{', '.join(BACKEND_DTYPES)}")
    return BACKEND_DTYPES[backend]


def _select(op: str, backend: str, reference: Callable, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` and tensors on ``device`` (the
    op's argument checks have already put all its tensors on one device)."""
    if backend == "reference":
        return reference
    if backend in ("cpu", "cuda"):
        if _C is None:
            raise RuntimeError(
                f"{op}: backend {backend!r} needs the compiled extension exposure_slot._C, "
                f"which did not import ({_C_IMPORT_ERROR}); build it with "
                "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`")
        if backend == "cuda" and not cuda_kernels_available():
            raise RuntimeError(
                f"{op}: backend 'cuda' needs exposure_slot._C built with its CUDA kernels, "
                "which needs a torch with CUDA and a CUDA toolkit at build time; this build "
                "has the CPU kernels only")
        if device.type != backend:
            raise ValueError(f"{op}: backend {backend!r} computes on {backend.upper()} tensors, "
                             f"got tensors on {device}; move them or choose another backend")
        return getattr(torch.ops.exposure_slot, op)
    if backend == "triton":
        if triton_import_error() is not None:
            raise RuntimeError(f"{op}: backend 'triton' is not usable here (it needs the triton "
                               f"package, `pip install triton`): {triton_import_error()}")
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            raise ValueError(f"{op}: backend 'triton' computes on CUDA tensors (or on CPU "
                             f"tensors with TRITON_INTERPRET=1), got tensors on {device}")
        return getattr(torch.ops.exposure_slot_triton, op)
    raise ValueError(f"{op}: unknown backend {backend!r}; expected one of "
                     f"{', '.join(BACKEND_DTYPES)}")
