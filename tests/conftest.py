"""Shared fixtures: the project's ../shared folder (golden vectors, photos)."""

import os
from pathlib import Path

import pytest
import torch

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
