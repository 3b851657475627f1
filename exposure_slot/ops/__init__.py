"""The project's fused operators, each with a pure-PyTorch twin.

Every op ``name`` has three parts:

- ``torch.ops.exposure_slot.<name>``: the compiled op, defined in
  ``csrc/exposure_slot.cpp`` with kernels in ``csrc/<device>/<name>.cpp``; it exists
  only when the extension ``exposure_slot._C`` is built;
- ``exposure_slot/ops/<name>.py``: its reference twin, argument checks, fake kernel
  and autograd formula;
- the public wrapper below, which validates the arguments and runs the backend the
  caller has already resolved (see ``exposure_slot.backends``):
  "reference" -> the twin, "cpu" -> the compiled op on CPU tensors.
"""

from __future__ import annotations

from typing import Callable

import torch  # first: the extension links against torch's libraries

try:
    from .. import _C  # noqa: F401  (defines torch.ops.exposure_slot.*)
except ImportError as exc:
    _C = None
    _C_IMPORT_ERROR: ImportError | None = exc
else:
    _C_IMPORT_ERROR = None

# The public functions below take the op modules' names in this namespace; the modules
# stay importable by their full names (exposure_slot.ops.mask_fusion), which is where
# csrc/exposure_slot.cpp tells torch to find their fake kernels.
from . import mask_fusion as _mask_fusion
from .mask_fusion import mask_fusion_reference

if _C is not None:
    _mask_fusion.register()

__all__ = ["cpu_kernels_available", "mask_fusion", "mask_fusion_reference"]


def cpu_kernels_available() -> bool:
    """True iff the compiled extension ``exposure_slot._C`` imported."""
    return _C is not None


def mask_fusion(masks: torch.Tensor, table: torch.Tensor, base: torch.Tensor | None = None,
                *, backend: str = "reference") -> torch.Tensor:
    """``out[b,n,c] = base[b,n,c] * sum_i masks[b,i,n] * table[tb,i,c]``.

    masks [B,K,N], table [B,K,C] or [1,K,C] (shared by the batch), base [B,N,C] or
    None (factor 1); returns [B,N,C]. Differentiable in all three inputs on every
    backend. Raises TypeError/ValueError for bad arguments, RuntimeError when the
    backend is not built.
    """
    _mask_fusion.check_args(masks, table, base, kernel=backend != "reference")
    return _select("mask_fusion", backend, mask_fusion_reference, masks.device)(masks, table, base)


def _select(op: str, backend: str, reference: Callable, device: torch.device) -> Callable:
    """The implementation of ``op`` for ``backend`` and tensors on ``device`` (the
    op's argument checks have already put all its tensors on one device)."""
    if backend == "reference":
        return reference
    if backend == "cpu":
        if _C is None:
            raise RuntimeError(
                f"{op}: backend 'cpu' needs the compiled extension exposure_slot._C, which "
                f"did not import ({_C_IMPORT_ERROR}); build it with "
                "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`")
        if device.type != "cpu":
            raise ValueError(f"{op}: backend 'cpu' computes on CPU tensors, got tensors on "
                             f"{device}; move them or choose another backend")
        return getattr(torch.ops.exposure_slot, op)
    raise ValueError(f"{op}: backend {backend!r} has no implementation here; "
                     "expected 'reference' or 'cpu'")
