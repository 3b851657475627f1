"""Exact inference on photos of any size with bounded memory: ``infer_large``.

The network's convolutions are local but its bottleneck (slot-in-slot attention and
a channel attention over all tokens) is global, so cutting the image into tiles and
running the network on each would change the result. ``infer_large`` instead runs
the network in three passes that give the whole-image result (float rounding
aside):

1. encoder tiles: each tile of the 1/4-resolution map ``e3`` is computed from a
   tile of the input grown by the encoder's halo, and the full ``e3`` is assembled;
2. the bottleneck block on the whole ``e3`` (``BottleneckBlock.forward_rows``,
   which streams everything but the tensors its slot attention needs whole);
3. decoder tiles: each output tile is computed from a tile of the bottleneck's
   output and of the skip features ``e1``, ``e2``, grown by the decoder's halo.

Three modes trade time for memory (``MODES``): "keep" keeps ``e1`` and ``e2`` from
pass 1 (6 bytes per input pixel per byte of e3); "recompute" recomputes them in
each decoder tile from its input tile; "lean" also frees ``e3`` once the
bottleneck has read it, and the bottleneck recomputes bands of it from strips of
input tiles when it needs them again, so ``e3`` is not held while the slot
attention runs.

Halos are derived from the layers, not written down: each layer becomes a
``Step`` (how far each output pixel reads into its input, and the change of
resolution), taken from the convolutions' kernel sizes, dilations, paddings and
strides and from the pixel (un)shuffles' factors (read off a run on a small
input). Walking the steps backwards from an output tile gives the input region
it needs. For the released network: 11 input pixels on each side for the encoder
(rounded out to 12, so that tiles start on multiples of 4 as the two pixel
unshuffles require); for the decoder, 3 pixels of the 1/4-resolution map and, to
recompute the skip features, 13 input pixels (16); 1 row of e3 between the
bottleneck's bands (its depthwise 3x3 convolution).

A tile is computed by the network's own modules, padding included: at the true
image border a tile's edge is the image's edge, so each convolution pads it as in
the whole-image forward (reflect for the Down/Up convolutions, zeros for the
others); at an inner edge the padded values are wrong, and a ``Window`` records
how far inwards the damage has spread after each layer. The halo is exactly
what keeps the damage outside the tile; cropping a region that is not exact
raises instead of returning wrong values.

Memory: ``plan_tiles`` picks the first mode, and in it the largest tile, whose
estimated peak fits the budget (by default half of the available RAM, or of the
free GPU memory on CUDA). The estimates add up the maps each pass holds and the
measured peak bytes per pixel of a tile (``tests/test_tiling.py`` checks every
constant against the allocator and a budget against a measured run).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .backends import resolve_backend
from .inference import (
    ConcatConv,
    FrozenConv,
    InferenceExposureSlot,
    canonical_channels_last,
)
from .network import (
    Downsample,
    ExposureSlot,
    ExposureSlotBase,
    MapRows,
    Upsample,
    _row_reach,
)

__all__ = [
    "MODES",
    "TilePlan",
    "default_memory_budget",
    "infer_large",
    "network_halos",
    "parse_memory_size",
    "plan_tiles",
]

Interval = tuple[int, int]  # [start, stop) along one axis
Box = tuple[Interval, Interval]  # rows, columns

# The default budget: this fraction of the memory available now.
DEFAULT_BUDGET_FRACTION = 0.5
# Tiles are searched in steps of this many pixels (a multiple of the alignment), up
# to MAX_TILE: beyond it the halos cost under 7 % and larger tiles only take memory.
TILE_STEP = 16
MAX_TILE = 1024
# Below this tile side the halos cost more than recomputing the skip features.
MIN_KEEP_TILE = 256


# --------------------------------------------------------------------------
# Geometry of the layers


@dataclass(frozen=True)
class Step:
    """One layer as the tiler sees it.

    ``run`` maps a ``[B, C, h, w]`` tensor to one of the same size times ``scale``.
    Each output pixel reads ``before[axis]`` input pixels before it and
    ``after[axis]`` after it (rows, columns), at the input's resolution, and then
    the resolution changes by ``scale`` (2 for a pixel shuffle, 1/2 for an
    unshuffle, 1 otherwise).
    """
    run: Callable[[torch.Tensor], torch.Tensor]
    before: tuple[int, int] = (0, 0)
    after: tuple[int, int] = (0, 0)
    scale: Fraction = Fraction(1)

    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        return tuple(_scaled(n, self.scale) for n in size)


def _scaled(n: int, scale: Fraction) -> int:
    if (n * scale).denominator != 1:
        raise ValueError(f"a side of {n} pixels cannot be scaled by {scale}")
    return int(n * scale)


def _strided(span: int, stride: int, offset: int, what) -> tuple[int, int, Fraction]:
    """Reach and scale along one axis of a convolution whose output ``i`` reads
    inputs ``stride*i - offset`` to ``stride*i - offset + span - 1``; its output
    must have the input's size divided by the stride."""
    if 2 * offset != span - stride:
        raise NotImplementedError(f"tiling needs convolutions that keep the size (divided by "
                                  f"the stride), got {what}")
    return offset, offset, Fraction(1, stride)


