"""Which implementation of the fused ops runs: names, availability, and "auto".

A backend is a name; the ops in ``exposure_slot.ops`` dispatch on it. Modules keep
the name the user chose ("auto" included) and resolve it per call from the device
of the input, so one model moves between CPU and GPU without reconfiguration.
"""

from __future__ import annotations

import torch

from . import ops

# Fastest first, per device type: "auto" takes the first available one.
_PREFERENCE = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
KNOWN_BACKENDS = ("reference", "cpu", "triton", "cuda")
# The device type each fused backend computes on; "reference" runs anywhere.
_DEVICE_OF = {"cpu": "cpu", "triton": "cuda", "cuda": "cuda"}


def available_backends() -> list[str]:
    """Backends that work on this install, in the order of ``KNOWN_BACKENDS``."""
    found = {"reference"}
    if ops.cpu_kernels_available():
        found.add("cpu")
    # The GPU backends need a GPU; Triton's CPU interpreter is for the op tests only
    # (the ops accept backend="triton" on CPU tensors there), far too slow for models.
    if torch.cuda.is_available():
        if ops.cuda_kernels_available():
            found.add("cuda")
        if ops.triton_kernels_available():
            found.add("triton")
    return [name for name in KNOWN_BACKENDS if name in found]


def _interpreted(name: str) -> bool:
    """Whether ``name`` is "triton" running on CPU tensors through Triton's
    interpreter (``TRITON_INTERPRET=1``): usable by explicit choice, for tests, but
    never listed as available nor picked by "auto" (it is far too slow for models)."""
    return name == "triton" and ops.triton_interpreting() and ops.triton_kernels_available()


def validate_backend(name: str) -> str:
    """Return ``name`` if it is "auto" or an available backend, else raise ValueError."""
    if name == "auto":
        return name
    available = available_backends()
    if name not in KNOWN_BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; known: {', '.join(KNOWN_BACKENDS)}; "
            f"available on this install: auto, {', '.join(available)}")
    if name not in available and not _interpreted(name):
        raise ValueError(
            f"backend {name!r} is not available on this install; "
            f"available: auto, {', '.join(available)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The concrete backend that runs for tensors on ``device``."""
    validate_backend(name)
    if name == "auto":
        available = available_backends()
        for candidate in _PREFERENCE.get(device.type, ("reference",)):
            if candidate in available:
                return candidate
        return "reference"
    wanted = _DEVICE_OF.get(name)
    if wanted is not None and device.type != wanted and not (
            device.type == "cpu" and _interpreted(name)):
        raise ValueError(
            f"backend {name!r} computes on {wanted} tensors but the input is on "
            f"{device}; move the input or choose backend='auto'")
    return name
