"""mask_fusion benchmarks: forward and forward+backward at B=1, C=128, float32, with a
base (the model's ``k * pf`` shape), for the backends reference (the PyTorch twin),
compiled (torch.compile of the twin) and cpu (the C++ kernels), plus a tensor copy of
the same size that gives the memory floor. See README.md for the numbers."""

from __future__ import annotations

import functools

import pytest
import torch

from exposure_slot.ops import cpu_kernels_available, mask_fusion, mask_fusion_reference

CHANNELS = 128
BYTES = 4  # float32


def traffic(pass_name: str, slots: int, tokens: int) -> tuple[int, int, int]:
    """The fewest bytes a pass must move, the flops it does (the K*C table ignored),
    and how many fresh [N,C] outputs it allocates. Forward reads masks and base and
    writes out; backward reads grad, masks and base and writes grad_base and
    grad_masks, recomputing the mixture."""
    n, k, c = tokens, slots, CHANNELS
    forward = (BYTES * n * (k + 2 * c), n * c * (2 * k + 1), 1)
    if pass_name == "forward":
        return forward
    return (forward[0] + BYTES * n * (3 * c + 2 * k), forward[1] + n * c * (6 * k + 2),
            forward[2] + 1)


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
    return masks, table, base, grad


def median(benchmark) -> float | None:
    """The benchmark's median in seconds; None under --benchmark-disable."""
    return None if benchmark.stats is None else benchmark.stats.stats.median


def run_benchmark(benchmark, results, pass_name, backend, slots, tokens, target, rounds):
    """Times target, which must return None: pytest-benchmark keeps a returned result
    alive into the next round, so each round would allocate its outputs afresh."""
    target()  # compiles the torch.compile backend outside the timed rounds
    benchmark.group = f"mask_fusion {pass_name} K={slots} N={tokens}"
    bytes_moved, flops, fresh_outputs = traffic(pass_name, slots, tokens)
    benchmark.extra_info.update(bytes_moved=bytes_moved, flops=flops)
    benchmark.pedantic(target, rounds=rounds, warmup_rounds=2)
    key = (pass_name, slots, tokens)
    results.traffic[key] = (bytes_moved, fresh_outputs)
    if median(benchmark) is not None:
        results.medians.setdefault(key, {})[backend] = median(benchmark)


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpu"])
def test_forward(benchmark, results, rounds, backend, slots, tokens):
    fuse = implementation(backend)
    masks, table, base, _ = make_inputs(slots, tokens)

    def forward():
        with torch.no_grad():
            fuse(masks, table, base)

    run_benchmark(benchmark, results, "forward", backend, slots, tokens, forward, rounds)


@pytest.mark.parametrize("backend", ["reference", "compiled", "cpu"])
def test_forward_backward(benchmark, results, rounds, backend, slots, tokens):
    fuse = implementation(backend)
    masks, table, base, grad = make_inputs(slots, tokens)
    leaves = [t.requires_grad_() for t in (masks, table, base)]

    def forward_backward():
        torch.autograd.grad(fuse(*leaves), leaves, grad)

    run_benchmark(benchmark, results, "forward_backward", backend, slots, tokens,
                  forward_backward, rounds)


@pytest.mark.parametrize("fresh", [False, True], ids=["copy_", "clone"])
def test_copy_floor(benchmark, results, rounds, tokens, fresh):
    """Copying one [1,N,C] tensor: into an existing one (copy_, the bandwidth the
    floors use) and into a freshly allocated one (clone, which adds what every
    out-of-place op pays to allocate its output and fault its pages in)."""
    src = torch.randn(1, tokens, CHANNELS)
    dst = torch.empty_like(src)
    def target():  # returns None, as run_benchmark explains
        src.clone() if fresh else dst.copy_(src)

    benchmark.group = f"copy N={tokens}"
    benchmark.pedantic(target, rounds=rounds * 5, warmup_rounds=2)
    if median(benchmark) is not None:
        (results.fresh_copy if fresh else results.copy)[tokens] = (src.nbytes, median(benchmark))
