"""The mask-weighted fusion op: the compiled CPU kernels against the PyTorch twin,
its torch.library registration, determinism, and its errors.

Tolerances, relative to the largest magnitude of the expected tensor (the sums mix
signs, so an element-wise relative bound would be meaningless near zero):
- float64 kernel vs float64 reference: 1e-12 (both are exact to ~1e-16; they only
  sum in different orders);
- float32 kernel vs float64 reference on the same values: 2e-6 (float32 rounding
  over sums of up to a few thousand terms; measured at most 6e-7, as for torch's
  own float32 matmul; far under 1e-4).
Repeated runs and runs on 1 or 2 threads must agree bit for bit.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from exposure_slot import ops
from exposure_slot.ops import cpu_kernels_available, mask_fusion, mask_fusion_reference

F64_TOL = 1e-12
F32_TOL = 2e-6

requires_kernels = pytest.mark.skipif(
    not cpu_kernels_available(),
    reason=f"exposure_slot._C is not built ({ops._C_IMPORT_ERROR}); "
           "run `python setup.py build_ext --inplace`")


def make_inputs(B, K, N, C, *, table_batch, with_base, dtype=torch.float64, seed=0):
    """Fresh random masks, table, base and output gradient, none of them zero."""
    gen = torch.Generator().manual_seed(seed)
    masks = 0.05 + torch.rand(B, K, N, generator=gen, dtype=dtype)
    table = torch.randn(table_batch, K, C, generator=gen, dtype=dtype)
    base = torch.randn(B, N, C, generator=gen, dtype=dtype) if with_base else None
    grad = torch.randn(B, N, C, generator=gen, dtype=dtype)
    return masks, table, base, grad


def forward_backward(backend, masks, table, base, grad):
    """The output and the gradients of every given input (None for an absent base)."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in (masks, table, base)]
    out = mask_fusion(*leaves, backend=backend)
    out.backward(grad)
    return [out.detach()] + [None if t is None else t.grad for t in leaves]


