"""The Exposure-slot image network (SPEC sections 3 and 4).

A three-scale U-Net whose 1/4-resolution bottleneck is one transformer block:
slot-in-slot attention finds exposure regions and modulates the values of a
channel ("transposed") attention, followed by a depthwise-convolution feed-forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .slot_attention import SlotInSlotAttention

SLOTS_OF_LEVEL = {1: (3,), 2: (3, 7), 3: (3, 7, 10)}
SIZE_POLICIES = ("pad", "resize")
MULTIPLE = 4  # two 2x pixel-unshuffles down to the bottleneck
# The upsampling convs reflect-pad the 1/4-resolution map, which needs 2 pixels.
MIN_SIDE = 2 * MULTIPLE


class ExposureOutput(NamedTuple):
    image: torch.Tensor  # [B, 3, H, W] corrected image
    masks: list[torch.Tensor]  # per level, top first: [B, K, H/4, W/4] exposure-region masks
    recon: torch.Tensor  # [B, 3, H, W] slot decoder reconstruction (training signal)


class Downsample(nn.Module):
    """3x3 conv n -> n/2 (reflect padding, no bias), then PixelUnshuffle(2): 2n channels at half size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels // 2, 3, padding=1, padding_mode="reflect", bias=False)

    def forward(self, x):
        return F.pixel_unshuffle(self.conv(x), 2)


