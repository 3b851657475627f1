"""Slot-in-slot attention benchmarks (issue 3's targets): the module's forward at
level 2 and level 3 and its forward+backward at level 2, for the backends reference
(SPEC-literal PyTorch), compiled (torch.compile of the reference module) and cpu
(the fused C++ ops), B and N as in the targets, C = 128, float32; plus the peak
memory each forward adds beyond its inputs, counted two ways: the tensors it holds
at once (the profiler's allocations and frees, the target's measure) and the
process's resident high-water mark in a fresh process (which adds the kernels'
scratch and what malloc's heap keeps).
benchmarks/README.md has the numbers and the bytes/flops per pass."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from traffic import copy_bandwidth, tensor_traffic

from exposure_slot import SlotInSlotAttention
from exposure_slot.host_memory import peak_allocated_bytes
from exposure_slot.ops import cpu_kernels_available

CHANNELS = 128
LEVELS = {2: (3, 7), 3: (3, 7, 10)}
BACKENDS = ("reference", "compiled", "cpu")


def shapes(short: bool, pass_name: str) -> tuple[int, int]:
    """(B, N) of a pass: the issue's targets, or small ones in short mode."""
    if short:
        return 1, 32 * 32
    return (1, 128 * 128) if pass_name == "forward" else (8, 64 * 64)


def module(level: int, backend: str) -> SlotInSlotAttention:
    torch.manual_seed(0)
    attention = SlotInSlotAttention(CHANNELS, LEVELS[level], iters=3)
    if backend == "compiled":
        attention.backend = "reference"
        torch._dynamo.reset()
        return torch.compile(attention, dynamic=False)
    if backend == "cpu" and not cpu_kernels_available():
        pytest.skip("exposure_slot._C is not built; run `python setup.py build_ext --inplace`")
    attention.backend = backend
    return attention


def inputs(batch: int, tokens: int):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(batch, tokens, CHANNELS, generator=gen),
            torch.randn(batch, tokens, CHANNELS, generator=gen))


def resident_extra_bytes(level: int, backend: str, batch: int, tokens: int) -> int:
    """Peak resident memory the forward adds beyond its inputs, in a fresh process
    with glibc's default malloc (large tensors are mmap'd and counted as touched):
    the kernel's high-water mark (VmHWM) is reset just before the forward
    (/proc/self/clear_refs) and read after it."""
    script = textwrap.dedent(f"""
        import torch
        from exposure_slot import SlotInSlotAttention
        def status(field):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
        torch.manual_seed(0)
        attention = SlotInSlotAttention({CHANNELS}, {LEVELS[level]!r}, iters=3,
                                        backend={backend!r})
        k = torch.randn({batch}, {tokens}, {CHANNELS})
        v = torch.randn({batch}, {tokens}, {CHANNELS})
        with torch.inference_mode():
            attention(k[:, :64], v[:, :64])  # one-time allocations, at a small size
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident size
            before = status("VmRSS:")
            out = attention(k, v)
            print(status("VmHWM:") - before)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True)
    return int(run.stdout.split()[-1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("level", [2, 3], ids=["level2", "level3"])
def test_forward(benchmark, record, short, level, backend):
    if short and level == 3:
        pytest.skip("short mode: level 2 only (compiling the level-3 reference takes minutes)")
    batch, tokens = shapes(short, "forward")
    attention = module(level, backend)
    k, v = inputs(batch, tokens)

    def forward():
        with torch.inference_mode():
            attention(k, v)

    group = f"slot-in-slot forward, level {level}, B={batch} N={tokens} C={CHANNELS} float32"
    record.time(benchmark, group, backend, forward, rounds=3 if short else 10)
    if backend != "compiled":
        record.peak(group, f"{backend} tensors", peak_allocated_bytes(forward))
        record.peak(group, f"{backend} resident", resident_extra_bytes(level, backend, batch, tokens))
        record.note(group, f"3 x B*N*C*4 bytes = {3 * batch * tokens * CHANNELS * 4 / 2**20:.1f} MiB "
                           "(the target for the cpu backend's tensors)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(benchmark, record, short, backend):
    batch, tokens = shapes(short, "forward_backward")
    attention = module(2, backend)
    k, v = (t.requires_grad_() for t in inputs(batch, tokens))
    params = [p for p in attention.parameters() if p.requires_grad]
    weights = torch.randn(3)

    def forward_backward():
        prompt_map, slot_map, masks = attention(k, v)
        loss = (weights[0] * prompt_map.square().mean() + weights[1] * slot_map.mean()
                + weights[2] * masks[-1].square().mean())
        torch.autograd.grad(loss, [k, v, *params])

    group = f"slot-in-slot forward+backward, level 2, B={batch} N={tokens} C={CHANNELS} float32"
    record.time(benchmark, group, backend, forward_backward, rounds=3 if short else 10)
    if backend != "compiled":  # the compiled step's ops are not dispatched one by one
        by_op = tensor_traffic(forward_backward)
        total = sum(by_op.values())
        largest = ", ".join(f"{name} {moved / 1e6:.0f}" for name, moved in by_op.most_common(3))
        floor = total / copy_bandwidth(tuple(k.shape))
        record.note(group, f"{backend}: its ops' tensors moved {total / 1e6:.0f} MB a step "
                           f"({largest}); at the copy_ bandwidth of a [B, N, C] tensor "
                           f"{floor * 1e3:.1f} ms")
