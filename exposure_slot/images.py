"""Image files in and out: reading, writing, atomic saving, mask colouring.

Reading
    :func:`read_image` opens a file with Pillow, applies the EXIF orientation
    (``ImageOps.exif_transpose``), and returns a :class:`LoadedImage` whose
    ``tensor`` is float32 ``[1, 3, H, W]`` in ``[0, 1]``.

    * 8-bit inputs (JPEG, 8-bit PNG, palette, grayscale, 1/2/4-bit) are
      converted to RGB with Pillow.  Grayscale is replicated to three channels.
    * 16-bit PNGs are read at full precision.  Pillow reads 16-bit grayscale
      natively (mode ``I;16``) but decodes 16-bit RGB / RGBA / gray+alpha PNGs
      into its 8-bit modes, keeping only the high byte of every sample.  We
      therefore run Pillow's own PNG decoder a second time with the
      little-endian raw mode, which picks the *low* byte of each big-endian
      sample, and combine both passes (``value = high * 256 + low``).  The PNG
      filtering and interlacing are still handled by Pillow; no extra
      dependency is needed.
    * An alpha channel (RGBA, LA, palette or ``tRNS`` transparency) is kept
      aside in ``LoadedImage.alpha`` and written back unchanged into PNG
      outputs; the network only ever sees RGB.

Writing
    :func:`save_image` writes 8-bit PNG, 16-bit PNG (an own small encoder,
    because Pillow cannot write 16-bit colour PNGs) or JPEG (quality 95).
    Values are clipped to ``[0, 1]`` and rounded.  Every file is written by
    :func:`atomic_write`: a temporary file in the destination directory that
    is renamed over the destination with ``os.replace`` only once complete,
    and removed on any failure.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ImageReadError",
    "LoadedImage",
    "read_image",
    "save_image",
    "encode_png",
    "atomic_write",
    "colorize_masks",
    "output_format",
    "SLOT_COLORS",
]

# Output format per input format: JPEG stays JPEG, everything else becomes PNG
# (lossless, and the only one of the two that can hold 16 bits and alpha).
JPEG_QUALITY = 95

# Distinct colours (RGB in [0, 1]) used to paint slot masks, one per slot.
# The first three are used for the top level (K = 3).
SLOT_COLORS = np.array(
    [
        [0.12, 0.47, 0.95],  # blue
        [1.00, 0.60, 0.05],  # orange
        [0.20, 0.80, 0.25],  # green
        [0.90, 0.15, 0.20],  # red
        [0.60, 0.35, 0.85],  # purple
        [0.55, 0.35, 0.25],  # brown
        [0.95, 0.45, 0.75],  # pink
        [0.50, 0.50, 0.50],  # grey
        [0.75, 0.75, 0.10],  # olive
        [0.10, 0.80, 0.85],  # cyan
    ],
    dtype=np.float32,
)


class ImageReadError(ValueError):
    """An input file could not be read as an image (message names the problem)."""


@dataclasses.dataclass
class LoadedImage:
    """A decoded input image.

    Attributes:
        tensor: float32 ``[1, 3, H, W]`` in ``[0, 1]``, RGB.
        bit_depth: 8 or 16, bits per sample of the source.
        format: Pillow's format name of the source (``"JPEG"``, ``"PNG"``, ...).
        alpha: float32 ``[H, W]`` in ``[0, 1]``, or ``None`` if the source is opaque.
        icc_profile: the embedded ICC profile (bytes) or ``None``; copied to outputs.
        notes: human-readable remarks on conversions that were made.
    """

    tensor: torch.Tensor
    bit_depth: int
    format: str
    alpha: np.ndarray | None = None
    icc_profile: bytes | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def height(self) -> int:
        return int(self.tensor.shape[-2])

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])


# --------------------------------------------------------------------------
# Reading


_MODE_DESCRIPTIONS = {
    "1": "1-bit black-and-white",
    "L": "grayscale",
    "LA": "grayscale with alpha",
    "P": "palette",
    "PA": "palette with alpha",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
}


def _png_rawmode(im: Image.Image) -> str | None:
    """The raw mode of Pillow's PNG decoder for ``im`` (before loading), if known."""
    tile = getattr(im, "tile", None)
    if not tile:
        return None
    args = tile[0].args if hasattr(tile[0], "args") else tile[0][3]
    if isinstance(args, tuple):
        args = args[0] if args else None
    return args if isinstance(args, str) else None


