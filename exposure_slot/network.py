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


class BottleneckBlock(nn.Module):
    """Slot-in-slot modulated channel attention plus feed-forward, on a [B,C,h,w] map.

    Returns the new map, the slot map ``[B,C,h,w]`` (input of the slot decoder) and
    the per-level masks ``[B,K,h,w]``.
    """

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

    def forward(self, z):
        batch, dim, h, w = z.shape
        x = z.flatten(2).transpose(1, 2)  # tokens [B, N, C], row-major over (h, w)
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        prompt_map, slot_map, masks = self.slot_attention(k, v)
        v = v * prompt_map
        # Channel attention: each channel is a unit vector over the tokens.
        qh = F.normalize(q, dim=1, eps=1e-12)
        kh = F.normalize(k, dim=1, eps=1e-12)
        attn = (torch.bmm(kh.transpose(1, 2), qh) * self.rescale).softmax(dim=-1)  # [B, C, C]
        y = torch.bmm(v, attn.transpose(1, 2))  # (attn @ v^T)^T
        x = x + self.proj(y)
        ff_in = self.norm(x).transpose(1, 2).reshape(batch, dim, h, w)
        out = x.transpose(1, 2).reshape(batch, dim, h, w) + self.ff(ff_in)
        slot_map = slot_map.transpose(1, 2).reshape(batch, dim, h, w)
        masks = [m.view(batch, -1, h, w) for m in masks]
        return out, slot_map, masks


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


class ExposureSlot(nn.Module):
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
    """

    def __init__(self, level: int = 2, backend: str = "auto", size_policy: str = "pad",
                 dim: int = 128, iters: int = 3):
        super().__init__()
        if level not in SLOTS_OF_LEVEL:
            raise ValueError(f"level must be one of {sorted(SLOTS_OF_LEVEL)}, got {level!r}")
        self.level = level
        self.size_policy = size_policy
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
        recon = self._from_multiple(self.slot_decoder(slot_map), height, width)
        if self.size_policy == "pad":
            masks = [m[..., :-(-height // MULTIPLE), :-(-width // MULTIPLE)] for m in masks]
        return ExposureOutput(image, masks, recon)

    def _forward_aligned(self, x):
        """The network on an input whose sides are multiples of 4."""
        e1 = self.bn1(self.conv1_2(F.gelu(self.conv1_1(x))))
        e2 = self.bn2(self.conv2_2(F.gelu(self.down1(e1))))
        e3 = self.bn3(self.conv3_2(F.gelu(self.down2(e2))))
        z, slot_map, masks = self.bottleneck(e3)
        d2 = F.gelu(self.conv4_2(F.gelu(self.conv4_1(torch.cat([self.up1(z), e2], dim=1)))))
        d1 = F.gelu(self.conv5_2(F.gelu(self.conv5_1(torch.cat([self.up2(d2), e1], dim=1)))))
        return self.conv6(d1) + x, slot_map, masks

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
