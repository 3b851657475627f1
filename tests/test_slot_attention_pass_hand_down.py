"""The hand-down pass op (a parent level's pass under inference, backend "cpu"): the
compiled CPU kernel against its PyTorch twin and against the plain pass, its
torch.library registration, determinism, and its errors.

``slot_attention_pass_hand_down`` is ``slot_attention_pass`` plus what the parent
hands its child: ``hand_down <- m * pf`` (m: the last stage's modulation, pf the
mixture of the prompts by the pass's attention) and one more stage of ``stats``,
the statistics of the child's first LayerNorm; see
``exposure_slot.ops.slot_attention_pass``.

Tolerances, relative to the largest magnitude of the expected tensor (as for the
plain pass): float64 kernel vs float64 twin 1e-12; float32 kernel vs float64 twin
1e-5. The pass's own outputs must be bitwise those of the plain pass (the
hand-down only adds work after them); the child's statistics agree with those the
child's own pass computes to 1e-12 in float64 and 1e-6 in float32 (the kernel takes
them from k * pf, the child from y * (m * pf): the same values up to rounding).
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

PARITY = [  # B, N, C, K, layout: the last stage is the parent's own
    (1, 1, 16, 3, [(F, [])]),
    (3, 2, 64, 1, [(T, [])]),
    (1, 97, 128, 16, [(F, [(3, F)])]),
    (3, 257, 256, 3, [(T, [(7, F), (10, T)])]),
    (3, 1031, 16, 7, [(F, [(3, F)]), (F, [])]),
    (1, 263, 64, 7, [(T, []), (T, [(10, F)])]),
    (3, 97, 128, 10, [(T, [(3, F)]), (T, [(7, T)]), (T, [])]),
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


def run_hand_down(case, backend, prompts, target, stats=None, alias=False):
    """(the four outputs, the hand-down): with ``alias``, ``target`` is the last
    stage's base too, as the module passes it."""
    bases = list(case.stage_bases)
    if alias:
        bases[-1] = target
    outputs = slot_attention_pass_hand_down(
        case.k_in, case.v_in, *case.norms, bases, case.masks, case.tables, case.factor_stages,
        case.queries, stats, NORM_EPS, ATTN_EPS, prompts, target, backend=backend)
    return outputs, target


def child_of(case, hand_down):
    """The child's pass: the parent's stages before its own unchanged, the parent's
    own stage with the hand-down as its whole modulation (its factors are in it),
    and the child's own stage (no modulation yet)."""
    gen = torch.Generator().manual_seed(99)
    D = len(case.stage_bases)
    C = case.k_in.shape[-1]
    child = case.with_tensors(case.tensors())
    child.norms = [torch.cat([n, 1 + 0.3 * torch.randn(1, C, generator=gen, dtype=n.dtype)])
                   for n in case.norms]
    child.stage_bases = list(case.stage_bases[:-1]) + [hand_down, None]
    keep = [j for j, s in enumerate(case.factor_stages) if s < D - 1]
    child.masks = [case.masks[j] for j in keep]
    child.tables = [case.tables[j] for j in keep]
    child.factor_stages = [case.factor_stages[j] for j in keep]
    child.queries = torch.randn(case.queries.shape[0], 5, C, generator=gen,
                                dtype=case.k_in.dtype) * (2.0 / C ** 0.5)
    return child


@requires_kernels
@pytest.mark.parametrize("B,N,C,K,layout", PARITY, ids=[case_id(*c) for c in PARITY])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_and_the_plain_pass(B, N, C, K, layout, dtype):
    case = Case(B, N, C, K, layout, seed=N + C + K)
    D = len(layout)
    for alias in ([False, True] if layout[-1][0] else [False]):
        prompts, target = hand_down_of(case, alias=alias, batched_prompts=B > 1, seed=K)
        expected, expected_hd = run_hand_down(case, "reference", prompts, target.clone(),
                                              alias=alias)
        low = case.to(dtype)
        actual, actual_hd = run_hand_down(low, "cpu", prompts.to(dtype), target.to(dtype),
                                          alias=alias)
        assert actual[3].shape == (B, N, D + 1, 4)
        for a, e in zip([*actual, actual_hd], [*expected, expected_hd], strict=True):
            assert_matches(a.double(), e, TOLERANCES[dtype])
        # The pass itself is untouched by the hand-down: bitwise the plain pass.
        plain = low.run("cpu")
        assert_identical(actual[:3], plain[:3])
        assert torch.equal(actual[3][:, :, :D], plain[3])


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_child_statistics_are_the_childs_own(dtype):
    """stats[:, :, D] is what the child's pass through the handed-down modulation
    computes for its stage D, and the child given them computes what it computes
    without them."""
    case = Case(3, 1031, 64, 7, [(T, [(3, F)]), (T, [(10, F)])], dtype=dtype, seed=5)
    prompts, target = hand_down_of(case, alias=True, seed=6)
    (_, _, _, stats), hand_down = run_hand_down(case, "cpu", prompts, target, alias=True)
    child = child_of(case, hand_down)
    own = child.run("cpu")
    assert_matches(stats, own[3], STATS_TOLERANCES[dtype])
    given = child.run("cpu", stats)
    for a, e in zip(given[:3], own[:3], strict=True):
        assert_matches(a, e, TOLERANCES[dtype])
    assert torch.equal(given[3], stats)  # taken as given, all D + 1 stages


