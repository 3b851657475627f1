"""Tiled inference (``exposure_slot.infer_large``) against the whole-image forward.

As a pytest-benchmark suite: the whole-image forward and each tiled mode with a
forced tile (1024, the largest the planner picks; short mode: 64) at 2048x1536
(short mode: 256x192), level 2, float32, CPU, in one group, so the table's ratios
to the fastest (the whole-image forward) are the tiling overheads. Each test also
checks the output against the whole-image forward's (``extra_info["max_abs_diff"]``).

    python -m pytest benchmarks/test_bench_tiling.py
    EXPOSURE_SLOT_BENCH_SHORT=1 python -m pytest benchmarks/test_bench_tiling.py

As a script: one memory-bounded run on a large image, reporting the plan, the time
and the process's peak resident memory (run it alone: it is the measurement):

    python benchmarks/test_bench_tiling.py --size 6000x4000 --max-memory 3G
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import pytest
import torch
from conftest import is_short

import exposure_slot as es
from exposure_slot.tiling import MODES, infer_large, plan_tiles

FULL = {"size": (1536, 2048), "tile": 1024, "rounds": 2}
SHORT = {"size": (192, 256), "tile": 64, "rounds": 3}


def settings(config) -> dict:
    return SHORT if is_short(config) else FULL


def random_model(level: int = 2) -> es.ExposureSlot:
    torch.manual_seed(0)
    return es.ExposureSlot(level=level).eval()


def random_image(height: int, width: int) -> torch.Tensor:
    return torch.rand(1, 3, height, width, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def setup(pytestconfig):
    cfg = settings(pytestconfig)
    model = random_model()
    x = random_image(*cfg["size"])
    with torch.inference_mode():
        reference = model(x)
    return cfg, model, x, reference


@pytest.mark.parametrize("mode", ("whole",) + MODES)
def test_tiled_against_whole(benchmark, setup, mode):
    cfg, model, x, reference = setup
    result = {}

    def run():
        # Keep only the last output: pytest-benchmark would keep a returned one alive
        # into the next round.
        result.clear()
        if mode == "whole":
            with torch.inference_mode():
                result["y"] = model(x)
        else:
            result["y"] = infer_large(model, x, tile=cfg["tile"], mode=mode, progress=False)

    benchmark.group = f"infer_large {cfg['size'][1]}x{cfg['size'][0]}"
    benchmark.extra_info["tile"] = None if mode == "whole" else cfg["tile"]
    benchmark.pedantic(run, rounds=cfg["rounds"], warmup_rounds=1)
    error = (result["y"] - reference).abs().max().item()
    benchmark.extra_info["max_abs_diff"] = error
    assert error <= 1e-5


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="6000x4000", help="WIDTHxHEIGHT (default 6000x4000)")
    parser.add_argument("--max-memory", default=None, help="budget, e.g. 3G (default: half "
                                                           "of the available memory)")
    parser.add_argument("--tile", type=int, default=None)
    parser.add_argument("--mode", choices=MODES, default=None)
    parser.add_argument("--level", type=int, choices=(2, 3), default=2)
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    model = random_model(args.level)
    model.backend = args.backend
    x = random_image(height, width)
    plan = plan_tiles(model, x.shape, max_memory=args.max_memory, tile=args.tile, mode=args.mode)
    print(f"{width}x{height} level {args.level}, backend {model.backend}: {plan.describe()}")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    y = infer_large(model, x, max_memory=args.max_memory, tile=args.tile, mode=args.mode,
                    progress=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"done in {seconds:.1f} s; peak resident memory {peak / 2**20:.2f} GiB "
          f"(before the run {before / 2**20:.2f} GiB, with the input image); "
          f"output finite: {bool(torch.isfinite(y).all())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