def _step_from_axes(run, axes: Sequence[tuple[int, int, Fraction]]) -> Step:
    (b0, a0, s0), (b1, a1, s1) = axes
    if s0 != s1:
        raise NotImplementedError(f"tiling needs the same resolution change along rows and "
                                  f"columns, {run} gives {s0} and {s1}")
    return Step(run, (b0, b1), (a0, a1), s0)


def conv_step(conv: nn.Conv2d) -> Step:
    """The step of a convolution whose output has its input's size divided by its
    stride (padding "same" or p = (dilation*(kernel-1) + 1 - stride) / 2)."""
    spans = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size)]
    padding = conv.padding
    if padding == "same":
        padding = [(span - 1) // 2 for span in spans]
    if isinstance(padding, str):
        raise NotImplementedError(f"tiling needs convolutions that keep the size, got {conv}")
    return _step_from_axes(conv, [_strided(span, s, p, conv)
                                  for span, s, p in zip(spans, conv.stride, padding)])


def frozen_conv_step(conv: FrozenConv) -> Step:
    """The step of ``optimize_for_inference``'s convolution: an optional reflect
    padding by 1, then a (transposed) convolution with its stride and padding."""
    kernel, stride, padding = conv.weight.shape[-1], conv.stride, conv.padding
    reflect = 1 if conv.reflect else 0
    if not conv.transposed:
        axis = _strided(kernel, stride, padding + reflect, conv)
        return _step_from_axes(conv, [axis, axis])
    # Output o = stride*i + phase gets padded input q when o = stride*q + tap - padding
    # for a tap in [0, kernel): q - reflect runs over i - before .. i + after.
    if (2 * reflect - 1) * stride - 2 * padding + kernel != 0:
        raise NotImplementedError(f"tiling needs transposed convolutions that multiply the "
                                  f"size by their stride, got {conv}")
    before = reflect + (kernel - 1 - padding) // stride  # r - ceil((p - k + 1) / s)
    after = (stride - 1 + padding) // stride - reflect
    axis = (before, after, Fraction(stride))
    return _step_from_axes(conv, [axis, axis])


def concat_conv_step(conv: ConcatConv) -> Step:
    """``optimize_for_inference``'s convolution over ``cat[a, b]``, as a step on the
    concatenation (it is given ``a`` and ``b`` as channel slices of it)."""
    first, second = frozen_conv_step(conv.of_first), frozen_conv_step(conv.of_second)
    if (first.before, first.after, first.scale) != (second.before, second.after, second.scale):
        raise NotImplementedError(f"the two halves of {conv} reach differently")
    split = conv.of_first.weight.shape[1]
    return Step(lambda t: conv(t[:, :split], t[:, split:]), first.before, first.after, first.scale)


def resample_step(module: Downsample | Upsample) -> Step:
    """A Downsample or Upsample: its convolution, then a pixel (un)shuffle whose
    factor is read off a run on a small zero input."""
    geometry = conv_step(module.conv)
    probe = 12  # divisible by the factors 2, 3, 4 and 6
    with torch.no_grad():
        out = module(module.conv.weight.new_zeros(1, module.conv.in_channels, probe, probe))
    rows, cols = (Fraction(n, probe) for n in out.shape[-2:])
    axes = [(geometry.before[i], geometry.after[i], scale) for i, scale in enumerate((rows, cols))]
    return _step_from_axes(module, axes)


def pointwise_step(fn: Callable[[torch.Tensor], torch.Tensor]) -> Step:
    """A per-pixel function (activation, BatchNorm in eval mode)."""
    return Step(fn)


@dataclass(frozen=True)
class Stages:
    """``ExposureSlot._forward_aligned`` as steps, stage by stage:

    e1 = to_e1(x); e2 = to_e2(e1); e3 = to_e3(e2); z = bottleneck(e3)
    d2 = to_d2(cat[up_z(z), e2]); y = to_y(cat[up_d2(d2), e1]) + x
    """
    to_e1: tuple[Step, ...]
    to_e2: tuple[Step, ...]
    to_e3: tuple[Step, ...]
    up_z: tuple[Step, ...]
    to_d2: tuple[Step, ...]
    up_d2: tuple[Step, ...]
    to_y: tuple[Step, ...]

    @property
    def alignment(self) -> int:
        """Input tiles start on multiples of this (the encoder's total downsampling),
        so that every pixel unshuffle groups the same pixels as in the whole image."""
        scale = math.prod(s.scale for s in self.to_e1 + self.to_e2 + self.to_e3)
        return int(1 / scale)


def network_stages(model: ExposureSlotBase) -> Stages:
    """The steps of ``model._forward_aligned``, for an ``ExposureSlot`` or its
    ``optimize_for_inference`` form."""
    if isinstance(model, InferenceExposureSlot):
        return _inference_stages(model)
    if not isinstance(model, ExposureSlot):
        raise TypeError(f"infer_large runs ExposureSlot models and their "
                        f"optimize_for_inference forms, got {type(model).__name__}")
    m = model
    gelu = pointwise_step(F.gelu)
    return Stages(
        to_e1=(conv_step(m.conv1_1), gelu, conv_step(m.conv1_2), pointwise_step(m.bn1)),
        to_e2=(resample_step(m.down1), gelu, conv_step(m.conv2_2), pointwise_step(m.bn2)),
        to_e3=(resample_step(m.down2), gelu, conv_step(m.conv3_2), pointwise_step(m.bn3)),
        up_z=(resample_step(m.up1),),
        to_d2=(conv_step(m.conv4_1), gelu, conv_step(m.conv4_2), gelu),
        up_d2=(resample_step(m.up2),),
        to_y=(conv_step(m.conv5_1), gelu, conv_step(m.conv5_2), gelu, conv_step(m.conv6)),
    )


def _inference_stages(model: InferenceExposureSlot) -> Stages:
    """``InferenceExposureSlot._forward_aligned``: its fused convolutions (GELUs and
    BatchNorms inside, strided convolutions in place of the pixel (un)shuffles), in
    its compute dtype and channels-last; the bottleneck in the model's dtype."""
    f, outer = model.fused, model.bottleneck.to_q.weight.dtype
    conv = frozen_conv_step
    return Stages(
        to_e1=(pointwise_step(lambda t: t.to(model.compute_dtype,
                                             memory_format=torch.channels_last)),
               conv(f.conv1_1), conv(f.conv1_2)),
        to_e2=(conv(f.down1), conv(f.conv2_2)),
        to_e3=(conv(f.down2), conv(f.conv3_2), pointwise_step(lambda t: t.to(outer))),
        up_z=(pointwise_step(lambda t: canonical_channels_last(t.to(model.compute_dtype))),
              conv(f.up1)),
        to_d2=(concat_conv_step(f.conv4_1), conv(f.conv4_2)),
        up_d2=(conv(f.up2),),
        to_y=(concat_conv_step(f.conv5_1), conv(f.conv5_2), conv(f.conv6),
              pointwise_step(lambda t: model._as_image(t, outer))),
    )


def needed_box(steps: Sequence[Step], box: Box, in_size: tuple[int, int]) -> Box:
    """The region of the input of ``steps`` (a map of ``in_size``) that the output
    region ``box`` depends on."""
    sizes = [in_size]
    for step in steps:
        sizes.append(step.out_size(sizes[-1]))
    for step, size in zip(reversed(steps), reversed(sizes[:-1])):
        new = []
        for axis, (start, stop) in enumerate(box):
            if step.scale < 1:
                factor = step.scale.denominator
                start, stop = start * factor, stop * factor
            elif step.scale > 1:
                factor = step.scale.numerator
                start, stop = start // factor, -(-stop // factor)
            new.append((max(0, start - step.before[axis]),
                        min(size[axis], stop + step.after[axis])))
        box = tuple(new)
    return box


def network_halos(model: ExposureSlot, size: tuple[int, int] = (1024, 1024)) -> dict[str, int]:
    """The halos, in pixels of each map, that an interior tile needs (derived from
    the layers). ``size`` is any aligned image size large enough for interior tiles."""
    st = network_stages(model)
    h, w = size
    quarter = (h // 4, w // 4)
    mid_q = (quarter[0] // 2, quarter[0] // 2 + 1), (quarter[1] // 2, quarter[1] // 2 + 1)
    enc = needed_box(st.to_e1 + st.to_e2 + st.to_e3, mid_q, size)
    mid = (h // 2, h // 2 + 4), (w // 2, w // 2 + 4)
    e1_box, e2_box, z_box = _decoder_boxes(st, mid, size)
    x_box = _hull(needed_box(st.to_e1, e1_box, size),
                  needed_box(st.to_e1 + st.to_e2, e2_box, size))
    return {
        "encoder_input": 4 * mid_q[0][0] - enc[0][0],
        "decoder_bottleneck": mid[0][0] // 4 - z_box[0][0],
        "decoder_input": mid[0][0] - x_box[0][0],
        "bottleneck_band": _row_reach(model.bottleneck.ff),
    }


def _decoder_boxes(st: Stages, box: Box, size: tuple[int, int]) -> tuple[Box, Box, Box]:
    """For an output region: the regions of e1, e2 and z it needs."""
    half = (size[0] // 2, size[1] // 2)
    quarter = (size[0] // 4, size[1] // 4)
    e1_box = needed_box(st.to_y, box, size)
    d2_box = needed_box(st.up_d2, e1_box, half)
    e2_box = needed_box(st.to_d2, d2_box, half)
    z_box = needed_box(st.up_z, e2_box, quarter)
    return e1_box, e2_box, z_box


def _hull(a: Box, b: Box) -> Box:
    return tuple((min(p[0], q[0]), max(p[1], q[1])) for p, q in zip(a, b))


def _aligned(box: Box, multiple: int, size: tuple[int, int]) -> Box:
    return tuple((start // multiple * multiple, min(n, -(-stop // multiple) * multiple))
                 for (start, stop), n in zip(box, size))


def _scale_box(box: Box, factor: Fraction) -> Box:
    return tuple((_scaled(a, factor), _scaled(b, factor)) for a, b in box)


def _crop(t: torch.Tensor, box: Box, origin: tuple[int, int] = (0, 0)) -> torch.Tensor:
    (r0, r1), (c0, c1) = box
    return t[..., r0 - origin[0]:r1 - origin[0], c0 - origin[1]:c1 - origin[1]]


def _inside(inner: Box, outer: Box) -> bool:
    return all(o0 <= i0 and i1 <= o1 for (i0, i1), (o0, o1) in zip(inner, outer))


@dataclass
class Window:
    """Part of a feature map of ``size``: ``tensor`` holds the region ``extent``,
    whose values are exact on ``valid`` (the rest was computed from padding that
    the whole map does not have)."""
    tensor: torch.Tensor
    extent: Box
    valid: Box
    size: tuple[int, int]

    @classmethod
    def exact(cls, full: torch.Tensor, box: Box) -> Window:
        """A region of a map that is known everywhere."""
        return cls(_crop(full, box), box, box, tuple(full.shape[-2:]))

    def through(self, steps: Sequence[Step]) -> Window:
        win = self
        for step in steps:
            win = win._apply(step)
        return win

    def _apply(self, step: Step) -> Window:
        extent, valid, size = [], [], []
        for axis in (0, 1):
            (t0, t1), (v0, v1), n = self.extent[axis], self.valid[axis], self.size[axis]
            # The layer pads the tensor's edges: right at the map's border, wrong inside.
            if v0 > 0:
                v0 += step.before[axis]
            if v1 < n:
                v1 -= step.after[axis]
            if step.scale < 1:
                factor = step.scale.denominator
                if t0 % factor or t1 % factor:
                    raise RuntimeError(f"tile {self.extent} is not aligned to the x{factor} "
                                       "pixel unshuffle")
                t0, t1, v0, v1 = t0 // factor, t1 // factor, -(-v0 // factor), v1 // factor
            elif step.scale > 1:
                factor = step.scale.numerator
                t0, t1, v0, v1 = t0 * factor, t1 * factor, v0 * factor, v1 * factor
            extent.append((t0, t1))
            valid.append((v0, v1))
            size.append(_scaled(n, step.scale))
        out = step.run(self.tensor)
        expected = tuple(b - a for a, b in extent)
        if tuple(out.shape[-2:]) != expected:
            raise RuntimeError(f"layer {step.run} gave a {tuple(out.shape[-2:])} map for a "
                               f"{tuple(self.tensor.shape[-2:])} input; its step says {expected}")
        return Window(out, tuple(extent), tuple(valid), tuple(size))

    def crop(self, box: Box) -> torch.Tensor:
        """The exact values on ``box``."""
        if not _inside(box, self.valid):
            raise RuntimeError(f"tiling bug: region {box} is not exact in this tile "
                               f"(exact on {self.valid})")
        return _crop(self.tensor, box, (self.extent[0][0], self.extent[1][0]))


def _cat(a: Window, b: Window, box: Box) -> Window:
    """The channel concatenation of two windows of one map, on ``box``."""
    return Window(torch.cat([a.crop(box), b.crop(box)], dim=1), box, box, a.size)


# --------------------------------------------------------------------------
# Memory budget and plan

# Peak bytes allocated per float32 pixel of a tile (of the input region it reads)
# while the encoder or the decoder runs it, and per input pixel by the whole-image
# forward (its output included); measured with the allocator, plus about 5 %
# (tests/test_tiling.py checks them).
ENCODER_BYTES_PER_PIXEL = 480
DECODER_BYTES_PER_PIXEL = 1000
WHOLE_BYTES_PER_PIXEL = 1050
# Peak [B, N, C] maps held by the bottleneck block while its slot attention runs,
# its input included, per slot-attention backend: a fixed part and a part per slot
# level, 3-7 % above the measured peaks (reference: 12.2 at level 2 and 17.4 at
# level 3; cpu, which holds the leaf's input rows, two maps, instead of every
# modulated k and v: 5.45 and 5.99). After the slot attention the block holds 3
# such maps (input, v, output) and the work space of a band of about
# ``chunk_tokens`` tokens, counted in [chunk, C] tensors.
BOTTLENECK_MAPS = {"reference": (2, 5.5), "cpu": (4.6, 0.55)}
BOTTLENECK_BAND_MAPS = 3
BOTTLENECK_CHUNK_MAPS = 15


# The tiled modes, from the fastest (most memory) to the leanest: "keep" keeps the
# skip features e1, e2 from the encoder pass; "recompute" recomputes them in each
# decoder tile; "lean" also lets the bottleneck recompute its input e3 band by band
# instead of holding it while the slot attention runs.
MODES = ("keep", "recompute", "lean")


@dataclass(frozen=True)
class TilePlan:
    """How ``infer_large`` runs an image: whole, or tiled with ``tile`` x ``tile``
    output tiles in one of ``MODES``; ``estimate`` is the predicted peak of the
    bytes it allocates and ``budget`` the limit."""
    whole: bool
    tile: int | None
    mode: str | None
    estimate: int
    budget: int
    image_size: tuple[int, int]

    def describe(self) -> str:
        if self.whole:
            return (f"whole image in one pass (about {_human(self.estimate)} of a "
                    f"{_human(self.budget)} budget)")
        how = {"keep": "skip features kept", "recompute": "skip features recomputed",
               "lean": "skip features and bottleneck input recomputed"}[self.mode]
        return (f"tiled: {self.tile}x{self.tile} tiles, {how}, about "
                f"{_human(self.estimate)} of a {_human(self.budget)} budget")


def _human(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_memory_size(text: str | int) -> int:
    """Bytes from an int or a string such as "4G", "3.5GB", "800MiB", "1073741824".
    Suffixes are binary (K = 1024)."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.match(text)
        if not match:
            raise ValueError(f"cannot read a memory size from {text!r}; use e.g. 4G, 3.5GB or 800M")
        exponent = " kmgt".index(match.group(2).lower() or " ")
        value = int(float(match.group(1)) * 1024 ** exponent)
    if value <= 0:
        raise ValueError(f"a memory size must be positive, got {text!r}")
    return value


def default_memory_budget(device: torch.device | str = "cpu") -> int:
    """``DEFAULT_BUDGET_FRACTION`` of the memory available now: free GPU memory
    (plus what torch's caching allocator holds unused) on CUDA, else the
    MemAvailable of /proc/meminfo (free physical pages where that is missing)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free * DEFAULT_BUDGET_FRACTION)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * DEFAULT_BUDGET_FRACTION)
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * DEFAULT_BUDGET_FRACTION)


@dataclass(frozen=True)
class _Footprint:
    """Byte counts that the plan's estimates are made of, for one image."""
    size: tuple[int, int]  # the aligned image
    copy: int  # the aligned copy of the input, when the input is not aligned
    image: int  # one [B, 3, H, W] image (the output, from the decoder pass on)
    token_map: int  # one [B, N, C] bottleneck map
    skips: int  # e1 and e2, whole
    slot_attention: int  # the bottleneck's peak while its slot attention runs, input included
    band: int  # the bottleneck's band work space
    band_rows: int  # rows of e3 per band
    pixel: float  # scales the per-pixel constants to this dtype and batch

    @property
    def bottleneck(self) -> int:
        """The bottleneck block's peak when it holds its input throughout."""
        return max(self.slot_attention, BOTTLENECK_BAND_MAPS * self.token_map + self.band)


def _footprint(model: ExposureSlot, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> _Footprint:
    batch = shape[0]
    size = height, width = model.aligned_size(*shape[-2:])
    itemsize = torch.empty((), dtype=dtype).element_size()
    pixels = batch * height * width
    block = model.bottleneck
    channels = block.to_q.in_features
    token_map = pixels // 16 * channels * itemsize
    skips = pixels * itemsize * (model.conv1_2.weight.shape[0] + model.conv2_2.weight.shape[0] // 4)
    backend = resolve_backend(model.backend, device)
    fixed, per_level = BOTTLENECK_MAPS.get(backend, max(BOTTLENECK_MAPS.values()))
    maps = fixed + per_level * len(block.slot_attention.slots)
    band_rows = max(1, block.chunk_tokens // (width // 4))
    band_tokens = min(band_rows, height // 4) * (width // 4)
    image = 3 * pixels * itemsize
    return _Footprint(size=size, copy=0 if size == tuple(shape[-2:]) else image, image=image,
                      token_map=token_map,
                      skips=skips, slot_attention=int(maps * token_map),
                      band=BOTTLENECK_CHUNK_MAPS * batch * band_tokens * channels * itemsize,
                      band_rows=band_rows, pixel=batch * itemsize / 4)


def _tiled_estimate(fp: _Footprint, halos: dict[str, int], tile: int, mode: str) -> int:
    def area(rows, cols):
        return min(fp.size[0], rows) * min(fp.size[1], cols)

    def tile_bytes(per_pixel, halo, rows=tile):
        return per_pixel * fp.pixel * area(rows + 2 * halo, tile + 2 * halo)

    u = fp.token_map
    encoder = u + tile_bytes(ENCODER_BYTES_PER_PIXEL, halos["encoder_input"])
    decoder = u + tile_bytes(DECODER_BYTES_PER_PIXEL, halos["decoder_input"])
    if mode == "lean":
        # Each band of the bottleneck's second pass recomputes its rows of e3, plus
        # the feed-forward's reach, from a strip of input tiles.
        strip = 4 * (fp.band_rows + 2 * halos["bottleneck_band"])
        bottleneck = max(
            BOTTLENECK_BAND_MAPS * u + fp.band,  # first pass: e3, k, v
            fp.slot_attention - u,
            (BOTTLENECK_BAND_MAPS - 1) * u + fp.band
            + tile_bytes(ENCODER_BYTES_PER_PIXEL, halos["encoder_input"], strip))
    else:
        bottleneck = fp.bottleneck
    kept = fp.skips if mode == "keep" else 0
    return int(fp.copy + kept + max(encoder, bottleneck, fp.image + decoder))


def plan_tiles(model: ExposureSlot, shape: Sequence[int], *, max_memory: int | str | None = None,
               tile: int | None = None, mode: str | None = None,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None
               ) -> TilePlan:
    """How ``infer_large`` will run an input of ``shape`` [B, 3, H, W].

    ``max_memory``: bytes (or "4G") the run may allocate, beyond the input and
    the model; default ``default_memory_budget(device)``. ``tile``: force tiling
    with this output tile side (rounded up to the network's alignment); by default
    the whole image runs in one pass if it fits, else the largest tile up to
    ``MAX_TILE`` that fits.
    ``mode``: one of ``MODES``; by default the first that fits, "keep" only with
    tiles of at least ``MIN_KEEP_TILE`` (smaller ones lose more to their halos
    than recomputing costs). Raises MemoryError when nothing fits.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    weight = model.bottleneck.to_q.weight
    dtype = dtype or weight.dtype
    device = torch.device(device) if device is not None else weight.device
    budget = (default_memory_budget(device) if max_memory is None
              else parse_memory_size(max_memory))
    fp = _footprint(model, shape, dtype, device)
    size = fp.size
    whole = int(max(WHOLE_BYTES_PER_PIXEL * fp.pixel * size[0] * size[1],
                    fp.copy + fp.skips + fp.bottleneck))
    if tile is None and mode is None and whole <= budget:
        return TilePlan(True, None, None, whole, budget, size)

    halos = network_halos(model)
    align = network_stages(model).alignment
    if tile is not None:
        if tile < 1:
            raise ValueError(f"tile must be a positive number of pixels, got {tile}")
        candidates = [-(-tile // align) * align]
    else:
        largest = min(MAX_TILE, -(-max(size) // TILE_STEP) * TILE_STEP)
        candidates = list(range(largest, 0, -TILE_STEP))
    for m in (MODES if mode is None else (mode,)):
        for t in candidates:
            estimate = _tiled_estimate(fp, halos, t, m)
            small_keep = m == "keep" and mode is None and tile is None and t < min(
                MIN_KEEP_TILE, max(size))
            if estimate <= budget and not small_keep:
                return TilePlan(False, t, m, estimate, budget, size)
    smallest = candidates[-1]
    need = _tiled_estimate(fp, halos, smallest, mode or MODES[-1])
    raise MemoryError(
        f"a {size[1]}x{size[0]} image (batch {shape[0]}, {dtype}) needs about {_human(need)} "
        f"even with {smallest}x{smallest} tiles (the slot attention alone holds about "
        f"{_human(fp.slot_attention - fp.token_map)}), more than the {_human(budget)} budget; "
        "raise max_memory")


# --------------------------------------------------------------------------
# Inference


def infer_large(model: ExposureSlot, x: torch.Tensor, *, max_memory: int | str | None = None,
                tile: int | None = None, mode: str | None = None,
                progress: bool | None = None, return_masks: bool = False):
    """``model(x)`` for an image of any size within a memory budget.

    Gives the whole-image forward's output (float rounding aside: within 1e-5 in
    float32), under the model's size policy. ``max_memory``, ``tile`` and ``mode``
    are as in ``plan_tiles``; when the whole image fits the budget (and neither a
    tile nor a mode is forced) this is ``model(x)``. ``progress``: a tqdm bar over
    the tiles (None: only on a terminal). ``return_masks``: also return the
    per-level exposure masks, as ``model(x, return_aux=True).masks``. Runs without
    autograd; the model must be in eval mode (BatchNorm then acts per pixel).
    """
    if model.training:
        raise ValueError("infer_large needs the model in eval mode (call model.eval()): "
                         "BatchNorm in training mode uses statistics of the whole batch")
    model._check_input(x)
    plan = plan_tiles(model, x.shape, max_memory=max_memory, tile=tile, mode=mode,
                      dtype=x.dtype, device=x.device)
    height, width = x.shape[-2:]
    with torch.inference_mode():
        if plan.whole:
            if return_masks:
                out = model(x, return_aux=True)
                return out.image, out.masks
            return model(x)
        image, masks = _run_tiled(model, model._to_multiple(x), plan, progress)
        image = model._from_multiple(image, height, width)
    if not return_masks:
        return image
    return image, model._crop_masks(masks, height, width)


def _tiles(size: tuple[int, int], tile: int) -> list[Box]:
    return [((r, min(r + tile, size[0])), (c, min(c + tile, size[1])))
            for r in range(0, size[0], tile) for c in range(0, size[1], tile)]


class _Encoder:
    """The encoder on tiles of one aligned input."""

    def __init__(self, stages: Stages, x: torch.Tensor):
        self.stages, self.x = stages, x
        self.size = tuple(x.shape[-2:])
        self.steps = stages.to_e1 + stages.to_e2 + stages.to_e3
        self.scale = math.prod(s.scale for s in self.steps)  # e3 resolution / input's

    def e3_size(self) -> tuple[int, int]:
        return tuple(_scaled(n, self.scale) for n in self.size)

    def tile(self, box: Box) -> tuple[Window, Window, Window]:
        """e1, e2 and e3 windows from the input region that e3 on ``box`` needs."""
        x_box = _aligned(needed_box(self.steps, box, self.size), self.stages.alignment, self.size)
        e1 = Window.exact(self.x, x_box).through(self.stages.to_e1)
        e2 = e1.through(self.stages.to_e2)
        return e1, e2, e2.through(self.stages.to_e3)

    def skips(self, e1_box: Box, e2_box: Box) -> tuple[Window, Window]:
        """e1 exact on ``e1_box`` and e2 on ``e2_box``, from the input."""
        st = self.stages
        x_box = _aligned(_hull(needed_box(st.to_e1, e1_box, self.size),
                               needed_box(st.to_e1 + st.to_e2, e2_box, self.size)),
                         st.alignment, self.size)
        e1 = Window.exact(self.x, x_box).through(st.to_e1)
        return e1, e1.through(st.to_e2)


class _EncoderRows(MapRows):
    """e3 for the bottleneck: the assembled map until released; then, if
    ``recompute``, the map is freed and bands of rows are recomputed from the
    input by a strip of encoder tiles ``tile`` wide."""

    def __init__(self, e3: torch.Tensor, encoder: _Encoder, tile: int, recompute: bool):
        super().__init__(e3)
        self.encoder, self.tile, self.recompute = encoder, tile, recompute

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        if self._z is not None:
            return super().rows(top, bottom)
        width = self.shape[-1]
        boxes = [((top, bottom), (c, min(c + self.tile, width)))
                 for c in range(0, width, self.tile)]
        return torch.cat([self.encoder.tile(box)[2].crop(box) for box in boxes], dim=-1)

    def release(self) -> None:
        if self.recompute:
            self._z = None


def _run_tiled(model: ExposureSlot, x: torch.Tensor, plan: TilePlan, progress: bool | None):
    """The three passes on an aligned input; returns the image and the masks."""
    st = network_stages(model)
    encoder = _Encoder(st, x)
    size = encoder.size
    e3_tile = _scaled(plan.tile, encoder.scale)
    e3_tiles = _tiles(encoder.e3_size(), e3_tile)
    out_tiles = _tiles(size, plan.tile)
    keep = plan.mode == "keep"
    bar = tqdm(total=len(e3_tiles) + 1 + len(out_tiles), unit="tile", desc="encoder",
               disable=None if progress is None else not progress, leave=False)
    try:
        e3 = e1 = e2 = None
        for box in e3_tiles:
            e1_win, e2_win, e3_win = encoder.tile(box)
            if e3 is None:
                e3 = _new_map(e3_win.tensor, e3_win.size)
                if keep:
                    e1 = _new_map(e1_win.tensor, e1_win.size)
                    e2 = _new_map(e2_win.tensor, e2_win.size)
            _crop(e3, box)[...] = e3_win.crop(box)
            if keep:
                own = _scale_box(box, 1 / encoder.scale)  # this tile's share of the input
                for full, win in ((e1, e1_win), (e2, e2_win)):
                    region = _scale_box(own, Fraction(win.size[0], size[0]))
                    _crop(full, region)[...] = win.crop(region)
            del e1_win, e2_win, e3_win
            bar.update()

        bar.set_description("bottleneck")
        source = _EncoderRows(e3, encoder, e3_tile, recompute=plan.mode == "lean")
        del e3  # the source holds it, and lets go of it in "lean" mode
        z, _, masks = model.bottleneck.forward_rows(source, keep_slot_map=False)
        del source
        bar.update()

        bar.set_description("decoder")
        out = torch.empty_like(x)
        for box in out_tiles:
            e1_box, e2_box, z_box = _decoder_boxes(st, box, size)
            if keep:
                e1_win, e2_win = Window.exact(e1, e1_box), Window.exact(e2, e2_box)
            else:
                e1_win, e2_win = encoder.skips(e1_box, e2_box)
            d2_win = _cat(Window.exact(z, z_box).through(st.up_z), e2_win, e2_box).through(st.to_d2)
            y_win = _cat(d2_win.through(st.up_d2), e1_win, e1_box).through(st.to_y)
            _crop(out, box)[...] = y_win.crop(box) + _crop(x, box)
            del e1_win, e2_win, d2_win, y_win
            bar.update()
    finally:
        bar.close()
    return out, masks


def _new_map(like: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return like.new_empty(*like.shape[:-2], *size)
