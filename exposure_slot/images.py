"""Image files in and out: reading, writing, atomic saving, mask colouring.

Reading
    :func:`read_image` opens a file with Pillow and returns a
    :class:`LoadedImage` whose ``tensor`` is float32 ``[1, 3, H, W]`` in
    ``[0, 1]``.  The EXIF orientation is applied to the decoded samples (one
    code path for every format and bit depth).

    * 8-bit inputs (JPEG, 8-bit PNG, palette, grayscale, 1/2/4-bit) are
      converted to RGB with Pillow.  Grayscale is replicated to three channels.
    * 16-bit grayscale is read by Pillow, which keeps it at full precision.
    * 16-bit RGB / RGBA / gray+alpha PNGs, which Pillow reduces to 8 bits, are
      read with pypng (``png.Reader``) at full precision.
    * An alpha channel (RGBA, LA, palette or ``tRNS`` transparency) is kept
      aside in ``LoadedImage.alpha`` and written back unchanged into PNG
      outputs; the network only ever sees RGB.

Writing
    :func:`save_image` writes 8-bit PNG or JPEG (quality 95) with Pillow, and
    16-bit PNG with pypng (``png.Writer``; Pillow cannot write 16-bit colour).
    Values are clipped to ``[0, 1]`` and rounded.  Every file is written by
    :func:`atomic_write`: a temporary file in the destination directory that
    is renamed over the destination with ``os.replace`` only once complete,
    and removed on any failure.

    Timing (measured once, 2-core CPU, 4000x3000 16-bit RGB photo-like PNG,
    whole read_image / save_image calls): writing takes about 2.2 s (69 MB;
    pypng stores rows unfiltered).  Reading takes about 2 s for unfiltered
    files, but pypng undoes PNG row filters in pure Python: about 7 s when
    every row uses the "Up" filter and about 16 s with "Paeth", which
    libpng-based writers often choose for photographs.  (Of that, 0.3-0.8 s is
    Pillow decoding the pixels in ``getexif()``, looking for an eXIf chunk
    after the image data.)

Video
    :class:`VideoReader` and :class:`VideoWriter` (PyAV, the optional extra
    ``video``) decode a file's first video stream to 8-bit RGB frames and encode
    such frames into a new video, atomically like :func:`atomic_write`.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import secrets
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np
import png
import torch
from PIL import Image, UnidentifiedImageError

__all__ = [
    "ImageReadError",
    "LoadedImage",
    "read_image",
    "save_image",
    "atomic_write",
    "colorize_masks",
    "output_format",
    "SLOT_COLORS",
    "VideoError",
    "VideoReader",
    "VideoWriter",
    "is_video",
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
    "I": "16-bit grayscale",
    "I;16": "16-bit grayscale",
    "I;16B": "16-bit grayscale",
    "I;16L": "16-bit grayscale",
    "CMYK": "CMYK",
    "YCbCr": "YCbCr",
    "LAB": "Lab",
    "HSV": "HSV",
}

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


def _exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation (1..8) of ``im``; 1 if absent or invalid."""
    try:
        orientation = int(im.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make the image unreadable
        return 1
    return orientation if orientation in _ORIENTATION_NAMES else 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1..8) to an ``[H, W, ...]`` array."""
    if orientation in (5, 6, 7, 8):
        arr = arr.swapaxes(0, 1)  # 5: transpose; 6, 7, 8 add a flip below
    if orientation in (2, 3, 6, 7):
        arr = arr[:, ::-1]
    if orientation in (3, 4, 7, 8):
        arr = arr[::-1]
    return arr


def _read_png16(path: Path) -> tuple[np.ndarray, tuple[int, ...] | None] | None:
    """Samples (uint16 ``[H, W, C]``) and ``tRNS`` colour key of a 16-bit PNG,
    or ``None`` if the PNG is not 16-bit."""
    with open(path, "rb") as f:
        reader = png.Reader(file=f)
        reader.preamble()  # header chunks only
        if reader.bitdepth != 16:
            return None
        width, height, rows, info = reader.read()
        # Rows are native-endian array('H'): join them into one buffer.
        samples = np.frombuffer(b"".join(rows), dtype=np.uint16)
    return samples.reshape(height, width, info["planes"]), info.get("transparent")


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
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, zlib.error, png.Error) as exc:
        # Pillow reports truncated/corrupt data as OSError ("image file is
        # truncated", "broken data stream"), SyntaxError (bad PNG chunks), ...;
        # pypng as png.Error (bad checksum, chunk too short, ...).
        detail = str(exc) or type(exc).__name__
        raise ImageReadError(f"corrupt or truncated image ({detail})") from None


def _read_opened(path: Path, im: Image.Image) -> LoadedImage:
    fmt = im.format or "unknown"
    mode = im.mode
    icc = im.info.get("icc_profile") or None
    orientation = _exif_orientation(im)
    key = None  # tRNS colour key: samples equal to it are fully transparent

    # Pillow opens 16-bit RGB, RGBA and gray+alpha PNGs as 8-bit RGB / RGBA.
    png16 = _read_png16(path) if fmt == "PNG" and mode in ("RGB", "RGBA") else None
    if png16 is not None:
        bit_depth = 16
        samples, key = png16
        mode = {2: "LA", 3: "RGB", 4: "RGBA"}[samples.shape[-1]]
    elif mode in ("I;16", "I;16B", "I;16L") or (mode == "I" and fmt == "PNG"):
        bit_depth = 16
        samples = np.asarray(im)[..., None]
        key = im.info.get("transparency")
    elif mode.startswith(("I", "F")):
        raise ImageReadError(f"unsupported pixel format {mode!r} (use 8- or 16-bit JPEG/PNG)")
    else:
        bit_depth = 8
        has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            "transparency" in im.info and mode in ("P", "L", "RGB", "1")
        )
        samples = np.asarray(im.convert("RGBA" if has_alpha else "RGB"))

    scale = np.float32(65535.0 if bit_depth == 16 else 255.0)
    samples = _orient(samples, orientation)
    alpha: np.ndarray | None = None
    if samples.shape[-1] in (2, 4):
        alpha = samples[..., -1].astype(np.float32) / scale
        samples = samples[..., :-1]
    elif key is not None:
        alpha = np.where((samples == np.asarray(key)).all(-1), 0.0, 1.0).astype(np.float32)
    if samples.shape[-1] == 1:
        samples = np.repeat(samples, 3, axis=-1)

    notes: list[str] = []
    description = _MODE_DESCRIPTIONS.get(mode, mode)
    if bit_depth == 16 and "16-bit" not in description:
        description = f"16-bit {description}"
    if mode not in ("RGB", "RGBA"):
        notes.append(f"{description} image converted to RGB")
    if icc and mode not in _RGB_MODES:
        # A grayscale or CMYK profile does not describe the RGB output.
        notes.append(f"embedded {description} ICC profile not carried over to the RGB output")
        icc = None
    if orientation != 1:
        notes.append(f"EXIF orientation applied ({_ORIENTATION_NAMES[orientation]})")
    if alpha is not None:
        if float(alpha.min()) >= 1.0:
            alpha = None  # fully opaque: nothing to carry
        else:
            alpha = np.ascontiguousarray(alpha)
            notes.append("alpha channel passed through unchanged (PNG output)")

    rgb = np.ascontiguousarray(samples, dtype=np.float32) / scale
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
    fd, tmp = _create_temporary(path)
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


def _create_temporary(path: Path, suffix: str = "") -> tuple[int, Path]:
    """A new, hidden file beside ``path`` (``.<name>.<random>.tmp<suffix>``), opened
    for writing: its descriptor and its path."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp{suffix}"
        try:
            # 0o666 honours the umask, like a normally created file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            return fd, tmp
        except FileExistsError:  # pragma: no cover - astronomically unlikely
            continue


