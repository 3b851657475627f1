"""A 3x3 convolution by Winograd's F(4x4, 3x3), with its pixel (un)shuffles, bias,
residual sum and GELU fused; for inference (no autograd).

    out = gelu?(shuffle(conv3x3(pad(unshuffle(x)), weight)) + bias + residual?)

``pad`` is zero or reflection padding by 1; ``unshuffle`` and ``shuffle`` are 2x2
pixel (un)shuffles or nothing. Channel orders are phase-major (unshuffled channel
``(2a + b) * Cx + c`` at ``(i, j)`` is ``x[c, 2i + a, 2j + b]``, and likewise for the
shuffle), where PyTorch's ``pixel_unshuffle``/``pixel_shuffle`` use ``4c + 2a + b``:
``permute_phases`` converts a weight between the two.

This module is the op's Python side:

- ``winograd_filter``: the weight's Winograd transform ``U = G g G^T`` in float64,
  the ``filter`` argument of the op;
- ``winograd_conv3x3_reference``: the pure PyTorch twin, taking the plain weight;
- ``check_args`` and the fake kernels (for torch.compile) of
  ``torch.ops.exposure_slot.winograd_conv3x3`` and its in-place variant
  ``winograd_conv3x3_``, which ``register()`` attaches.

The C++ kernel is ``csrc/cpu/winograd_conv3x3.cpp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .checks import check_tensors

KERNEL_DTYPES = (torch.float32, torch.float64)
POINTS = 36  # Winograd points per tile: (4 + 3 - 1)^2

# G of F(4, 3) (interpolation points 0, 1, -1, 2, -2 and infinity).
_FILTER_TRANSFORM = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)


def winograd_filter(weight: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight`` [Co, Ci, 3, 3] as the op's filter [36, Ci, Co]: point ``6i + j``
    holds ``(G g G^T)[i, j]``, computed in float64 and cast to ``dtype`` (default:
    the weight's)."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"winograd_filter: weight must be [Co, Ci, 3, 3], got shape "
                         f"{list(weight.shape)}")
    g = torch.tensor(_FILTER_TRANSFORM, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ia,ocab,jb->ijco", g, weight.detach().double(), g)
    return u.reshape(POINTS, weight.shape[1], weight.shape[0]).to(dtype or weight.dtype).contiguous()


def permute_phases(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """``weight`` with its channels along ``dim`` reordered from PyTorch's pixel
    (un)shuffle order ``4c + phase`` to the op's ``phase * C + c``."""
    shape = list(weight.shape)
    split = weight.unflatten(dim, (shape[dim] // 4, 4))
    return split.transpose(dim, dim + 1).reshape(shape)


def whole_vectors(x_channels: int, out_channels: int, shuffle: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes these channel counts: x's channels and each
    shuffle phase's output channels are whole vectors (64 bytes) of ``dtype``."""
    lanes = 64 // dtype.itemsize
    phases = shuffle * shuffle
    return x_channels % lanes == 0 and out_channels % phases == 0 \
        and (out_channels // phases) % lanes == 0


def winograd_conv3x3_reference(x, weight, bias=None, residual=None, reflect: bool = False,
                               unshuffle: int = 1, shuffle: int = 1, gelu: bool = False):
    """The op in plain PyTorch, with the plain weight [Co, Ci, 3, 3] (phase-major
    channel orders) instead of its transform."""
    if unshuffle == 2:
        x = F.pixel_unshuffle(x, 2)
        x = x.unflatten(1, (-1, 4)).transpose(1, 2).flatten(1, 2)  # 4c + phase -> phase-major
    x = F.pad(x, (1, 1, 1, 1), mode="reflect") if reflect else F.pad(x, (1, 1, 1, 1))
    y = F.conv2d(x, weight, bias)
    if shuffle == 2:
        y = F.pixel_shuffle(y.unflatten(1, (4, -1)).transpose(1, 2).flatten(1, 2), 2)
    if residual is not None:
        y = y + residual
    return F.gelu(y) if gelu else y


def check_args(x, filter, bias, reflect, unshuffle, shuffle, out=None, *, dtypes=KERNEL_DTYPES,
               op: str = "winograd_conv3x3") -> list[int]:
    """Raise TypeError or ValueError naming the problem; returns the output's shape."""
    named = {"x": x, "filter": filter}
    if bias is not None:
        named["bias"] = bias
    if out is not None:
        named["out"] = out
    check_tensors(named, op=op, dtypes=dtypes)
    if unshuffle not in (1, 2) or shuffle not in (1, 2):
        raise ValueError(f"{op}: unshuffle and shuffle must be 1 or 2, got {unshuffle} and {shuffle}")
    if x.dim() != 4 or x.shape[2] % unshuffle or x.shape[3] % unshuffle:
        raise ValueError(f"{op}: x must be [B, C, H, W] (H and W divisible by unshuffle = "
                         f"{unshuffle}), got shape {list(x.shape)}")
    batch, channels, height, width = x.shape
    height, width = height // unshuffle, width // unshuffle
    if height < 1 or width < 1 or (reflect and min(height, width) < 2):
        raise ValueError(f"{op}: the convolution's input is {height} x {width}; it needs at "
                         f"least {'2 x 2 for reflect padding' if reflect else '1 x 1'}")
    in_channels = channels * unshuffle * unshuffle
    if filter.dim() != 3 or filter.shape[0] != POINTS or filter.shape[1] != in_channels:
        raise ValueError(f"{op}: filter must be [{POINTS}, Ci, Co] with Ci = {in_channels} "
                         f"(x's channels times unshuffle^2), got shape {list(filter.shape)}; "
                         "make it with winograd_filter(weight)")
    out_channels = filter.shape[2]
    if not whole_vectors(channels, out_channels, shuffle, x.dtype):
        raise ValueError(f"{op}: x's channels ({channels}) and the filter's Co / shuffle^2 "
                         f"({out_channels} / {shuffle * shuffle}) must be multiples of "
                         f"{64 // x.element_size()}")
    if bias is not None and list(bias.shape) != [out_channels]:
        raise ValueError(f"{op}: bias must be [Co] = [{out_channels}], got shape {list(bias.shape)}")
    shape = [batch, out_channels // (shuffle * shuffle), height * shuffle, width * shuffle]
    if out is not None and list(out.shape) != shape:
        raise ValueError(f"{op}: out must be the output's shape {shape}, got {list(out.shape)}")
    return shape


# ---------------------------------------------------------------- torch.library


def _fake(x, filter, bias, reflect, unshuffle, shuffle, gelu):
    shape = check_args(x, filter, bias, reflect, unshuffle, shuffle)
    return x.new_empty(shape).contiguous(memory_format=torch.channels_last)


def _fake_inplace(out, x, filter, bias, reflect, unshuffle, shuffle, gelu):
    check_args(x, filter, bias, reflect, unshuffle, shuffle, out, op="winograd_conv3x3_")


def register(namespace: str = "exposure_slot") -> None:
    """Attach the fake kernels to the ops of ``namespace`` (see ``mask_fusion.register``)."""
    torch.library.register_fake(f"{namespace}::winograd_conv3x3", _fake)
    torch.library.register_fake(f"{namespace}::winograd_conv3x3_", _fake_inplace)
