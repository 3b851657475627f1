"""The mask-weighted fusion op: every fused backend that can run here (the compiled
CPU kernels; the Triton kernels on a GPU or, small shapes, under Triton's
interpreter; the CUDA kernels on a GPU) against the PyTorch twin, its torch.library
registration, determinism, and its errors.

    out = base * prod_j (masks[j]^T @ tables[j]),  masks[j] [B,K_j,N],
    tables[j] [B or 1,K_j,C], base [B,N,C] or None.

Tolerances, relative to the largest magnitude of the expected tensor (the sums mix
signs, so an element-wise relative bound would be meaningless near zero):
- float64 kernel vs float64 reference: 1e-12 (both are exact to ~1e-16; they only
  sum in different orders);
- float32 kernel vs float64 reference on the same values: 4e-6 (float32 rounding of
  products of up to 3 mixtures and of sums over a few thousand tokens; observed
  below 1e-6; far under 1e-4);
- bfloat16 / float16 kernels (GPU backends; float32 accumulation) vs the float64
  reference on the same (rounded) values: 1.6e-2 / 2e-3, a few units in the last
  place of the 16-bit result (2^-8 and 2^-11 relative), which every output is
  rounded to once.
Repeated runs (and, on the CPU, runs on 1 or 2 threads) must agree bit for bit.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import (backend_device, fused_backends, interpreted, low_precision_dtypes,
                      op_namespace, requires_kernels)
from exposure_slot import ops
from exposure_slot.ops import mask_fusion, mask_fusion_reference

F64_TOL = 1e-12
F32_TOL = 4e-6
TOLERANCES = {torch.float64: F64_TOL, torch.float32: F32_TOL, torch.bfloat16: 1.6e-2,
              torch.float16: 2e-3}
FUSED = fused_backends()


def make_inputs(B, slots, N, C, *, table_batches, with_base, dtype=torch.float64, seed=0):
    """Fresh random factors (masks strictly positive), base and output gradient.
    ``slots`` and ``table_batches`` have one entry per factor."""
    gen = torch.Generator().manual_seed(seed)
    masks = [0.05 + torch.rand(B, K, N, generator=gen, dtype=dtype) for K in slots]
    tables = [torch.randn(tb, K, C, generator=gen, dtype=dtype)
              for K, tb in zip(slots, table_batches)]
    base = torch.randn(B, N, C, generator=gen, dtype=dtype) if with_base else None
    grad = torch.randn(B, N, C, generator=gen, dtype=dtype)
    return masks, tables, base, grad


def forward_backward(backend, masks, tables, base, grad):
    """[out, *grad_masks, *grad_tables, grad_base (None without a base)], computed on
    the backend's device and returned on the CPU."""
    device = backend_device(backend)
    masks = [m.detach().to(device).requires_grad_() for m in masks]
    tables = [t.detach().to(device).requires_grad_() for t in tables]
    base = None if base is None else base.detach().to(device).requires_grad_()
    out = mask_fusion(masks, tables, base, backend=backend)
    out.backward(grad.to(device))
    return [None if t is None else t.cpu() for t in
            [out.detach()] + [m.grad for m in masks] + [t.grad for t in tables]
            + [None if base is None else base.grad]]