class Upsample(nn.Module):
    """3x3 conv n -> 2n (reflect padding, no bias), then PixelShuffle(2): n/2 channels at double size."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels * 2, 3, padding=1, padding_mode="reflect", bias=False)

    def forward(self, x):
        return F.pixel_shuffle(self.conv(x), 2)


class FeedForward(nn.Module):
    """1x1 expand to 4C, GELU, depthwise 3x3, GELU, 1x1 project back to C (no biases)."""

    def __init__(self, dim: int, expansion: int = 4):
        super().__init__()
        hidden = dim * expansion
        self.expand = nn.Conv2d(dim, hidden, 1, bias=False)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False)
        self.project = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x):
        return self.project(F.gelu(self.depthwise(F.gelu(self.expand(x)))))


class MapRows:
    """Rows of a ``[B, C, h, w]`` map, band by band, for ``BottleneckBlock.forward_rows``.

    ``shape`` is the map's shape and ``memory_format`` the layout wanted for the
    block's output. ``rows(top, bottom)`` returns rows ``[top, bottom)``. The block
    reads every row once, calls ``release()``, then reads overlapping bands once
    more; a source that can recompute rows may free the map on ``release()``. This
    one holds a tensor.
    """

    def __init__(self, z: torch.Tensor):
        self.shape = z.shape
        # The block's output takes this layout (channels-last in, channels-last out).
        self.memory_format = (torch.channels_last if not z.is_contiguous()
                              and z.is_contiguous(memory_format=torch.channels_last)
                              else torch.contiguous_format)
        self._z = z

    def rows(self, top: int, bottom: int) -> torch.Tensor:
        return self._z[:, :, top:bottom]

    def release(self) -> None:
        """The map itself stays with whoever passed it in."""


class BottleneckBlock(nn.Module):
    """Slot-in-slot modulated channel attention plus feed-forward, on a [B,C,h,w] map.

    Returns the new map, the slot map ``[B,C,h,w]`` (input of the slot decoder) and
    the per-level masks ``[B,K,h,w]``.

    With autograd off (``torch.no_grad``/``inference_mode``) the block runs a
    memory-lean path (``forward_rows``) with the same results up to float rounding:
    it holds ``k`` and ``v`` (which the slot attention needs whole), the slot
    attention's outputs and its own output, and streams everything else through
    bands of about ``chunk_tokens`` tokens. The channel attention only needs sums
    over tokens (column norms and the C x C gram matrix ``k^T q``), so ``q`` is
    never held whole; the feed-forward runs on bands of rows that overlap by its
    depthwise convolution's reach. ``keep_slot_map=False`` drops the slot map
    (returned as None) as soon as the slot attention has made it.
    """

    # Big enough for efficient matmuls, small enough that a band's feed-forward
    # hidden maps (4C channels, 64 MiB each at C=128 in float32) stay modest.
    chunk_tokens = 32768

    def __init__(self, dim: int = 128, slots=(3, 7), iters: int = 3, backend: str = "auto"):
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.rescale = nn.Parameter(torch.ones(1, 1, 1))
        self.proj = nn.Linear(dim, dim)
        self.slot_attention = SlotInSlotAttention(dim, slots, iters, backend)
        self.norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, z, keep_slot_map: bool = True):
        if not torch.is_grad_enabled():
            return self.forward_rows(MapRows(z), keep_slot_map)
        batch, _, h, w = z.shape
        x = _tokens(z)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        prompt_map, slot_map, masks = self.slot_attention(k, v)
        v = v * prompt_map
        # Channel attention: each channel is a unit vector over the tokens.
        qh = F.normalize(q, dim=1, eps=1e-12)
        kh = F.normalize(k, dim=1, eps=1e-12)
        attn = (torch.bmm(kh.transpose(1, 2), qh) * self.rescale).softmax(dim=-1)  # [B, C, C]
        y = torch.bmm(v, attn.transpose(1, 2))  # (attn @ v^T)^T
        x = x + self.proj(y)
        out = _as_map(x, h, w) + self.ff(_as_map(self.norm(x), h, w))
        return (out, _as_map(slot_map, h, w) if keep_slot_map else None,
                [m.view(batch, -1, h, w) for m in masks])

    def forward_rows(self, source: MapRows, keep_slot_map: bool = True):
        """The no-grad forward of the map that ``source`` gives band by band."""
        batch, dim, h, w = source.shape
        band = max(1, self.chunk_tokens // w)
        whole = band >= h  # one band: its k, v and output are the block's, not copied
        weight = self.to_k.weight
        if not whole:
            k = weight.new_empty(batch, h * w, dim)
            v = weight.new_empty(batch, h * w, dim)
        sums = None
        for top in range(0, h, band):
            bottom = min(h, top + band)
            x = _tokens(source.rows(top, bottom))
            k_chunk, v_chunk = self.to_k(x), self.to_v(x)
            if whole:
                k, v = k_chunk, v_chunk
            else:
                k[:, top * w:bottom * w] = k_chunk
                v[:, top * w:bottom * w] = v_chunk
            sums = self._token_sums(x, k_chunk, sums)
            del x, k_chunk, v_chunk
        source.release()
        prompt_map, slot_map, masks = self.slot_attention(k, v)
        del k
        slot_map = _as_map(slot_map, h, w) if keep_slot_map else None
        v.mul_(prompt_map)
        del prompt_map
        mix = self._channel_mix(sums)

        if not whole:
            out = torch.empty(batch, dim, h, w, dtype=weight.dtype, device=weight.device,
                              memory_format=source.memory_format)
        # Output rows [top, bottom) need the feed-forward's input on the rows its
        # convolutions reach beyond them; those rows are recomputed, not kept.
        reach = _row_reach(self.ff)
        for top in range(0, h, band):
            bottom = min(h, top + band)
            lo, hi = max(0, top - reach), min(h, bottom + reach)
            x1 = self._attended(_tokens(source.rows(lo, hi)), v[:, lo * w:hi * w], mix)
            y = _as_map(x1, hi - lo, w) + self.ff(_as_map(self.norm(x1), hi - lo, w))
            if whole:
                out = y.contiguous(memory_format=source.memory_format)
            else:
                out[:, :, top:bottom] = y[:, :, top - lo:bottom - lo]
            del x1, y
        return out, slot_map, [m.view(batch, -1, h, w) for m in masks]

    # The channel attention of forward_rows in three steps, which
    # exposure_slot.inference regroups: sums over the tokens (band by band), the
    # [B, C, C] matrix they give, and the block's output tokens from it.

    def _token_sums(self, x, k, sums):
        """``sums`` updated with a band's tokens ``x`` and keys ``k``: the gram matrix
        ``k^T q`` and the squared column norms of ``k`` and ``q``."""
        q = self.to_q(x)
        if sums is None:
            sums = (x.new_zeros(x.shape[0], x.shape[2], x.shape[2]),
                    x.new_zeros(x.shape[0], x.shape[2]), x.new_zeros(x.shape[0], x.shape[2]))
        gram, k_sq, q_sq = sums
        q_sq += q.square().sum(dim=1)
        k_sq += k.square().sum(dim=1)
        gram.baddbmm_(k.transpose(1, 2), q)
        return sums

    def _channel_mix(self, sums):
        """The transposed channel attention ``attn^T`` [B, C, C] from the sums."""
        return self._channel_attention_t(*sums)

    def _channel_attention_t(self, gram, k_sq, q_sq):
        # F.normalize's max(norm, eps) per channel, applied to the gram's rows and columns.
        k_norm = k_sq.sqrt().clamp_min(1e-12)
        q_norm = q_sq.sqrt().clamp_min(1e-12)
        cosines = gram / k_norm[:, :, None] / q_norm[:, None, :]
        return (cosines * self.rescale).softmax(dim=-1).transpose(1, 2)

    def _attended(self, x, v, mix):
        """The tokens after the channel attention: ``x + proj(v attn^T)``."""
        return x + self.proj(torch.bmm(v, mix))


def _tokens(z: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` as tokens ``[B, h*w, C]``, row-major over (h, w); a view for
    contiguous and channels-last maps and for bands of rows of them."""
    return z.flatten(2).transpose(1, 2)


