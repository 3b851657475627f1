"""The slot update op (CPU) and its backward: against the PyTorch twin (forward and
the gradients of every input), the twin against ``SlotLevel``'s own ATen steps, the
torch.library registration (opcheck, gradcheck, fake kernels), determinism and
errors.

Tolerances, relative to the largest magnitude of the expected tensor:
- float64 kernel vs float64 twin: 1e-12, forward and every gradient (sums in
  another order; observed ~1e-15);
- float32 kernel vs float64 twin on the same values: 2e-6 for the forward (five
  chained C x C products and two LayerNorms in float32; observed 1-3e-7), 1e-5 for
  the gradients (and their backward; observed up to 5e-6, C = 256 with one slot);
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
GRAD_TOLERANCES = {torch.float64: 1e-12, torch.float32: 1e-5}


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


def forward_backward(level, slots, attn_sum, attn_v, backend, dtype, used=("slots", "queries"),
                     seed=0):
    """The two outputs and the gradients of every input (slots, attn_sum, attn_v, the
    14 weights) of a random weighting of the ``used`` outputs."""
    gen = torch.Generator().manual_seed(seed)
    leaves = [t.detach().to(dtype).requires_grad_()
              for t in (slots, attn_sum, attn_v, *level_weights(level))]
    outputs = ops.slot_update(*leaves[:3], leaves[3:], level.scale, level.norm_slots.eps,
                              backend=backend)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
               for name, o in zip(("slots", "queries"), outputs) if name in used)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # to_q's, if q is unused
    return [o.detach() for o in outputs] + [torch.zeros_like(t) if g is None else g
                                            for t, g in zip(leaves, grads)]


@requires_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("batch,slots,channels", [(1, 3, 128), (3, 7, 64), (3, 16, 16),
                                                  (1, 1, 256), (2, 5, 24)])
def test_gradients_match_the_twin(dtype, batch, slots, channels):
    level, s, attn_sum, attn_v = make_case(batch, slots, channels, seed=batch * 10 + slots)
    expected = forward_backward(level, s, attn_sum, attn_v, "reference", torch.float64)
    actual = forward_backward(level, s, attn_sum, attn_v, "cpu", dtype)
    assert len(actual) == 2 + 3 + len(WEIGHT_NAMES)
    for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
        assert a.dtype == dtype and a.shape == e.shape
        assert_close(a, e, (TOLERANCES if i < 2 else GRAD_TOLERANCES)[dtype])


@requires_kernels
@pytest.mark.parametrize("used", [("slots",), ("queries",)], ids=["slots", "queries"])
def test_gradients_of_one_output(used):
    # A level's last queries feed nothing: their gradient is None, taken as zeros.
    level, s, attn_sum, attn_v = make_case(2, 7, 32, seed=8)
    expected = forward_backward(level, s, attn_sum, attn_v, "reference", torch.float64, used)
    actual = forward_backward(level, s, attn_sum, attn_v, "cpu", torch.float64, used)
    for a, e in zip(actual, expected, strict=True):
        assert_close(a, e, TOLERANCES[torch.float64])


@requires_kernels
def test_gradients_through_expanded_slots():
    # The first iteration's slots: slots_mu expanded over the batch; its gradient is
    # the sum over the batch.
    level, _, attn_sum, attn_v = make_case(3, 7, 32, seed=9)
    results = []
    for backend in ("reference", "cpu"):
        mu = level.slots_mu.detach().clone().requires_grad_()
        out = ops.slot_update(mu.expand(3, -1, -1), attn_sum, attn_v, level_weights(level),
                              level.scale, level.norm_slots.eps, backend=backend)
        results.append(torch.autograd.grad(out[0].sum() + out[1].square().sum(), mu)[0])
    assert_close(results[1], results[0], TOLERANCES[torch.float64])


@requires_kernels
def test_gradcheck():
    level, s, attn_sum, attn_v = make_case(2, 3, 8, seed=10)
    inputs = tuple(t.detach().requires_grad_() for t in (s, attn_sum, attn_v,
                                                       *level_weights(level)))

    def update(*tensors):
        return ops.slot_update(*tensors[:3], tensors[3:], level.scale, 1e-5, backend="cpu")

    assert torch.autograd.gradcheck(update, inputs, fast_mode=True)


@requires_kernels
def test_opcheck():
    level, s, attn_sum, attn_v = make_case(2, 5, 32, seed=5, dtype=torch.float32)
    weights = [w.detach() for w in level_weights(level)]
    torch.library.opcheck(torch.ops.exposure_slot.slot_update,
                          (s, attn_sum, attn_v, *weights, level.scale, 1e-5))
    # With gradients: the autograd registration against the op's own backward.
    trainable = [t.detach().requires_grad_() for t in (s, attn_sum, attn_v, *weights)]
    torch.library.opcheck(torch.ops.exposure_slot.slot_update,
                          (*trainable, level.scale, 1e-5))
    grads = (torch.randn(s.shape), torch.randn(s.shape))
    torch.library.opcheck(torch.ops.exposure_slot.slot_update_backward,
                          (*grads, s, attn_sum, attn_v, *weights, level.scale, 1e-5))


@requires_kernels
def test_backward_fake_kernel_on_meta_tensors():
    level, s, attn_sum, attn_v = make_case(2, 5, 16, seed=11, dtype=torch.float32)
    meta = [t.detach().to("meta") for t in (s, s, s, attn_sum, attn_v, *level_weights(level))]
    g_slots, g_sum, g_v, g_weights = torch.ops.exposure_slot.slot_update_backward(
        *meta, level.scale, 1e-5)
    assert g_slots.shape == s.shape and g_sum.shape == attn_sum.shape
    assert g_v.shape == attn_v.shape
    assert [g.shape for g in g_weights] == [w.shape for w in level_weights(level)]


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
    # The compiled op's own checks (what validate_args=False leaves).
    op = torch.ops.exposure_slot.slot_update
    plain = weights
    with pytest.raises(RuntimeError, match=r"gru_weight_hh must have shape \[48, 16\]"):
        op(s, attn_sum, attn_v, plain[0], plain[0][:16], *plain[2:], level.scale, 1e-5)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        op(s.half(), attn_sum.half(), attn_v.half(), *[w.half() for w in plain], level.scale, 1e-5)
    backward = torch.ops.exposure_slot.slot_update_backward
    with pytest.raises(RuntimeError, match=r"slot_update_backward: grad_queries must be \[B, K, C\]"):
        backward(s, s[:, :2], s, attn_sum, attn_v, *plain, level.scale, 1e-5)
    with pytest.raises(RuntimeError, match=r"slot_update_backward: mlp_weight_2 must have shape"):
        backward(s, s, s, attn_sum, attn_v, *plain[:8], plain[8][:8], *plain[9:], level.scale,
                 1e-5)
