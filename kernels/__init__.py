"""Triton kernels of exposure-slot, installed as ``exposure_slot.kernels``.

Importing this package defines the operator namespace ``exposure_slot_triton`` with
the ops of csrc/exposure_slot.cpp under the same names and schemas (``mask_fusion``,
``mask_fusion_``, ``mask_fusion_backward``, ``slot_attention_pass``,
``slot_attention_pass_backward``), implemented by the kernels of ``mask_fusion.py``
and ``slot_attention_pass.py``; then attaches the shared fake kernels and autograd
formulas of ``exposure_slot.ops``. The ops are custom ops with fake kernels, so
torch.compile (fullgraph) traces through them as single nodes. (``triton_op`` would
let the compiler see the kernels themselves, but its schema inference rejects the
backward ops' ``Tensor?`` outputs, and one op set should not be defined two ways.)

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter:
``TRITON_INTERPRET=1`` must be set before this package (which imports triton) is
imported, since ``triton.jit`` picks the interpreter when a kernel is decorated.
Raises ImportError when triton is missing.
"""

from __future__ import annotations

import torch
import triton  # noqa: F401  (ImportError here tells exposure_slot.ops that triton is missing)

# (By their full names: exposure_slot.ops re-exports functions under the modules' names.)
from ..ops.mask_fusion import KERNEL_DTYPES
from ..ops.mask_fusion import check_args as check_mask_fusion_args
from ..ops.mask_fusion import register as register_mask_fusion
from ..ops.slot_attention_pass import register as register_slot_attention_pass
from . import mask_fusion, slot_attention_pass
from .modulation import check_device

NAMESPACE = "exposure_slot_triton"

OPS = ("mask_fusion", "mask_fusion_", "mask_fusion_backward", "slot_attention_pass",
       "slot_attention_pass_backward")


def _schema(op: str) -> str:
    """The schema csrc/exposure_slot.cpp gives ``exposure_slot::op``, without its
    namespace: one definition of every op's arguments for all backends."""
    from ..ops import _C_IMPORT_ERROR, cpu_kernels_available

    if not cpu_kernels_available():
        raise ImportError("the Triton ops take their schemas from exposure_slot._C, which did "
                          f"not import ({_C_IMPORT_ERROR})")
    return str(getattr(torch.ops.exposure_slot, op).default._schema).split("::", 1)[1]



# The kernels check only what the shared check_args (the fake kernels' checks) do not.
def _mask_fusion(masks, tables, base):
    shape = check_mask_fusion_args(masks, tables, base, dtypes=KERNEL_DTYPES)
    check_device("mask_fusion", masks[0])
    out = torch.empty(shape, dtype=masks[0].dtype, device=masks[0].device)
    mask_fusion.forward(masks, tables, base, out)
    return out


def _mask_fusion_(masks, tables, base):
    check_mask_fusion_args(masks, tables, base, dtypes=KERNEL_DTYPES,
                               op="mask_fusion_")
    check_device("mask_fusion_", masks[0])
    if base.is_contiguous():
        mask_fusion.forward(masks, tables, base, base)
    else:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
        mask_fusion.forward(masks, tables, base, out)
        base.copy_(out)


def _mask_fusion_backward(grad, masks, tables, base):
    check_mask_fusion_args(masks, tables, base, grad, dtypes=KERNEL_DTYPES,
                               op="mask_fusion_backward")
    check_device("mask_fusion_backward", grad)
    return mask_fusion.backward(grad, masks, tables, base)


_LIBRARY = torch.library.Library(NAMESPACE, "DEF")
_IMPLS = {
    "mask_fusion": _mask_fusion,
    "mask_fusion_": _mask_fusion_,
    "mask_fusion_backward": _mask_fusion_backward,
    "slot_attention_pass": slot_attention_pass.slot_attention_pass,
    "slot_attention_pass_backward": slot_attention_pass.slot_attention_pass_backward,
}
for _name in OPS:
    _LIBRARY.define(_schema(_name), tags=(torch.Tag.pt2_compliant_tag,))
    for _key in ("CUDA", "CPU"):
        _LIBRARY.impl(_name, _IMPLS[_name], _key)

register_mask_fusion(NAMESPACE)
register_slot_attention_pass(NAMESPACE)
