"""Fast inference: a frozen copy of an ``ExposureSlot`` whose convolutions are
folded, fused and channels-last.

    fast = optimize_for_inference(model)                   # float32
    fast = optimize_for_inference(model, torch.bfloat16)   # bfloat16 convolutions
    fast = optimize_for_inference(model, torch.float16, device="cuda")  # on a GPU
    image = fast(x)                                        # as model(x); return_aux too
    image, masks = fast.correct(x)                         # without the slot decoder

Every change below computes the same function as ``model.eval()``; only the
rounding differs:

- BatchNorm is folded into the convolution before it (in float64, then cast).
- A convolution after a PixelUnshuffle(2) is a stride-2 6x6 convolution of the map
  before it, and a convolution followed by a PixelShuffle(2) is a stride-2
  transposed 6x6 convolution: neither shuffle is materialised.
- A convolution over ``cat[a, b]`` is ``conv_a(a) + conv_b(b)``, the first adding into
  the second's output: the concatenation is never built.
- Bias, GELU and that sum run inside oneDNN's convolution (post-ops), and every map
  stays channels-last, where oneDNN's kernels are fastest and the bottleneck's token
  view ``[B, N, C]`` of its input is free.
- In float32 on the CPU, the 3x3 convolutions (with their pixel (un)shuffles,
  reflect padding, bias, sum and GELU) run as Winograd F(4x4, 3x3) convolutions
  (``exposure_slot.ops.winograd_conv3x3``): 4x fewer multiplications, 1.4-2.5x
  faster than oneDNN's direct ones here; each rounds about 10x more than a direct
  convolution (~5e-6 relative), which on the golden checkpoints stays below the
  image's own float32 rounding (1e-7). ``winograd=False`` keeps oneDNN's.
- The bottleneck's channel attention is regrouped (``InferenceBottleneck``).

On tensors oneDNN does not take (float64, GPU tensors, a torch built without it) the
same frozen weights run through ``F.conv2d`` (cuDNN on a GPU, where the weights are
kept channels-last too), the sum and the GELU in place on its output: the folding
is then exact in float64. Either way the forward frees each full-resolution map as
soon as it can (``correct``), so it holds few maps at once; ``exposure_slot.engine``
builds on it for fixed-shape GPU inference with CUDA graphs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .network import BottleneckBlock, ExposureSlot, FeedForward
from .ops.winograd_conv3x3 import permute_phases, whole_vectors, winograd_filter


def _onednn_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes that go through oneDNN's fused convolutions: float32 (it rejects
    float64), and bfloat16 where this CPU has oneDNN's bfloat16 convolution
    (AVX512 BW+VL+DQ or AVX-NE-CONVERT); elsewhere oneDNN refuses bfloat16 and the
    plain convolution runs it, slowly."""
    bf16 = (hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


_ONEDNN_DTYPES = _onednn_dtypes()
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
# float16 only where it is fast and its range is handled by the hardware (cuDNN);
# CPU convolutions in float16 are slow reference code.
CUDA_COMPUTE_DTYPES = COMPUTE_DTYPES + (torch.float16,)
# Compute dtypes too narrow for the slot attention: with them the layers, the
# bottleneck and the images stay float32.
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_ONEDNN = _onednn_available()
# The dtype the Winograd convolutions run in (the float64 kernel is the tests' exact
# twin; float64 inference keeps the plain convolutions, exact up to summation order).
_WINOGRAD_DTYPE = torch.float32


class FrozenConv(nn.Module):
    """A fixed 2-D convolution with bias, an optional sum into a given map and an
    optional GELU; one oneDNN call on CPU float32/bfloat16 tensors.

    ``reflect`` reflect-pads the input by 1 first (oneDNN pads only with zeros);
    ``transposed`` makes it a transposed convolution (weight ``[in, out, kh, kw]``).
    ``persistent``: whether the weights go into state_dicts (as ``weight`` and ``bias``).
    ``winograd``: the same convolution as a 3x3 one (weight ``[out, in, 3, 3]``, phase-
    major channel orders) between a pixel ``unshuffle`` and ``shuffle`` (1 or 2), run
    by ``winograd_conv3x3`` on CPU tensors of its dtype; ignored (None) where that op
    does not apply (other dtypes, channel counts, an unbuilt extension).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, *,
                 stride: int = 1, padding: int = 1, groups: int = 1, reflect: bool = False,
                 transposed: bool = False, gelu: bool = False, persistent: bool = False,
                 winograd: torch.Tensor | None = None, unshuffle: int = 1, shuffle: int = 1):
        super().__init__()
        # cuDNN runs a channels-last input fastest with a channels-last weight (else it
        # converts the weight on every call); oneDNN wants its weights contiguous.
        layout = torch.channels_last if weight.device.type == "cuda" else torch.contiguous_format
        # Copies: the frozen model must not share storage with the trainable one.
        self.register_buffer("weight", weight.detach().to(dtype, copy=True)
                             .contiguous(memory_format=layout), persistent=persistent)
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype, copy=True),
                             persistent=persistent)
        self.stride, self.padding, self.groups = stride, padding, groups
        self.reflect, self.transposed, self.gelu = reflect, transposed, gelu
        self.unshuffle, self.shuffle = unshuffle, shuffle
        if not _winograd_applies(winograd, dtype, unshuffle, shuffle):
            winograd = None
        self.register_buffer("winograd_filter", None if winograd is None
                             else winograd_filter(winograd, dtype), persistent=False)
        # Per output channel of the 3x3 convolution: the shuffle's phases share one.
        self.register_buffer("winograd_bias", None if winograd is None or bias is None
                             else self.bias.repeat(shuffle * shuffle), persistent=False)

    def extra_repr(self) -> str:
        kind = "transposed, " if self.transposed else ""
        return (f"{kind}weight={tuple(self.weight.shape)}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, reflect={self.reflect}, "
                f"gelu={self.gelu}, winograd={self.winograd_filter is not None}")

    def forward(self, x: torch.Tensor, add_into: torch.Tensor | None = None) -> torch.Tensor:
        """``GELU?(conv(x) + bias + add_into)``; ``add_into`` (channels-last, the output's
        shape) is overwritten with the result on the oneDNN path."""
        x = canonical_channels_last(x)
        if self.winograd_filter is not None and x.device.type == "cpu" \
                and x.dtype == self.winograd_filter.dtype:
            return self._winograd(x, add_into)
        if self.reflect:
            x = F.pad(x, (1, 1, 1, 1), mode="reflect")
        if _ONEDNN and x.device.type == "cpu" and x.dtype in _ONEDNN_DTYPES:
            return self._onednn(x, add_into)
        conv = F.conv_transpose2d if self.transposed else F.conv2d
        y = conv(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                 groups=self.groups)
        del x  # the padded copy, if any: one full map less at the peak
        # In place: y is this call's own, and a GPU forward is bound by memory traffic.
        if add_into is not None:
            y.add_(add_into)
        return torch.ops.aten.gelu_(y) if self.gelu else y

    def _winograd(self, x, add_into):
        args = (x, self.winograd_filter, self.winograd_bias, self.reflect, self.unshuffle,
                self.shuffle, self.gelu)
        if add_into is None:
            return torch.ops.exposure_slot.winograd_conv3x3(*args)
        add_into = canonical_channels_last(add_into)
        torch.ops.exposure_slot.winograd_conv3x3_(add_into, *args)
        return add_into

    def _onednn(self, x, add_into):
        mkldnn = torch.ops.mkldnn
        padding, stride, dilation = [self.padding] * 2, [self.stride] * 2, [1, 1]
        if add_into is not None:
            # oneDNN fuses only ReLU after a sum, so GELU runs in place afterwards.
            y = mkldnn._convolution_pointwise_.binary(
                add_into, x, self.weight, self.bias, padding, stride, dilation, self.groups,
                "add", 1.0, None, [], None)
            return torch.ops.aten.gelu_(y) if self.gelu else y
        attr, algorithm = ("gelu", "none") if self.gelu else ("none", "")
        if self.transposed:
            return mkldnn._convolution_transpose_pointwise(
                x, self.weight, self.bias, padding, [0, 0], stride, dilation, self.groups,
                attr, [], algorithm)
        return mkldnn._convolution_pointwise(
            x, self.weight, self.bias, padding, stride, dilation, self.groups, attr, [], algorithm)


def _winograd_applies(weight, dtype, unshuffle: int, shuffle: int) -> bool:
    """Whether ``winograd_conv3x3`` can run this 3x3 convolution in ``dtype``: the
    extension is built and each pixel's channels are whole vectors."""
    if weight is None or dtype != _WINOGRAD_DTYPE or weight.device.type != "cpu" \
            or not ops.cpu_kernels_available():
        return False
    out_channels, in_channels = weight.shape[:2]
    return whole_vectors(in_channels // (unshuffle * unshuffle), out_channels, shuffle, dtype)


def canonical_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a channels-last view with the canonical NHWC strides, if its memory is
    channels-last; otherwise ``x`` itself.

    A size-1 dim may carry any stride: ``[1, N, C]`` tokens seen as ``[1, C, h, w]``
    through ``transpose(1, 2).reshape(...)`` get batch stride ``C``, and PyTorch's and
    oneDNN's layout checks then treat the map as non-contiguous NCHW and copy it.
    """
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return x
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(-1).view(batch, height, width, channels).permute(0, 3, 1, 2)


class ConcatConv(nn.Module):
    """A 3x3 convolution and GELU over ``cat[a, b]`` (channels), computed as the
    convolution of ``b`` (with the bias) plus that of ``a``, added in place."""

    def __init__(self, conv: nn.Conv2d, split: int, dtype: torch.dtype, winograd: bool):
        super().__init__()
        weight, bias = _weight_and_bias(conv)
        first, second = weight[:, :split], weight[:, split:]
        self.of_first = FrozenConv(first, None, dtype, gelu=True,
                                   winograd=first if winograd else None)
        self.of_second = FrozenConv(second, bias, dtype, winograd=second if winograd else None)

    def forward(self, a, b):
        return self.of_first(a, add_into=self.of_second(b))


class FrozenFeedForward(nn.Module):
    """The bottleneck's ``FeedForward`` with each GELU fused into the convolution before
    it, computing in ``dtype`` and answering in its input's dtype."""

    def __init__(self, ff: FeedForward, dtype: torch.dtype):
        super().__init__()
        # Persistent: a state_dict keeps FeedForward's keys.
        self.expand = FrozenConv(ff.expand.weight, None, dtype, padding=0, gelu=True,
                                 persistent=True)
        self.depthwise = FrozenConv(ff.depthwise.weight, None, dtype, groups=ff.depthwise.groups,
                                    gelu=True, persistent=True)
        self.project = FrozenConv(ff.project.weight, None, dtype, padding=0, persistent=True)

    def forward(self, x):
        y = self.expand(x.to(self.expand.weight.dtype))
        return self.project(self.depthwise(y)).to(x.dtype)


class InferenceBottleneck(BottleneckBlock):
    """The bottleneck block (same parameters, same state_dict) with its feed-forward
    fused (``FrozenFeedForward``) and the linear algebra of its channel attention
    regrouped; the function is the same, only the rounding differs:

    - ``q = x W_q^T`` is never formed: the channel attention needs only
      ``k^T q = W_k X W_q^T`` and the column norms ``diag(W_k X W_k^T)``,
      ``diag(W_q X W_q^T)`` of ``X = x^T x``, one [C, C] sum over the tokens (the
      quadratic forms in float64);
    - ``proj(v attn^T) = v (attn^T W_p^T) + b_p``: the two [C, C] matrices are
      multiplied first, so the tokens go through one product instead of two.
    """

    def __init__(self, block: BottleneckBlock, dtype: torch.dtype):
        attention = block.slot_attention
        super().__init__(block.to_q.in_features, attention.slots, attention.iters,
                         attention.backend)
        self.load_state_dict(block.state_dict())
        self.to(block.to_q.weight).requires_grad_(False).train(False)
        self.ff = FrozenFeedForward(block.ff, dtype)

    def _token_sums(self, x, k, sums):
        xt = x.transpose(1, 2)
        return torch.bmm(xt, x) if sums is None else sums.baddbmm_(xt, x)

    def _channel_mix(self, x_gram):
        gram = x_gram.double()
        wq, wk = self.to_q.weight.double(), self.to_k.weight.double()
        k_gram = wk @ gram
        attn_t = self._channel_attention_t(k_gram @ wq.T, (k_gram * wk).sum(-1),
                                           ((wq @ gram) * wq).sum(-1))
        return (attn_t @ self.proj.weight.double().T).to(x_gram.dtype)

    def _attended(self, x, v, mix):
        return torch.baddbmm(x, v, mix).add_(self.proj.bias)


class FusedConvolutions(nn.Module):
    """The image network's convolutions, BatchNorms and GELUs as frozen, fused
    convolutions computing in ``dtype``: the encoder, the decoder and the slot decoder.

    Its buffers stay out of state_dicts: they are derived from the layers."""

    def __init__(self, model: ExposureSlot, dtype: torch.dtype, winograd: bool):
        super().__init__()
        c = model.conv1_2.out_channels
        w = winograd
        self.conv1_1 = _conv(model.conv1_1, dtype, w, gelu=True)
        self.conv1_2 = _conv(model.conv1_2, dtype, w, bn=model.bn1)
        self.down1 = _downsample(model.down1, dtype, w)
        self.conv2_2 = _after_unshuffle(model.conv2_2, model.bn2, dtype, w)
        self.down2 = _downsample(model.down2, dtype, w)
        self.conv3_2 = _after_unshuffle(model.conv3_2, model.bn3, dtype, w)
        self.up1 = _upsample(model.up1, dtype, w)
        self.conv4_1 = ConcatConv(model.conv4_1, 2 * c, dtype, w)
        self.conv4_2 = _conv(model.conv4_2, dtype, w, gelu=True)
        self.up2 = _upsample(model.up2, dtype, w)
        self.conv5_1 = ConcatConv(model.conv5_1, c, dtype, w)
        self.conv5_2 = _conv(model.conv5_2, dtype, w, gelu=True)
        self.conv6 = _conv(model.conv6, dtype, w)
        decoder = model.slot_decoder
        self.slot_decoder = nn.Sequential(
            _upsample(decoder.up1, dtype, w),
            _conv(decoder.conv1, dtype, w, gelu=True),
            _conv(decoder.conv2, dtype, w, gelu=True),
            _upsample(decoder.up2, dtype, w),
            _conv(decoder.conv3, dtype, w, gelu=True),
            _conv(decoder.conv4, dtype, w, gelu=True),
            _conv(decoder.conv5, dtype, w),
        )


class InferenceExposureSlot(ExposureSlot):
    """A frozen ``ExposureSlot`` whose whole-image forward runs ``FusedConvolutions``;
    see ``optimize_for_inference``.

    It keeps the network's layers (frozen, eval mode, same state_dict), so code that
    walks them, such as tiled inference, still works on it; ``train()`` is refused.
    """

    def __init__(self, model: ExposureSlot, dtype: torch.dtype, winograd: bool = True):
        super().__init__(model.level, model.backend, model.size_policy,
                         dim=model.bottleneck.to_q.in_features,
                         iters=model.bottleneck.slot_attention.iters)
        self.load_state_dict(model.state_dict())
        # The slot attention needs float32 or better: with bfloat16 or float16
        # convolutions the layers (the bottleneck among them) stay float32, and so do
        # images in and out.
        outer = torch.float32 if dtype in _HALF_DTYPES else dtype
        self.to(device=model.conv1_1.weight.device, dtype=outer).requires_grad_(False)
        super().train(False)
        self.fused = FusedConvolutions(model, dtype, winograd)
        self.bottleneck = InferenceBottleneck(self.bottleneck, dtype)

    def train(self, mode: bool = True):
        if mode:
            raise RuntimeError("an optimized model is for inference only; train the model "
                               "it was made from and optimize it again")
        return super().train(False)

    def compile_for(self, shape, *, graphs: bool | None = None):
        """This model bound to inputs of ``shape`` [B, 3, H, W], with a CUDA graph on
        a GPU; see ``exposure_slot.engine.compile_for``."""
        from .engine import CompiledExposureSlot

        return CompiledExposureSlot(self, shape, graphs=graphs)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the convolutions run in."""
        return self.fused.conv1_1.weight.dtype

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        if return_aux:
            return super().forward(x, return_aux=True)
        return self.correct(x)[0]

    def correct(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The corrected image and the masks of ``model(x, return_aux=True)``, without
        the slot decoder's image, whose input (the slot map) it never keeps."""
        self._check_input(x)
        height, width = x.shape[-2:]
        image, _, masks = self._forward_aligned(self._to_multiple(x), keep_slot_map=False)
        return self._from_multiple(image, height, width), self._crop_masks(masks, height, width)

    def _forward_aligned(self, x, keep_slot_map: bool = True):
        # Each skip connection is held as the skip half of its concatenated
        # convolution (same size), made as soon as its map is: the full-resolution
        # map e1 is then gone before the decoder's full-resolution stage.
        f = self.fused
        h = x.to(self.compute_dtype, memory_format=torch.channels_last)
        e1 = f.conv1_2(f.conv1_1(h))
        del h
        e2 = f.down1(e1)
        skip1 = f.conv5_1.of_second(e1)
        del e1
        e2 = f.conv2_2(e2)
        e3 = f.down2(e2)
        skip2 = f.conv4_1.of_second(e2)
        del e2
        e3 = f.conv3_2(e3).to(x.dtype)
        z, slot_map, masks = self.bottleneck(e3, keep_slot_map)
        del e3
        z = canonical_channels_last(z.to(self.compute_dtype))
        d2 = f.conv4_2(f.conv4_1.of_first(f.up1(z), add_into=skip2))
        del z, skip2
        d1 = f.conv5_2(f.conv5_1.of_first(f.up2(d2), add_into=skip1))
        del d2, skip1
        return x + self._as_image(f.conv6(d1), x.dtype), slot_map, masks

    def _reconstruct(self, slot_map):
        recon = self.fused.slot_decoder(canonical_channels_last(slot_map.to(self.compute_dtype)))
        return self._as_image(recon, slot_map.dtype)

    @staticmethod
    def _as_image(y, dtype):
        return y.to(dtype, memory_format=torch.contiguous_format)


def optimize_for_inference(model: ExposureSlot, dtype: torch.dtype = torch.float32,
                           device: torch.device | str | None = None, *,
                           winograd: bool = True) -> InferenceExposureSlot:
    """A frozen, faster copy of ``model`` for inference (its eval-mode function).

    ``dtype`` is what the convolutions compute in: ``torch.float32`` (default; within
    1e-4 of the float64 network on images in [0, 1]), ``torch.bfloat16`` (several times
    faster on CPUs with AMX or AVX512-BF16 and on GPUs, about 1e-2 worse; the
    bottleneck, the inputs and the outputs stay float32), ``torch.float64``, or on a
    CUDA device ``torch.float16`` (as bfloat16, with 3 more mantissa bits). The copy
    lives on ``device`` (default: the model's), its weights folded there; ``model``
    itself is not changed and later changes to it are not seen by the copy.
    ``winograd``: in float32 on the CPU, run the 3x3 convolutions as Winograd
    F(4x4, 3x3) ones (faster; about 10x the direct ones' float32 rounding per layer);
    False keeps oneDNN's direct convolutions.
    """
    if not isinstance(model, ExposureSlot):
        raise TypeError(f"expected an ExposureSlot, got {type(model).__name__}")
    device = model.conv1_1.weight.device if device is None else torch.device(device)
    allowed = CUDA_COMPUTE_DTYPES if device.type == "cuda" else COMPUTE_DTYPES
    if dtype not in allowed:
        raise ValueError(f"dtype must be one of {', '.join(map(str, allowed))} on {device.type}"
                         f"{' (torch.float16 on CUDA too)' if device.type != 'cuda' else ''}, "
                         f"got {dtype}")
    for name in ("bn1", "bn2", "bn3"):
        if getattr(model, name).running_mean is None:
            raise ValueError(f"{name} keeps no running statistics (track_running_stats=False), "
                             "so there is no inference-time BatchNorm to fold")
    with torch.no_grad():
        if device != model.conv1_1.weight.device:
            model = copy.deepcopy(model).to(device)  # fold where the copy will run
        return InferenceExposureSlot(model, dtype, winograd)


# --------------------------------------------------------------------------
# Weight algebra, in float64


def _weight_and_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None):
    """The conv's weight and bias (zeros if it has none), with ``bn`` (eval mode)
    folded in: ``bn(conv(x)) = conv'(x)``."""
    weight = conv.weight.detach().double()
    bias = (torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
            if conv.bias is None else conv.bias.detach().double())
    if bn is None:
        return weight, bias
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    weight = weight * scale[:, None, None, None]
    bias = (bias - bn.running_mean.double()) * scale + bn.bias.detach().double()
    return weight, bias


def _conv(conv: nn.Conv2d, dtype, winograd: bool, *, bn: nn.BatchNorm2d | None = None,
          gelu: bool = False) -> FrozenConv:
    """A size-keeping convolution (3x3 with zero padding 1, or 1x1), ``bn`` folded."""
    weight, bias = _weight_and_bias(conv, bn)
    padding = conv.padding[0]
    # What winograd_conv3x3 computes: a 3x3 convolution, stride 1, zero padding 1.
    same_3x3 = (tuple(conv.kernel_size) == (3, 3) and conv.stride == (1, 1)
                and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                and conv.padding_mode == "zeros")
    return FrozenConv(weight, bias, dtype, padding=padding, gelu=gelu,
                      winograd=weight if winograd and same_3x3 else None)


def _downsample(down, dtype, winograd: bool) -> FrozenConv:
    """``Downsample``'s convolution with the GELU that follows it, its PixelUnshuffle
    left to ``_after_unshuffle`` (GELU acts per value, so the order does not matter)."""
    weight, _ = _weight_and_bias(down.conv)
    return FrozenConv(weight, None, dtype, reflect=True, padding=0, gelu=True,
                      winograd=weight if winograd else None)


def _after_unshuffle(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype, winograd: bool) -> FrozenConv:
    """``bn(conv(PixelUnshuffle(2)(t)))`` as one stride-2 6x6 convolution of ``t``.

    Unshuffled channel ``4c + 2a + b`` at ``(i, j)`` is ``t[c, 2i + a, 2j + b]``, so
    tap ``(dy, dx)`` of that channel is tap ``(2dy + a, 2dx + b)`` of channel ``c`` on
    the full-resolution grid; zero padding 1 there is zero padding 2 here.
    """
    weight, bias = _weight_and_bias(conv, bn)
    out, inp, kh, kw = weight.shape
    folded = (weight.view(out, inp // 4, 2, 2, kh, kw)  # [o, c, a, b, dy, dx]
              .permute(0, 1, 4, 2, 5, 3).reshape(out, inp // 4, 2 * kh, 2 * kw))
    return FrozenConv(folded, bias, dtype, stride=2, padding=2, unshuffle=2,
                      winograd=permute_phases(weight, 1) if winograd else None)


def _upsample(up, dtype, winograd: bool) -> FrozenConv:
    """``Upsample`` (reflect-padded 3x3 conv to 4n channels, then PixelShuffle(2)) as a
    stride-2 transposed 6x6 convolution of the padded map.

    Output ``[c, 2i + a, 2j + b]`` is conv channel ``4c + 2a + b`` at ``(i, j)``, the sum
    over taps ``(dy, dx)`` of padded input ``(i + dy, j + dx)``. A transposed
    convolution with stride 2 and padding 4 takes input ``p`` to output ``2p + k - 4``,
    so tap ``dy`` of phase ``a`` is kernel row ``k = 2(2 - dy) + a``.
    """
    weight, _ = _weight_and_bias(up.conv)
    out4, inp, kh, kw = weight.shape
    folded = (weight.view(out4 // 4, 2, 2, inp, kh, kw).flip(4, 5)  # [c, a, b, in, 2-dy, 2-dx]
              .permute(3, 0, 4, 1, 5, 2).reshape(inp, out4 // 4, 2 * kh, 2 * kw))
    return FrozenConv(folded, None, dtype, stride=2, padding=4, reflect=True, transposed=True,
                      shuffle=2, winograd=permute_phases(weight, 0) if winograd else None)
