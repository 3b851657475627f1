"""Float64 properties of the reference path: masks, shapes, size policies, backends,
input errors, and an independent re-derivation of one slot level."""

import pytest
import torch
import torch.nn.functional as F

import exposure_slot as es
from exposure_slot.backends import resolve_backend
from exposure_slot.slot_attention import EPS


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("slots", [(3,), (3, 7), (3, 7, 10), (2, 5, 4, 3)])
@pytest.mark.parametrize("batch, tokens", [(1, 1), (3, 37)])
def test_slot_in_slot_shapes_and_masks(slots, batch, tokens):
    module = es.SlotInSlotAttention(dim=32, slots=slots, backend="reference").double()
    k, v = rand(batch, tokens, 32, seed=1), rand(batch, tokens, 32, seed=2)
    out = module(k, v)
    assert out.prompt_map.shape == out.slot_map.shape == (batch, tokens, 32)
    assert [tuple(m.shape) for m in out.masks] == [(batch, s, tokens) for s in slots]
    for mask, num_slots in zip(out.masks, slots):
        # softmax over the slot axis, then +eps: sums to 1 + K*eps, never below eps.
        torch.testing.assert_close(mask.sum(dim=1), torch.full((batch, tokens), 1 + num_slots * EPS,
                                                               dtype=torch.float64), rtol=0, atol=1e-14)
        assert (mask >= EPS).all()


def naive_slot_attention(level, k_in, v_in, iters):
    """Plain slot attention (one level), written slot by slot from SPEC section 1."""
    k = F.layer_norm(k_in, (k_in.shape[-1],), level.norm_k_inp.weight, level.norm_k_inp.bias)
    v = F.layer_norm(v_in, (v_in.shape[-1],), level.norm_v_inp.weight, level.norm_v_inp.bias)
    batch, tokens, dim = k.shape
    slots = level.slots_mu.expand(batch, -1, -1)
    for _ in range(iters):
        prev = slots
        q = level.to_q(F.layer_norm(slots, (dim,), level.norm_slots.weight, level.norm_slots.bias))
        logits = torch.einsum("bid,bnd->bin", q, k) * dim ** -0.5
        attn = torch.exp(logits - logits.logsumexp(dim=1, keepdim=True)) + EPS
        updates = torch.stack([
            sum(attn[:, i, n, None] * v[:, n] for n in range(tokens)) / attn[:, i].sum(-1, keepdim=True)
            for i in range(slots.shape[1])], dim=1)
        slots = torch.stack([level.gru(updates[:, i], prev[:, i]) for i in range(slots.shape[1])], dim=1)
        slots = slots + level.mlp(F.layer_norm(slots, (dim,), level.norm_pre_ff.weight, level.norm_pre_ff.bias))
    prompt_map = torch.einsum("bin,id->bnd", attn, level.prompts[0])
    slot_map = torch.einsum("bin,bid->bnd", attn, slots)
    return prompt_map, slot_map, attn


def test_plain_slot_attention_matches_a_slot_by_slot_derivation():
    module = es.SlotInSlotAttention(dim=16, slots=(4,), iters=2, backend="reference").double()
    k, v = rand(2, 11, 16, seed=3), rand(2, 11, 16, seed=4)
    out = module(k, v)
    with torch.no_grad():
        prompt_map, slot_map, attn = naive_slot_attention(module.levels[0], k, v, iters=2)
    torch.testing.assert_close(out.prompt_map, prompt_map, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.slot_map, slot_map, rtol=0, atol=1e-12)
    torch.testing.assert_close(out.masks[0], attn, rtol=0, atol=1e-14)


