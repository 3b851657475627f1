"""Synthetic exposure errors made from well-exposed photographs.

A well-exposed sRGB photo is treated as the camera's rendering of a scene:

1. decode sRGB to linear light with the exact sRGB transfer function
   (IEC 61966-2-1: ``c / 12.92`` below 0.04045, ``((c + 0.055) / 1.055) ** 2.4`` above);
2. undo the camera's tone curve to get scene-referred exposure;
3. multiply by ``2 ** EV`` (one number for the whole image, or a smooth random
   per-pixel EV field for mixed exposure);
4. render again through the same tone curve, clip to ``[0, 1]``, and encode to sRGB;
5. optionally round-trip through JPEG at a given quality.

The tone curve is the extended Reinhard operator with white point ``w = 2``
(:func:`tone_curve`, ``T(x) = x (1 + x / w**2) / (1 + x)``): nearly linear in
the shadows, with a soft highlight shoulder that reaches 1 at scene value ``w``,
like a camera's rendering curve (``w = 1`` would be linear with hard clipping). Because step 2 inverts it exactly, EV 0 returns
the input (up to float rounding) and no JPEG round trip is asked for. Raising the
exposure compresses highlights into the shoulder before they clip, as a camera
does, instead of clipping linearly; lowering it crushes the shadows into the
steep part of the sRGB curve, where 8-bit quantisation (the JPEG round trip)
destroys detail, as in real under-exposed shots.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..images import ImageReadError, read_image
from .datasets import DatasetError, _image_files

# Scene value the tone curve maps to 1: values up to one stop above the clipping
# point of a linear curve are rolled into the shoulder. (At 4 the shoulder is so
# long that -2 EV mostly flattens contrast instead of darkening; at 1 the curve is
# linear and highlights clip hard.)
WHITE_POINT = 2.0


def srgb_to_linear(x: torch.Tensor) -> torch.Tensor:
    """The exact sRGB decoding function, elementwise, for values in ``[0, 1]``."""
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: torch.Tensor) -> torch.Tensor:
    """The exact sRGB encoding function, elementwise, for values in ``[0, 1]``."""
    return torch.where(x <= 0.0031308, x * 12.92,
                       1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def tone_curve(scene: torch.Tensor, white: float = WHITE_POINT) -> torch.Tensor:
    """Extended Reinhard: scene-referred exposure ``>= 0`` to linear display
    values; ``tone_curve(white) == 1``, larger values exceed 1 (clipped later)."""
    return scene * (1 + scene / (white * white)) / (1 + scene)


def inverse_tone_curve(display: torch.Tensor, white: float = WHITE_POINT) -> torch.Tensor:
    """The inverse of :func:`tone_curve` on ``[0, 1]``.

    Solves ``x**2 / w**2 + (1 - L) x - L = 0`` for its positive root, written as
    ``2L / ((1 - L) + sqrt((1 - L)**2 + 4L / w**2))`` so that dark values do not
    lose precision to cancellation.
    """
    rest = 1 - display
    return 2 * display / (rest + torch.sqrt(rest * rest + 4 * display / (white * white)))


def ev_field(shape: tuple[int, int], low: float, high: float, *, grid: int = 4,
             generator: torch.Generator | None = None, dtype=torch.float32) -> torch.Tensor:
    """A smooth random EV map ``[H, W]`` whose minimum is ``low`` and maximum ``high``.

    Gaussian noise on a ``grid x grid`` lattice (a few blobs across the image)
    is upsampled bicubically, then rescaled so that its range is exactly
    ``[low, high]``: with ``low < 0 < high`` the image holds both under- and
    over-exposed regions.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    if not low <= high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    height, width = shape
    coarse = torch.randn(1, 1, grid, grid, generator=generator, dtype=torch.float64)
    smooth = F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)[0, 0]
    lo, hi = smooth.min(), smooth.max()
    unit = (smooth - lo) / (hi - lo) if hi > lo else torch.full_like(smooth, 0.5)
    return (low + (high - low) * unit).to(dtype)