def _as_map(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens ``[B, h*w, C]`` as a ``[B, C, h, w]`` map (a view of contiguous tokens)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)


def _row_reach(module: nn.Module) -> int:
    """How many rows beyond an output row the stride-1 convolutions of ``module``,
    applied in sequence, read: the sum of their row paddings (any module with a
    ``padding`` attribute, so frozen copies of the convolutions count too)."""
    reach = 0
    for m in module.modules():
        padding = getattr(m, "padding", 0)
        reach += padding if isinstance(padding, int) else padding[0]
    return reach


class SlotDecoder(nn.Module):
    """Training-only branch: reconstructs the image from the slot map."""

    def __init__(self, dim: int = 128):
        super().__init__()
        self.up1 = Upsample(dim)
        self.conv1 = nn.Conv2d(dim // 2, dim // 2, 3, padding=1)
        self.conv2 = nn.Conv2d(dim // 2, dim // 2, 3, padding=1)
        self.up2 = Upsample(dim // 2)
        self.conv3 = nn.Conv2d(dim // 4, dim // 4, 3, padding=1)
        self.conv4 = nn.Conv2d(dim // 4, dim // 8, 3, padding=1)
        self.conv5 = nn.Conv2d(dim // 8, 3, 3, padding=1)

    def forward(self, slot_map):
        x = F.gelu(self.conv2(F.gelu(self.conv1(self.up1(slot_map)))))
        x = F.gelu(self.conv4(F.gelu(self.conv3(self.up2(x)))))
        return self.conv5(x)


class ExposureSlotBase(nn.Module):
    """What every form of the image network shares: the level, the backend of its
    bottleneck, input checks, the size policy and the auxiliary outputs.

    Subclasses hold ``conv1_1`` (whose weight gives the dtype and device that inputs
    must have) and a ``bottleneck``, and implement ``_forward_aligned(x)`` ->
    ``(image, slot_map, masks)`` on inputs whose sides are multiples of 4, and
    ``_reconstruct(slot_map)`` -> the slot decoder's image.
    """

    def __init__(self, level: int, size_policy: str):
        super().__init__()
        if level not in SLOTS_OF_LEVEL:
            raise ValueError(f"level must be one of {sorted(SLOTS_OF_LEVEL)}, got {level!r}")
        self.level = level
        self.size_policy = size_policy

    @property
    def backend(self) -> str:
        return self.bottleneck.slot_attention.backend

    @backend.setter
    def backend(self, name: str) -> None:
        self.bottleneck.slot_attention.backend = name

    @property
    def size_policy(self) -> str:
        return self._size_policy

    @size_policy.setter
    def size_policy(self, policy: str) -> None:
        if policy not in SIZE_POLICIES:
            raise ValueError(f"size_policy must be one of {SIZE_POLICIES}, got {policy!r}")
        self._size_policy = policy

    def extra_repr(self) -> str:
        return f"level={self.level}, size_policy={self.size_policy!r}"

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        self._check_input(x)
        height, width = x.shape[-2:]
        image, slot_map, masks = self._forward_aligned(self._to_multiple(x))
        image = self._from_multiple(image, height, width)
        if not return_aux:
            return image
        recon = self._from_multiple(self._reconstruct(slot_map), height, width)
        return ExposureOutput(image, self._crop_masks(masks, height, width), recon)

    def _crop_masks(self, masks, height: int, width: int):
        """The 1/4-resolution masks of the aligned input, cropped under "pad" to the
        ceil(H/4) x ceil(W/4) that cover the original image."""
        if self.size_policy != "pad":
            return masks
        return [m[..., :-(-height // MULTIPLE), :-(-width // MULTIPLE)] for m in masks]

    def _forward_aligned(self, x):
        raise NotImplementedError

    def _reconstruct(self, slot_map):
        raise NotImplementedError

    def aligned_size(self, height: int, width: int) -> tuple[int, int]:
        """The size the network runs at: sides multiples of 4 and at least 8."""
        def side(n):
            n = -(-n // MULTIPLE) * MULTIPLE if self.size_policy == "pad" else n - n % MULTIPLE
            return max(n, MIN_SIDE)
        return side(height), side(width)

    def _to_multiple(self, x):
        height, width = self.aligned_size(*x.shape[-2:])
        if self.size_policy == "resize":
            if x.shape[-2:] == (height, width):
                return x
            return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
        # Reflect padding must be narrower than the side, so tiny inputs grow in steps.
        while x.shape[-2:] != (height, width):
            pad_h = min(height - x.shape[-2], x.shape[-2] - 1)
            pad_w = min(width - x.shape[-1], x.shape[-1] - 1)
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect")
        return x

    def _from_multiple(self, y, height, width):
        if y.shape[-2:] == (height, width):
            return y
        if self.size_policy == "pad":
            return y[..., :height, :width]
        return F.interpolate(y, size=(height, width), mode="bilinear", align_corners=False)

    def _check_input(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected an image batch [B, 3, H, W], got shape {list(x.shape)}")
        if x.shape[-2] < MULTIPLE or x.shape[-1] < MULTIPLE:
            raise ValueError(f"image sides must be at least {MULTIPLE} pixels, got {list(x.shape[-2:])}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point image in [0, 1], got {x.dtype}; "
                            "convert 8-bit images with x.float() / 255")
        weight = self.conv1_1.weight
        if x.dtype != weight.dtype or x.device != weight.device:
            raise ValueError(f"input is {x.dtype} on {x.device} but the model is {weight.dtype} "
                             f"on {weight.device}; use model.to(x) or cast the input")


class ExposureSlot(ExposureSlotBase):
    """Exposure-slot, level 2 or 3 (or 1: plain slot attention, not released).

    ``model(x)`` corrects ``x`` ``[B,3,H,W]`` (values in [0,1]) for any H, W >= 4;
    ``model(x, return_aux=True)`` returns ``ExposureOutput(image, masks, recon)``.
    ``size_policy`` handles H or W not a multiple of 4: "pad" (default) reflect-pads
    bottom/right and crops the outputs, as the authors evaluate; "resize" resizes
    bilinearly to the multiple of 4 below and back, as their training code does.
    The released network needs sides of at least 8 (its upsampling convs reflect-pad
    the 1/4-resolution map); smaller sides are padded (or resized) up to 8. Under
    "pad" the masks are cropped to ceil(H/4) x ceil(W/4); under "resize" they are at
    the resized image's 1/4 resolution.

    For fast inference, ``exposure_slot.optimize_for_inference(model)`` gives a frozen
    copy with folded and fused convolutions.
    """

    def __init__(self, level: int = 2, backend: str = "auto", size_policy: str = "pad",
                 dim: int = 128, iters: int = 3):
        super().__init__(level, size_policy)
        c = dim // 4
        self.conv1_1 = nn.Conv2d(3, c, 3, padding=1)
        self.conv1_2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.down1 = Downsample(c)
        self.conv2_2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * c)
        self.down2 = Downsample(2 * c)
        self.conv3_2 = nn.Conv2d(4 * c, 4 * c, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * c)
        self.bottleneck = BottleneckBlock(dim, SLOTS_OF_LEVEL[level], iters, backend)
        self.up1 = Upsample(4 * c)
        self.conv4_1 = nn.Conv2d(4 * c, 2 * c, 3, padding=1)
        self.conv4_2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1)
        self.up2 = Upsample(2 * c)
        self.conv5_1 = nn.Conv2d(2 * c, c, 3, padding=1)
        self.conv5_2 = nn.Conv2d(c, c, 3, padding=1)
        self.conv6 = nn.Conv2d(c, 3, 1)
        self.slot_decoder = SlotDecoder(dim)

    def _forward_aligned(self, x):
        """The network on an input whose sides are multiples of 4."""
        e1 = self.bn1(self.conv1_2(F.gelu(self.conv1_1(x))))
        e2 = self.bn2(self.conv2_2(F.gelu(self.down1(e1))))
        e3 = self.bn3(self.conv3_2(F.gelu(self.down2(e2))))
        z, slot_map, masks = self.bottleneck(e3)
        d2 = F.gelu(self.conv4_2(F.gelu(self.conv4_1(torch.cat([self.up1(z), e2], dim=1)))))
        d1 = F.gelu(self.conv5_2(F.gelu(self.conv5_1(torch.cat([self.up2(d2), e1], dim=1)))))
        return self.conv6(d1) + x, slot_map, masks

    def _reconstruct(self, slot_map):
        """The slot decoder's image from the slot map."""
        return self.slot_decoder(slot_map)
