"""The CPU kernels' channel loops run in full-width vectors on the two x86-64 targets
that matter: AVX-512 servers (``-march=x86-64-v4``, 64-byte vectors) and AVX2
laptops (``-march=x86-64-v3``, 32-byte vectors). Each file of csrc/cpu is compiled
for both as setup.py builds it (its CXX_FLAGS, ``-mprefer-vector-width=512``) and
g++'s vectorisation report checked; compiling needs no such CPU, so the test runs on
any x86-64 machine with g++ (it skips elsewhere, saying why).

The kernels are vectorised two ways, and each gets its check:
- Most channel loops are written over blocks of GCC vector types (``Vec<T>``, one
  register of the target, csrc/cpu/common.h). GCC lowers an operation on a type
  wider than the target's registers piecewise, through the stack, and says so
  under ``-Wvector-operation-performance``: no such warning may come from our
  sources. (With 64-byte vectors on AVX2 the kernels ran 8-11x slower.)
- The plain loops the compiler is asked to vectorise (``#pragma omp simd``) must be
  reported vectorised with the target's full vectors (``-fopt-info-vec-optimized``),
  for the float and double kernels alike.

benchmarks/README.md ("Vectorisation report") has the command to see the whole
report and what it says.
"""

from __future__ import annotations

import os
import platform
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
# setup.py's flags on x86-64 but the instruction set, and what torch's BuildExtension adds.
CXX_FLAGS = setup_flags("CXX_FLAGS") + [
    "-mprefer-vector-width=512", "-std=c++20", "-fPIC",
    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
]
# Instruction set -> the bytes of its vectors.
TARGETS = {"x86-64-v4": 64, "x86-64-v3": 32}

GXX = shutil.which("g++")
pytestmark = [
    pytest.mark.skipif(GXX is None, reason="g++ not found: the report is g++'s"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"),
                       reason=f"the targets are x86-64's; this is {platform.machine()}"),
]


def compile_one(source: Path, target: str, out_dir: Path) -> tuple[subprocess.CompletedProcess, str]:
    """g++'s result (its warnings in stderr) and its report of vectorised loops."""
    report = out_dir / f"{source.stem}.{target}.vec.txt"
    # Torch's headers as system headers: their own warnings are not ours to judge.
    includes = [f"-isystem{p}" for p in torch.utils.cpp_extension.include_paths()]
    includes.append(f"-isystem{sysconfig.get_paths()['include']}")
    cmd = [GXX, "-c", str(source.relative_to(ROOT)),  # reported as csrc/cpu/...
           "-o", os.devnull, f"-march={target}", *CXX_FLAGS, *includes,
           "-Wvector-operation-performance", f"-fopt-info-vec-optimized={report}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    return result, report.read_text() if report.is_file() else ""


@pytest.fixture(scope="module", params=list(TARGETS))
def compiled(request, tmp_path_factory):
    """(target, {source name: (g++'s result, report)}), compiled in parallel."""
    out_dir = tmp_path_factory.mktemp("vectorisation")
    target = request.param
    return target, compile_each(SOURCES, lambda source: compile_one(source, target, out_dir))


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
    assert len(simd_loops()) >= 2


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_no_piecewise_vector_operations(compiled, source):
    target, results = compiled
    result, _ = results[source]
    assert result.returncode == 0, f"g++ -march={target} failed on {source}:\n{result.stderr}"
    piecewise = sorted({line for line in result.stderr.splitlines()
                        if "-Wvector-operation-performance" in line})
    assert not piecewise, (f"vector operations lowered piecewise for {target}:\n"
                           + "\n".join(piecewise))


@pytest.mark.parametrize("loop", simd_loops(), ids=lambda loop: f"{loop[0]}:{loop[1]}")
def test_simd_loop_is_vectorised(compiled, loop):
    target, results = compiled
    name, first, last = loop
    # A header's loop is reported once per source that instantiates it.
    reports = "\n".join(report for _, report in results.values())
    found = [int(line) for line in re.findall(
        rf"^{re.escape(name)}:(\d+):\d+: optimized: loop vectorized using "
        rf"{TARGETS[target]} byte vectors", reports, flags=re.MULTILINE)]
    assert any(first <= line <= last for line in found), (
        f"the loop at {name}:{first}-{last} under `#pragma omp simd` is not vectorised "
        f"with {TARGETS[target]}-byte vectors for {target}; see `g++ -fopt-info-vec-all` "
        f"(benchmarks/README.md)")
