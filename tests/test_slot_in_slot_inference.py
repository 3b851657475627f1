"""The slot-in-slot inference op (CPU): the whole forward of SlotInSlotAttention
without autograd in one call. Its parity with the float64 reference backend, over
levels 1-3, K 1-16, C, N and B, is tested through the module in
tests/test_slot_in_slot_fused.py (the module calls this op under inference on
"cpu"); here: the op against the module's other fused path (the same ops driven from
Python, as under autograd), its torch.library registration, determinism and errors.

Tolerances, relative to the largest magnitude of the expected tensor:
- the op vs the module's fused path with autograd on, float64: 1e-12 (the op fuses
  the slot update into one kernel and the parent's hand-down into its pass, and its
  leaf reads the input rows its parent wrote rather than recomputing them; each
  sums and rounds in another order; observed ~1e-15).
Repeated runs, and runs on 1 or 2 threads, must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from conftest import requires_kernels
from exposure_slot.ops import slot_in_slot_inference
from test_slot_in_slot_fused import flat, make_inputs, make_pair

OP = getattr(torch.ops.exposure_slot, "slot_in_slot_inference", None)
F64_TOL = 1e-12


def op_args(module, k, v):
    """The op's arguments for ``module`` (parameters detached) and inputs k, v."""
    args = slot_in_slot_inference.level_args(module.levels)
    return (k, v, *[a.detach() if isinstance(a, torch.Tensor) else
                    [t.detach() if isinstance(t, torch.Tensor) else t for t in a] for a in args],
            module.iters, 1e-8)


@requires_kernels
@pytest.mark.parametrize("slots,B,N,C,iters", [
    ((5,), 2, 37, 16, 3),
    ((3, 7), 1, 1000, 64, 3),
    ((3, 7, 10), 3, 263, 32, 2),
    ((3, 7, 10), 1, 77, 16, 1),  # one iteration: every level's only pass is its first
    ((1, 16, 2), 1, 1, 16, 3),
    # four levels: a middle level's later passes run the chain from k_in with its
    # own and the top level's factors
    ((3, 4, 5, 6), 2, 129, 16, 3),
])
def test_matches_the_fused_path_with_autograd(slots, B, N, C, iters):
    _, module = make_pair(C, slots, iters)
    k, v = make_inputs(B, N, C)
    with torch.no_grad():
        actual = flat(OP(*op_args(module, k, v)))
    # With autograd on, the module drives the same ops from Python: the passes
    # without the hand-down, the slot update as ATen ops.
    expected = [t.detach() for t in flat(module(k, v))]
    assert len(actual) == len(expected) == 2 + len(slots)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        scale = e.abs().max().item()
        assert (a - e).abs().max().item() <= F64_TOL * scale


@requires_kernels
def test_the_module_uses_it_under_inference():
    module = make_pair(32, (3, 7))[1].float()
    k, v = make_inputs(2, 300, 32, dtype=torch.float32)
    with torch.inference_mode():
        expected = flat(OP(*op_args(module, k, v)))
        actual = flat(module(k, v))
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@requires_kernels
@pytest.mark.parametrize("slots", [(4,), (3, 7), (3, 7, 10), (2, 3, 4, 5)],
                         ids=["level1", "level2", "level3", "level4"])
def test_opcheck(slots):
    _, module = make_pair(16, slots, iters=2)
    k, v = make_inputs(2, 41, 16)
    torch.library.opcheck(OP, op_args(module, k, v))


@requires_kernels
def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    module = make_pair(32, (3, 7, 10))[1].float()
    k, v = make_inputs(2, 3000, 32, dtype=torch.float32, seed=3)
    results = []
    for threads in (2, 1, 2):
        torch.set_num_threads(threads)
        with torch.no_grad():
            results.append(flat(OP(*op_args(module, k, v))))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))


@requires_kernels
def test_errors_name_the_problem():
    _, module = make_pair(16, (3, 7))
    k, v = make_inputs(1, 10, 16)
    args = list(op_args(module, k, v))
    bad = lambda index, value: args[:index] + [value] + args[index + 1:]
    with pytest.raises(RuntimeError, match=r"norm_k_weight must be \[L, C\]"):
        OP(*bad(2, args[2][:1]))
    with pytest.raises(RuntimeError, match="one entry per level in slots_mu, prompts"):
        OP(*bad(7, args[7][:1]))
    with pytest.raises(RuntimeError, match="14 per level in update_weights"):
        OP(*bad(8, args[8][:-1]))
    with pytest.raises(RuntimeError, match="iters must be >= 1"):
        OP(*bad(12, 0))
    with pytest.raises(RuntimeError, match=r"slots_mu\[1\] must be \[1, K, C\]"):
        OP(*bad(6, [args[6][0], args[6][1][..., :8]]))
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        OP(*bad(0, k.half()))
    with pytest.raises(RuntimeError, match="all tensors must share one dtype"):
        OP(*bad(1, v.float()))
    # The fake kernel (torch.compile) names the same problems.
    with pytest.raises(ValueError, match=r"norm_v_bias must be \[L, C\] = \[2, 16\]"):
        slot_in_slot_inference.check_args(*bad(5, args[5][:, :8]))
    with pytest.raises(ValueError, match="prompts needs one entry per level"):
        slot_in_slot_inference.check_args(*bad(7, args[7][:1]))
