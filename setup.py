"""Builds the exposure_slot._C extension: C++ (OpenMP) kernels always, CUDA kernels
when the installed torch has CUDA.

Install with ``pip install -e . --no-build-isolation`` after installing torch, so
that the extension is compiled against the torch it will be loaded into.

Environment:
  EXPOSURE_SLOT_CPU_ARCH   compiler flags selecting the CPU instruction set
                           (default ``-march=native``, plus
                           ``-mprefer-vector-width=512`` on x86-64; set
                           ``-march=x86-64-v3`` or similar when building a wheel
                           for other machines).
  FORCE_CUDA=1             require the CUDA kernels: fail, saying why, instead of
                           building the CPU kernels only when torch has no CUDA or
                           no CUDA toolkit (nvcc, CUDA_HOME) is found.
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0").
  MAX_JOBS                 parallel compile jobs (ninja; the CUDA files take a
                           minute or two each).
"""

import glob
import os
import platform

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

HERE = os.path.dirname(os.path.abspath(__file__))
# nvcc's flags for csrc/cuda (IEEE math: no --use_fast_math). tests/test_cuda_sources.py
# reads this list from here (tests/compile_helpers.py), so the compile test builds
# exactly what setup.py does.
NVCC_FLAGS = ["-O3", "-DEXPOSURE_SLOT_CUDA"]
# g++'s flags for csrc/*.cpp and csrc/cpu, before the instruction set's (extension());
# tests/test_vectorisation.py reads them the same way. Hidden inline functions: the
# kernels' calls of their shared helpers (dot_block, a tile's logits 12 calls a tile)
# are direct calls, not through the PLT (level-3 slot-in-slot forward ~2% faster).
CXX_FLAGS = ["-O3", "-fopenmp", "-g0", "-fvisibility-inlines-hidden", "-DEXPOSURE_SLOT_CPU"]


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute ones in editable builds.
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot be built here, or None. CUDAExtension needs a
    torch built with CUDA (a CPU torch makes its CUDA_HOME None whatever the
    environment says) and a CUDA toolkit."""
    if torch.version.cuda is None:
        return "the installed torch has no CUDA (torch.version.cuda is None)"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (nvcc on PATH or CUDA_HOME)"
    return None


def extension():
    # gcc prefers 256-bit vectors even where AVX-512 exists; the kernels' loops over
    # 128 channels run faster at full width there (and the flag is a no-op without it).
    default_arch = "-march=native" + (" -mprefer-vector-width=512"
                                      if platform.machine() in ("x86_64", "AMD64") else "")
    cpu_arch = os.environ.get("EXPOSURE_SLOT_CPU_ARCH", default_arch)
    cxx_flags = CXX_FLAGS + cpu_arch.split()
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    cuda_sources = sources("csrc/cuda/*.cu")

    why_not_cuda = cuda_unavailable_reason()
    if why_not_cuda is not None and os.environ.get("FORCE_CUDA") == "1":
        raise RuntimeError(f"exposure-slot: FORCE_CUDA=1, but {why_not_cuda}")
    if why_not_cuda is None and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        return CUDAExtension(
            "exposure_slot._C",
            cpp_sources + cuda_sources,
            extra_compile_args={
                "cxx": cxx_flags + ["-DEXPOSURE_SLOT_CUDA"],
                "nvcc": NVCC_FLAGS,
            },
            extra_link_args=["-fopenmp"],
        )
    if why_not_cuda is not None:
        print(f"exposure-slot: {why_not_cuda}; building the CPU kernels only")
    return CppExtension(
        "exposure_slot._C",
        cpp_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=["exposure_slot", "exposure_slot.ops", "exposure_slot.data", "exposure_slot.kernels"],
    package_dir={"exposure_slot.kernels": "kernels"},
    package_data={"exposure_slot": ["weights/*.pt"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
