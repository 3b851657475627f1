"""compile_for: the fixed-shape engine against the reference network.

On CPU the engine runs eagerly; the tests also run it with oneDNN switched off,
which is the code path a GPU runs (plain convolutions, sum and GELU in place). The
CUDA-graph tests need a GPU and skip without one.

Tolerances (max abs on the image, inputs in [0, 1]): float32 1e-4 against the
float64 reference (observed ~1e-7); bfloat16 2e-2 against the float32 reference,
the issue's bar, on Kodak crops with synthetic exposure errors and the shipped demo
weights (observed ~4e-3 on CPU).
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import shared_path
from PIL import Image

import exposure_slot as es
from exposure_slot import inference
from exposure_slot.data.synthesis import synthesize
from exposure_slot.engine import compile_for
from exposure_slot.host_memory import peak_allocated_bytes
from random_models import random_model

FLOAT32_TOL = 1e-4
BF16_TOL = 2e-2
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA GPU; none here")


def image(*shape, seed, dtype=torch.float64):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double(), return_aux=True)


def max_err(actual, expected):
    return (actual.double().cpu() - expected.double().cpu()).abs().max().item()


def kodak_crops(count, height, width, seed=0):
    """Crops of Kodak photos the demo model never saw (kodim19-24), each re-exposed by
    a smooth random EV field from -2.5 to +1.5 stops (under- and over-exposed
    regions in one image)."""
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        with Image.open(shared_path("data", "kodak", f"kodim{19 + index % 6:02d}.png")) as im:
            photo = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
        top = rng.integers(0, photo.shape[0] - height + 1)
        left = rng.integers(0, photo.shape[1] - width + 1)
        crops.append(torch.from_numpy(photo[top:top + height, left:left + width].copy())
                     .permute(2, 0, 1))
    return synthesize(torch.stack(crops), (-2.5, 1.5), mixed=True, seed=seed)


@pytest.fixture(params=[True, False], ids=["onednn", "gpu-code-path"])
def conv_path(request, monkeypatch):
    """oneDNN's fused convolutions, or (False) the plain ones a GPU runs."""
    if not request.param:
        monkeypatch.setattr(inference, "_ONEDNN", False)
    return request.param


@pytest.mark.parametrize("level, size_policy, height, width",
                         [(2, "pad", 37, 50), (3, "resize", 41, 30), (2, "pad", 32, 24)])
def test_float32_engine_matches_float64_reference(conv_path, level, size_policy, height, width):
    model = random_model(level, seed=level, size_policy=size_policy)
    x = image(3, 3, height, width, seed=height * width)
    expected = reference(model, x)
    engine = compile_for(model, x.shape, dtype=torch.float32)
    assert not engine.graphed and engine.dtype == torch.float32
    out, masks = engine(x.float(), return_masks=True)
    assert expected.image.sub(x).abs().max() > 0.1  # the test can see a wrong correction
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert max_err(out, expected.image) <= FLOAT32_TOL
    assert len(masks) == len(expected.masks)
    for mask, ref in zip(masks, expected.masks):
        assert mask.shape == ref.shape and max_err(mask, ref) <= FLOAT32_TOL


def test_bfloat16_engine_on_real_photos_within_2e2_of_float32(conv_path):
    """The issue's accuracy bar for the real-time setting, on trained weights."""
    model = es.load_pretrained("demo", backend="reference")
    x = kodak_crops(4, 96, 128)
    with torch.no_grad():
        expected = model(x)
    engine = compile_for(model, x.shape, dtype=torch.bfloat16)
    out = engine(x)
    assert expected.sub(x).abs().max() > 0.1  # the network changes these images
    err = max_err(out.clamp(0, 1), expected.clamp(0, 1))
    assert err <= BF16_TOL, err
    mse = (out.clamp(0, 1) - expected.clamp(0, 1)).double().square().mean().item()
    assert 10 * math.log10(1 / mse) >= 50


def test_batches_partial_batches_and_out():
    model = random_model(2, seed=5)
    engine = compile_for(model, (3, 3, 24, 28), dtype=torch.float32)
    x = image(3, 3, 24, 28, seed=1, dtype=torch.float32)
    full = engine(x)
    with torch.no_grad():
        single = torch.cat([engine.model(x[i:i + 1]) for i in range(3)])
    assert (full - single).abs().max() <= 1e-5
    # A smaller batch runs in the compiled one; stale rows do not leak into it.
    engine(image(3, 3, 24, 28, seed=2, dtype=torch.float32))
    two = engine(x[:2])
    assert two.shape == (2, 3, 24, 28) and (two - full[:2]).abs().max() <= 1e-5
    out = torch.full((1, 3, 24, 28), float("nan"), dtype=torch.float64)
    assert engine(x[2:], out=out) is out
    assert max_err(out, full[2:]) <= 1e-6
    # Results are new tensors, not views of the engine's buffers.
    first = engine(x[:1])
    engine(x[1:2])
    assert (first - full[:1]).abs().max() <= 1e-5


def test_the_engine_is_the_model_function_under_inference_mode():
    model = random_model(2, seed=6)
    x = image(1, 3, 20, 20, seed=3, dtype=torch.float32)
    with torch.inference_mode():
        engine = compile_for(model, x.shape, dtype=torch.float32)
        inside = engine(x)
    outside = engine(x)  # buffers made under inference_mode stay writable
    with torch.no_grad():
        expected = model(x)
    assert (inside - expected).abs().max() <= 1e-5 and torch.equal(inside, outside)