def _write_png16(f: BinaryIO, samples: np.ndarray, icc_profile: bytes | None) -> None:
    """Write uint16 ``[H, W, 3 or 4]`` samples (RGB or RGBA) as a 16-bit PNG."""
    h, w, c = samples.shape
    writer = png.Writer(w, h, greyscale=False, alpha=c == 4, bitdepth=16)
    # Rows as big-endian bytes: write_packed then skips pypng's per-value packing.
    rows = np.ascontiguousarray(samples, dtype=">u2").view(np.uint8).reshape(h, -1)
    if not icc_profile:
        writer.write_packed(f, rows)
        return
    # pypng's Writer has no ICC option: add an iCCP chunk after IHDR (it must
    # precede IDAT) and write the chunks out again.
    buf = io.BytesIO()
    writer.write_packed(buf, rows)
    chunks = list(png.Reader(bytes=buf.getvalue()).chunks())
    chunks.insert(1, (b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc_profile)))
    png.write_chunks(f, chunks)


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
        def write(f: BinaryIO) -> None:
            _write_png16(f, samples, icc_profile)
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


# --------------------------------------------------------------------------
# Video (PyAV, the optional extra "video")

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".avi", ".webm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
# Codecs tried in order per output suffix; the first one this FFmpeg build has wins.
_VIDEO_CODECS = {".webm": ("libvpx-vp9",)}
_DEFAULT_VIDEO_CODECS = ("libx264", "mpeg4")
# Visually lossless settings: the correction should not add visible coding loss.
_CODEC_OPTIONS = {"libx264": {"crf": "16", "preset": "fast"},
                  "libvpx-vp9": {"crf": "20", "b": "0"},
                  "mpeg4": {"qscale": "2"}}


