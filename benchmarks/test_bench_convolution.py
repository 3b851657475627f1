"""The optimized model's convolutions one by one, at a 512x512 image (short mode
64x64), B=1, float32: each as the plain model computes it (reference: its layers,
NCHW), torch.compile of that (compiled), ``optimize_for_inference``'s oneDNN form
(cpu-direct: folded, channels-last, post-ops fused) and its Winograd form (cpu:
``winograd_conv3x3``, the default in float32 on the CPU). The flops noted are the
direct convolution's; Winograd F(4x4, 3x3) does a quarter of its multiplications.
See README.md ("Winograd convolutions") for the numbers."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import is_short

import exposure_slot as es
from exposure_slot.inference import optimize_for_inference
from exposure_slot.ops import cpu_kernels_available

# name -> (the input's channels and its side as a fraction of the image's, the
# plain model's computation of that layer, the fused layer's name)
LAYERS = {
    "conv1_2: 3x3 conv + BN, 32 -> 32": (32, 1, lambda m, x: m.bn1(m.conv1_2(x)), "conv1_2"),
    "down1: reflect 3x3 conv + GELU, 32 -> 16": (32, 1, lambda m, x: F.gelu(m.down1.conv(x)),
                                                 "down1"),
    "conv2_2: unshuffle + 3x3 conv + BN, 16 -> 64 at half size":
        (16, 1, lambda m, x: m.bn2(m.conv2_2(F.pixel_unshuffle(x, 2))), "conv2_2"),
    "conv4_2: 3x3 conv + GELU, 64 -> 64": (64, 2, lambda m, x: F.gelu(m.conv4_2(x)), "conv4_2"),
    "up1: reflect 3x3 conv 128 -> 256 + shuffle": (128, 4, lambda m, x: m.up1(x), "up1"),
    "up2: reflect 3x3 conv 64 -> 128 + shuffle": (64, 2, lambda m, x: m.up2(x), "up2"),
}
BACKENDS = ("reference", "compiled", "cpu-direct", "cpu")


@functools.cache
def models():
    torch.manual_seed(0)
    model = es.ExposureSlot(level=2, backend="reference").eval()
    return model, optimize_for_inference(model), optimize_for_inference(model, winograd=False)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_convolution(benchmark, record, pytestconfig, backend, name):
    if backend.startswith("cpu") and not cpu_kernels_available():
        pytest.skip("exposure_slot._C is not built; run `python setup.py build_ext --inplace`")
    channels, shrink, plain, fused_name = LAYERS[name]
    side = (64 if is_short(pytestconfig) else 512) // shrink
    model, winograd, direct = models()
    x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(1))
    if backend == "reference":
        layer = functools.partial(plain, model)
    elif backend == "compiled":
        torch._dynamo.reset()
        layer = torch.compile(functools.partial(plain, model), dynamic=False)
    else:
        layer = getattr((winograd if backend == "cpu" else direct).fused, fused_name)
        assert (layer.winograd_filter is not None) == (backend == "cpu")
        x = x.contiguous(memory_format=torch.channels_last)

    def forward():  # returns None: see Recorder.time
        with torch.inference_mode():
            layer(x)

    group = f"{name}, {side}x{side} input, float32"
    record.time(benchmark, group, backend, forward, rounds=3 if is_short(pytestconfig) else 20)
    with torch.no_grad():
        outputs = plain(model, x.contiguous()).numel()  # a (un)shuffle keeps the count
    # The direct convolution's flops: each output sums 9 taps over the input channels.
    flops = 2 * 9 * channels * (4 if "unshuffle" in name else 1) * outputs
    record.note(group, f"{flops / 1e9:.2f} GFLOP as a direct convolution")