@pytest.mark.parametrize("level", [2, 3])
@pytest.mark.parametrize("batch, height, width", [(1, 16, 24), (3, 13, 10), (1, 5, 7), (1, 4, 4)])
@pytest.mark.parametrize("policy", ["pad", "resize"])
def test_model_shapes_for_any_size(level, batch, height, width, policy):
    model = es.ExposureSlot(level=level, size_policy=policy, backend="reference").double().eval()
    x = rand(batch, 3, height, width, seed=5).sigmoid()
    with torch.no_grad():
        out = model(x, return_aux=True)
        plain = model(x)
    assert out.image.shape == out.recon.shape == x.shape
    torch.testing.assert_close(plain, out.image, rtol=0, atol=0)
    if policy == "pad":
        bottleneck = (-(-height // 4), -(-width // 4))
    else:  # the multiple of 4 below, but at least 8 (the network's smallest input)
        bottleneck = (max(8, height // 4 * 4) // 4, max(8, width // 4 * 4) // 4)
    assert [tuple(m.shape) for m in out.masks] == [
        (batch, k, *bottleneck) for k in es.network.SLOTS_OF_LEVEL[level]]


def test_pad_policy_is_reflect_pad_then_crop():
    model = es.ExposureSlot(level=2, backend="reference").double().eval()
    x = rand(1, 3, 13, 10, seed=6).sigmoid()
    padded = F.pad(x, (0, 2, 0, 3), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(padded)[..., :13, :10], rtol=0, atol=0)


def test_tiny_images_grow_by_repeated_reflection():
    """Sides below 8 cannot pass the released network; 4x5 is reflect-extended to 8x8."""
    model = es.ExposureSlot(level=2, backend="reference").double().eval()
    x = rand(1, 3, 4, 5, seed=9).sigmoid()
    extended = F.pad(F.pad(x, (0, 3, 0, 3), mode="reflect"), (0, 0, 0, 1), mode="reflect")
    assert extended.shape[-2:] == (8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(extended)[..., :4, :5], rtol=0, atol=0)


def test_resize_policy_resizes_in_and_out():
    model = es.ExposureSlot(level=2, size_policy="resize", backend="reference").double().eval()
    x = rand(1, 3, 13, 10, seed=7).sigmoid()
    inner = F.interpolate(x, size=(12, 8), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = F.interpolate(model(inner), size=(13, 10), mode="bilinear", align_corners=False)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_training_step_reaches_every_parameter():
    model = es.ExposureSlot(level=3, backend="reference").double().train()
    x = rand(2, 3, 16, 16, seed=8).sigmoid()
    out = model(x, return_aux=True)
    loss = F.l1_loss(out.image, x) + F.mse_loss(out.recon, x)
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_backend_names_and_errors():
    available = es.available_backends()
    assert available[0] == "reference"
    module = es.SlotInSlotAttention(dim=16, slots=(3,))
    assert module.backend == "auto"
    with pytest.raises(ValueError, match="unknown backend 'fastest'; known: reference, cpu, triton, cuda"):
        module.backend = "fastest"
    if "cuda" not in available:
        with pytest.raises(ValueError, match="'cuda' is not available on this install; available: auto, reference"):
            module.backend = "cuda"
    model = es.ExposureSlot(level=2)
    for name in available:
        model.backend = name
        assert model.backend == name == model.bottleneck.slot_attention.backend
    with pytest.raises(ValueError, match="unknown backend"):
        es.ExposureSlot(level=2, backend="gpu")


def test_auto_resolves_per_device():
    cpu_choice = "cpu" if "cpu" in es.available_backends() else "reference"
    assert resolve_backend("auto", torch.device("cpu")) == cpu_choice
    gpu_choices = [b for b in ("cuda", "triton") if b in es.available_backends()]
    assert resolve_backend("auto", torch.device("cuda")) == (gpu_choices + ["reference"])[0]
    assert resolve_backend("reference", torch.device("meta")) == "reference"
    if "cpu" in es.available_backends():
        with pytest.raises(ValueError, match="backend 'cpu' computes on cpu tensors but the input is on cuda"):
            resolve_backend("cpu", torch.device("cuda"))


def test_input_errors_name_the_problem():
    model = es.ExposureSlot(level=2)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got shape \[1, 4, 8, 8\]"):
        model(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 4 pixels, got \\[3, 8\\]"):
        model(torch.rand(1, 3, 3, 8))
    with pytest.raises(TypeError, match="floating-point image.*torch.uint8"):
        model(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="input is torch.float64 on cpu but the model is torch.float32"):
        model(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="size_policy must be one of"):
        model.size_policy = "crop"
    with pytest.raises(ValueError, match="level must be one of"):
        es.ExposureSlot(level=4)
    module = es.SlotInSlotAttention(dim=16, slots=(3, 7))
    with pytest.raises(ValueError, match=r"k must be \[B, N, 16\], got \[2, 5, 8\]"):
        module(torch.rand(2, 5, 8), torch.rand(2, 5, 8))
    with pytest.raises(ValueError, match="same shape"):
        module(torch.rand(2, 5, 16), torch.rand(2, 6, 16))
    with pytest.raises(ValueError, match="slots must be a non-empty sequence"):
        es.SlotInSlotAttention(dim=16, slots=())
