"""exposure-slot: fast, exact Exposure-slot (CVPR 2025) exposure correction.

Public API:
    ExposureSlot            the image network (level 2 or 3)
    SlotInSlotAttention     the nested slot attention module, usable on its own
    load_official           an ExposureSlot from the authors' released checkpoint
    export_official         our weights back in the authors' layout
    load_pretrained         weights shipped with the package ("demo")
    optimize_for_inference  a frozen, faster copy of a model for CPU inference
    compile_for             a fixed-shape engine (CUDA graphs on a GPU) for video frames
    infer_large             exact inference on images of any size in bounded memory
    keep_freed_memory       stop repeated CPU forwards page-faulting their tensors in
    available_backends      the kernel backends that work on this install
"""

import torch  # noqa: F401  (torch first: the extension links against its libraries)

from .backends import available_backends
from .checkpoint import CheckpointError, export_official, load_official
from .engine import CompiledExposureSlot, compile_for
from .host_memory import keep_freed_memory
from .inference import InferenceExposureSlot, optimize_for_inference
from .network import ExposureOutput, ExposureSlot
from .pretrained import load_pretrained
from .slot_attention import SlotAttentionOutput, SlotInSlotAttention
from .tiling import infer_large

__all__ = [
    "ExposureSlot",
    "ExposureOutput",
    "SlotInSlotAttention",
    "SlotAttentionOutput",
    "load_official",
    "export_official",
    "load_pretrained",
    "optimize_for_inference",
    "InferenceExposureSlot",
    "compile_for",
    "CompiledExposureSlot",
    "infer_large",
    "keep_freed_memory",
    "CheckpointError",
    "available_backends",
]
__version__ = "0.1.0"