def jpeg_round_trip(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode ``[3,H,W]`` in ``[0,1]`` as an 8-bit JPEG at ``quality`` and decode it."""
    samples = (img.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(samples).save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        back = np.asarray(decoded.convert("RGB"))
    return torch.from_numpy(back.copy()).permute(2, 0, 1).to(img.dtype).div(255).to(img.device)


def synthesize(
    img: torch.Tensor,
    ev: float | tuple[float, float],
    *,
    mixed: bool = False,
    grid: int = 4,
    jpeg_quality: int | None = None,
    white: float = WHITE_POINT,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Re-expose well-exposed sRGB images by ``ev`` stops (see the module docstring).

    Args:
        img: ``[3,H,W]`` or ``[B,3,H,W]`` float sRGB in ``[0, 1]``.
        ev: global exposure change in stops (``mixed=False``); with ``mixed=True``
            either ``(low, high)``, the range of the EV field, or a number ``a``
            meaning ``(-a, a)``.
        mixed: a smooth random EV field per image (:func:`ev_field`) instead of
            one EV.
        grid: lattice size of the mixed field's noise (larger: smaller regions).
        jpeg_quality: if given, each result is round-tripped through JPEG.
        white: the tone curve's white point.
        seed / generator: randomness of the mixed field (a seed makes a fresh
            ``torch.Generator``); the result is a function of the inputs and the
            generator state only.

    Returns:
        a tensor shaped like ``img`` in ``[0, 1]``.
    """
    if img.dim() not in (3, 4) or img.shape[-3] != 3:
        raise ValueError(f"expected an RGB image [3,H,W] or batch [B,3,H,W], got {list(img.shape)}")
    if not img.is_floating_point():
        raise TypeError(f"expected a float image in [0, 1], got {img.dtype}")
    if seed is not None and generator is not None:
        raise ValueError("give either seed or generator, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    batch = img if img.dim() == 4 else img[None]
    height, width = batch.shape[-2:]

    if mixed:
        low, high = (-abs(ev), abs(ev)) if isinstance(ev, (int, float)) else ev
        fields = [ev_field((height, width), low, high, grid=grid, generator=generator,
                           dtype=img.dtype) for _ in range(batch.shape[0])]
        gain = torch.exp2(torch.stack(fields)[:, None].to(img.device))  # [B,1,H,W]
    else:
        if not isinstance(ev, (int, float)):
            raise TypeError(f"a global exposure change is one number, got {ev!r}; "
                            "pass mixed=True for an EV range")
        gain = 2.0 ** float(ev)

    scene = inverse_tone_curve(srgb_to_linear(batch.clamp(0, 1)), white)
    out = linear_to_srgb(tone_curve(scene * gain, white).clamp(0, 1))
    if jpeg_quality is not None:
        out = torch.stack([jpeg_round_trip(one, jpeg_quality) for one in out])
    return out if img.dim() == 4 else out[0]


class SyntheticExposurePairs(torch.utils.data.Dataset):
    """(badly exposed input, well-exposed target) pairs made on the fly.

    Every item is a random square window of one of the photos (photo
    ``index % len(photos)``), ``crop`` pixels wide or, with ``window``, a random
    part of the photo scaled down to ``crop`` pixels, randomly flipped, re-exposed by :func:`synthesize`
    with a global EV uniform in ``ev_range`` or, with probability ``mixed_prob``,
    a smooth EV field whose minimum is drawn from ``mixed_low`` and maximum from
    ``mixed_high`` (stops).

    The randomness of item ``index`` depends only on ``(seed, epoch, index)``
    (:meth:`set_epoch` changes it per epoch), never on global RNG state: any
    worker layout, process count or resumed run sees the same items.

    Args:
        images: a folder or file of well-exposed photos, or a list of folders and files.
        crop: side of the square crops (at most the smaller photo side).
        window: ``(min, max)``: take a window whose side is a random fraction in
            this range of the photo's shorter side and resize it (antialiased) to
            ``crop``. Small crops of a large photo rarely show whether a patch is
            dark or under-exposed; a large window keeps the whole scene's context,
            like the released recipe's 256x256 resize of whole images.
        length: items per epoch (default: 8 per photo, i.e. 8 random crops of each).
        ev_range: range of global EVs.
        mixed_prob: probability of a mixed-exposure item.
        mixed_low / mixed_high: ranges of the mixed field's minimum and maximum.
        jpeg_quality: ``None``, a quality, or a ``(min, max)`` range to draw from.
        seed: base seed.
    """

    def __init__(self, images: str | Path | Sequence[str | Path], *, crop: int = 128,
                 window: tuple[float, float] | None = None, length: int | None = None, ev_range: tuple[float, float] = (-2.0, 2.0),
                 mixed_prob: float = 0.5, mixed_low: tuple[float, float] = (-2.0, -0.5),
                 mixed_high: tuple[float, float] = (0.5, 2.0),
                 jpeg_quality: int | tuple[int, int] | None = None, seed: int = 0):
        sources = [images] if isinstance(images, (str, Path)) else list(images)
        paths: list[Path] = []
        for source in map(Path, sources):
            paths += _image_files(source, "photo") if source.is_dir() else [source]
        if not paths:
            raise DatasetError("no photos given")
        self.photos = [self._read(path) for path in paths]
        self.paths = paths
        smallest = min(min(p.shape[-2:]) for p in self.photos)
        if crop > smallest:
            raise DatasetError(f"crop {crop} is larger than the smallest photo side ({smallest})")
        if window is not None and not 0 < window[0] <= window[1] <= 1:
            raise ValueError(f"window must be (min, max) with 0 < min <= max <= 1, got {window!r}")
        self.crop = crop
        self.window = window
        self.length = length or 8 * len(paths)
        self.ev_range = ev_range
        self.mixed_prob = mixed_prob
        self.mixed_low = mixed_low
        self.mixed_high = mixed_high
        self.jpeg_quality = jpeg_quality
        self.seed = seed
        self.epoch = 0

    @staticmethod
    def _read(path: Path) -> torch.Tensor:
        """A photo as uint8 ``[3,H,W]``: small in memory; the files are 8-bit anyway."""
        try:
            image = read_image(path)
        except ImageReadError as exc:
            raise DatasetError(f"cannot read photo {path}: {exc}") from None
        return (image.tensor[0] * 255).round().to(torch.uint8)

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops and exposures of ``epoch``."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        # A seed per (seed, epoch, index) from a hash that is the same on every platform.
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}")
        photo = self.photos[index % len(self.photos)]
        height, width = photo.shape[-2:]
        side = self.crop
        if self.window is not None:
            side = max(self.crop, round(rng.uniform(*self.window) * min(height, width)))
        top, left = rng.randrange(height - side + 1), rng.randrange(width - side + 1)
        target = photo[:, top:top + side, left:left + side].float() / 255
        if side != self.crop:
            target = F.interpolate(target[None], size=(self.crop, self.crop), mode="bilinear",
                                   antialias=True, align_corners=False)[0].clamp(0, 1)
        if rng.random() < 0.5:
            target = target.flip(-1)
        if rng.random() < 0.5:
            target = target.flip(-2)
        quality = self.jpeg_quality
        if isinstance(quality, tuple):
            quality = rng.randint(*quality)
        generator = torch.Generator().manual_seed(rng.getrandbits(63))
        if rng.random() < self.mixed_prob:
            ev = (rng.uniform(*self.mixed_low), rng.uniform(*self.mixed_high))
            source = synthesize(target, ev, mixed=True, jpeg_quality=quality, generator=generator)
        else:
            source = synthesize(target, rng.uniform(*self.ev_range), jpeg_quality=quality)
        return source.contiguous(), target.contiguous()


__all__ = [
    "srgb_to_linear", "linear_to_srgb", "tone_curve", "inverse_tone_curve", "ev_field",
    "jpeg_round_trip", "synthesize", "SyntheticExposurePairs", "WHITE_POINT",
]
