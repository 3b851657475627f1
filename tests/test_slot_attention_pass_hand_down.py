"""The hand-down pass op (a parent level's pass under inference, backend "cpu"): the
compiled CPU kernel against its PyTorch twin and against the plain pass, its
torch.library registration, determinism, and its errors.

``slot_attention_pass_hand_down`` is ``slot_attention_pass`` plus what the parent
hands its child: ``hand_down <- m * pf`` (m: the last stage's modulation, pf the
mixture of the prompts by the pass's attention), one more stage of ``stats``, the
statistics of the child's first LayerNorm, and, given the child's first queries,
the child's first pass; see ``exposure_slot.ops.slot_attention_pass``.

Tolerances, relative to the largest magnitude of the expected tensor (as for the
plain pass): float64 kernel vs float64 twin 1e-12; float32 kernel vs float64 twin
1e-5. The pass's own outputs must be bitwise those of the plain pass (the
hand-down only adds work after them); the child's statistics and its first pass
agree with those the child's own pass computes to 1e-12 in float64, and to 1e-6
(statistics) and 1e-5 (the pass) in float32 (the kernel takes them from k * pf,
the child from y * (m * pf): the same values up to rounding).
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_kernels
from exposure_slot.ops import slot_attention_pass, slot_attention_pass_hand_down
from test_slot_attention_pass import (ATTN_EPS, NORM_EPS, Case, assert_identical, assert_matches,
                                      case_id)

F, T = False, True
TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}
STATS_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-6}

PARITY = [  # B, N, C, K, layout: the last stage is the parent's own; K_c: the child's
    (1, 1, 16, 3, [(F, [])], 1),
    (3, 2, 64, 1, [(T, [])], 7),
    (1, 97, 128, 16, [(F, [(3, F)])], 16),
    (3, 257, 256, 3, [(T, [(7, F), (10, T)])], 7),
    (3, 1031, 16, 7, [(F, [(3, F)]), (F, [])], 10),
    (1, 263, 64, 7, [(T, []), (T, [(10, F)])], 3),
    (3, 97, 128, 10, [(T, [(3, F)]), (T, [(7, T)]), (T, [])], 5),
]


def hand_down_of(case, *, alias=False, batched_prompts=False, seed=0):
    """Prompts for ``case`` and the tensor its hand-down goes into: the last stage's
    base (in place) or a fresh one."""
    gen = torch.Generator().manual_seed(seed)
    B, K = case.queries.shape[:2]
    C = case.k_in.shape[-1]
    prompts = 0.2 + torch.randn(B if batched_prompts else 1, K, C, generator=gen,
                                dtype=case.k_in.dtype)
    if alias:
        assert case.stage_bases[-1] is not None
        return prompts, case.stage_bases[-1].clone()
    return prompts, torch.full_like(case.k_in, float("nan"))  # every value must be written


def child_norms(case):
    """The norms down to the child's stage: the case's D rows and the child's."""
    gen = torch.Generator().manual_seed(99)
    C = case.k_in.shape[-1]
    return [torch.cat([n, (1 if r % 2 == 0 else 0) + 0.3 * torch.randn(
        1, C, generator=gen, dtype=torch.float64).to(n.dtype)]) for r, n in enumerate(case.norms)]


def child_queries_of(case, slots, seed=98):
    gen = torch.Generator().manual_seed(seed)
    B, _, C = case.k_in.shape
    return (torch.randn(B, slots, C, generator=gen, dtype=torch.float64) * (2.0 / C ** 0.5)
            ).to(case.k_in.dtype)


def run_hand_down(case, backend, prompts, target, stats=None, alias=False, child_queries=None):
    """(the seven outputs, the hand-down): with ``alias``, ``target`` is the last
    stage's base too, as the module passes it."""
    bases = list(case.stage_bases)
    if alias:
        bases[-1] = target
    outputs = slot_attention_pass_hand_down(
        case.k_in, case.v_in, *child_norms(case), bases, case.masks, case.tables,
        case.factor_stages, case.queries, stats, NORM_EPS, ATTN_EPS, prompts, target,
        child_queries, backend=backend)
    return outputs, target


def op_args(case, stats=None):
    """The compiled hand-down op's leading arguments (the norms with the child's row)."""
    args = case.op_args(stats)
    return (*args[:2], *child_norms(case), *args[6:])


def child_of(case, hand_down, child_queries):
    """The child's pass: the parent's stages before its own unchanged, the parent's
    own stage with the hand-down as its whole modulation (its factors are in it),
    and the child's own stage (no modulation yet)."""
    D = len(case.stage_bases)
    child = case.with_tensors(case.tensors())
    child.norms = child_norms(case)
    child.stage_bases = list(case.stage_bases[:-1]) + [hand_down, None]
    keep = [j for j, s in enumerate(case.factor_stages) if s < D - 1]
    child.masks = [case.masks[j] for j in keep]
    child.tables = [case.tables[j] for j in keep]
    child.factor_stages = [case.factor_stages[j] for j in keep]
    child.queries = child_queries
    return child


