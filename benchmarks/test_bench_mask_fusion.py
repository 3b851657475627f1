"""mask_fusion benchmarks: forward and forward+backward at B=1, C=128, float32, with a
base and one factor (the model's running-modulation update ``M * pf``), for the
backends reference (the PyTorch twin), compiled (torch.compile of the twin) and cpu
(the C++ kernels), with the memory floor of each pass (its bytes at the copy_
bandwidth measured in the same run). See README.md for the numbers."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import is_short
from traffic import copy_bandwidth

from exposure_slot.ops import cpu_kernels_available, mask_fusion, mask_fusion_reference

CHANNELS = 128
BYTES = 4  # float32
SIZES = {True: {"tokens": [32 * 32], "slots": [3]},  # short mode
         False: {"tokens": [128 * 128, 256 * 256], "slots": [3, 7]}}


def pytest_generate_tests(metafunc):
    chosen = SIZES[is_short(metafunc.config)]
    for name, prefix in (("tokens", "N"), ("slots", "K")):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, chosen[name], ids=lambda v, p=prefix: f"{p}{v}")


def traffic(pass_name: str, slots: int, tokens: int) -> tuple[int, int]:
    """The fewest bytes a pass must move and the flops it does (the K*C table
    ignored). Forward reads masks and base and writes out; backward reads grad, masks
    and base and writes grad_base and grad_masks, recomputing the mixture."""
    n, k, c = tokens, slots, CHANNELS
    forward = (BYTES * n * (k + 2 * c), n * c * (2 * k + 1))
    if pass_name == "forward":
        return forward
    return forward[0] + BYTES * n * (3 * c + 2 * k), forward[1] + n * c * (6 * k + 2)


def implementation(backend: str):
    if backend == "compiled":
        torch._dynamo.reset()  # each size compiles afresh, specialised (dynamic=False)
        return torch.compile(mask_fusion_reference, dynamic=False)
    if backend == "cpu" and not cpu_kernels_available():
        pytest.skip("exposure_slot._C is not built; run `python setup.py build_ext --inplace`")
    return functools.partial(mask_fusion, backend=backend)


def make_inputs(slots: int, tokens: int):
    gen = torch.Generator().manual_seed(0)
    masks = torch.randn(1, slots, tokens, generator=gen).softmax(dim=1)
    table = torch.randn(1, slots, CHANNELS, generator=gen)
    base = torch.randn(1, tokens, CHANNELS, generator=gen)
    grad = torch.randn(1, tokens, CHANNELS, generator=gen)
    return [masks], [table], base, grad


def run(benchmark, record, short, pass_name, backend, slots, tokens, target):
    group = f"mask_fusion {pass_name}, K={slots} N={tokens} C={CHANNELS} float32"
    bytes_moved, flops = traffic(pass_name, slots, tokens)
    benchmark.extra_info.update(bytes_moved=bytes_moved, flops=flops)
    record.time(benchmark, group, backend, target, rounds=3 if short else 30)
    floor = bytes_moved / copy_bandwidth((1, tokens, CHANNELS))
    record.note(group, f"{bytes_moved / 1e6:.1f} MB, {flops / 1e6:.1f} MFLOP; floor at the "
                       f"copy_ bandwidth: {floor * 1e3:.2f} ms")


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpu"])
def test_forward(benchmark, record, short, backend, slots, tokens):
    fuse = implementation(backend)
    masks, tables, base, _ = make_inputs(slots, tokens)

    def forward():  # returns None: see Recorder.time
        with torch.no_grad():
            fuse(masks, tables, base)

    run(benchmark, record, short, "forward", backend, slots, tokens, forward)


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpu"])
def test_forward_backward(benchmark, record, short, backend, slots, tokens):
    fuse = implementation(backend)
    masks, tables, base, grad = make_inputs(slots, tokens)
    leaves = [masks[0].requires_grad_(), tables[0].requires_grad_(), base.requires_grad_()]

    def forward_backward():
        torch.autograd.grad(fuse(masks, tables, base), leaves, grad)

    run(benchmark, record, short, "forward+backward", backend, slots, tokens, forward_backward)
