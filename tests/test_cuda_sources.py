"""The CUDA sources (csrc/cuda/*.cu) compile with nvcc, without a GPU, for the
architectures setup.py builds by default (sm_80 and sm_90), and no kernel spills.

Each file is compiled once (``nvcc -c``, both architectures in one call, all files
in parallel) with torch's include paths and the defines torch's CUDAExtension
passes, plus setup.py's own nvcc flags; a failure shows nvcc's output. Then
``cuobjdump --dump-resource-usage`` (from the CUDA toolkit, or the copy bundled
with triton) lists every kernel's registers (printed, run with ``-s`` to see them)
and its STACK and LOCAL bytes, which must be 0: a spill is local memory traffic in
a kernel meant to be bound by its global reads.

Exception: the float64 backward of slot_attention_pass holds its rows in double
registers and sits at the 255-register ceiling, where ptxas may spill a few
scalars (24 bytes of stack for sm_80 with CUDA 13.0, none for sm_90). float64 is
the exactness dtype (tests against the float64 reference), not a speed path, so
that spill is printed and allowed, as long as it stays small (KNOWN_SPILLS).

Skips, with the reason, when nvcc is not installed.
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

SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
ARCHS = ("80", "90")

# setup.py's nvcc flags, and the ones torch's BuildExtension adds to every .cu file.
NVCC_FLAGS = setup_flags("NVCC_FLAGS") + [
    "-std=c++20",
    "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
    "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C", "-Xcompiler", "-fPIC",
]

# Kernels allowed to spill, by a fragment of their demangled name, with the most
# STACK bytes each may use (see the module docstring).
KNOWN_SPILLS = {"slot_attention_pass_backward_kernel<double": 256}


def find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc")] + ([str(Path(home) / "bin" / "nvcc")] if home else [])
    return next((c for c in candidates if c and Path(c).is_file()), None)


def find_cuobjdump(nvcc: str) -> str | None:
    candidates = [shutil.which("cuobjdump"), str(Path(nvcc).parent / "cuobjdump")]
    try:
        import triton  # its wheel bundles a cuobjdump
        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
                              / "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and Path(c).is_file()), None)


NVCC = find_nvcc()
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, CUDA_HOME): the "
                                                      "CUDA sources cannot be compiled here")


def compile_one(source: Path, out_dir: Path) -> tuple[Path, subprocess.CompletedProcess]:
    obj = out_dir / (source.stem + ".o")
    includes = [f"-I{p}" for p in torch.utils.cpp_extension.include_paths()]
    includes.append(f"-I{sysconfig.get_paths()['include']}")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = [NVCC, "-c", str(source), "-o", str(obj), *gencode, *NVCC_FLAGS, *includes]
    return obj, subprocess.run(cmd, capture_output=True, text=True)


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    """{source name: (object file, nvcc's result)}, compiled in parallel."""
    out_dir = tmp_path_factory.mktemp("cuda_objects")
    return compile_each(SOURCES, lambda source: compile_one(source, out_dir))


def test_there_are_cuda_sources():
    assert {s.name for s in SOURCES} >= {"mask_fusion.cu", "slot_attention_pass.cu"}


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_compiles(objects, source):
    obj, result = objects[source]
    assert result.returncode == 0, f"nvcc failed on {source}:\n{result.stdout}\n{result.stderr}"
    assert obj.is_file()


def resource_usage(cuobjdump: str, obj: Path) -> list[tuple[str, str, dict[str, int]]]:
    """(arch, demangled kernel, {REG, STACK, LOCAL, SHARED, ...}) per kernel and arch."""
    text = subprocess.run([cuobjdump, "--dump-resource-usage", str(obj)], capture_output=True,
                          text=True, check=True).stdout
    rows, arch, name = [], None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.removeprefix("arch = ")
        elif line.startswith("Function "):
            name = line.removeprefix("Function ").rstrip(":")
        elif name is not None and line.startswith("REG:"):
            usage = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            rows.append((arch, name, usage))
            name = None
    names = subprocess.run(["c++filt"], input="\n".join(n for _, n, _ in rows),
                           capture_output=True, text=True).stdout.splitlines() \
        if shutil.which("c++filt") else [n for _, n, _ in rows]
    return [(a, re.sub(r"exposure_slot::cuda::(\(anonymous namespace\)::)?", "", d), u)
            for (a, _, u), d in zip(rows, names, strict=True)]


@pytest.mark.parametrize("source", [s.name for s in SOURCES])
def test_no_kernel_spills(objects, source):
    obj, result = objects[source]
    if result.returncode != 0:
        pytest.skip(f"{source} did not compile (see test_compiles)")
    cuobjdump = find_cuobjdump(NVCC)
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (CUDA toolkit, or `pip install triton`)")
    usage = resource_usage(cuobjdump, obj)
    assert {a for a, _, _ in usage} == {f"sm_{a}" for a in ARCHS}
    spills = []
    for arch, kernel, u in usage:
        short = kernel.split("(")[0].removeprefix("void ")
        print(f"{source} {arch} {short}: {u['REG']} registers, {u.get('SHARED', 0)} B shared, "
              f"stack {u['STACK']} B, local {u['LOCAL']} B")
        allowed = next((limit for frag, limit in KNOWN_SPILLS.items() if frag in kernel), 0)
        if u["STACK"] > allowed or u["LOCAL"] > allowed:
            spills.append(f"{arch} {short}: STACK {u['STACK']}, LOCAL {u['LOCAL']}")
    assert not spills, "kernels spill to local memory:\n" + "\n".join(spills)