def assert_matches(actual, expected, rel):
    assert (actual is None) == (expected is None)
    if expected is not None:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def assert_identical(results_a, results_b):
    for a, b in zip(results_a, results_b, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


# ---------------------------------------------------------------- parity

SHAPES = list(itertools.product([1, 3], [1, 3, 7, 10, 16], [1, 7, 97, 1031], [16, 37, 128, 256]))


@requires_kernels
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("shared_table", [True, False], ids=["table1", "tableB"])
@pytest.mark.parametrize("B,K,N,C", SHAPES, ids=[f"B{b}-K{k}-N{n}-C{c}" for b, k, n, c in SHAPES])
def test_float64_matches_reference(B, K, N, C, shared_table, with_base):
    inputs = make_inputs(B, K, N, C, table_batch=1 if shared_table else B, with_base=with_base)
    expected = forward_backward("reference", *inputs)
    for actual, want in zip(forward_backward("cpu", *inputs), expected, strict=True):
        assert_matches(actual, want, F64_TOL)


@requires_kernels
@pytest.mark.parametrize("shared_table", [True, False], ids=["table1", "tableB"])
def test_non_contiguous_inputs(shared_table):
    B, K, N, C = 2, 7, 301, 37
    gen = torch.Generator().manual_seed(1)
    masks = 0.05 + torch.rand(B, 2 * N, K, generator=gen, dtype=torch.float64)
    masks = masks.transpose(1, 2)[:, :, ::2]  # transposed and strided
    table = torch.randn(1 if shared_table else B, C, K, generator=gen,
                        dtype=torch.float64).transpose(1, 2)
    base = torch.randn(B, C, N, generator=gen, dtype=torch.float64).transpose(1, 2)
    grad = torch.randn(N, B, C, generator=gen, dtype=torch.float64).transpose(0, 1)
    for t in (masks, table, base, grad):
        assert not t.is_contiguous()
    expected = forward_backward("reference", masks, table, base, grad)
    for actual, want in zip(forward_backward("cpu", masks, table, base, grad), expected,
                            strict=True):
        assert_matches(actual, want, F64_TOL)


@requires_kernels
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("B,K,N,C,table_batch", [(1, 3, 16411, 128, 1), (3, 16, 1031, 37, 3),
                                                 (2, 7, 4099, 256, 1)])
def test_float32_matches_float64_reference(B, K, N, C, table_batch, with_base):
    inputs = make_inputs(B, K, N, C, table_batch=table_batch, with_base=with_base,
                         dtype=torch.float32)
    expected = forward_backward(
        "reference", *[None if t is None else t.double() for t in inputs])
    for actual, want in zip(forward_backward("cpu", *inputs), expected, strict=True):
        if want is not None:
            assert actual.dtype == torch.float32
            assert_matches(actual.double(), want, F32_TOL)


# ---------------------------------------------------------------- torch.library


@requires_kernels
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("table_batch", [1, 2], ids=["table1", "tableB"])
def test_opcheck(table_batch, with_base):
    masks, table, base, grad = make_inputs(2, 3, 300, 16, table_batch=table_batch,
                                           with_base=with_base)
    forward_args = [t if t is None else t.requires_grad_() for t in (masks, table, base)]
    torch.library.opcheck(torch.ops.exposure_slot.mask_fusion, tuple(forward_args))
    torch.library.opcheck(torch.ops.exposure_slot.mask_fusion_backward,
                          (grad, masks.detach(), table.detach(),
                           None if base is None else base.detach()))


@requires_kernels
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
@pytest.mark.parametrize("table_batch", [1, 2], ids=["table1", "tableB"])
def test_gradcheck(table_batch, with_base):
    # N = 260 crosses the kernel's 256-token reduction chunk.
    masks, table, base, _ = make_inputs(2, 3, 260, 5, table_batch=table_batch,
                                        with_base=with_base)
    inputs = tuple(t if t is None else t.requires_grad_() for t in (masks, table, base))
    assert torch.autograd.gradcheck(lambda *a: mask_fusion(*a, backend="cpu"), inputs)


@requires_kernels
def test_torch_compile_fullgraph():
    def fused(masks, table, base):
        return torch.tanh(mask_fusion(masks, table, base, backend="cpu")).sum(dim=-1)

    masks, table, base, _ = make_inputs(2, 3, 97, 16, table_batch=1, with_base=True)
    compiled = torch.compile(fused, fullgraph=True)
    expected = [t.detach().requires_grad_() for t in (masks, table, base)]
    actual = [t.detach().requires_grad_() for t in (masks, table, base)]
    fused(*expected).sum().backward()
    compiled(*actual).sum().backward()
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a.grad, e.grad, F64_TOL)


# ---------------------------------------------------------------- determinism


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@requires_kernels
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "nobase"])
def test_bitwise_repeatable_and_thread_count_independent(with_base, restore_threads):
    # Large enough to run in parallel, with many reduction chunks per batch item.
    inputs = make_inputs(2, 7, 5003, 128, table_batch=1, with_base=with_base,
                         dtype=torch.float32)
    first = forward_backward("cpu", *inputs)
    assert_identical(forward_backward("cpu", *inputs), first)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_identical(forward_backward("cpu", *inputs), first)


# ---------------------------------------------------------------- errors


