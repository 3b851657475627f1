"""pytest-benchmark setup for the kernel benchmarks: sizes (full or short), machine
info, and an end-of-session table of medians, ratios and memory floors.

Run from the repository root:
    python -m pytest benchmarks/                  # full sizes
    python -m pytest benchmarks/ --bench-short    # CI: small sizes, few rounds
                                                  # (or EXPOSURE_SLOT_BENCH_SHORT=1)
    python -m pytest benchmarks/ --bench-plain-malloc   # leave glibc's malloc as is

By default the session first tells glibc to keep freed memory (see
keep_freed_memory); README.md explains why and what plain malloc costs.
"""

from __future__ import annotations

import ctypes
import os
import platform
from dataclasses import dataclass, field

import pytest
import torch

FULL = {"tokens": [128 * 128, 256 * 256], "slots": [3, 7], "rounds": 30}
SHORT = {"tokens": [32 * 32], "slots": [3], "rounds": 3}
BACKENDS = ("reference", "compiled", "cpu")


@dataclass
class Results:
    """Medians (s) per (pass, K, N) and backend, the traffic of each pass (bytes, fresh
    [N,C] outputs), and the copy timings per N: (bytes of one tensor, median s)."""
    medians: dict[tuple, dict[str, float]] = field(default_factory=dict)
    traffic: dict[tuple, tuple[int, int]] = field(default_factory=dict)
    copy: dict[int, tuple[int, float]] = field(default_factory=dict)
    fresh_copy: dict[int, tuple[int, float]] = field(default_factory=dict)

    def floors(self, key) -> tuple[float, float] | None:
        """The time the pass needs at the copy_ bandwidth, and that plus what its
        fresh outputs cost to allocate (clone minus copy_)."""
        tokens = key[2]
        if tokens not in self.copy or tokens not in self.fresh_copy:
            return None
        size, copy_s = self.copy[tokens]
        bytes_moved, fresh_outputs = self.traffic[key]
        bandwidth = 2 * size / copy_s
        floor = bytes_moved / bandwidth
        return floor, floor + fresh_outputs * (self.fresh_copy[tokens][1] - copy_s)


RESULTS = pytest.StashKey[Results]()


MALLOC_MODE = pytest.StashKey[str]()


def pytest_addoption(parser):
    parser.addoption("--bench-short", action="store_true",
                     help="small sizes and few rounds, for CI (also EXPOSURE_SLOT_BENCH_SHORT=1)")
    parser.addoption("--bench-plain-malloc", action="store_true",
                     help="leave glibc's malloc thresholds alone (fresh outputs may be "
                          "page-faulted in on every call)")


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory mapped (mmap and trim thresholds of 1 GiB), so a
    fresh output reuses pages that are already there, as with a caching allocator.
    Left alone, glibc's adaptive thresholds decide from the heap's history whether an
    8 to 32 MiB output is faulted in afresh (about 0.6 us per 4 KiB page on this VM),
    and the same benchmark takes 0.7 ms in one session and 3.8 ms in the next."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(
        libc.mallopt(m_trim_threshold, 1 << 30))


def pytest_configure(config):
    config.stash[RESULTS] = Results()
    kept = not config.getoption("--bench-plain-malloc") and keep_freed_memory()
    config.stash[MALLOC_MODE] = "freed memory kept" if kept else "plain malloc"


def sizes(config) -> dict:
    short = config.getoption("--bench-short") or os.environ.get("EXPOSURE_SLOT_BENCH_SHORT") == "1"
    return SHORT if short else FULL


def pytest_generate_tests(metafunc):
    for name, prefix in (("tokens", "N"), ("slots", "K")):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, sizes(metafunc.config)[name],
                                 ids=lambda v, p=prefix: f"{p}{v}")


@pytest.fixture
def rounds(pytestconfig) -> int:
    return sizes(pytestconfig)["rounds"]


@pytest.fixture
def results(pytestconfig) -> Results:
    return pytestconfig.stash[RESULTS]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["cpu_model"] = cpu_model()
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["malloc"] = config.stash[MALLOC_MODE]


def pytest_terminal_summary(terminalreporter, config):
    res = config.stash.get(RESULTS, None)
    if res is None or not res.medians:
        return
    write = terminalreporter.write_line
    terminalreporter.section("mask_fusion medians (ms), B=1 C=128 float32, with base")
    write(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{config.stash[MALLOC_MODE]}, load average {os.getloadavg()[0]:.2f}")
    write("ref/cpu, comp/cpu: backend median over cpu median. floor: bytes moved at the "
          "copy_ bandwidth; +alloc: plus faulting in fresh outputs")
    header = ("pass", "K", "N", "reference", "compiled", "cpu", "ref/cpu", "comp/cpu",
              "floor", "+alloc", "cpu/+alloc")
    widths = (17, 3, 7, 11, 10, 8, 9, 10, 8, 8, 12)
    write("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    for key in sorted(res.medians):
        m = res.medians[key]
        cells = [key[0], *key[1:]]
        cells += [f"{m[b] * 1e3:.2f}" if b in m else "-" for b in BACKENDS]
        cells += [f"{m[b] / m['cpu']:.2f}" if b in m and "cpu" in m else "-"
                  for b in ("reference", "compiled")]
        floors = res.floors(key)
        cells += [f"{f * 1e3:.2f}" for f in floors] if floors else ["-", "-"]
        cells.append(f"{m['cpu'] / floors[1]:.2f}" if floors and "cpu" in m else "-")
        write("".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    for tokens in sorted(res.copy):
        size, copy_s = res.copy[tokens]
        line = (f"N={tokens}: copy_ of a {size / 2**20:.0f} MiB tensor {copy_s * 1e3:.3f} ms = "
                f"{2 * size / copy_s / 1e9:.1f} GB/s (read + write)")
        if tokens in res.fresh_copy:
            line += f"; clone {res.fresh_copy[tokens][1] * 1e3:.3f} ms"
        write(line)
