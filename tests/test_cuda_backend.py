"""What is specific to the CUDA kernels (csrc/cuda) beyond the backend-generic parity
suites of tests/test_mask_fusion.py and tests/test_slot_attention_pass.py.

Without a GPU (run everywhere): backend "cuda" fails clearly when the extension has
no CUDA kernels, refuses CPU tensors, and the public wrappers check dtypes and
shapes before choosing a backend.

On a GPU with the CUDA kernels (skipped otherwise, with the reason): the kernels'
own limits give clear errors; parity against the float64 reference over every K in
1..16 and C from 1 to 256 (whole and partial channel vectors, the lane groups of
every size), large N (a 1080p bottleneck, 480 x 270 tokens, and primes up to
70,000, crossing every tile and block boundary), rows that are not 16-byte aligned;
bitwise repeatable results; float16 and bfloat16.

Tolerances, relative to the largest magnitude of the expected tensor:
- float64 kernels vs the float64 reference: 1e-12 (both exact to ~1e-16, summed in
  different orders);
- float32 vs the float64 reference on the same values: 1e-5 (IEEE exp, rsqrt and
  division -- no fast math, as for the other backends -- a few ulp through up to
  three LayerNorms and a softmax, and sums over up to 130,000 tokens in per-block
  partials; a bug is off by far more);
- bfloat16 / float16 vs the float64 reference on the same rounded values: 3e-2 /
  4e-3: every output is rounded once to 8 / 11 significant bits (2^-9 / 2^-12
  relative) after float32 accumulation, and the LayerNorm statistics a later stage
  uses are exact, so a few units in the last place.
"""

from __future__ import annotations

import pytest
import torch

import test_mask_fusion as mf
import test_slot_attention_pass as sap
from conftest import _fused_backend_skip
from exposure_slot import ops

F64_TOL, F32_TOL = 1e-12, 1e-5
LOW_TOL = {torch.bfloat16: 3e-2, torch.float16: 4e-3}
F, T = False, True

requires_extension = pytest.mark.skipif(
    not ops.cpu_kernels_available(), reason=f"exposure_slot._C is not built ({ops._C_IMPORT_ERROR})")
CUDA_SKIP = _fused_backend_skip("cuda")
requires_cuda = pytest.mark.skipif(CUDA_SKIP is not None, reason=CUDA_SKIP or "")


def slot_case(B=2, N=67, C=32, K=5, layout=((T, [(3, F)]), (F, [(2, T)])), **kw):
    return sap.Case(B, N, C, K, [tuple(s) for s in layout], **kw)


def slot_call(case, backend="cuda", queries=None, v_in=None):
    """The public wrapper on the case's own tensors (where they are)."""
    return ops.slot_attention_pass(case.k_in, case.v_in if v_in is None else v_in, *case.norms,
                                   case.stage_bases, case.masks, case.tables, case.factor_stages,
                                   case.queries if queries is None else queries,
                                   backend=backend)


def fusion_inputs(B=2, slots=(3, 7), N=67, C=32, table_batches=(1, 2), with_base=True, **kw):
    return mf.make_inputs(B, list(slots), N, C, table_batches=list(table_batches),
                          with_base=with_base, **kw)


# ---------------------------------------------------------------- host side (no GPU)


@requires_extension
@pytest.mark.skipif(ops.cuda_kernels_available(), reason="this build has the CUDA kernels")
def test_backend_cuda_without_cuda_kernels_says_how_to_build_them():
    masks, tables, base, _ = fusion_inputs()
    case = slot_case()
    calls = [lambda: ops.mask_fusion(masks, tables, base, backend="cuda"),
             lambda: ops.mask_fusion_(masks, tables, base.clone(), backend="cuda"),
             lambda: slot_call(case)]
    for call in calls:
        with pytest.raises(RuntimeError, match="backend 'cuda' needs exposure_slot._C built with "
                                               "its CUDA kernels"):
            call()


@requires_extension
def test_backend_cuda_refuses_cpu_tensors(monkeypatch):
    # As if the CUDA kernels were built: the wrapper's device check comes next.
    monkeypatch.setattr(ops, "cuda_kernels_available", lambda: True)
    masks, tables, base, _ = fusion_inputs()
    with pytest.raises(ValueError, match="backend 'cuda' computes on CUDA tensors, got tensors "
                                         "on cpu"):
        ops.mask_fusion(masks, tables, base, backend="cuda")
    case = slot_case()
    with pytest.raises(ValueError, match="backend 'cuda' computes on CUDA tensors"):
        slot_call(case)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_backend_cuda_takes_the_four_float_dtypes(dtype):
    """The wrapper's dtype check passes them (the call then fails, or runs, on the
    backend: never a dtype error)."""
    masks, tables, base, _ = fusion_inputs(dtype=dtype)
    try:
        ops.mask_fusion(masks, tables, base, backend="cuda")
    except (RuntimeError, ValueError) as exc:
        assert "dtype" not in str(exc), exc


