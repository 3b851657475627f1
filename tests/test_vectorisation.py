"""The CPU kernels' channel loops run in full-width vectors: g++'s vectorisation
report on csrc/cpu, compiled as setup.py builds it on this machine (its CXX_FLAGS
and default instruction set, ``-march=native -mprefer-vector-width=512``).

The kernels are vectorised two ways, and each gets its check:
- Most channel loops are written over blocks of GCC vector types (``Vec<T>``, 64
  bytes, csrc/cpu/common.h). GCC lowers an operation on a type wider than the
  target's registers piecewise and says so under ``-Wvector-operation-performance``:
  no such warning may come from our sources.
- The plain loops the compiler is asked to vectorise (``#pragma omp simd``) must be
  reported vectorised with 64-byte vectors (``-fopt-info-vec-optimized``), for the
  float and double kernels alike.

Needs g++ and an x86-64 CPU with AVX-512 (on AVX2 every 64-byte vector operation
is split in two, which GCC reports the same way); skips, saying which, otherwise.
benchmarks/README.md ("Vectorisation report") has the command to see the whole
report and what it says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch.utils.cpp_extension
from compile_helpers import ROOT, compile_each, setup_flags

SOURCES = sorted((ROOT / "csrc" / "cpu").glob("*.cpp"))
HEADERS = sorted((ROOT / "csrc" / "cpu").glob("*.h"))
# setup.py's default instruction set on x86-64, and what torch's BuildExtension adds.
CXX_FLAGS = setup_flags("CXX_FLAGS") + [
    "-march=native", "-mprefer-vector-width=512", "-std=c++20", "-fPIC",
    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
]


def has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


GXX = shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(GXX is None, reason="g++ not found: the report is g++'s"),
    pytest.mark.skipif(not has_avx512(), reason="this CPU has no AVX-512: its 64-byte "
                                                "vectors are split by design"),
]


def compile_one(source: Path, out_dir: Path) -> tuple[subprocess.CompletedProcess, str]:
    """g++'s result (its warnings in stderr) and its report of vectorised loops."""
    report = out_dir / (source.stem + ".vec.txt")
    # Torch's headers as system headers: their own warnings are not ours to judge.
    includes = [f"-isystem{p}" for p in torch.utils.cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    cmd = [GXX, "-c", str(source.relative_to(ROOT)),  # reported as csrc/cpu/...
           "-o", os.devnull, *CXX_FLAGS, *includes,
           "-Wvector-operation-performance", f"-fopt-info-vec-optimized={report}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return result, report.read_text() if report.is_file() else ""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """{source name: (g++'s result, report)}, compiled in parallel."""
    out_dir = tmp_path_factory.mktemp("vectorisation")
    return compile_each(SOURCES, lambda source: compile_one(source, out_dir))


def simd_loops() -> list[tuple[str, int, int]]:
    """(file, first line, last line) of every loop under ``#pragma omp simd``."""
    loops = []
    for path in SOURCES + HEADERS:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != "#pragma omp simd":
                continue
            first = last = i + 1  # the for statement, 0-based
            if lines[first].rstrip().endswith("{"):
                depth = 0
                for last in range(first, len(lines)):
                    depth += lines[last].count("{") - lines[last].count("}")
                    if depth == 0:
                        break
            else:
                while not lines[last].rstrip().endswith(";"):
                    last += 1
            loops.append((f"csrc/cpu/{path.name}", first + 1, last + 1))
    return loops


def test_there_are_simd_loops():
    assert len(simd_loops()) >= 3


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_no_piecewise_vector_operations(compiled, source):
    result, _ = compiled[source]
    assert result.returncode == 0, f"g++ failed on {source}:\n{result.stderr}"
    piecewise = sorted({line for line in result.stderr.splitlines()
                        if "-Wvector-operation-performance" in line})
    assert not piecewise, "vector operations lowered piecewise:\n" + "\n".join(piecewise)


@pytest.mark.parametrize("loop", simd_loops(), ids=lambda loop: f"{loop[0]}:{loop[1]}")
def test_simd_loop_is_vectorised(compiled, loop):
    name, first, last = loop
    # A header's loop is reported once per source that instantiates it.
    reports = "\n".join(report for _, report in compiled.values())
    found = [int(line) for line in re.findall(
        rf"^{re.escape(name)}:(\d+):\d+: optimized: loop vectorized using 64 byte vectors",
        reports, flags=re.MULTILINE)]
    assert any(first <= line <= last for line in found), (
        f"the loop at {name}:{first}-{last} under `#pragma omp simd` is not vectorised "
        f"with 64-byte vectors; see `g++ -fopt-info-vec-all` (benchmarks/README.md)")
