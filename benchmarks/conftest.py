"""pytest-benchmark setup shared by every benchmark file: sizes (full or short), machine
info, and an end-of-session table of medians, ratios, peak memory and notes.

Run from the repository root:
    python -m pytest benchmarks/                  # full sizes
    python -m pytest benchmarks/ --bench-short    # CI: small sizes, few rounds
                                                  # (or EXPOSURE_SLOT_BENCH_SHORT=1)
    python -m pytest benchmarks/ --bench-plain-malloc   # leave glibc's malloc as is

A benchmark file times each implementation with ``record.time(benchmark, group,
backend, target)``; rows with the same group are compared in the summary: the
median of every backend, and "x/fast" ratios of the reference and compiled backends
over each fast one measured in the same run. ``record.note`` and ``record.peak``
add a floor or a peak memory to a group.

By default the session first tells glibc to keep freed blocks of up to 1 GiB
(``exposure_slot.keep_freed_memory``; the command line tool keeps up to 64 MiB);
README.md explains why and what plain malloc costs.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass, field

import pytest
import torch

from exposure_slot import keep_freed_memory

# Backends in summary order; the first two are what the fast ones are measured against.
BASELINES = ("reference", "compiled")
# At full size every backend is timed over at least this long (Recorder.time).
MIN_SECONDS = 1.0
MAX_ROUNDS = 100


@dataclass
class Group:
    medians: dict[str, float] = field(default_factory=dict)  # backend -> seconds
    peaks: dict[str, int] = field(default_factory=dict)  # backend -> bytes
    notes: list[str] = field(default_factory=list)


class Recorder:
    """Collects the session's measurements for the summary table."""

    def __init__(self, short: bool):
        self.short = short
        self.groups: dict[str, Group] = {}

    def group(self, name: str) -> Group:
        return self.groups.setdefault(name, Group())

    def time(self, benchmark, group: str, backend: str, target, rounds: int,
             warmup_rounds: int = 2) -> float | None:
        """Times ``target`` (which must return None: pytest-benchmark keeps a returned
        result alive into the next round) after one untimed call (compilation);
        returns the median in seconds, None under --benchmark-disable. At full size
        the rounds grow until they span at least MIN_SECONDS (at most MAX_ROUNDS), so
        that a fast backend's median is not taken over a fraction of a second, where
        one burst of the shared machine's noise moves it by 10-20%."""
        target()
        if not self.short:
            start = time.perf_counter()
            target()
            once = time.perf_counter() - start
            rounds = max(rounds, min(MAX_ROUNDS, math.ceil(MIN_SECONDS / max(once, 1e-9))))
        benchmark.group = group
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds)
        if benchmark.stats is None:
            return None
        seconds = benchmark.stats.stats.median
        self.group(group).medians[backend] = seconds
        return seconds

    def peak(self, group: str, backend: str, nbytes: int) -> None:
        self.group(group).peaks[backend] = nbytes

    def note(self, group: str, text: str) -> None:
        if text not in self.group(group).notes:
            self.group(group).notes.append(text)


RECORDER = pytest.StashKey[Recorder]()
MALLOC_MODE = pytest.StashKey[str]()


def pytest_addoption(parser):
    parser.addoption("--bench-short", action="store_true",
                     help="small sizes and few rounds, for CI (also EXPOSURE_SLOT_BENCH_SHORT=1)")
    parser.addoption("--bench-plain-malloc", action="store_true",
                     help="leave glibc's malloc thresholds alone (fresh outputs may be "
                          "page-faulted in on every call)")


def is_short(config) -> bool:
    return bool(config.getoption("--bench-short")
                or os.environ.get("EXPOSURE_SLOT_BENCH_SHORT") == "1")


def pytest_configure(config):
    config.stash[RECORDER] = Recorder(is_short(config))
    kept = not config.getoption("--bench-plain-malloc") and keep_freed_memory()
    config.stash[MALLOC_MODE] = "freed memory kept" if kept else "plain malloc"


@pytest.fixture
def record(pytestconfig) -> Recorder:
    return pytestconfig.stash[RECORDER]


@pytest.fixture
def short(pytestconfig) -> bool:
    """True in CI's short mode: small sizes, few rounds."""
    return is_short(pytestconfig)


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
    recorder = config.stash.get(RECORDER, None)
    if recorder is None or not any(g.medians for g in recorder.groups.values()):
        return
    write = terminalreporter.write_line
    terminalreporter.section("benchmark medians (ms) and ratios")
    write(f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{config.stash[MALLOC_MODE]}, load average {os.getloadavg()[0]:.2f}")
    write("x/fast: the reference's (or compiled's) median over the fast backend's, "
          "both measured in this run")
    for name, group in recorder.groups.items():
        if not group.medians:
            continue
        write("")
        write(name)
        fast = [b for b in group.medians if b not in BASELINES]
        cells = [f"{b} {group.medians[b] * 1e3:.2f}" for b in (*BASELINES, *fast)
                 if b in group.medians]
        for backend in fast:
            cells += [f"{base}/{backend} {group.medians[base] / group.medians[backend]:.2f}x"
                      for base in BASELINES if base in group.medians]
        write("  " + "   ".join(cells))
        if group.peaks:
            write("  peak extra memory: " + "   ".join(
                f"{b} {n / 2**20:.1f} MiB" for b, n in group.peaks.items()))
        for text in group.notes:
            write("  " + text)
