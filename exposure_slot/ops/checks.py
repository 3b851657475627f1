"""Argument checks shared by every op's public wrapper and fake kernels."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def check_tensors(named: Mapping[str, torch.Tensor], *, op: str,
                  dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    """Raise TypeError unless every value is a floating-point tensor (of one of
    ``dtypes`` when given) and all share one dtype; ValueError unless all are on one
    device. Messages name the op and the offending arguments."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
        if dtypes is not None and t.dtype not in dtypes:
            raise TypeError(f"{op}: the compiled kernels implement "
                            f"{', '.join(str(d).removeprefix('torch.') for d in dtypes)}; "
                            f"got {name} of dtype {t.dtype}")
    if len({t.dtype for t in named.values()}) > 1:
        raise TypeError(f"{op}: all tensors must share one dtype, got "
                        + ", ".join(f"{name} {t.dtype}" for name, t in named.items()))
    if len({t.device for t in named.values()}) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got "
                         + ", ".join(f"{name} on {t.device}" for name, t in named.items()))
