"""The bytes a computation moves between its ops: each op's tensor inputs read and
its outputs written, counted by a TorchDispatchMode below autograd, so that the
backward's ops (autograd's gradient sums included) are seen too.

It is the traffic of the op-by-op design, whatever each kernel keeps in cache
inside itself: a tensor another op reads again counts again, since the step's
[B, N, C] tensors do not fit in this machine's last-level cache together. Divided
by a copy's bandwidth it gives the floor those bytes alone put under the step."""

from __future__ import annotations

import functools
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _bytes(tensors) -> int:
    # An expanded input (stride 0) is read once: at most its storage.
    return sum(min(t.nbytes, t.untyped_storage().nbytes()) for t in tensors
               if isinstance(t, torch.Tensor))


class _Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:  # a view moves nothing
            moved = _bytes(tree_flatten((args, kwargs))[0]) + _bytes(tree_flatten(out)[0])
            self.by_op[func.overloadpacket.__name__] += moved
        return out


def tensor_traffic(fn: Callable[[], object]) -> Counter[str]:
    """Bytes moved by one call of ``fn``, per op name (e.g. ``add_``,
    ``slot_attention_pass_backward``)."""
    with _Traffic() as mode:
        fn()
    return mode.by_op


@functools.cache
def copy_bandwidth(shape: tuple[int, ...]) -> float:
    """Bytes per second of ``dst.copy_(src)`` for one float32 tensor of ``shape``
    (read and write counted), the median of 21 copies."""
    src = torch.randn(shape)
    dst = torch.empty_like(src)
    times = []
    for _ in range(21):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / sorted(times)[len(times) // 2]
