"""Fixed-shape inference: one input shape, static buffers, and on a GPU the whole
forward captured once in a CUDA graph and replayed for every batch.

    engine = compile_for(model, (4, 3, 1080, 1920))         # bfloat16 on a GPU
    y = engine(x)                    # x [<=4, 3, 1080, 1920] float in [0, 1], any device
    y, masks = engine(x, return_masks=True)
    engine(x, out=pinned_host_buffer, non_blocking=True)  # no extra device copy

What ``compile_for`` builds, in order:

1. ``optimize_for_inference(model, dtype, device)``: BatchNorm folded exactly (in
   float64), pixel (un)shuffles and skip concatenations folded into the
   convolutions, channels-last maps and weights, convolutions in ``dtype`` (bfloat16
   or float16 on a GPU: the tensor cores' rate) while the slot attention, the rest
   of the bottleneck and the images stay float32, where the accuracy is needed.
2. A static input buffer of the compiled shape. The model's size policy runs inside
   the forward: a side that is not a multiple of 4 is reflect-padded (or resized)
   and the result cropped (or resized) back, so any H, W >= 4 can be compiled.
3. On CUDA (``graphs=True``, the default there): a few warm-up forwards on a side
   stream (cuDNN's and Triton's first calls choose algorithms and compile kernels,
   which a capture must not see), then one forward captured in a ``CUDAGraph``.
   The graph owns the forward's memory (its private pool) and its outputs, which
   every replay overwrites. A call copies the input into the static buffer,
   replays, and copies the outputs out: two copies and one launch per batch.
   Elsewhere, or with ``graphs=False``, a call runs the same forward eagerly.

Batches: frames of a batch are independent (BatchNorm is folded, the slot attention
is per image), so a batch smaller than the compiled one runs in the compiled batch,
its extra rows on stale data, and only its own rows come back. Any other shape is
an error naming both shapes: compile one engine per frame size.

Memory (level 2, bfloat16, 3840x2160, batch 1): the forward holds about 2.0 GiB at
its peak besides its input and weights, measured on the same code path on CPU at
960x540 (the fused ``cpu`` slot attention standing in for the GPU's) and scaled by
the pixel count, the bottleneck's bands scaled alike; under the 4 GB target, with
room for cuDNN's work spaces. ``tests/test_engine.py`` keeps that estimate checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .inference import InferenceExposureSlot, optimize_for_inference
from .network import MULTIPLE, ExposureSlot

WARMUP_RUNS = 3  # cuDNN settles its algorithm choice and Triton compiles in the first


def default_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 on a GPU (the real-time setting), float32 elsewhere (CPUs without
    AMX or AVX512-BF16 run bfloat16 convolutions slowly)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def compile_for(model: ExposureSlot, shape: Sequence[int], *, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, graphs: bool | None = None,
                warmup: int = WARMUP_RUNS) -> CompiledExposureSlot:
    """An engine that runs ``model``'s inference function on inputs of ``shape``
    ``[B, 3, H, W]``, fast.

    ``dtype``: what the convolutions compute in (default ``default_dtype(device)``);
    see ``optimize_for_inference``. ``device``: where it runs (default: the model's).
    An ``InferenceExposureSlot`` of that dtype on that device is used as it is, any
    other ``ExposureSlot`` is optimized into a frozen copy (``model`` is not changed).
    ``graphs``: capture a CUDA graph (default: on CUDA devices; only there).
    ``warmup``: eager forwards before the capture.
    """
    if not isinstance(model, ExposureSlot):
        raise TypeError(f"expected an ExposureSlot, got {type(model).__name__}")
    device = model.conv1_1.weight.device if device is None else torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = default_dtype(device) if dtype is None else dtype
    if not (isinstance(model, InferenceExposureSlot) and model.compute_dtype == dtype
            and model.conv1_1.weight.device == device):
        if model.training:
            raise ValueError("compile_for needs the model in eval mode (call model.eval()): "
                             "it folds BatchNorm's running statistics")
        model = optimize_for_inference(model, dtype, device)
    return CompiledExposureSlot(model, shape, graphs=graphs, warmup=warmup)


class CompiledExposureSlot:
    """A frozen model bound to one input shape; see the module docstring and
    ``compile_for``, which makes these.

    Attributes: ``model`` (the ``InferenceExposureSlot`` it runs), ``shape`` (the
    compiled ``[B, 3, H, W]``), ``device``, ``dtype`` (of the convolutions),
    ``graphed`` (whether calls replay a CUDA graph).
    """

    def __init__(self, model: InferenceExposureSlot, shape: Sequence[int], *,
                 graphs: bool | None = None, warmup: int = WARMUP_RUNS):
        shape = torch.Size(int(n) for n in shape)
        if len(shape) != 4 or shape[1] != 3 or shape[0] < 1:
            raise ValueError(f"shape must be [B, 3, H, W] with B >= 1, got {list(shape)}")
        if min(shape[-2:]) < MULTIPLE:
            raise ValueError(f"image sides must be at least {MULTIPLE} pixels, "
                             f"got {list(shape[-2:])}")
        weight = model.conv1_1.weight
        self.model, self.shape, self.device = model, shape, weight.device
        self.dtype = model.compute_dtype
        graphs = self.device.type == "cuda" if graphs is None else graphs
        if graphs and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {self.device} "
                             "(use graphs=False or move the model)")
        if warmup < 1 and graphs:
            raise ValueError(f"a CUDA graph capture needs warm-up runs first, got warmup={warmup}")
        # Normal tensors even when made under inference_mode: every call writes into
        # the input (and replays write into the graph's outputs) in whatever mode.
        with torch.inference_mode(False):
            # Stale rows of a partial batch must be finite numbers: start from grey.
            self._input = torch.full(shape, 0.5, dtype=weight.dtype, device=self.device)
            self._outputs: tuple[torch.Tensor, list[torch.Tensor]] | None = None
            self._graph = self._capture(warmup) if graphs else None

    @property
    def graphed(self) -> bool:
        return self._graph is not None

    def __repr__(self) -> str:
        how = "CUDA graph" if self.graphed else "eager"
        return (f"CompiledExposureSlot(shape={list(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, {how}, level={self.model.level}, "
                f"backend={self.model.backend!r}, size_policy={self.model.size_policy!r})")

    def __call__(self, x: torch.Tensor, *, out: torch.Tensor | None = None,
                 return_masks: bool = False, non_blocking: bool = False):
        """The corrected images of ``x`` ``[b, 3, H, W]`` (b up to the compiled batch,
        a floating dtype, any device), as ``model(x)`` gives them.

        ``out``: a ``[b, 3, H, W]`` tensor (any device and floating dtype) to write
        them into, and return; by default a new tensor on the engine's device.
        ``return_masks``: also return the per-level masks (new tensors), as
        ``model(x, return_aux=True).masks``. ``non_blocking``: copy in and out
        asynchronously where the memory allows (pinned host tensors): then ``x``
        must not change, nor ``out`` be read, before the current CUDA stream has
        reached this call (``torch.cuda.current_stream().synchronize()``).
        """
        batch = self._check(x, "input")
        if out is not None:
            self._check(out, "out", batch)
        with torch.no_grad():
            self._input[:batch].copy_(x, non_blocking=non_blocking)
            if self._graph is not None:
                self._graph.replay()
            else:
                self._outputs = self.model.correct(self._input)
            image, masks = self._outputs
            if out is None:
                out = image[:batch].clone()
            else:
                out.copy_(image[:batch], non_blocking=non_blocking)
            if not return_masks:
                return out
            return out, [m[:batch].clone() for m in masks]

    def _capture(self, warmup: int) -> torch.cuda.CUDAGraph:
        """Warm up on a side stream, then capture one forward (PyTorch's recipe for
        whole-network capture)."""
        with torch.cuda.device(self.device), torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    self.model.correct(self._input)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # The capture synchronises and empties the allocator's cache first, so the
            # warm-up's blocks go back to the GPU rather than sit beside the graph's pool.
            # "thread_local": other threads (a reader or writer of the CLI) may keep
            # using CUDA while this one captures.
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._outputs = self.model.correct(self._input)
        return graph

    def _check(self, t: torch.Tensor, name: str, batch: int | None = None) -> int:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point image in [0, 1], got {t.dtype}; "
                            "convert 8-bit images with x.float() / 255")
        compiled = list(self.shape)
        if t.dim() != 4 or t.shape[1:] != self.shape[1:] or not 1 <= t.shape[0] <= self.shape[0]:
            raise ValueError(
                f"{name} has shape {list(t.shape)} but the engine is compiled for {compiled} "
                f"(a batch of up to {compiled[0]} images of {compiled[3]}x{compiled[2]}); "
                "compile another engine for this size with compile_for(model, shape)")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"out has {t.shape[0]} images but the input has {batch}")
        return t.shape[0]