@requires_kernels
def test_stats_cache_is_used_and_gives_bitwise_the_same_outputs():
    case = Case(2, 263, 64, 5, [(F, [(3, F)]), (T, [(7, T)])], seed=13)
    prompts, target = hand_down_of(case, seed=14)
    first, first_hd = run_hand_down(case, "cpu", prompts, target.clone())
    for S in range(3):
        again, again_hd = run_hand_down(case, "cpu", prompts, target.clone(),
                                        stats=first[3][:, :, :S].contiguous())
        assert_identical([*again, again_hd], [*first, first_hd])


@requires_kernels
def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    case = Case(2, 5003, 128, 7, [(F, [(3, F)]), (T, [(7, T), (10, F)])],
                dtype=torch.float32, seed=37)
    prompts, target = hand_down_of(case, alias=True, seed=38)
    first = run_hand_down(case, "cpu", prompts, target.clone(), alias=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        again = run_hand_down(case, "cpu", prompts, target.clone(), alias=True)
        assert_identical([*again[0], again[1]], [*first[0], first[1]])


# ---------------------------------------------------------------- torch.library


@requires_kernels
@pytest.mark.parametrize("layout", [[(F, [])], [(T, [(3, F)]), (F, [(2, T), (3, F)])]],
                         ids=["D1-plain", "D2-mixed"])
def test_opcheck(layout):
    case = Case(2, 260, 8, 3, layout, seed=23)
    prompts, target = hand_down_of(case, batched_prompts=True, seed=24)
    op = torch.ops.exposure_slot.slot_attention_pass_hand_down
    torch.library.opcheck(op, (*case.op_args(), prompts, target))
    stats = case.run("cpu")[3]
    torch.library.opcheck(op, (*case.op_args(stats[:, :, :1].contiguous()), prompts, target))


@requires_kernels
def test_fake_kernel_on_meta_tensors():
    case = Case(2, 10, 8, 3, [(T, [(3, F)]), (F, [(2, T)])], seed=41)
    meta = case.with_tensors([t.to("meta") for t in case.tensors()])
    prompts, target = hand_down_of(case, seed=42)
    attn, attn_sum, attn_v, stats = torch.ops.exposure_slot.slot_attention_pass_hand_down(
        *meta.op_args(), prompts.to("meta"), target.to("meta"))
    assert [list(t.shape) for t in (attn, attn_sum, attn_v, stats)] == [
        [2, 3, 10], [2, 3], [2, 3, 8], [2, 10, 3, 4]]
    assert all(t.device.type == "meta" for t in (attn, attn_sum, attn_v, stats))


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


@requires_kernels
@pytest.mark.parametrize("change,match", [
    (lambda p, t: (p[:, :2], t), r"prompts must be \[B or 1, K, C\]"),
    (lambda p, t: (p, t[:, :9]), r"hand_down must be \[B, N, C\] like k_in"),
    (lambda p, t: (p, t.transpose(0, 1).contiguous().transpose(0, 1)),
     "hand_down must be contiguous"),
    (lambda p, t: (p.float(), t), "all tensors must share one dtype, but prompts is Float"),
], ids=["prompts-slots", "hand-down-shape", "hand-down-not-contiguous", "prompts-dtype"])
def test_compiled_op_rejects_bad_arguments(change, match):
    case = small_case()
    prompts, target = change(*hand_down_of(case, seed=45))
    with pytest.raises(RuntimeError, match=match):
        torch.ops.exposure_slot.slot_attention_pass_hand_down(*case.op_args(), prompts, target)
