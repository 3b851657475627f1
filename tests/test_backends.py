"""Every available backend against the reference, through the modules: forward and
every gradient (inputs and parameters) in float64, forward in float32.

Tolerances: float64 1e-12 absolute on O(1) values (the fused ops only reorder sums);
float32 1e-5 absolute (observed about 1e-6).
"""

import copy

import pytest
import torch

import exposure_slot as es
from exposure_slot import ops

FUSED = [b for b in es.available_backends() if b != "reference"]
# Without a GPU, the Triton kernels run through Triton's interpreter (tests/conftest.py
# switches it on): slow, so only the module test below, at its small sizes, uses it.
INTERPRETED = ["triton"] if "triton" not in FUSED and ops.triton_interpreting() \
    and ops.triton_kernels_available() else []
if not FUSED:
    pytest.skip("no fused backend is built on this install (exposure_slot._C missing); "
                "run `pip install -e . --no-build-isolation`", allow_module_level=True)


def rand(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def grads(module, inputs, outputs):
    """Gradients of a random projection of ``outputs`` w.r.t. inputs and parameters."""
    weights = [rand(*o.shape, seed=100 + i, dtype=o.dtype) for i, o in enumerate(outputs)]
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, list(inputs) + params, allow_unused=True)


@pytest.mark.parametrize("backend", FUSED + INTERPRETED)
@pytest.mark.parametrize("slots, batch, tokens", [((3,), 1, 1), ((3, 7), 3, 97), ((3, 7, 10), 2, 64),
                                                  ((16, 1), 1, 33)])
def test_slot_in_slot_forward_and_gradients(backend, slots, batch, tokens):
    reference = es.SlotInSlotAttention(dim=32, slots=slots, backend="reference").double()
    fused = copy.deepcopy(reference)
    fused.backend = backend
    k = rand(batch, tokens, 32, seed=1).requires_grad_()
    v = rand(batch, tokens, 32, seed=2).requires_grad_()
    expected, actual = reference(k, v), fused(k, v)
    flat_expected = [expected.prompt_map, expected.slot_map, *expected.masks]
    flat_actual = [actual.prompt_map, actual.slot_map, *actual.masks]
    for e, a in zip(flat_expected, flat_actual):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)
    for e, a in zip(grads(reference, (k, v), flat_expected), grads(fused, (k, v), flat_actual)):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("level", [2, 3])
def test_model_float32_inference(backend, level):
    model = es.ExposureSlot(level=level, backend="reference").eval()
    x = rand(2, 3, 30, 41, seed=3, dtype=torch.float32).sigmoid()
    with torch.inference_mode():
        expected = model(x, return_aux=True)
        model.backend = backend
        actual = model(x, return_aux=True)
    torch.testing.assert_close(actual.image, expected.image, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.recon, expected.recon, rtol=0, atol=1e-5)
    for e, a in zip(expected.masks, actual.masks):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_model_training_gradients(backend):
    reference = es.ExposureSlot(level=2, backend="reference").double().train()
    fused = copy.deepcopy(reference)
    fused.backend = backend
    x = rand(2, 3, 16, 20, seed=4).sigmoid()
    out_ref, out_fused = reference(x, return_aux=True), fused(x, return_aux=True)
    for e, a in zip(grads(reference, (), [out_ref.image, out_ref.recon]),
                    grads(fused, (), [out_fused.image, out_fused.recon])):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-10)