def bad_call_cases():
    m = torch.rand(3, 4, 10, dtype=torch.float64)
    t = torch.randn(1, 4, 8, dtype=torch.float64)
    b = torch.randn(3, 10, 8, dtype=torch.float64)
    return [
        ("not-a-tensor", (m.tolist(), t, b), TypeError, "masks must be a torch.Tensor"),
        ("integer", (m.long(), t.long(), b.long()), TypeError, "floating-point"),
        ("mixed-dtypes", (m, t.float(), b), TypeError, "share one dtype"),
        ("mixed-devices", (m, t.to("meta"), b), ValueError, "one device"),
        ("masks-2d", (m[0], t, b), ValueError, r"masks must be \[B, K, N\]"),
        ("table-2d", (m, t[0], b), ValueError, r"table must be \[B, K, C\]"),
        ("slot-mismatch", (m, t[:, :3], b), ValueError, "table has 3 slots but masks has K = 4"),
        ("no-slots", (m[:, :0], t[:, :0], b), ValueError, r"at least one slot"),
        ("batch-mismatch", (m, t.expand(2, -1, -1), b), ValueError, "table batch must be 1 or B = 3"),
        ("channel-mismatch", (m, t, b[..., :7]), ValueError, r"base must be \[B, N, C\]"),
        ("token-mismatch", (m, t, b[:, :9]), ValueError, r"base must be \[B, N, C\]"),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("args,error,match", [c[1:] for c in bad_call_cases()],
                         ids=[c[0] for c in bad_call_cases()])
def test_wrapper_rejects_bad_arguments(backend, args, error, match):
    with pytest.raises(error, match=match):
        mask_fusion(*args, backend=backend)


def test_wrapper_rejects_unknown_backend():
    masks, table, base, _ = make_inputs(1, 3, 5, 4, table_batch=1, with_base=True)
    with pytest.raises(ValueError, match="backend 'fast' has no implementation"):
        mask_fusion(masks, table, base, backend="fast")


@requires_kernels
def test_cpu_backend_rejects_half_and_non_cpu_tensors():
    masks, table, base, _ = make_inputs(1, 3, 5, 4, table_batch=1, with_base=True)
    with pytest.raises(TypeError, match="implement float32 and float64, got masks of dtype torch.float16"):
        mask_fusion(masks.half(), table.half(), base.half(), backend="cpu")
    with pytest.raises(ValueError, match="computes on CPU tensors, got tensors on meta"):
        mask_fusion(masks.to("meta"), table.to("meta"), base.to("meta"), backend="cpu")
    assert mask_fusion(masks.half(), table.half(), base.half()).dtype == torch.float16


@requires_kernels
def test_compiled_ops_reject_bad_arguments():
    """Called directly, the C++ kernels (and, on meta tensors, the fake kernels)
    check their arguments too."""
    op, backward = torch.ops.exposure_slot.mask_fusion, torch.ops.exposure_slot.mask_fusion_backward
    masks, table, base, grad = make_inputs(3, 4, 10, 8, table_batch=1, with_base=True)
    cases = [
        (lambda: op(masks, table[:, :3], base), "table has 3 slots but masks has K = 4"),
        (lambda: op(masks, table, base[:, :9]), r"base must be \[B, N, C\]"),
        (lambda: op(masks.half(), table.half(), None), "float32 or float64, got Half"),
        (lambda: op(masks, table.float(), None), "share one dtype"),
        (lambda: op(masks, table.expand(2, -1, -1), None), "table batch must be 1 or B = 3"),
        (lambda: backward(grad[:, :9], masks, table, base), r"grad must be \[B, N, C\]"),
    ]
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()
    meta = [t.to("meta") for t in (masks, table, base)]
    with pytest.raises(ValueError, match="table has 3 slots but masks has K = 4"):
        op(meta[0], meta[1][:, :3], meta[2])
    assert op(*meta).shape == (3, 10, 8)


def test_package_imports_without_the_extension():
    script = textwrap.dedent("""
        import sys, torch
        class BlockExtension:
            def find_spec(self, name, path=None, target=None):
                if name == "exposure_slot._C":
                    raise ImportError("blocked by the test")
        sys.meta_path.insert(0, BlockExtension())
        from exposure_slot.ops import cpu_kernels_available, mask_fusion
        assert not cpu_kernels_available()
        masks, table = torch.rand(1, 3, 5), torch.randn(1, 3, 4)
        assert mask_fusion(masks, table).shape == (1, 5, 4)
        try:
            mask_fusion(masks, table, backend="cpu")
        except RuntimeError as exc:
            assert "blocked by the test" in str(exc), exc
        else:
            raise AssertionError("backend 'cpu' ran without the extension")
    """)
    subprocess.run([sys.executable, "-c", script], check=True,
                   cwd=Path(__file__).resolve().parents[1])