def test_backend_cuda_rejects_other_dtypes_and_bad_shapes():
    masks, tables, base, _ = fusion_inputs()
    f8 = torch.float8_e4m3fn
    with pytest.raises(TypeError, match=r"implement float32, float64, bfloat16, float16; got "
                                        r"masks\[0\] of dtype torch.float8_e4m3fn"):
        ops.mask_fusion([m.to(f8) for m in masks], [t.to(f8) for t in tables], None,
                        backend="cuda")
    with pytest.raises(ValueError, match=r"base must be \[B, N, C\]"):
        ops.mask_fusion(masks, tables, base[:, :5], backend="cuda")
    case = slot_case()
    with pytest.raises(ValueError, match=r"queries must be \[B, K, C\]"):
        slot_call(case, queries=case.queries[..., :7])
    with pytest.raises(TypeError, match="share one dtype"):
        slot_call(case, v_in=case.v_in.float())


# ---------------------------------------------------------------- the kernels' limits


@requires_cuda
def test_kernels_name_their_limits():
    op = torch.ops.exposure_slot.slot_attention_pass
    fusion = torch.ops.exposure_slot.mask_fusion

    def args(case):
        return case.on("cuda").op_args()

    cases = [
        (lambda: op(*args(slot_case(K=17))), "support 1 to 16 slots, but queries has K = 17"),
        (lambda: op(*args(slot_case(C=257, layout=[(F, [])]))),
         "take 1 to 256 channels C .from k_in., got C = 257"),
        (lambda: op(*args(slot_case(layout=[(F, [(17, F)])]))),
         r"support 1 to 16 slots, but masks\[0\] has K = 17"),
        (lambda: op(*args(slot_case(layout=[(F, [])] * 9))), "at most 8 stages, got D = 9"),
        (lambda: op(*args(slot_case(layout=[(F, [(2, F)] * 17)]))),
         "at most 16 factors, got 17"),
    ]
    masks, tables, base, _ = fusion_inputs(slots=(3,), table_batches=(1,), C=300)
    cases.append((lambda: fusion([m.cuda() for m in masks], [t.cuda() for t in tables],
                                 base.cuda()), "take 1 to 256 channels C"))
    case = slot_case().on("cuda")
    mixed = list(args(slot_case()))
    mixed[1] = case.v_in.cpu()
    cases.append((lambda: op(*mixed), "v_in must be a CUDA tensor for the CUDA kernel"))
    for call, match in cases:
        with pytest.raises(RuntimeError, match=match):
            call()


# ---------------------------------------------------------------- parity over K, C, N


@requires_cuda
@pytest.mark.parametrize("K", range(1, 17))
def test_slot_pass_every_slot_count(K):
    case = slot_case(B=2, N=131, C=48, K=K, layout=[(T, [(K, F)]), (F, [(17 - K, T)])], seed=K)
    expected = case.forward_backward("reference")
    for a, e in zip(case.forward_backward("cuda"), expected, strict=True):
        sap.assert_matches(a, e, F64_TOL)


CHANNELS = [1, 3, 4, 7, 16, 20, 37, 48, 64, 100, 128, 200, 255, 256]


@requires_cuda
@pytest.mark.parametrize("C", CHANNELS)
def test_slot_pass_every_channel_layout(C):
    """C from 1 to 256: partial vectors, and lane groups of 4 to 32 lanes."""
    case = slot_case(B=2, N=97, C=C, K=7, layout=[(F, [(3, F)]), (T, [(7, T), (2, F)])], seed=C)
    expected = case.forward_backward("reference")
    for a, e in zip(case.forward_backward("cuda"), expected, strict=True):
        sap.assert_matches(a, e, F64_TOL)


@requires_cuda
@pytest.mark.parametrize("C", CHANNELS)
@pytest.mark.parametrize("K", [1, 16])
def test_mask_fusion_every_channel_layout_and_slot_count(C, K):
    inputs = fusion_inputs(B=2, slots=(K, 17 - K), N=97, C=C, seed=C + K)
    expected = mf.forward_backward("reference", *inputs)
    for a, e in zip(mf.forward_backward("cuda", *inputs), expected, strict=True):
        mf.assert_matches(a, e, F64_TOL)