def _decode_with_rawmode(path: Path, rawmode: str) -> np.ndarray:
    """Decode the PNG at ``path`` again, forcing Pillow's decoder raw mode."""
    with Image.open(path) as im:
        im.tile = [t._replace(args=rawmode) if isinstance(t.args, str) else
                   t._replace(args=(rawmode,) + tuple(t.args[1:])) for t in im.tile]
        im.load()
        return np.asarray(im).copy()


def _read_png16_color(path: Path, im: Image.Image, rawmode: str) -> np.ndarray:
    """Full-precision samples (uint16 ``[H, W, C]``) of a 16-bit colour/LA PNG.

    ``im`` is the opened, not yet loaded image; ``rawmode`` its decoder raw mode.
    """
    if rawmode == "LA;16B":
        # Gray+alpha, 4 bytes per pixel: decode the bytes verbatim into RGBA
        # (R, G, B, A) = (gray hi, gray lo, alpha hi, alpha lo).
        raw = _decode_with_rawmode(path, "RGBA").astype(np.uint16)
        gray = (raw[..., 0] << 8) | raw[..., 1]
        alpha = (raw[..., 2] << 8) | raw[..., 3]
        return np.stack([gray, alpha], axis=-1)
    # RGB;16B / RGBA;16B: the normal decode keeps the high byte of each sample;
    # the ";16L" raw mode reads the other byte of each pair, i.e. the low byte.
    im.load()
    high = np.asarray(im).astype(np.uint16)
    low = _decode_with_rawmode(path, rawmode[:-1] + "L").astype(np.uint16)
    if high.shape != low.shape:  # pragma: no cover - defensive
        raise ImageReadError("inconsistent 16-bit PNG decode")
    return (high << 8) | low


