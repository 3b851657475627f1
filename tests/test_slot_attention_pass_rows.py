"""The rows pass op (a parent level's pass in training, backend "cpu"): the compiled
CPU kernels, forward and backward, against the PyTorch twin and against the plain
pass, its torch.library registration (opcheck, gradcheck, fake kernels),
determinism, and its errors.

``slot_attention_pass_rows`` is ``slot_attention_pass`` plus its child's input rows
``rows_k = k * pf``, ``rows_v = v * pf`` (k, v the chain's output, pf the mixture of
the prompts by the pass's attention) and one more stage of ``stats``, the statistics
of the rows; see ``exposure_slot.ops.slot_attention_pass``.

Tolerances, relative to the largest magnitude of the expected tensor (as for the
plain pass): float64 kernel vs float64 twin 1e-12, forward and every gradient;
float32 kernel vs float64 twin 1e-5 (observed a few 1e-7 to 1e-6). The pass's own
outputs must be bitwise those of the plain pass; the rows' statistics agree with
those the child's own pass computes from the rows to 1e-12 in float64 and 1e-6 in
float32.
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_kernels
from exposure_slot.ops import slot_attention_pass_rows
from test_slot_attention_pass import (ATTN_EPS, NORM_EPS, Case, assert_identical, assert_matches,
                                      case_id)
from test_slot_attention_pass_hand_down import PARITY, child_norms, hand_down_of, small_case

F, T = False, True
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}
STATS_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-6}


def prompts_of(case, *, batched=False, seed=0):
    return hand_down_of(case, batched_prompts=batched, seed=seed)[0]


def row_grads_of(case, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(case.k_in.shape, generator=gen, dtype=torch.float64)
                 .to(case.k_in.dtype) for _ in range(2))


def run_rows(case, backend, prompts, stats=None):
    return slot_attention_pass_rows(
        case.k_in, case.v_in, *child_norms(case), case.stage_bases, case.masks, case.tables,
        case.factor_stages, case.queries, stats, NORM_EPS, ATTN_EPS, prompts, backend=backend)


def forward_backward(case, backend, prompts, row_grads, stats=None):
    """The six outputs and the gradients of the five differentiable ones (weighted by
    case.grads and row_grads) w.r.t. every input tensor and the prompts."""
    leaves = [t.detach().requires_grad_() for t in case.tensors()]
    leaf_prompts = prompts.detach().requires_grad_()
    outputs = run_rows(case.with_tensors(leaves), backend, leaf_prompts, stats)
    assert not outputs[3].requires_grad
    weighted = [*outputs[:3], *outputs[4:]]
    loss = sum((o * g).sum() for o, g in zip(weighted, [*case.grads, *row_grads], strict=True))
    grads = torch.autograd.grad(loss, leaves + [leaf_prompts])
    return [o.detach() for o in outputs] + list(grads)


def op_args(case, prompts, stats=None):
    """The compiled op's arguments (the norms with the child's row)."""
    args = case.op_args(stats)
    return (*args[:2], *child_norms(case), *args[6:], prompts)


@requires_kernels
@pytest.mark.parametrize("B,N,C,K,layout", [c[:5] for c in PARITY],
                         ids=[case_id(*c[:5]) for c in PARITY])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_and_the_plain_pass(B, N, C, K, layout, dtype):
    case = Case(B, N, C, K, layout, seed=N + C + K)
    D = len(layout)
    prompts = prompts_of(case, batched=B > 1, seed=K)
    row_grads = row_grads_of(case)
    expected = forward_backward(case, "reference", prompts, row_grads)
    low = case.to(dtype)
    actual = forward_backward(low, "cpu", prompts.to(dtype), tuple(g.to(dtype) for g in row_grads))
    assert actual[3].shape == (B, N, D + 1, 4)
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a.double(), e, TOLERANCES[dtype])
    # The pass itself is untouched by the rows: bitwise the plain pass.
    plain = low.run("cpu")
    assert_identical(actual[:3], plain[:3])
    assert torch.equal(actual[3][:, :, :D], plain[3])


@requires_kernels
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(3, F)])]], ids=["D1-plain", "D1-base"])
def test_matches_reference_with_large_outputs(layout):
    # Gradients of k_in, v_in and the base past 16 MB: written in non-temporal stores.
    case = Case(2, 8209, 128, 3, layout, seed=3)
    prompts = prompts_of(case, batched=True, seed=4)
    row_grads = row_grads_of(case)
    expected = forward_backward(case, "reference", prompts, row_grads)
    for a, e in zip(forward_backward(case, "cpu", prompts, row_grads), expected, strict=True):
        assert_matches(a, e, TOLERANCES[torch.float64])


@requires_kernels
def test_non_contiguous_inputs():
    case = Case(3, 263, 16, 5, [(T, [(3, F)]), (T, [])], seed=3)
    prompts = prompts_of(case, batched=True, seed=4)

    def strided(t):  # the same values through a transposed, stepped view
        wide = torch.empty(*t.shape[:-2], t.shape[-1], 2 * t.shape[-2], dtype=t.dtype)
        view = wide.transpose(-1, -2)[..., ::2, :]
        view.copy_(t)
        assert not view.is_contiguous()
        return view

    noncontig = case.with_tensors([strided(t) if t.dim() >= 2 and t.shape[-2] > 1 else t
                                   for t in case.tensors()])
    noncontig.grads = tuple(strided(g) for g in case.grads)
    row_grads = row_grads_of(case)
    expected = forward_backward(case, "reference", prompts, row_grads)
    actual = forward_backward(noncontig, "cpu", strided(prompts),
                              tuple(strided(g) for g in row_grads))
    for a, e in zip(actual, expected, strict=True):
        assert_matches(a, e, TOLERANCES[torch.float64])


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_statistics_are_the_childs_own(dtype):
    """stats[:, :, D] is what the child's pass over the rows computes for its stage,
    and the child given them computes what it computes without them."""
    case = Case(3, 1031, 64, 7, [(T, [(3, F)]), (T, [(10, F)])], dtype=dtype, seed=5)
    outputs = run_rows(case, "cpu", prompts_of(case, seed=6))
    stats, rows_k, rows_v = outputs[3], outputs[4], outputs[5]
    child = case.with_tensors(case.tensors())
    child.k_in, child.v_in = rows_k, rows_v
    child.norms = [n[-1:] for n in child_norms(case)]
    child.stage_bases, child.masks, child.tables, child.factor_stages = [None], [], [], []
    own = child.run("cpu")
    assert_matches(stats[:, :, -1:], own[3], STATS_TOLERANCES[dtype])
    given = child.run("cpu", stats[:, :, -1:].contiguous())
    for a, e in zip(given[:3], own[:3], strict=True):
        assert_matches(a, e, TOLERANCES[dtype])


@requires_kernels
def test_stats_cache_is_used_and_gives_bitwise_the_same_results():
    case = Case(2, 263, 64, 5, [(F, [(3, F)]), (T, [(7, T)])], seed=13)
    prompts, row_grads = prompts_of(case, seed=14), row_grads_of(case)
    first = forward_backward(case, "cpu", prompts, row_grads)
    for S in range(3):
        again = forward_backward(case, "cpu", prompts, row_grads,
                                 stats=first[3][:, :, :S].contiguous())
        assert_identical(again, first)


@requires_kernels
def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    case = Case(2, 5003, 128, 7, [(F, [(3, F)]), (T, [(7, T), (10, F)])],
                dtype=torch.float32, seed=37)
    prompts, row_grads = prompts_of(case, seed=38), row_grads_of(case)
    first = forward_backward(case, "cpu", prompts, row_grads)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert_identical(forward_backward(case, "cpu", prompts, row_grads), first)


# ---------------------------------------------------------------- torch.library


@requires_kernels
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(3, F)]), (F, [(2, T), (3, F)])]],
                         ids=["D1-plain", "D2-mixed"])
def test_opcheck(layout):
    case = Case(2, 260, 8, 3, layout, seed=23)
    prompts = prompts_of(case, batched=True, seed=24)
    with_grad = lambda a: ([t.detach().requires_grad_() for t in a]
                           if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                           else a.detach().requires_grad_() if isinstance(a, torch.Tensor) else a)
    ops = torch.ops.exposure_slot
    torch.library.opcheck(ops.slot_attention_pass_rows,
                          tuple(map(with_grad, op_args(case, prompts))))
    attn, _, _, stats, _, _ = run_rows(case, "cpu", prompts)
    for cached in (None, stats):  # the forward's stats, as the autograd formula passes them
        args = op_args(case, prompts, cached)
        torch.library.opcheck(ops.slot_attention_pass_rows_backward,
                              (*case.grads, *row_grads_of(case), *args[:13], attn, NORM_EPS,
                               ATTN_EPS, prompts))


@requires_kernels
def test_gradcheck_across_the_chunk_boundary():
    # N = 260 crosses the kernel's 256-token reduction chunk.
    case = Case(2, 260, 6, 3, [(T, [(2, F)]), (F, [(3, T)])], seed=29)
    prompts = prompts_of(case, seed=30)
    tensors = tuple(t.detach().requires_grad_() for t in [*case.tensors(), prompts])

    def fused(*flat):
        outputs = run_rows(case.with_tensors(flat[:-1]), "cpu", flat[-1])
        return (*outputs[:3], *outputs[4:])

    assert torch.autograd.gradcheck(fused, tensors, fast_mode=True)


@requires_kernels
def test_fake_kernels_on_meta_tensors():
    case = small_case()
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else (
        [meta(e) for e in t] if isinstance(t, list) else t)
    ops = torch.ops.exposure_slot
    args = [meta(a) for a in op_args(case, prompts_of(case, seed=42))]
    outputs = ops.slot_attention_pass_rows(*args)
    assert [list(t.shape) for t in outputs] == [
        [2, 3, 10], [2, 3], [2, 3, 8], [2, 10, 3, 4], [2, 10, 8], [2, 10, 8]]
    grads = ops.slot_attention_pass_rows_backward(
        *map(meta, case.grads), *map(meta, row_grads_of(case)), *args[:13], outputs[0], NORM_EPS,
        ATTN_EPS, args[-1])
    assert [t.shape for t in grads[:6]] == [t.shape for t in args[:6]]
    assert grads[-1].shape == args[-1].shape
    assert all(t.device.type == "meta" for t in [*grads[:6], grads[-1]])


# ---------------------------------------------------------------- errors


def test_wrapper_rejects_other_backends_and_bad_prompts():
    case = small_case()
    prompts = prompts_of(case, seed=44)
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="compiled for the 'cpu' backend only"):
            run_rows(case, backend, prompts)
    with pytest.raises(ValueError, match=r"prompts must be \[B or 1, K, C\] = \[2 or 1, 3, 8\]"):
        run_rows(case, "reference", prompts[:, :2])
    with pytest.raises(ValueError, match=r"norm_k_weight must be \[D \+ 1, C\], a row per stage "
                                         r"and one for the child.s, with D = 2 stages"):
        slot_attention_pass_rows(
            case.k_in, case.v_in, *case.norms, case.stage_bases, case.masks, case.tables,
            case.factor_stages, case.queries, None, NORM_EPS, ATTN_EPS, prompts)


@requires_kernels
def test_compiled_backward_rejects_bad_arguments():
    case = small_case()
    prompts = prompts_of(case, seed=45)
    attn = run_rows(case, "cpu", prompts)[0]
    op = torch.ops.exposure_slot.slot_attention_pass_rows_backward
    args = op_args(case, prompts)
    grad_k, grad_v = row_grads_of(case)
    with pytest.raises(RuntimeError, match=r"grad_rows_k must be \[B, N, C\] like k_in"):
        op(*case.grads, grad_k[:, :9], grad_v, *args[:13], attn, NORM_EPS, ATTN_EPS, prompts)
    with pytest.raises(RuntimeError,
                       match="all tensors must share one dtype, but grad_rows_v is Float"):
        op(*case.grads, grad_k, grad_v.float(), *args[:13], attn, NORM_EPS, ATTN_EPS, prompts)
    with pytest.raises(RuntimeError, match=r"prompts must be \[B or 1, K, C\]"):
        op(*case.grads, grad_k, grad_v, *args[:13], attn, NORM_EPS, ATTN_EPS, prompts[:, :2])
