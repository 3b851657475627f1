"""The slot update op (CPU, inference): against its PyTorch twin, the twin against
``SlotLevel``'s own ATen steps, its torch.library registration, determinism and
errors.

Tolerances, relative to the largest magnitude of the expected output:
- float64 kernel vs float64 twin: 1e-12 (sums in another order; observed ~1e-15);
- float32 kernel vs float64 twin on the same values: 2e-6 (five chained C x C
  products and two LayerNorms in float32; observed 1-3e-7);
- the twin vs SlotLevel.update/refine and the queries as the reference backend
  forms them, float64: 1e-14 (the same ATen ops, one reshape apart).
Repeated runs, and runs on 1 or 2 threads, must agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import requires_kernels
from exposure_slot import ops
from exposure_slot.ops.slot_update import WEIGHT_NAMES, level_weights, slot_update_reference
from exposure_slot.slot_attention import SlotLevel

TOLERANCES = {torch.float64: 1e-12, torch.float32: 2e-6}


def make_case(batch, slots, channels, seed, dtype=torch.float64):
    """A level with random (not default-initialised) parameters and the inputs of one
    update: slots, a pass's positive attn_sum and its attn_v."""
    gen = torch.Generator().manual_seed(seed)
    level = SlotLevel(channels, slots).to(dtype)
    with torch.no_grad():
        for p in level.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) / channels ** 0.5)
        level.norm_pre_ff.weight.add_(1)  # LayerNorm gains around 1, as trained
        level.norm_slots.weight.add_(1)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    slots_in = rand(batch, slots, channels)
    attn_sum = torch.rand(batch, slots, generator=gen, dtype=dtype) * 50 + 0.5
    attn_v = rand(batch, slots, channels) * attn_sum.unsqueeze(-1)
    return level, slots_in, attn_sum, attn_v


def run(level, slots, attn_sum, attn_v, backend, dtype=None):
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    with torch.no_grad():
        return ops.slot_update(cast(slots), cast(attn_sum), cast(attn_v),
                               [cast(w) for w in level_weights(level)], level.scale,
                               level.norm_slots.eps, backend=backend)


def assert_close(actual, expected, rel):
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x {scale:.3g}"


def test_twin_is_the_levels_aten_steps():
    level, slots, attn_sum, attn_v = make_case(3, 7, 32, seed=1)
    with torch.no_grad():
        expected = level.refine(level.update(slots, attn_v / attn_sum.unsqueeze(-1)))
        queries = level.to_q(level.norm_slots(expected)) * level.scale
        new_slots, new_queries = run(level, slots, attn_sum, attn_v, "reference")
    assert_close(new_slots, expected, 1e-14)
    assert_close(new_queries, queries, 1e-14)


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,slots,channels", [(1, 3, 128), (1, 10, 128), (3, 7, 64),
                                                  (3, 16, 16), (1, 1, 256), (2, 5, 24)])
def test_matches_the_twin(dtype, batch, slots, channels):
    level, s, attn_sum, attn_v = make_case(batch, slots, channels, seed=batch * 100 + slots)
    expected = run(level, s, attn_sum, attn_v, "reference")
    actual = run(level, s, attn_sum, attn_v, "cpu", dtype)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, TOLERANCES[dtype])


@requires_kernels
@settings(max_examples=25, deadline=None)
@given(batch=st.integers(1, 3), slots=st.integers(1, 16), channels=st.integers(1, 70),
       seed=st.integers(0, 2 ** 16))
def test_matches_the_twin_on_any_shape(batch, slots, channels, seed):
    level, s, attn_sum, attn_v = make_case(batch, slots, channels, seed)
    expected = run(level, s, attn_sum, attn_v, "reference")
    for a, e in zip(run(level, s, attn_sum, attn_v, "cpu"), expected, strict=True):
        assert_close(a, e, TOLERANCES[torch.float64])