def assert_matches(actual, expected, rel):
    assert (actual is None) == (expected is None)
    if expected is not None:
        assert actual.shape == expected.shape
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_identical(results_a, results_b):
    for a, b in zip(results_a, results_b, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# ---------------------------------------------------------------- parity

SLOT_CYCLE = [1, 3, 7, 10, 16, 2, 5]


def parity_cases():
    """Every (B, N) with two of the four C (every C with every B and N over the
    grid); the factor count (1..3), base or not, and the slot counts and table
    layouts of the factors cycle along the cases so that every combination of
    factor count and base occurs."""
    cases = []
    index = 0
    pairs = [(B, N) for B in (1, 3) for N in (1, 2, 97, 257, 1031)]
    for pair, (B, N) in enumerate(pairs):
        for C in ((16, 128), (37, 256))[pair % 2]:
            factors = 1 + index % 3
            with_base = index % 2 == 0
            slots = [SLOT_CYCLE[(index + 2 * j) % len(SLOT_CYCLE)] for j in range(factors)]
            table_batches = [1 if (index + j) % 2 else B for j in range(factors)]
            cases.append((B, N, C, slots, table_batches, with_base))
            index += 1
    return cases


PARITY = parity_cases()
# Under Triton's interpreter (seconds per thousand tokens) the parity grid stops at
# this many tokens of 128 channels.
INTERPRETER_MAX_TOKENS = 100


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize(
    "B,N,C,slots,table_batches,with_base", PARITY,
    ids=[f"B{b}-N{n}-C{c}-K{'.'.join(map(str, k))}-T{'.'.join(map(str, t))}-{'base' if w else 'nobase'}"
         for b, n, c, k, t, w in PARITY])
def test_float64_matches_reference(backend, B, N, C, slots, table_batches, with_base):
    if interpreted(backend) and (N > INTERPRETER_MAX_TOKENS
                                 or N * C > INTERPRETER_MAX_TOKENS * 128):
        pytest.skip(f"N = {N}, C = {C}: too slow for Triton's interpreter (a GPU runs it)")
    inputs = make_inputs(B, slots, N, C, table_batches=table_batches, with_base=with_base,
                         seed=B * 7 + N + C)
    expected = forward_backward("reference", *inputs)
    for actual, want in zip(forward_backward(backend, *inputs), expected, strict=True):
        assert_matches(actual, want, F64_TOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_non_contiguous_inputs(backend, with_base):
    B, N, C = 2, 101 if interpreted(backend) else 301, 37
    gen = torch.Generator().manual_seed(1)
    dtype = torch.float64
    masks = [
        (0.05 + torch.rand(B, 2 * N, 7, generator=gen, dtype=dtype)).transpose(1, 2)[:, :, ::2],
        (0.05 + torch.rand(5, B, N, generator=gen, dtype=dtype)).transpose(0, 1),
    ]
    tables = [
        torch.randn(1, C, 7, generator=gen, dtype=dtype).transpose(1, 2),
        torch.randn(B, 5, 2 * C, generator=gen, dtype=dtype)[:, :, 1::2],
    ]
    base = (torch.randn(B, C, N, generator=gen, dtype=dtype).transpose(1, 2)
            if with_base else None)
    grad = torch.randn(N, B, C, generator=gen, dtype=dtype).transpose(0, 1)
    for t in (*masks, *tables, grad) + ((base,) if with_base else ()):
        assert not t.is_contiguous()
    expected = forward_backward("reference", masks, tables, base, grad)
    for actual, want in zip(forward_backward(backend, masks, tables, base, grad), expected,
                            strict=True):
        assert_matches(actual, want, F64_TOL)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("B,slots,N,C,table_batches,with_base", [
    (1, [3], 16411, 128, [1], True),
    (3, [16, 7], 1031, 37, [3, 1], False),
    (2, [3, 7, 10], 4099, 256, [1, 2, 1], True),
])
def test_low_precision_matches_float64_reference(backend, B, slots, N, C, table_batches,
                                                 with_base):
    """Every dtype below float64 the backend implements, against the float64 reference
    on the same values (TOLERANCES); the interpreter takes at most 70 tokens and 64
    channels."""
    if interpreted(backend):
        N, C = min(N, 70), min(C, 64)
    for dtype in low_precision_dtypes(backend):
        masks, tables, base, grad = make_inputs(B, slots, N, C, table_batches=table_batches,
                                                with_base=with_base, dtype=dtype)
        to64 = lambda t: None if t is None else t.double()
        expected = forward_backward("reference", [m.double() for m in masks],
                                    [t.double() for t in tables], to64(base), grad.double())
        actual = forward_backward(backend, masks, tables, base, grad)
        for a, want in zip(actual, expected, strict=True):
            if want is not None:
                assert a.dtype == dtype
                assert_matches(a.double(), want, TOLERANCES[dtype])


# ---------------------------------------------------------------- torch.library


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("table_batches", [[1], [2, 1]], ids=["one-shared", "two-mixed"])
def test_opcheck(backend, table_batches, with_base):
    slots = [3, 5][:len(table_batches)]
    device = backend_device(backend)
    masks, tables, base, grad = (
        None if t is None else [x.to(device) for x in t] if isinstance(t, list) else t.to(device)
        for t in make_inputs(2, slots, 70 if interpreted(backend) else 260, 8,
                             table_batches=table_batches, with_base=with_base))
    forward_args = ([m.requires_grad_() for m in masks], [t.requires_grad_() for t in tables],
                    None if base is None else base.requires_grad_())
    torch.library.opcheck(op_namespace(backend).mask_fusion, forward_args)
    torch.library.opcheck(op_namespace(backend).mask_fusion_backward,
                          (grad, [m.detach() for m in masks], [t.detach() for t in tables],
                           None if base is None else base.detach()))


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("table_batches", [[1], [2, 1]], ids=["one-shared", "two-mixed"])
def test_gradcheck(backend, table_batches, with_base):
    # N = 260 crosses the CPU kernel's 256-token reduction chunk (and the Triton
    # kernels' 64-token tiles).
    slots = [3, 2][:len(table_batches)]
    device = backend_device(backend)
    masks, tables, base, _ = make_inputs(2, slots, 260, 5, table_batches=table_batches,
                                         with_base=with_base)
    masks, tables = [m.to(device) for m in masks], [t.to(device) for t in tables]
    base = None if base is None else base.to(device)
    J = len(masks)
    inputs = tuple(t.requires_grad_() for t in masks + tables + ([base] if with_base else []))

    def fused(*flat):
        return mask_fusion(list(flat[:J]), list(flat[J:2 * J]),
                           flat[2 * J] if with_base else None, backend=backend)

    # fast_mode checks random projections of the Jacobian (one backward per output
    # projection instead of one forward per input element).
    assert torch.autograd.gradcheck(fused, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", FUSED)
def test_torch_compile_fullgraph(backend):
    def fused(masks, tables, base):
        return torch.tanh(mask_fusion(masks, tables, base, backend=backend)).sum(dim=-1)

    device = backend_device(backend)
    masks, tables, base, _ = make_inputs(2, [3, 4], 97, 16, table_batches=[1, 2],
                                         with_base=True)
    masks, tables, base = [m.to(device) for m in masks], [t.to(device) for t in tables], \
        base.to(device)
    compiled = torch.compile(fused, fullgraph=True)
    results = []
    for fn in (fused, compiled):
        leaves = ([m.detach().requires_grad_() for m in masks],
                  [t.detach().requires_grad_() for t in tables], base.detach().requires_grad_())
        out = fn(*leaves)
        out.sum().backward()
        results.append([out.detach(), *[m.grad for m in leaves[0]],
                        *[t.grad for t in leaves[1]], leaves[2].grad])
    for a, e in zip(*reversed(results), strict=True):
        assert_matches(a, e, F64_TOL)


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_bitwise_repeatable_and_thread_count_independent(backend, with_base, restore_threads):
    # Large enough to run in parallel, with many reduction chunks per batch item
    # (under the interpreter: several Triton chunks).
    N, C = (131, 32) if interpreted(backend) else (5003, 128)
    inputs = make_inputs(2, [7, 3], N, C, table_batches=[1, 2], with_base=with_base,
                         dtype=torch.float32)
    first = forward_backward(backend, *inputs)
    assert_identical(forward_backward(backend, *inputs), first)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_identical(forward_backward(backend, *inputs), first)


# ---------------------------------------------------------------- errors


def bad_call_cases():
    m = 0.05 + torch.rand(3, 4, 10, dtype=torch.float64)
    t = torch.randn(1, 4, 8, dtype=torch.float64)
    b = torch.randn(3, 10, 8, dtype=torch.float64)
    return [
        ("masks-not-a-list", (m, [t], b), TypeError, "masks and tables must be lists"),
        ("mask-not-a-tensor", ([m.tolist()], [t], b), ValueError,
         r"masks\[0\] must be a 3-D tensor"),
        ("base-not-a-tensor", ([m], [t], b.tolist()), TypeError,
         "base must be a torch.Tensor"),
        ("integer", ([m.long()], [t.long()], b.long()), TypeError, "floating-point"),
        ("mixed-dtypes", ([m], [t.float()], b), TypeError, "share one dtype"),
        ("mixed-devices", ([m], [t.to("meta")], b), ValueError, "one device"),
        ("masks-2d", ([m[0]], [t], b), ValueError, r"masks\[0\] must be a 3-D tensor"),
        ("table-2d", ([m], [t[0]], b), ValueError, r"tables\[0\] must be a 3-D tensor"),
        ("slot-mismatch", ([m, m], [t, t[:, :3]], b), ValueError,
         r"tables\[1\] must be \[B or 1, K, C\] = \[3 or 1, 4, 8\]"),
        ("no-slots", ([m[:, :0]], [t[:, :0]], b), ValueError, r"K >= 1"),
        ("table-batch-mismatch", ([m], [t.expand(2, -1, -1)], b), ValueError,
         r"tables\[0\] must be \[B or 1, K, C\]"),
        ("mask-batch-mismatch", ([m, m[:2]], [t, t], None), ValueError,
         r"masks\[1\] must be \[B, K, N\] = \[3, K >= 1, 10\]"),
        ("mask-token-mismatch", ([m, m[:, :, :9]], [t, t], None), ValueError,
         r"masks\[1\] must be \[B, K, N\]"),
        ("table-channel-mismatch", ([m, m], [t, t[..., :7]], None), ValueError,
         r"tables\[1\] must be \[B or 1, K, C\]"),
        ("base-channel-mismatch", ([m], [t], b[..., :7]), ValueError,
         r"base must be \[B, N, C\] = \[3, 10, 8\]"),
        ("base-token-mismatch", ([m], [t], b[:, :9]), ValueError, r"base must be \[B, N, C\]"),
        ("length-mismatch", ([m, m], [t], b), ValueError, "got 2 masks but 1 tables"),
        ("empty", ([], [], b), ValueError, "at least one"),
    ]


BAD = bad_call_cases()


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize("args,error,match", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_wrapper_rejects_bad_arguments(backend, args, error, match):
    # The wrapper checks before it picks a backend: same errors without the extension.
    with pytest.raises(error, match=match):
        mask_fusion(*args, backend=backend)


def test_wrapper_rejects_unknown_backend():
    masks, tables, base, _ = make_inputs(1, [3], 5, 4, table_batches=[1], with_base=True)
    with pytest.raises(ValueError, match="unknown backend 'fast'; expected one of reference, cpu, cuda, triton"):
        mask_fusion(masks, tables, base, backend="fast")


@requires_kernels
def test_cpu_backend_rejects_half_and_non_cpu_tensors():
    masks, tables, base, _ = make_inputs(1, [3], 5, 4, table_batches=[1], with_base=True)
    half = ([masks[0].half()], [tables[0].half()], base.half())
    with pytest.raises(TypeError, match="implement float32, float64; got masks.0. of dtype "
                                        "torch.float16"):
        mask_fusion(*half, backend="cpu")
    meta = ([masks[0].to("meta")], [tables[0].to("meta")], base.to("meta"))
    with pytest.raises(ValueError, match="computes on CPU tensors, got tensors on meta"):
        mask_fusion(*meta, backend="cpu")
    # The reference backend takes float16 and computes the same thing.
    out = mask_fusion(*half)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.double(), mask_fusion_reference(
        [half[0][0].double()], [half[1][0].double()], half[2].double()), rtol=0, atol=0.05)


@requires_kernels
def test_compiled_ops_reject_bad_arguments():
    """Called directly, the C++ kernels check their arguments too (RuntimeError;
    NotImplementedError, a subclass, for dtypes the dispatch does not cover)."""
    op, backward = torch.ops.exposure_slot.mask_fusion, torch.ops.exposure_slot.mask_fusion_backward
    (m,), (t,), b, g = make_inputs(3, [4], 10, 8, table_batches=[1], with_base=True)
    cases = [
        (lambda: op([m], [t[:, :3]], b),
         r"tables\[0\] must be \[B or 1, K, C\] with B = 3, K = 4 .* got shape \[1, 3, 8\]"),
        (lambda: op([m], [t.expand(2, -1, -1)], None), r"tables\[0\] must be \[B or 1, K, C\]"),
        (lambda: op([m, m[:, :, :9]], [t, t], None), r"masks\[1\] must be \[B, K, N\]"),
        (lambda: op([m[0]], [t], None), r"masks\[0\] must be \[B, K, N\]"),
        (lambda: op([m], [t], b[..., :7]), r"base must be \[B, N, C\] = \[3, 10, 8\]"),
        (lambda: op([m], [t], b[:, :9]), r"base must be \[B, N, C\]"),
        (lambda: op([m, m], [t], None), "got 2 masks but 1 tables"),
        (lambda: op([], [], b), "at least one"),
        (lambda: op([m.half()], [t.half()], None), "Half"),
        (lambda: op([m.long()], [t.long()], None), "Long"),
        (lambda: op([m], [t.float()], None), "share one dtype"),
        (lambda: op([m], [t], b.float()), "share one dtype"),
        (lambda: backward(g[:, :9], [m], [t], b), r"grad must be \[B, N, C\] = \[3, 10, 8\]"),
        (lambda: backward(g[..., :7], [m], [t], b), r"grad must be \[B, N, C\]"),
        (lambda: backward(g.float(), [m], [t], b), "share one dtype"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] != "cuda"])
def test_fake_kernels_on_meta_tensors(backend):
    """Meta tensors go to the fake kernels: shapes out, the wrapper's checks in."""
    op, backward = op_namespace(backend).mask_fusion, op_namespace(backend).mask_fusion_backward
    masks, tables, base, grad = make_inputs(3, [4, 2], 10, 8, table_batches=[1, 3],
                                            with_base=True)
    masks = [x.to("meta") for x in masks]
    tables = [x.to("meta") for x in tables]
    base, grad = base.to("meta"), grad.to("meta")
    out = op(masks, tables, base)
    assert out.device.type == "meta" and out.shape == (3, 10, 8) and out.dtype == torch.float64
    grad_masks, grad_tables, grad_base = backward(grad, masks, tables, base)
    assert [g.shape for g in grad_masks] == [m.shape for m in masks]
    assert [g.shape for g in grad_tables] == [t.shape for t in tables]
    assert grad_base.shape == base.shape
    assert backward(grad, masks, tables, None)[2] is None
    with pytest.raises(ValueError, match=r"tables\[0\] must be \[B or 1, K, C\]"):
        op(masks, [tables[0][:, :3], tables[1]], base)
    with pytest.raises(ValueError, match=r"grad must be \[B, N, C\]"):
        backward(grad[:, :9], masks, tables, base)
    with pytest.raises(TypeError, match="implement float32, float64, bfloat16, float16; got "
                                        r"masks\[0\] of dtype torch.float8_e4m3fn"):
        op([m.to(torch.float8_e4m3fn) for m in masks],
           [t.to(torch.float8_e4m3fn) for t in tables], None)
    with pytest.raises(ValueError, match="one device"):
        op([masks[0], torch.rand(masks[1].shape, dtype=torch.float64)], tables, base)


def test_package_imports_without_the_extension():
    script = textwrap.dedent("""
        import sys, torch
        class BlockExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "exposure_slot._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, BlockExtension())
        import exposure_slot
        assert exposure_slot.__file__.startswith(sys.argv[1]), exposure_slot.__file__
        from exposure_slot.ops import cpu_kernels_available, mask_fusion, mask_fusion_reference
        assert not cpu_kernels_available()
        assert exposure_slot.available_backends() == ["reference"]
        masks, tables = [torch.rand(1, 3, 5) + 0.05], [torch.randn(1, 3, 4)]
        base = torch.randn(1, 5, 4)
        out = mask_fusion(masks, tables, base)
        assert torch.equal(out, base * (masks[0].transpose(1, 2) @ tables[0])), out
        try:
            mask_fusion(masks, tables, backend="cpu")
        except RuntimeError as exc:
            assert "blocked by the test" in str(exc), exc
        else:
            raise AssertionError("backend 'cpu' ran without the extension")
    """)
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, cwd=root)


# ---------------------------------------------------------------- in place


@pytest.mark.parametrize("backend", ["reference", *FUSED])
def test_in_place_update_equals_the_out_of_place_op(backend):
    """mask_fusion_ writes mask_fusion(masks, tables, base) into base (float64,
    1e-12) and refuses to run where autograd would need the old base."""
    device = backend_device(backend)
    masks, tables, base, _ = make_inputs(2, [3, 7], 131 if interpreted(backend) else 1031, 37,
                                         table_batches=[1, 2], with_base=True)
    masks, tables, base = [m.to(device) for m in masks], [t.to(device) for t in tables], \
        base.to(device)
    expected = mask_fusion(masks, tables, base, backend="reference")
    updated = base.clone()
    assert ops.mask_fusion_(masks, tables, updated, backend=backend) is updated
    torch.testing.assert_close(updated, expected, rtol=F64_TOL, atol=F64_TOL * expected.abs().max())
    with pytest.raises(RuntimeError, match="in-place and not differentiable"):
        ops.mask_fusion_(masks, tables, base.clone().requires_grad_(), backend=backend)


@pytest.mark.parametrize("backend", [p for p in FUSED if p.values[0] == "triton"])
def test_triton_ops_reject_bad_arguments_and_shapes_beyond_the_kernels(backend):
    """Called directly, the Triton ops run the shared checks (TypeError/ValueError)
    and refuse, naming the limit, what the kernels do not implement."""
    op = op_namespace(backend).mask_fusion
    device = backend_device(backend)
    (m,), (t,), b, _ = (x.to(device) if isinstance(x, torch.Tensor) else [y.to(device) for y in x]
                        for x in make_inputs(3, [4], 10, 8, table_batches=[1], with_base=True))
    with pytest.raises(ValueError, match=r"tables\[0\] must be \[B or 1, K, C\]"):
        op([m], [t[:, :3]], b)
    with pytest.raises(TypeError, match="share one dtype"):
        op([m], [t.float()], None)
    wide = torch.randn(1, 4, 300, dtype=m.dtype, device=device)
    with pytest.raises(ValueError, match="implement C <= 256, got C = 300"):
        op([m], [wide], None)
    many = 0.05 + torch.rand(3, 17, 10, dtype=m.dtype, device=device)
    with pytest.raises(ValueError, match="factors of at most 16 slots"):
        op([many], [torch.randn(1, 17, 8, dtype=m.dtype, device=device)], None)
    with pytest.raises(ValueError, match="at most 15 factors per call, got 16"):
        op([m] * 16, [t] * 16, None)
