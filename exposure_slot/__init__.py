"""exposure-slot: fast, exact Exposure-slot (CVPR 2025) exposure correction.

Public API:
    ExposureSlot            the image network (level 2 or 3)
    SlotInSlotAttention     the nested slot attention module, usable on its own
    load_official           an ExposureSlot from the authors' released checkpoint
    export_official         our weights back in the authors' layout
    available_backends      the kernel backends that work on this install
"""

import torch  # noqa: F401  (torch first: the extension links against its libraries)

from .backends import available_backends
from .checkpoint import CheckpointError, export_official, load_official
from .network import ExposureOutput, ExposureSlot
from .slot_attention import SlotAttentionOutput, SlotInSlotAttention

__all__ = [
    "ExposureSlot",
    "ExposureOutput",
    "SlotInSlotAttention",
    "SlotAttentionOutput",
    "load_official",
    "export_official",
    "CheckpointError",
    "available_backends",
]
__version__ = "0.1.0"