def _transpose_array(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an ``[H, W, ...]`` array."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:  # transpose
        return arr.swapaxes(0, 1)
    if orientation == 6:  # rotate 90 clockwise
        return arr.swapaxes(0, 1)[:, ::-1]
    if orientation == 7:  # transverse
        return arr.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:  # rotate 90 counter-clockwise
        return arr.swapaxes(0, 1)[::-1]
    return arr


# Pillow modes whose ICC profile (if any) is an RGB profile, valid for our output.
_RGB_MODES = ("RGB", "RGBA", "RGBX", "RGBa", "P", "PA")

_ORIENTATION_NAMES = {
    2: "mirrored horizontally",
    3: "rotated 180 degrees",
    4: "mirrored vertically",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}


def read_image(path: str | os.PathLike) -> LoadedImage:
    """Read an image file into a :class:`LoadedImage`.

    Raises:
        ImageReadError: missing file, a directory, not an image, a corrupt or
            truncated image, or an unsupported pixel format.  The message names
            the problem but not the file (callers add the file name).
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError("no such file")
    if path.is_dir():
        raise ImageReadError("is a directory, not an image file")
    try:
        with Image.open(path) as im:
            return _read_opened(path, im)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"image too large ({exc})") from None
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or an image format Pillow cannot read") from None
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is
        # truncated", "broken data stream"), SyntaxError (bad PNG chunks), ...
        detail = str(exc) or type(exc).__name__
        raise ImageReadError(f"corrupt or truncated image ({detail})") from None


def _read_opened(path: Path, im: Image.Image) -> LoadedImage:
    fmt = im.format or "unknown"
    notes: list[str] = []
    icc = im.info.get("icc_profile") or None
    # Before anything loads the pixels (getexif() does, for PNG), which clears the tile.
    rawmode = _png_rawmode(im) if fmt == "PNG" else None
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the image unreadable
        orientation = 1
    if orientation not in _ORIENTATION_NAMES:
        orientation = 1

    alpha: np.ndarray | None = None

    if fmt == "PNG" and rawmode in ("RGB;16B", "RGBA;16B", "LA;16B"):
        bit_depth = 16
        data = _read_png16_color(path, im, rawmode)
        if rawmode == "LA;16B":
            rgb = np.repeat(data[..., :1], 3, axis=-1)
            alpha16 = data[..., 1]
            icc = None  # a grayscale profile does not describe the RGB output
            notes.append("16-bit grayscale with alpha converted to RGB")
        else:
            rgb = data[..., :3]
            alpha16 = data[..., 3] if data.shape[-1] == 4 else None
            trns = im.info.get("transparency")
            if alpha16 is None and isinstance(trns, tuple) and len(trns) == 3:
                alpha16 = np.where((rgb == np.array(trns, dtype=np.uint16)).all(-1), 0, 65535)
        rgb = _transpose_array(rgb, orientation)
        scale = 65535.0
        if alpha16 is not None:
            alpha = np.ascontiguousarray(_transpose_array(alpha16, orientation), dtype=np.float32) / 65535.0
    elif im.mode in ("I;16", "I;16B", "I;16L") or (im.mode == "I" and fmt == "PNG"):
        bit_depth = 16
        icc = None  # a grayscale profile does not describe the RGB output
        im.load()
        trns = im.info.get("transparency")
        im = ImageOps.exif_transpose(im)
        values = np.asarray(im)
        gray = values.astype(np.float32)
        if isinstance(trns, int):
            alpha = np.where(values == trns, 0.0, 1.0).astype(np.float32)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
        scale = 65535.0
        notes.append("16-bit grayscale converted to RGB")
    elif im.mode in ("I", "F", "I;16N") or im.mode.startswith(("I;", "F;")):
        raise ImageReadError(f"unsupported pixel format {im.mode!r} (use 8- or 16-bit JPEG/PNG)")
    else:
        bit_depth = 8
        im.load()
        mode = im.mode
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            "transparency" in im.info and mode in ("P", "L", "RGB", "1")
        )
        im = ImageOps.exif_transpose(im)
        if has_alpha:
            rgba = np.asarray(im.convert("RGBA"))
            rgb = rgba[..., :3]
            alpha = rgba[..., 3].astype(np.float32) / 255.0
        else:
            rgb = np.asarray(im.convert("RGB"))
        if mode not in ("RGB", "RGBA"):
            notes.append(f"{_MODE_DESCRIPTIONS.get(mode, mode)} image converted to RGB")
        scale = 255.0
        if icc and mode not in _RGB_MODES:
            # A grayscale or CMYK profile does not describe the RGB output.
            notes.append(f"embedded {mode} ICC profile not carried over to the RGB output")
            icc = None

    if orientation != 1:
        notes.append(f"EXIF orientation applied ({_ORIENTATION_NAMES[orientation]})")
    if alpha is not None:
        if float(alpha.min()) >= 1.0:
            alpha = None  # fully opaque: nothing to carry
        else:
            notes.append("alpha channel passed through unchanged (PNG output)")

    rgb = np.ascontiguousarray(rgb, dtype=np.float32) / np.float32(scale)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise ImageReadError(f"unexpected decoded shape {rgb.shape}")
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()
    return LoadedImage(tensor=tensor, bit_depth=bit_depth, format=fmt, alpha=alpha,
                       icc_profile=icc, notes=notes)


# --------------------------------------------------------------------------
# Writing


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary file in the
    same directory, which then replaces ``path`` with ``os.replace``.

    On any failure (including KeyboardInterrupt) the temporary file is removed
    and the exception propagates; ``path`` is then untouched.
    """
    path = Path(path)
    directory = path.parent
    while True:
        tmp = directory / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o666 honours the umask, like a normally created file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError as exc:  # pragma: no cover
            if exc.errno != errno.ENOENT:
                pass
        raise


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(samples: np.ndarray, icc_profile: bytes | None = None) -> bytes:
    """Encode an ``[H, W, C]`` uint8 or uint16 array (C in 1, 2, 3, 4) as PNG bytes.

    Used for 16-bit outputs, which Pillow cannot write in colour.  Each row
    uses the PNG "Up" filter (difference to the row above), which compresses
    photographs well and is cheap to compute.
    """
    if samples.ndim == 2:
        samples = samples[..., None]
    h, w, c = samples.shape
    if samples.dtype == np.uint16:
        depth, raw = 16, samples.astype(">u2")
    elif samples.dtype == np.uint8:
        depth, raw = 8, samples
    else:
        raise TypeError(f"PNG samples must be uint8 or uint16, got {samples.dtype}")
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(h, w * c * depth // 8)
    filtered = rows.copy()
    filtered[1:] -= rows[:-1]  # uint8 arithmetic wraps modulo 256, as PNG wants
    stream = np.empty((h, filtered.shape[1] + 1), dtype=np.uint8)
    stream[:, 0] = 2  # filter type "Up"; for the first row it equals "None"
    stream[:, 1:] = filtered
    out = [b"\x89PNG\r\n\x1a\n",
           _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color_type, 0, 0, 0))]
    if icc_profile:
        out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    out.append(_png_chunk(b"IDAT", zlib.compress(stream.tobytes(), 6)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def output_format(source_format: str) -> str:
    """Output format for a source format: ``"JPEG"`` for JPEG, else ``"PNG"``."""
    return "JPEG" if source_format in ("JPEG", "MPO") else "PNG"


def _to_hwc(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """``[1,3,H,W]`` / ``[3,H,W]`` tensor or ``[H,W,3]`` array -> float ``[H,W,3]``."""
    if isinstance(image, torch.Tensor):
        t = image.detach().to("cpu", torch.float32)
        if t.dim() == 4:
            if t.shape[0] != 1:
                raise ValueError(f"expected a single image, got batch of {t.shape[0]}")
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise ValueError(f"expected [3,H,W] image, got {tuple(t.shape)}")
        return t.permute(1, 2, 0).numpy()
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected [H,W,3] array, got {arr.shape}")
    return arr


def _quantize(values: np.ndarray, bit_depth: int) -> np.ndarray:
    top = 65535.0 if bit_depth == 16 else 255.0
    q = np.rint(np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0) * top)
    return q.astype(np.uint16 if bit_depth == 16 else np.uint8)


def save_image(
    path: str | os.PathLike,
    image: torch.Tensor | np.ndarray,
    *,
    format: str = "PNG",
    bit_depth: int = 8,
    alpha: np.ndarray | None = None,
    icc_profile: bytes | None = None,
) -> None:
    """Atomically save an RGB image with values in ``[0, 1]``.

    Args:
        path: destination file (its directory must exist).
        image: ``[1,3,H,W]`` / ``[3,H,W]`` tensor or ``[H,W,3]`` array.
        format: ``"PNG"`` or ``"JPEG"`` (quality 95; 8-bit only, alpha not allowed).
        bit_depth: 8 or 16 (16 only for PNG).
        alpha: optional ``[H, W]`` alpha in ``[0, 1]`` (PNG only).
        icc_profile: optional ICC profile to embed.
    """
    if format not in ("PNG", "JPEG"):
        raise ValueError(f"unsupported output format {format!r}")
    if bit_depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {bit_depth}")
    if format == "JPEG" and (bit_depth != 8 or alpha is not None):
        raise ValueError("JPEG output must be 8-bit without alpha")
    hwc = _to_hwc(image)
    if alpha is not None:
        alpha = np.asarray(alpha, dtype=np.float32)
        if alpha.shape != hwc.shape[:2]:
            raise ValueError(f"alpha shape {alpha.shape} does not match image {hwc.shape[:2]}")
        hwc = np.concatenate([hwc, alpha[..., None]], axis=-1)
    samples = _quantize(hwc, bit_depth)

    if bit_depth == 16:
        data = encode_png(samples, icc_profile)

        def write(f: BinaryIO) -> None:
            f.write(data)
    else:
        pil = Image.fromarray(samples)
        params: dict = {}
        if icc_profile:
            params["icc_profile"] = icc_profile
        if format == "JPEG":
            params.update(quality=JPEG_QUALITY)

        def write(f: BinaryIO) -> None:
            pil.save(f, format=format, **params)

    atomic_write(path, write)


# --------------------------------------------------------------------------
# Mask visualisation


def colorize_masks(
    masks: torch.Tensor,
    size: tuple[int, int],
    *,
    padded: bool = True,
    colors: np.ndarray = SLOT_COLORS,
) -> torch.Tensor:
    """Paint soft slot masks as a colour image.

    Args:
        masks: ``[K, h, w]`` (or ``[1, K, h, w]``) soft masks, summing to ~1
            over K (softmax over slots).
        size: ``(H, W)`` of the image the masks belong to.
        padded: whether the network reflect-padded the image at the bottom and
            right to a multiple of 4 (the "pad" size policy).  Then the mask
            grid covers ``(4h, 4w)`` pixels of which the top-left ``(H, W)``
            are the image; otherwise (the "resize" policy) the grid is
            stretched over the whole image.
        colors: ``[>=K, 3]`` RGB colours in ``[0, 1]``, one per slot.

    Returns:
        float32 ``[3, H, W]`` in ``[0, 1]``: ``sum_k mask_k * color_k``,
        bilinearly upsampled.
    """
    m = masks.detach().to("cpu", torch.float32)
    if m.dim() == 4:
        m = m[0]
    if m.dim() != 3:
        raise ValueError(f"expected masks [K,h,w], got {tuple(masks.shape)}")
    k, h, w = m.shape
    if k > len(colors):
        raise ValueError(f"{k} slots but only {len(colors)} colours")
    height, width = size
    palette = torch.as_tensor(np.asarray(colors[:k], dtype=np.float32))  # [K,3]
    painted = torch.einsum("khw,kc->chw", m, palette)  # [3,h,w]
    if padded and 4 * h >= height and 4 * w >= width:
        target = (4 * h, 4 * w)
    else:
        target = (height, width)
    up = torch.nn.functional.interpolate(painted[None], size=target, mode="bilinear",
                                         align_corners=False)[0]
    return up[:, :height, :width].clamp(0.0, 1.0).contiguous()
