"""Real-time whole-model inference: the fixed-shape engine (``compile_for``: folded
BatchNorm, channels-last, bfloat16 convolutions, one CUDA graph per frame shape)
against the released network in float32 eager (backend "reference"), both measured
in this run, on the issue's targets (H100, level 2):

- 1920x1080 at >= 120 frames/s and 3840x2160 at >= 30 frames/s (batch 1);
- >= 5x the frame rate of the released network in float32 eager;
- outputs within 2e-2 of the float32 reference (max abs, on [0, 1] images);
- peak GPU memory at 3840x2160 <= 4 GB (torch.cuda.max_memory_allocated from the
  engine's construction on; the warm-up before the capture is the forward's peak,
  since a replay allocates nothing).

The input is a Kodak photo (shared/data/kodak) scaled to the frame size with a
synthetic mixed exposure error, and the weights are the shipped demo model's
(trained: realistic masks and corrections). Timed calls take a frame already on
the GPU and write into a preallocated output; they synchronise inside.

    python -m pytest benchmarks/test_bench_realtime.py            # needs a CUDA GPU
    EXPOSURE_SLOT_BENCH_SHORT=1 python -m pytest benchmarks/test_bench_realtime.py

Short mode: 480x270 and 960x540 on the GPU, and on CPU (where the engine runs
eagerly in float32) a 128x96 check that runs anywhere.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import is_short

import exposure_slot as es
from exposure_slot.data.synthesis import synthesize
from exposure_slot.engine import compile_for
from exposure_slot.images import read_image

FULL = {"sizes": [(1920, 1080), (3840, 2160)], "rounds": 20}
SHORT = {"sizes": [(480, 270), (960, 540)], "rounds": 3}
TARGET_FPS = {(1920, 1080): 120, (3840, 2160): 30}
TARGET_SPEEDUP = 5.0
TARGET_ERROR = 2e-2
TARGET_PEAK = 4 * 10**9  # the 4 GB
ENGINE = "engine-bf16-graph"
SHARED = Path(os.environ.get("EXPOSURE_SLOT_SHARED",
                             Path(__file__).resolve().parents[2] / "shared"))

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the real-time targets are for a CUDA GPU; none here")


def frame(width: int, height: int) -> tuple[torch.Tensor, str]:
    """A [1, 3, H, W] frame in [0, 1]: a Kodak photo scaled to the size, re-exposed
    by a smooth EV field from -2.5 to +1.5; random values if the photos are absent."""
    path = SHARED / "data" / "kodak" / "kodim23.png"
    if not path.exists():
        return (torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0)),
                "random frame (shared/data/kodak not found)")
    photo = read_image(path).tensor
    photo = F.interpolate(photo, size=(height, width), mode="bilinear", align_corners=False)
    return synthesize(photo.clamp(0, 1), (-2.5, 1.5), mixed=True, seed=0), f"{path.name} scaled"


def reference_model(device) -> es.ExposureSlot:
    """The released network as it is: float32, eager, the reference slot attention."""
    return es.load_pretrained("demo", backend="reference").to(device)


EXPECTED: dict[tuple, torch.Tensor] = {}  # (device type, width, height) -> reference output


def expected_output(device: torch.device, x: torch.Tensor) -> torch.Tensor:
    key = (device.type, *x.shape[-2:])
    if key not in EXPECTED:
        with torch.inference_mode():
            EXPECTED[key] = reference_model(device)(x).clamp(0, 1)
    return EXPECTED[key]


def run(benchmark, record, rounds: int, device: torch.device, width: int, height: int,
        variant: str, dtype: torch.dtype) -> tuple[str, float | None]:
    """Times one variant on one frame size: "reference" (the released network) or
    an engine computing in ``dtype``. Returns the group and the median seconds;
    checks and records the engine's error and peak memory."""
    x, source = frame(width, height)
    x = x.to(device)
    group = f"whole model level 2, {width}x{height}, {device.type}"
    record.note(group, f"input: {source}")
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    if variant == "reference":
        model = reference_model(device)

        def forward():
            with torch.inference_mode():
                model(x)
            sync()

        return group, record.time(benchmark, group, variant, forward, rounds=rounds)

    expected = expected_output(device, x)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model = reference_model("cpu")
    model.backend = "auto"  # the fastest slot attention built here (cuda, then triton)
    engine = compile_for(model, x.shape, dtype=dtype, device=device)
    out = torch.empty_like(x)

    def forward():
        engine(x, out=out)
        sync()

    forward()
    error = (out.clamp(0, 1) - expected).abs().max().item()
    record.note(group, f"{variant}: max abs error vs float32 reference {error:.2e}; {engine!r}")
    benchmark.extra_info["max_abs_error"] = error
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) - base
        record.peak(group, variant, peak)
        benchmark.extra_info["peak_bytes"] = peak
        if (width, height) == (3840, 2160):
            reserved = torch.cuda.memory_reserved(device)
            record.note(group, f"peak {peak / 1e9:.2f} GB (target <= 4 GB: "
                               f"{'met' if peak <= TARGET_PEAK else 'MISSED'}); reserved "
                               f"after the capture {reserved / 1e9:.2f} GB")
    # Accuracy is a correctness property, not a timing: it must hold on every run.
    assert error <= (TARGET_ERROR if dtype != torch.float32 else 1e-4), error
    return group, record.time(benchmark, group, variant, forward, rounds=rounds)


MEDIANS: dict[tuple, float] = {}  # (width, height, variant) -> seconds


@needs_cuda
@pytest.mark.parametrize("variant", ["reference", ENGINE])
@pytest.mark.parametrize("index", [0, 1], ids=["hd", "4k"])
def test_realtime_gpu(benchmark, record, pytestconfig, index, variant):
    cfg = SHORT if is_short(pytestconfig) else FULL
    width, height = cfg["sizes"][index]
    group, seconds = run(benchmark, record, cfg["rounds"], torch.device("cuda"), width, height,
                         variant, torch.bfloat16)
    if seconds is None:  # --benchmark-disable
        return
    MEDIANS[width, height, variant] = seconds
    if (width, height, "reference") not in MEDIANS or (width, height, ENGINE) not in MEDIANS:
        return  # the other variant of this size has not run yet
    seconds = MEDIANS[width, height, ENGINE]
    fps, speedup = 1 / seconds, MEDIANS[width, height, "reference"] / seconds
    target = TARGET_FPS.get((width, height))
    verdict = f"{fps:.1f} frames/s"
    if target:
        verdict += f" (target >= {target}: {'met' if fps >= target else 'MISSED'})"
    verdict += (f"; {speedup:.1f}x the float32 eager reference (target >= {TARGET_SPEEDUP:g}x: "
                f"{'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})")
    record.note(group, verdict)


@pytest.mark.parametrize("variant", ["reference", "engine-f32"])
def test_engine_cpu_small(benchmark, record, pytestconfig, variant):
    """The same pair on CPU at a small size (the engine eager, float32): a check
    that the suite runs anywhere, and the engine's overhead there."""
    rounds = 3 if is_short(pytestconfig) else 5
    run(benchmark, record, rounds, torch.device("cpu"), 128, 96, variant, torch.float32)