LARGE_N = [480 * 270, 69997, 65521, 4099]  # a 1080p bottleneck; primes


@requires_cuda
@pytest.mark.parametrize("N", LARGE_N)
def test_slot_pass_large_n_float32(N):
    case = slot_case(B=1, N=N, C=128, K=7, layout=[(F, [(3, F)]), (T, [])],
                     dtype=torch.float32, seed=N % 1000)
    expected = case.to(torch.float64).forward_backward("reference")
    actual = case.forward_backward("cuda")
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == torch.float32
        sap.assert_matches(a.double(), e, F32_TOL)


@requires_cuda
@pytest.mark.parametrize("N", LARGE_N)
def test_mask_fusion_large_n_float32(N):
    inputs = fusion_inputs(B=1, slots=(3, 7), N=N, C=128, table_batches=(1, 1),
                           dtype=torch.float32, seed=N % 1000)
    expected = mf.forward_backward("reference", *[
        [t.double() for t in x] if isinstance(x, list) else x.double() for x in inputs])
    for a, e in zip(mf.forward_backward("cuda", *inputs), expected, strict=True):
        mf.assert_matches(a.double(), e, F32_TOL)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_wide_and_many_slots(dtype):
    case = slot_case(B=2, N=4099, C=256, K=16, layout=[(T, [(10, F)]), (F, [(16, T)])],
                     dtype=dtype, seed=7)
    expected = case.to(torch.float64).forward_backward("reference")
    for a, e in zip(case.forward_backward("cuda"), expected, strict=True):
        assert a.dtype == dtype
        sap.assert_matches(a.double(), e, LOW_TOL[dtype])
    inputs = fusion_inputs(B=2, slots=(16, 3), N=4099, C=256, dtype=dtype, seed=8)
    expected = mf.forward_backward("reference", *[
        [t.double() for t in x] if isinstance(x, list) else x.double() for x in inputs])
    for a, e in zip(mf.forward_backward("cuda", *inputs), expected, strict=True):
        mf.assert_matches(a.double(), e, LOW_TOL[dtype])


@requires_cuda
def test_rows_off_the_vector_boundary():
    """Contiguous tensors at an odd storage offset (not 16-byte aligned), in place too."""
    def shifted(t):
        flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        view = flat[1:].view(t.shape)
        view.copy_(t)
        assert view.is_contiguous() and view.data_ptr() % 16 != 0
        return view

    masks, tables, base, grad = fusion_inputs(N=301, C=64, dtype=torch.float32, seed=3)
    masks, tables = [shifted(m.cuda()) for m in masks], [shifted(t.cuda()) for t in tables]
    expected = ops.mask_fusion(masks, tables, base.cuda(), backend="reference")
    sap.assert_matches(ops.mask_fusion(masks, tables, shifted(base.cuda()), backend="cuda"),
                       expected, F32_TOL)
    updated = shifted(base.cuda())
    assert ops.mask_fusion_(masks, tables, updated, backend="cuda") is updated
    sap.assert_matches(updated, expected, F32_TOL)

    case = slot_case(N=301, C=64, dtype=torch.float32).on("cuda")
    shifted_case = case.with_tensors([shifted(t) for t in case.tensors()])
    for a, e in zip(shifted_case.run("cuda"), case.run("cuda"), strict=True):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- determinism


@requires_cuda
def test_bitwise_repeatable():
    case = slot_case(B=2, N=20011, C=128, K=7, layout=[(F, [(3, F)]), (T, [(7, T), (3, F)])],
                     dtype=torch.float32, seed=37)
    first = case.forward_backward("cuda")
    sap.assert_identical(case.forward_backward("cuda"), first)
    inputs = fusion_inputs(B=2, slots=(3, 7, 10), N=20011, C=128, table_batches=(1, 2, 1),
                           dtype=torch.float32, seed=38)
    first = mf.forward_backward("cuda", *inputs)
    mf.assert_identical(mf.forward_backward("cuda", *inputs), first)


@requires_cuda
def test_stats_cache_in_half_precision_is_close():
    """float16/bfloat16 stats hold the statistics rounded to the dtype: a pass given
    them back agrees with one that computes them, to the dtype's tolerance."""
    for dtype in LOW_TOL:
        case = slot_case(N=1031, C=64, dtype=dtype, seed=5).on("cuda")
        first = case.run("cuda")
        for a, e in zip(case.run("cuda", first[3])[:3], first[:3], strict=True):
            sap.assert_matches(a.double(), e.double(), LOW_TOL[dtype])
