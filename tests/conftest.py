"""Shared fixtures: the project's ../shared folder (golden vectors, photos); the
fused op backends that can run here."""

import os
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter,
# which triton.jit picks when a kernel is decorated: set it before anything imports
# exposure_slot.kernels. (tests/test_triton_kernels.py compiles in a child process
# without it.)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(os.environ.get("EXPOSURE_SLOT_SHARED",
                             Path(__file__).resolve().parents[2] / "shared"))


def shared_path(*parts: str) -> Path:
    """A path under shared/; missing shared data fails under CI and skips, with the
    reason, elsewhere (a clone without the shared folder beside it)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found (set EXPOSURE_SLOT_SHARED to the shared/ folder)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session", params=[2, 3], ids=["level2", "level3"])
def golden(request):
    """The authors' network's float64 outputs for a seeded random checkpoint."""
    return torch.load(shared_path("golden", f"official_level{request.param}.pt"), weights_only=False)


@pytest.fixture
def restore_threads():
    """Lets a test change torch's thread count (the kernels' OpenMP threads too)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _cpu_kernels_skip() -> str | None:
    from exposure_slot import ops
    if ops.cpu_kernels_available():
        return None
    return (f"exposure_slot._C is not built ({ops._C_IMPORT_ERROR}); "
            "run `python setup.py build_ext --inplace`")


# Marks a test of the compiled CPU kernels.
_CPU_KERNELS_SKIP = _cpu_kernels_skip()
requires_kernels = pytest.mark.skipif(_CPU_KERNELS_SKIP is not None,
                                      reason=_CPU_KERNELS_SKIP or "")


def _fused_backend_skip(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None."""
    from exposure_slot import ops
    if backend == "cpu":
        return _CPU_KERNELS_SKIP
    if backend == "cuda":
        if not torch.cuda.is_available():
            return "backend 'cuda' needs a GPU"
        if not ops.cuda_kernels_available():
            return "exposure_slot._C was built without its CUDA kernels"
    if backend == "triton":
        if not ops.triton_kernels_available():
            return f"backend 'triton' needs triton ({ops.triton_import_error()})"
        if not torch.cuda.is_available() and not ops.triton_interpreting():
            return "backend 'triton' needs a GPU or TRITON_INTERPRET=1"
    return None


FUSED_BACKENDS = ("cpu", "triton", "cuda")


def fused_backends():
    """pytest params of every fused op backend, skipped (with the reason) where it
    cannot run: "cpu" when the extension is built; "triton" on a GPU or under the
    interpreter; "cuda" on a GPU with the extension's CUDA kernels."""
    return [pytest.param(b, marks=pytest.mark.skipif(bool(_fused_backend_skip(b)),
                                                     reason=_fused_backend_skip(b) or ""))
            for b in FUSED_BACKENDS]


def backend_device(backend: str) -> torch.device:
    """Where ``backend`` computes: CUDA for "cuda" and for "triton" on a GPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """True for Triton kernels run by the interpreter: slow, so tests shrink shapes."""
    return backend == "triton" and backend_device(backend).type == "cpu"


# The torch.ops namespace of each fused backend's ops.
_NAMESPACES = {"cpu": "exposure_slot", "cuda": "exposure_slot", "triton": "exposure_slot_triton"}


def op_namespace(backend: str):
    """torch.ops.<namespace> of a fused backend's ops."""
    return getattr(torch.ops, _NAMESPACES[backend])


def low_precision_dtypes(backend: str) -> list[torch.dtype]:
    """The dtypes below float64 that ``backend``'s kernels implement (bfloat16 alone
    under Triton's interpreter, to keep it fast: float32 runs in other tests there)."""
    from exposure_slot import ops
    if interpreted(backend):
        return [torch.bfloat16]
    return [d for d in ops.BACKEND_DTYPES[backend] if d != torch.float64]