@requires_kernels
@pytest.mark.parametrize("B,N,C,K,layout,Kc", PARITY, ids=[case_id(*c[:5]) + f"-Kc{c[5]}"
                                                            for c in PARITY])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_and_the_plain_pass(B, N, C, K, layout, Kc, dtype):
    case = Case(B, N, C, K, layout, seed=N + C + K)
    D = len(layout)
    for alias, slots in ([(False, None), (False, Kc), (True, Kc)] if layout[-1][0]
                         else [(False, None), (False, Kc)]):
        prompts, target = hand_down_of(case, alias=alias, batched_prompts=B > 1, seed=K)
        child_queries = None if slots is None else child_queries_of(case, slots)
        expected, expected_hd = run_hand_down(case, "reference", prompts, target.clone(),
                                              alias=alias, child_queries=child_queries)
        low = case.to(dtype)
        actual, actual_hd = run_hand_down(
            low, "cpu", prompts.to(dtype), target.to(dtype), alias=alias,
            child_queries=None if slots is None else child_queries.to(dtype))
        assert actual[3].shape == (B, N, D + 1, 4)
        assert actual[4].shape == (B, slots or 0, N)
        for a, e in zip([*actual, actual_hd], [*expected, expected_hd], strict=True):
            if e.numel() == 0:  # no child pass asked for
                assert a.shape == e.shape
            else:
                assert_matches(a.double(), e, TOLERANCES[dtype])
        # The pass itself is untouched by the hand-down: bitwise the plain pass.
        plain = low.run("cpu")
        assert_identical(actual[:3], plain[:3])
        assert torch.equal(actual[3][:, :, :D], plain[3])


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_child_statistics_and_first_pass_are_the_childs_own(dtype):
    """stats[:, :, D] is what the child's pass through the handed-down modulation
    computes for its stage D, the child given them computes what it computes
    without them, and the hand-down's run of the child's first pass is the child's
    own pass with those queries."""
    case = Case(3, 1031, 64, 7, [(T, [(3, F)]), (T, [(10, F)])], dtype=dtype, seed=5)
    prompts, target = hand_down_of(case, alias=True, seed=6)
    child_queries = child_queries_of(case, 10)
    outputs, hand_down = run_hand_down(case, "cpu", prompts, target, alias=True,
                                       child_queries=child_queries)
    stats, child_first = outputs[3], outputs[4:]
    child = child_of(case, hand_down, child_queries)
    own = child.run("cpu")
    assert_matches(stats, own[3], STATS_TOLERANCES[dtype])
    given = child.run("cpu", stats)
    for a, e in zip(given[:3], own[:3], strict=True):
        assert_matches(a, e, TOLERANCES[dtype])
    assert torch.equal(given[3], stats)  # taken as given, all D + 1 stages
    for a, e in zip(child_first, own[:3], strict=True):
        assert_matches(a, e, TOLERANCES[dtype])


@requires_kernels
def test_stats_cache_is_used_and_gives_bitwise_the_same_outputs():
    case = Case(2, 263, 64, 5, [(F, [(3, F)]), (T, [(7, T)])], seed=13)
    prompts, target = hand_down_of(case, seed=14)
    child_queries = child_queries_of(case, 4)
    first, first_hd = run_hand_down(case, "cpu", prompts, target.clone(),
                                    child_queries=child_queries)
    for S in range(3):
        again, again_hd = run_hand_down(case, "cpu", prompts, target.clone(),
                                        stats=first[3][:, :, :S].contiguous(),
                                        child_queries=child_queries)
        assert_identical([*again, again_hd], [*first, first_hd])


@requires_kernels
def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    case = Case(2, 5003, 128, 7, [(F, [(3, F)]), (T, [(7, T), (10, F)])],
                dtype=torch.float32, seed=37)
    prompts, target = hand_down_of(case, alias=True, seed=38)
    child_queries = child_queries_of(case, 10)
    first = run_hand_down(case, "cpu", prompts, target.clone(), alias=True,
                          child_queries=child_queries)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        again = run_hand_down(case, "cpu", prompts, target.clone(), alias=True,
                              child_queries=child_queries)
        assert_identical([*again[0], again[1]], [*first[0], first[1]])


# ---------------------------------------------------------------- torch.library


@requires_kernels
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(3, F)]), (F, [(2, T), (3, F)])]],
                         ids=["D1-plain", "D2-mixed"])
def test_opcheck(layout):
    case = Case(2, 260, 8, 3, layout, seed=23)
    prompts, target = hand_down_of(case, batched_prompts=True, seed=24)
    op = torch.ops.exposure_slot.slot_attention_pass_hand_down
    torch.library.opcheck(op, (*op_args(case), prompts, target, None))
    stats = case.run("cpu")[3]
    torch.library.opcheck(op, (*op_args(case, stats[:, :, :1].contiguous()), prompts, target,
                               child_queries_of(case, 5)))


