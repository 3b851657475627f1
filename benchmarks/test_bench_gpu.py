"""GPU benchmarks (issue 6's targets): the slot-in-slot module at level 2, C = 128, on
CUDA tensors, for the backends reference (SPEC-literal PyTorch), compiled
(torch.compile of the reference module), triton (float32 and bfloat16) and cuda
(when the extension has its CUDA kernels):

- forward at 1080p, B = 1, N = 480 x 270 (targets: triton float32 >= 25x the
  reference and >= 3x compiled; bfloat16 >= 1.6x float32);
- forward + backward at B = 8, N = 128 x 128 (target: >= 8x the reference);
- each op's token pass alone (slot_attention_pass forward at D = 3, mask_fusion
  forward), as bytes moved per second against the device's measured copy
  bandwidth (target: >= 60%; benchmarks/ROOFLINE.md counts the bytes).

Every timed callable ends with torch.cuda.synchronize(), so the host clock that
pytest-benchmark reads covers the GPU work. Skips, with the reason, without CUDA.
Short mode (--bench-short) takes small sizes and few rounds.
"""

from __future__ import annotations

import pytest
import torch

from exposure_slot import SlotInSlotAttention, ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmarks need a CUDA device")

CHANNELS = 128
LEVEL2 = (3, 7)
BACKENDS = ("reference", "compiled", "triton", "triton-bf16", "cuda")


def sync():
    torch.cuda.synchronize()


def module(backend: str) -> SlotInSlotAttention:
    """The level-2 module on the GPU for ``backend`` (its dtype in the name)."""
    torch.manual_seed(0)
    attention = SlotInSlotAttention(CHANNELS, LEVEL2, iters=3).cuda()
    if backend == "compiled":
        attention.backend = "reference"
        torch._dynamo.reset()
        return torch.compile(attention, dynamic=False)
    name = backend.removesuffix("-bf16")
    if name == "triton" and not ops.triton_kernels_available():
        pytest.skip("triton is not installed")
    if name == "cuda" and not ops.cuda_kernels_available():
        pytest.skip("exposure_slot._C was built without its CUDA kernels")
    attention.backend = name
    if backend.endswith("-bf16"):
        attention = attention.to(torch.bfloat16)
    return attention


def dtype_of(backend: str) -> torch.dtype:
    return torch.bfloat16 if backend.endswith("-bf16") else torch.float32


def inputs(batch: int, tokens: int, dtype: torch.dtype):
    gen = torch.Generator(device="cuda").manual_seed(1)
    return tuple(torch.randn(batch, tokens, CHANNELS, generator=gen, device="cuda").to(dtype)
                 for _ in range(2))


@pytest.fixture(scope="session")
def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(2**28, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    sync()
    return 20 * 2 * src.numel() * 4 / (start.elapsed_time(end) / 1e3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_1080p(benchmark, record, short, backend):
    batch, tokens = (1, 64 * 64) if short else (1, 480 * 270)
    attention = module(backend)
    k, v = inputs(batch, tokens, dtype_of(backend))

    def forward():
        with torch.inference_mode():
            attention(k, v)
        sync()

    group = f"GPU slot-in-slot forward, level 2, B={batch} N={tokens} C={CHANNELS}"
    record.time(benchmark, group, backend, forward, rounds=3 if short else 20, warmup_rounds=3)
    record.note(group, f"{torch.cuda.get_device_name()}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton-bf16"])
def test_forward_backward(benchmark, record, short, backend):
    batch, tokens = (2, 32 * 32) if short else (8, 128 * 128)
    attention = module(backend)
    k, v = (t.requires_grad_() for t in inputs(batch, tokens, torch.float32))
    params = [p for p in attention.parameters() if p.requires_grad]
    weights = torch.randn(3, device="cuda")

    def forward_backward():
        prompt_map, slot_map, masks = attention(k, v)
        loss = (weights[0] * prompt_map.square().mean() + weights[1] * slot_map.mean()
                + weights[2] * masks[-1].square().mean())
        torch.autograd.grad(loss, [k, v, *params])
        sync()

    group = f"GPU slot-in-slot forward+backward, level 2, B={batch} N={tokens} C={CHANNELS}"
    record.time(benchmark, group, backend, forward_backward, rounds=3 if short else 10,
                warmup_rounds=3)


def pass_arguments(batch, tokens, dtype, depth=3, slots=7):
    """A level-3-like slot_attention_pass: D stages, a base at every stage after the
    first, one 3-slot factor per stage after the first; and its byte count
    (ROOFLINE.md): k_in, v_in and D-1 bases read, attn written, masks read."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    rand = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)
    k_in, v_in = rand(batch, tokens, CHANNELS), rand(batch, tokens, CHANNELS)
    norms = [1 + 0.1 * rand(depth, CHANNELS) for _ in range(4)]
    bases = [None] + [1 + 0.1 * rand(batch, tokens, CHANNELS) for _ in range(depth - 1)]
    masks = [rand(batch, 3, tokens).softmax(1) for _ in range(depth - 1)]
    tables = [rand(1, 3, CHANNELS) for _ in range(depth - 1)]
    queries = 0.1 * rand(batch, slots, CHANNELS)
    args = (k_in, v_in, *norms, bases, masks, tables, list(range(1, depth)), queries)
    size = torch.finfo(dtype).bits // 8
    nbytes = size * (batch * tokens * CHANNELS * (2 + depth - 1)
                     + batch * tokens * (slots + 3 * (depth - 1) + 4 * depth))
    return args, nbytes


@pytest.mark.parametrize("backend", ["triton", "triton-bf16", "cuda"])
@pytest.mark.parametrize("op", ["slot_attention_pass", "mask_fusion"])
def test_token_pass_bandwidth(benchmark, record, short, copy_bandwidth, op, backend):
    name = backend.removesuffix("-bf16")
    if name == "cuda" and not ops.cuda_kernels_available():
        pytest.skip("exposure_slot._C was built without its CUDA kernels")
    if name == "triton" and not ops.triton_kernels_available():
        pytest.skip("triton is not installed")
    batch, tokens = (1, 64 * 64) if short else (1, 480 * 270)
    dtype = dtype_of(backend)
    args, pass_bytes = pass_arguments(batch, tokens, dtype)
    if op == "slot_attention_pass":
        call = lambda: ops.slot_attention_pass(*args, backend=name)
        nbytes = pass_bytes
    else:
        masks, tables, base = args[7], args[8], args[6][1]
        call = lambda: ops.mask_fusion(masks, tables, base, backend=name)
        size = torch.finfo(dtype).bits // 8
        nbytes = size * (2 * batch * tokens * CHANNELS + sum(m.numel() for m in masks))

    def token_pass():
        with torch.inference_mode():
            call()
        sync()

    group = f"GPU {op} token pass, B={batch} N={tokens} C={CHANNELS}"
    seconds = record.time(benchmark, group, backend, token_pass, rounds=3 if short else 30,
                          warmup_rounds=3)
    if seconds is not None:
        record.note(group, f"{backend}: {nbytes / seconds / 1e9:.0f} GB/s = "
                           f"{100 * nbytes / seconds / copy_bandwidth:.0f}% of the measured copy "
                           f"bandwidth {copy_bandwidth / 1e9:.0f} GB/s (target >= 60%)")