def test_an_optimized_model_is_used_as_it_is():
    fast = es.optimize_for_inference(random_model(2, seed=7))
    engine = fast.compile_for((1, 3, 16, 16))
    assert engine.model is fast and not engine.graphed
    assert compile_for(fast, (1, 3, 16, 16), dtype=torch.float32).model is fast
    assert compile_for(fast, (1, 3, 16, 16), dtype=torch.bfloat16).model is not fast
    assert "shape=[1, 3, 16, 16]" in repr(engine) and "eager" in repr(engine)


def test_errors_name_the_problem():
    model = random_model(2)
    engine = compile_for(model, (2, 3, 16, 20), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"shape \[1, 3, 16, 24\] but the engine is compiled "
                                         r"for \[2, 3, 16, 20\].*compile_for"):
        engine(torch.rand(1, 3, 16, 24))
    with pytest.raises(ValueError, match="compiled for"):
        engine(torch.rand(3, 3, 16, 20))  # a larger batch
    with pytest.raises(TypeError, match="floating-point image.*torch.uint8"):
        engine(torch.zeros(1, 3, 16, 20, dtype=torch.uint8))
    with pytest.raises(ValueError, match="out has 2 images but the input has 1"):
        engine(torch.rand(1, 3, 16, 20), out=torch.empty(2, 3, 16, 20))
    with pytest.raises(ValueError, match="shape must be"):
        compile_for(model, (1, 1, 16, 16))
    with pytest.raises(ValueError, match="at least 4 pixels"):
        compile_for(model, (1, 3, 2, 16))
    if not CUDA:
        with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
            compile_for(model, (1, 3, 16, 16), graphs=True)
    with pytest.raises(ValueError, match="eval mode"):
        compile_for(random_model(2).train(), (1, 3, 16, 16))
    with pytest.raises(TypeError, match="expected an ExposureSlot"):
        compile_for(torch.nn.Linear(2, 2), (1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"got torch.float16"):
        compile_for(model, (1, 3, 16, 16), dtype=torch.float16, device="cpu")


def test_gpu_code_path_memory_scaled_to_4k_stays_under_4gb(monkeypatch):
    """The issue's 3840x2160 memory bar, estimated on CPU: the GPU code path (plain
    convolutions) of the level-2 bfloat16 forward at 1/8 of the 4K side, its peak
    beyond the input scaled by the pixel count. The bottleneck's bands are scaled
    too, so that they hold the same share of the map as at 4K. Measured: ~2.0 GiB
    (the forward before it freed its skip maps early: ~3.5 GiB). The bar here, 3 GiB,
    leaves a GiB for the input, the allocator's rounding and the slot attention
    kernels' differences from the CPU ones."""
    monkeypatch.setattr(inference, "_ONEDNN", False)
    width, height = 480, 272
    scale = 3840 * 2160 / (width * height)
    torch.manual_seed(0)
    backend = "cpu" if "cpu" in es.available_backends() else "reference"
    model = es.optimize_for_inference(es.ExposureSlot(level=2, backend=backend).eval(),
                                      torch.bfloat16)
    model.bottleneck.chunk_tokens = int(model.bottleneck.chunk_tokens / scale)
    x = torch.rand(1, 3, height, width)
    with torch.no_grad():
        estimate = peak_allocated_bytes(lambda: model.correct(x)) * scale
    assert estimate <= 3 * 2**30, f"{estimate / 2**30:.2f} GiB"


# --------------------------------------------------------------------------
# CUDA graphs (GPU only)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_graph_matches_eager_and_reference(dtype):
    model = es.load_pretrained("demo")
    x = kodak_crops(2, 96, 128, seed=1)
    with torch.no_grad():
        expected = model(x)  # float32 on CPU
    engine = compile_for(model, (3, 3, 96, 128), dtype=dtype, device="cuda")
    eager = engine.model.compile_for((3, 3, 96, 128), graphs=False)
    assert engine.graphed and not eager.graphed
    out = engine(x.cuda())
    # Same kernels, same shapes: the replay is the eager forward.
    assert max_err(out, eager(x.cuda())) <= 1e-3
    assert max_err(out.clamp(0, 1), expected.clamp(0, 1)) <= BF16_TOL
    # Every replay reads the input anew; partial batches and host outputs work.
    other = kodak_crops(1, 96, 128, seed=2)
    host = torch.empty(1, 3, 96, 128).pin_memory()
    engine(other.pin_memory(), out=host, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    with torch.no_grad():
        assert max_err(host.clamp(0, 1), model(other).clamp(0, 1)) <= BF16_TOL


@needs_cuda
def test_cuda_graph_with_padding_and_masks(monkeypatch):
    # True float32 convolutions (cuDNN's default is TF32): the float32 bar holds.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = random_model(3, seed=2)
    x = image(2, 3, 37, 50, seed=4, dtype=torch.float32)
    expected = reference(model, x)
    engine = compile_for(model, x.shape, dtype=torch.float32, device="cuda")
    out, masks = engine(x.cuda(), return_masks=True)
    assert max_err(out, expected.image) <= FLOAT32_TOL
    for mask, ref in zip(masks, expected.masks):
        assert mask.shape == ref.shape and max_err(mask, ref) <= FLOAT32_TOL
