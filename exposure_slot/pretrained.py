"""Our own weights files, and the weights that ship with the package.

A weights file is a ``torch.save``d dict::

    {"format": "exposure-slot-weights", "version": 1,
     "config": {"level": 2, "dim": 128, "iters": 3},
     "metadata": {...free-form: steps, data, date, ...},
     "state_dict": {...ExposureSlot.state_dict(), float32 or float16...}}

It loads with ``weights_only=True`` (no pickled code). The authors' ``.pth``
layout is handled by :mod:`exposure_slot.checkpoint` instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .checkpoint import CheckpointError
from .images import atomic_write
from .network import ExposureSlot

WEIGHTS_FORMAT = "exposure-slot-weights"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# name -> (file in WEIGHTS_DIR, one-line description)
PRETRAINED = {
    "demo": ("demo_level2.pt",
             "level 2, trained on synthetic exposure errors of Kodak photos kodim01-18 "
             "(a demonstration model, not the authors' weights)"),
}


def save_weights(model: ExposureSlot, path: str | os.PathLike, *, metadata: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
    """Atomically write ``model``'s weights (floating tensors cast to ``dtype``)."""
    state = {key: (value.detach().to("cpu", dtype) if value.is_floating_point() else value.detach().cpu())
             for key, value in model.state_dict().items()}
    payload = {
        "format": WEIGHTS_FORMAT,
        "version": 1,
        "config": model_config(model),
        "metadata": dict(metadata or {}),
        "state_dict": state,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def model_config(model: ExposureSlot) -> dict[str, int]:
    """The constructor arguments that shape ``model``'s parameters."""
    slot_attention = model.bottleneck.slot_attention
    return {"level": model.level, "dim": model.conv3_2.out_channels,
            "iters": slot_attention.iters}


def read_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The payload of a weights file, checked; raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file {path}: {type(exc).__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(f"{path} is not an exposure-slot weights file (no format "
                              f"{WEIGHTS_FORMAT!r}); for the authors' .pth files use load_official")
    return payload


def load_weights(path: str | os.PathLike, *, backend: str = "auto",
                 size_policy: str = "pad") -> ExposureSlot:
    """An eval-mode float32 :class:`ExposureSlot` from a weights file (strict)."""
    payload = read_weights(path)
    model = ExposureSlot(backend=backend, size_policy=size_policy, **payload["config"])
    state = {key: value.float() if value.is_floating_point() else value
             for key, value in payload["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights in {path} do not fit the network: {exc}") from None
    model.metadata = payload["metadata"]
    return model.eval()


def load_pretrained(name: str = "demo", *, backend: str = "auto",
                    size_policy: str = "pad") -> ExposureSlot:
    """Weights shipped with the package, by name (see ``PRETRAINED``), as an
    eval-mode :class:`ExposureSlot`; its ``metadata`` attribute says how it was
    trained."""
    if name not in PRETRAINED:
        known = ", ".join(f"{key!r} ({text})" for key, (_, text) in PRETRAINED.items())
        raise ValueError(f"unknown pretrained weights {name!r}; known: {known}")
    path = WEIGHTS_DIR / PRETRAINED[name][0]
    if not path.is_file():
        raise CheckpointError(f"the {name!r} weights are missing from this install ({path}); "
                              "reinstall the package")
    return load_weights(path, backend=backend, size_policy=size_policy)