@requires_kernels
def test_non_contiguous_inputs():
    level, s, attn_sum, attn_v = make_case(2, 7, 32, seed=3)
    expected = run(level, s, attn_sum, attn_v, "reference")
    s_t = s.transpose(0, 1).contiguous().transpose(0, 1)
    attn_v_t = attn_v.transpose(1, 2).contiguous().transpose(1, 2)
    sum_t = attn_sum.t().contiguous().t()
    assert not (s_t.is_contiguous() or attn_v_t.is_contiguous() or sum_t.is_contiguous())
    for a, e in zip(run(level, s_t, sum_t, attn_v_t, "cpu"), expected, strict=True):
        assert_close(a, e, TOLERANCES[torch.float64])
    # The first iteration's slots: slots_mu expanded over the batch (stride 0).
    mu = level.slots_mu.detach().expand(2, -1, -1)
    expected = run(level, mu.contiguous(), attn_sum, attn_v, "reference")
    for a, e in zip(run(level, mu, attn_sum, attn_v, "cpu"), expected, strict=True):
        assert_close(a, e, TOLERANCES[torch.float64])


@requires_kernels
def test_bitwise_repeatable_and_thread_count_independent(restore_threads):
    level, s, attn_sum, attn_v = make_case(3, 10, 128, seed=4, dtype=torch.float32)
    outs = []
    for threads in (1, 2, 2):
        torch.set_num_threads(threads)
        outs.append(run(level, s, attn_sum, attn_v, "cpu"))
    assert all(torch.equal(a, b) for out in outs[1:] for a, b in zip(outs[0], out))


@requires_kernels
def test_opcheck():
    level, s, attn_sum, attn_v = make_case(2, 5, 32, seed=5, dtype=torch.float32)
    weights = [w.detach() for w in level_weights(level)]
    torch.library.opcheck(torch.ops.exposure_slot.slot_update,
                          (s, attn_sum, attn_v, *weights, level.scale, 1e-5))


@requires_kernels
def test_errors_name_the_problem():
    level, s, attn_sum, attn_v = make_case(1, 3, 16, seed=6, dtype=torch.float32)
    trainable = list(level_weights(level))
    weights = [w.detach() for w in trainable]
    update = lambda *a, **k: ops.slot_update(*a, level.scale, **{"backend": "cpu", **k})
    with pytest.raises(ValueError, match=r"attn_v must have shape \[1, 3, 16\]"):
        update(s, attn_sum, attn_v[:, :2], weights)
    with pytest.raises(ValueError, match=r"mlp_weight_1 must have shape \[16, 16\]"):
        update(s, attn_sum, attn_v, weights[:6] + [torch.randn(16, 8)] + weights[7:])
    with pytest.raises(TypeError, match=f"takes {len(WEIGHT_NAMES)} weights"):
        update(s, attn_sum, attn_v, weights[:-1])
    with pytest.raises(TypeError, match="implement float32, float64; got slots of dtype torch.float16"):
        update(s.half(), attn_sum.half(), attn_v.half(), [w.half() for w in weights])
    with pytest.raises(TypeError, match="share one dtype"):
        update(s.double(), attn_sum, attn_v, weights)
    with pytest.raises(ValueError, match="computes on CPU tensors, got tensors on meta"):
        update(s.to("meta"), attn_sum.to("meta"), attn_v.to("meta"),
               [w.to("meta") for w in weights])
    with pytest.raises(ValueError, match="'cpu' backend only"):
        update(s, attn_sum, attn_v, weights, backend="cuda")
    with pytest.raises(RuntimeError, match="no autograd"):
        update(s, attn_sum, attn_v, trainable)  # the level's parameters require grad
    # The compiled op's own checks (what validate_args=False leaves).
    op = torch.ops.exposure_slot.slot_update
    plain = weights
    with pytest.raises(RuntimeError, match=r"gru_weight_hh must have shape \[48, 16\]"):
        op(s, attn_sum, attn_v, plain[0], plain[0][:16], *plain[2:], level.scale, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(s.half(), attn_sum.half(), attn_v.half(), *[w.half() for w in plain], level.scale, 1e-5)