class VideoError(ValueError):
    """A video could not be read or written (the message names the problem)."""


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _av():
    try:
        import av
    except ImportError:
        raise VideoError("reading and writing video needs PyAV, the optional extra 'video': "
                         "pip install 'exposure-slot[video]' (or pip install av)") from None
    return av


class VideoReader:
    """The frames of a file's first video stream, decoded (by FFmpeg's threads) to
    8-bit RGB arrays ``[H, W, 3]``; a context manager.

    ``width``, ``height``: of the first frame's stream; ``rate``: the average frame
    rate (a Fraction); ``frames``: the frame count the container states (0 if
    unknown). Audio and subtitle streams are not read.
    """

    def __init__(self, path: str | os.PathLike):
        av = _av()
        self.path = Path(path)
        if not self.path.exists():
            raise VideoError("no such file")
        try:
            self._container = av.open(str(self.path))
        except (av.FFmpegError, OSError) as exc:
            raise VideoError(f"not a video FFmpeg can read ({exc})") from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError("the file has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "AUTO"
        context = self._stream.codec_context
        self.width, self.height = context.width, context.height
        self.rate = self._stream.average_rate or self._stream.guessed_rate or 30
        self.frames = self._stream.frames or 0

    def __iter__(self):
        av = _av()
        try:
            for frame in self._container.decode(self._stream):
                yield frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise VideoError(f"corrupt video ({exc})") from None

    def close(self) -> None:
        self._container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class VideoWriter:
    """Writes 8-bit RGB frames ``[H, W, 3]`` to a video file atomically: into a
    hidden temporary file beside ``path``, renamed to ``path`` when the context
    exits normally, removed when it exits with an exception (an interrupt
    included), so ``path`` is either the complete video or untouched.

    The codec follows the suffix: VP9 for .webm, else H.264 (libx264) or, in
    FFmpeg builds without it, MPEG-4 part 2; all at visually lossless settings,
    yuv420p (yuv444p for odd sides, which 4:2:0 cannot hold; H.264 only). The
    frame rate is constant, ``rate``.
    """

    def __init__(self, path: str | os.PathLike, width: int, height: int, rate):
        av = _av()
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        wanted = _VIDEO_CODECS.get(suffix, _DEFAULT_VIDEO_CODECS)
        codec = next((c for c in wanted if c in av.codecs_available), None)
        if codec is None:
            raise VideoError(f"this FFmpeg build has no encoder for {suffix} "
                             f"(tried {', '.join(wanted)})")
        odd = width % 2 or height % 2
        if odd and codec != "libx264":
            raise VideoError(f"{codec} needs even frame sides, got {width}x{height}")
        fd, self._tmp = _create_temporary(self.path, suffix)
        os.close(fd)
        try:
            self._container = av.open(str(self._tmp), mode="w")
            self._stream = self._container.add_stream(codec, rate=rate)
            self._stream.width, self._stream.height = width, height
            self._stream.pix_fmt = "yuv444p" if odd else "yuv420p"
            self._stream.options = dict(_CODEC_OPTIONS.get(codec, {}))
        except BaseException:
            os.unlink(self._tmp)
            raise
        self.codec = codec

    def write(self, frame: np.ndarray) -> None:
        av = _av()
        picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        try:
            for packet in self._stream.encode(picture):
                self._container.mux(packet)
        except av.FFmpegError as exc:
            raise VideoError(f"cannot encode with {self.codec} ({exc})") from None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        av = _av()
        try:
            try:
                if exc_type is None:
                    for packet in self._stream.encode(None):  # flush the encoder
                        self._container.mux(packet)
            finally:
                self._container.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
        except av.FFmpegError as error:
            raise VideoError(f"cannot finish the video ({error})") from None
        finally:
            if self._tmp.exists():
                os.unlink(self._tmp)
