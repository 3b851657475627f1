"""Whole-model CPU inference: B=1, float32, level 2 and 3, for the plain model
(backend "reference"), torch.compile of it, the optimized path
(``optimize_for_inference``, backend "cpu" where built: Winograd convolutions), the
same with oneDNN's direct convolutions (``winograd=False``, "cpu-direct") and its
bfloat16 mode.

After the module a table gives the medians, the ratios measured in the same run, the
peak memory of one forward, the convolution flops counted on the model, the floor
those flops set at this session's sgemm rate, and (full sizes) the optimized path's
per-layer profile. See README.md for the numbers.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from conftest import is_short
from torch.utils.flop_counter import FlopCounterMode

import exposure_slot as es
from exposure_slot.inference import optimize_for_inference
from exposure_slot.host_memory import peak_allocated_bytes

FULL = {"side": 512, "rounds": 5}
SHORT = {"side": 64, "rounds": 2}
VARIANTS = ("reference", "compiled", "cpu-direct", "cpu", "cpu-bf16")
LEVELS = (2, 3)
RESULTS: dict[tuple[int, int], dict] = {}  # per (level, side): medians, peaks, flops, profile
RESULTS_SGEMM: list[float] = []  # this session's sgemm flops per second, measured once


def bench_sizes(config) -> dict:
    return SHORT if is_short(config) else FULL


def build(variant: str, level: int):
    torch.manual_seed(0)
    model = es.ExposureSlot(level=level, backend="reference").eval()
    if variant == "reference":
        return model
    if variant == "compiled":
        torch._dynamo.reset()
        return torch.compile(model, dynamic=False)
    model.backend = "auto"  # the C++ slot attention where it is built
    return optimize_for_inference(model, torch.bfloat16 if variant == "cpu-bf16" else torch.float32,
                                  winograd=variant != "cpu-direct")


def conv_and_matmul_flops(level: int, side: int) -> int:
    model = build("reference", level)
    counter = FlopCounterMode(display=False)
    with counter:  # with autograd on: FlopCounterMode's module hooks need it
        model(torch.rand(1, 3, side, side))
    return counter.get_total_flops()


def sgemm_rate(n: int = 2048, rounds: int = 5) -> float:
    """float32 matrix-multiply flops per second on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def layer_profile(model, x, rows: int = 20) -> str:
    with torch.inference_mode(), torch.profiler.profile(record_shapes=True) as prof:
        model(x)
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44,
        max_shapes_column_width=60)


@pytest.fixture(scope="module", autouse=True)
def report(pytestconfig):
    yield
    if not RESULTS or not RESULTS_SGEMM:
        return
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        write_report(pytestconfig.pluginmanager.get_plugin("terminalreporter"))


def write_report(reporter):
    write = reporter.write_line
    reporter.section("whole model, B=1, medians (ms)")
    write(f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.2f}; sgemm {RESULTS_SGEMM[0] / 1e9:.0f} GFLOP/s")
    # floor: the direct convolutions' flops at the sgemm rate, which Winograd's
    # convolutions (a quarter of the multiplications) can go below.
    header = ["level", "side"] + list(VARIANTS) + ["ref/cpu", "comp/cpu", "ref/bf16",
                                                   "GFLOP", "floor", "cpu/floor"]
    write("".join(f"{h:>11}" for h in header))
    for (level, side), entry in sorted(RESULTS.items()):
        m = entry["median"]
        cells = [level, side] + [f"{m[v] * 1e3:.0f}" if v in m else "-" for v in VARIANTS]
        cells += [f"{m[a] / m[b]:.2f}" if a in m and b in m else "-"
                  for a, b in (("reference", "cpu"), ("compiled", "cpu"), ("reference", "cpu-bf16"))]
        floor = entry["flops"] / RESULTS_SGEMM[0]
        cells += [f"{entry['flops'] / 1e9:.1f}", f"{floor * 1e3:.0f}",
                  f"{m['cpu'] / floor:.2f}" if "cpu" in m else "-"]
        write("".join(f"{c:>11}" for c in cells))
    # torch.compile's generated code allocates where the profiler does not see it.
    write("peak memory of one forward (MiB; compiled: not visible to the profiler): " + "; ".join(
        f"L{level} {side}: " + ", ".join(f"{v} {b / 2**20:.0f}" for v, b in entry["peak"].items()
                                         if v != "compiled")
        for (level, side), entry in sorted(RESULTS.items())))
    for (level, side), entry in sorted(RESULTS.items()):
        if "profile" in entry:
            reporter.section(f"optimized path, level {level}, {side}x{side}: per-layer profile")
            for line in entry["profile"].splitlines():
                write(line)


@pytest.mark.parametrize("level", LEVELS, ids=lambda v: f"level{v}")
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_inference(benchmark, pytestconfig, variant, level):
    sizes = bench_sizes(pytestconfig)
    side = sizes["side"]
    model = build(variant, level)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))

    def forward():  # returns None: a kept result would be allocated afresh each round
        with torch.inference_mode():
            model(x)

    forward()  # compiles torch.compile outside the timed rounds
    benchmark.group = f"model level {level} {side}x{side}"
    benchmark.pedantic(forward, rounds=sizes["rounds"], warmup_rounds=1)
    entry = RESULTS.setdefault((level, side), {"median": {}, "peak": {}})
    if "flops" not in entry:
        entry["flops"] = conv_and_matmul_flops(level, side)
    if not RESULTS_SGEMM:
        RESULTS_SGEMM.append(sgemm_rate())
    benchmark.extra_info.update(flops=entry["flops"])
    entry["peak"][variant] = peak_allocated_bytes(forward)
    if benchmark.stats is not None:
        entry["median"][variant] = benchmark.stats.stats.median
    if variant == "cpu" and sizes is FULL:
        entry["profile"] = layer_profile(model, x)
