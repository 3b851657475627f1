"""Whether freed host memory goes back to the kernel, which decides how much of a CPU
forward is spent in page faults.

PyTorch allocates CPU tensors with the C library's ``malloc``, which has no cache of
its own for large blocks: glibc serves a block above its mmap threshold (adaptive, at
most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel when it is freed,
and it trims the top of its heap the same way. A forward makes dozens of large maps
(4 * 32 * H * W bytes for the first layers of an H x W image: 32 MiB at 512x512), so
every call faults their pages in again (about 0.6-0.8 us per 4 KiB page on the
machines of ``benchmarks/README.md``): the level-3 model at 512x512 took 258-290 ms
that way against 226-235 ms with freed memory kept, and the level-2 model at
1024x1024 955-975 ms against 650-680 ms.

``keep_freed_memory(max_block)`` raises both thresholds to ``max_block`` for the rest
of the process: blocks up to that size stay mapped when freed and the next forward
reuses them, as a caching allocator would; larger ones still go back to the kernel.
The price is memory: the process keeps its heap's high-water mark, and with images
of mixed sizes the heap fragments (the command line tool on 24 photos of 768x512 and
one of 3000x2000 peaked at 5.1 GB with 1 GiB blocks kept, 3.0 GB with 64 MiB, 2.9 GB
with glibc's defaults). So the command line tool keeps blocks up to 64 MiB (whole
maps up to about 700x700 pixels, and a tiled photo's); a process that runs many
forwards of one size should keep blocks above its largest map. The same effect
without code: ``MALLOC_MMAP_THRESHOLD_=<bytes> MALLOC_TRIM_THRESHOLD_=<bytes>`` in the
environment of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

import torch

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(max_block: int = 1 << 30) -> bool:
    """Make this process's C allocator keep freed blocks of up to ``max_block`` bytes
    mapped (glibc's mmap and trim thresholds), so that repeated CPU forwards stop
    page-faulting their large tensors in afresh. Returns whether it took effect:
    False where the C library is not glibc (macOS, Windows, musl), where nothing is
    changed."""
    if not 0 < max_block < 1 << 31:
        raise ValueError(f"max_block must be a positive int below 2 GiB (glibc's mallopt "
                         f"takes an int), got {max_block}")
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return False
    # musl and the BSDs have no mallopt or treat it differently; only glibc has both.
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, max_block)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, max_block))


def peak_allocated_bytes(fn: Callable[[], object]) -> int:
    """The most CPU memory ``fn`` holds at once in torch's allocator beyond what was
    allocated before it: the running sum, in time order, of the profiler's record of
    every allocation and free. Those records carry their own times, so this sees the
    tensors a C++ op allocates and frees inside itself (its intermediates) as well
    as those ops return; the profiler's per-op summaries (``self_cpu_memory_usage``)
    net an op's inner frees at its start and would miss them. Memory a kernel takes
    outside torch's allocator (scratch in std::vector) is not counted."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    live = peak = 0
    for record in records:
        live += record.nbytes()
        peak = max(peak, live)
    return peak