@requires_kernels
def test_fake_kernel_on_meta_tensors():
    case = Case(2, 10, 8, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=41)
    prompts, target = hand_down_of(case, seed=42)
    meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else (
        [meta(e) for e in t] if isinstance(t, list) else t)
    op = torch.ops.exposure_slot.slot_attention_pass_hand_down
    for child_queries, Kc in [(None, 0), (child_queries_of(case, 5).to("meta"), 5)]:
        outputs = op(*map(meta, op_args(case)), prompts.to("meta"), target.to("meta"),
                     child_queries)
        assert [list(t.shape) for t in outputs] == [
            [2, 3, 10], [2, 3], [2, 3, 8], [2, 10, 3, 4], [2, Kc, 10], [2, Kc], [2, Kc, 8]]
        assert all(t.device.type == "meta" for t in outputs)


# ---------------------------------------------------------------- errors


def small_case():
    return Case(2, 10, 8, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=41)


HAND_DOWN_ERRORS = [
    ("prompts-slots", lambda p, t: (p[:, :2], t), ValueError,
     r"prompts must be \[B or 1, K, C\] = \[2 or 1, 3, 8\]"),
    ("prompts-channels", lambda p, t: (p[..., :7], t), ValueError,
     r"prompts must be \[B or 1, K, C\]"),
    ("hand-down-shape", lambda p, t: (p, t[:, :9]), ValueError,
     r"hand_down must be \[B, N, C\] like k_in"),
    ("hand-down-not-contiguous", lambda p, t: (p, t.transpose(0, 1).contiguous().transpose(0, 1)),
     ValueError, "hand_down must be contiguous"),
    ("hand-down-dtype", lambda p, t: (p, t.float()), TypeError, "share one dtype"),
    ("prompts-device", lambda p, t: (p.to("meta"), t), ValueError, "one device"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("change,error,match", [e[1:] for e in HAND_DOWN_ERRORS],
                         ids=[e[0] for e in HAND_DOWN_ERRORS])
def test_wrapper_rejects_bad_arguments(backend, change, error, match):
    case = small_case()
    prompts, target = change(*hand_down_of(case, seed=43))
    with pytest.raises(error, match=match):
        run_hand_down(case, backend, prompts, target)


def test_wrapper_rejects_other_backends_and_autograd():
    case = small_case()
    prompts, target = hand_down_of(case, seed=44)
    for backend in ("triton", "cuda"):
        with pytest.raises(ValueError, match="compiled for the 'cpu' backend only"):
            run_hand_down(case, backend, prompts, target)
    with pytest.raises(RuntimeError, match="for inference, with no autograd"):
        run_hand_down(case, "reference", prompts.requires_grad_(), target)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_wrapper_rejects_bad_child_arguments(backend):
    case = small_case()
    prompts, target = hand_down_of(case, seed=46)
    with pytest.raises(ValueError, match=r"child_queries must be \[B, K_c, C\] = \[2, K_c >= 1, 8\]"):
        run_hand_down(case, backend, prompts, target, child_queries=child_queries_of(case, 4)[:1])
    with pytest.raises(ValueError, match=r"norm_k_weight must be \[D \+ 1, C\], a row per stage and "
                                         r"one for the child.s, with D = 2 stages"):
        slot_attention_pass_hand_down(
            case.k_in, case.v_in, *case.norms, case.stage_bases, case.masks, case.tables,
            case.factor_stages, case.queries, None, NORM_EPS, ATTN_EPS, prompts, target,
            backend=backend)


@requires_kernels
@pytest.mark.parametrize("change,match", [
    (lambda p, t, q: (p[:, :2], t, q), r"prompts must be \[B or 1, K, C\]"),
    (lambda p, t, q: (p, t[:, :9], q), r"hand_down must be \[B, N, C\] like k_in"),
    (lambda p, t, q: (p, t.transpose(0, 1).contiguous().transpose(0, 1), q),
     "hand_down must be contiguous"),
    (lambda p, t, q: (p.float(), t, q), "all tensors must share one dtype, but prompts is Float"),
    (lambda p, t, q: (p, t, q[..., :7]), r"child_queries must be \[B, K_c, C\]"),
    (lambda p, t, q: (p, t, q.float()), "child_queries"),
], ids=["prompts-slots", "hand-down-shape", "hand-down-not-contiguous", "prompts-dtype",
        "child-queries-shape", "child-queries-dtype"])
def test_compiled_op_rejects_bad_arguments(change, match):
    case = small_case()
    prompts, target, child_queries = change(*hand_down_of(case, seed=45),
                                            child_queries_of(case, 4))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.exposure_slot.slot_attention_pass_hand_down(*op_args(case), prompts, target,
                                                              child_queries)


@requires_kernels
def test_compiled_op_wants_the_childs_norm_row():
    case = small_case()
    prompts, target = hand_down_of(case, seed=47)
    with pytest.raises(RuntimeError, match=r"norm_k_bias must be \[D \+ 1, C\]"):
        args = list(op_args(case))
        args[3] = case.norms[1]  # norm_k_bias without the child's row
        torch.ops.exposure_slot.slot_attention_pass_hand_down(*args, prompts, target, None)
