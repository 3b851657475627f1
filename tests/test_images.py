"""Image reading/writing: bit depths, formats, EXIF orientation, alpha, atomic saves."""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
import png
import pytest
import torch
from PIL import Image, ImageOps

from exposure_slot import images
from exposure_slot.images import (
    ImageReadError,
    atomic_write,
    colorize_masks,
    read_image,
    save_image,
)


def _ramp(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((h, w, 3), dtype=np.float32)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _filter_rows(samples: np.ndarray) -> bytes:
    """PNG-filter the rows of ``samples`` (16-bit), cycling through all five filters."""
    h, w, c = samples.shape
    bpp = 2 * c
    out = bytearray()
    prev = bytes(w * bpp)
    for y in range(h):
        row = samples[y].astype(">u2").tobytes()
        kind = y % 5
        out.append(kind)
        for i, byte in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b = prev[i]
            cc = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) // 2, _paeth(a, b, cc)][kind]
            out.append((byte - pred) & 0xFF)
        prev = row
    return bytes(out)


_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _write_png16_all_filters(path, samples: np.ndarray, interlace: bool = False) -> None:
    """An independent 16-bit PNG writer that cycles through all five row filters,
    so that the reader's un-filtering (Sub/Avg/Paeth use the 6- or 8-byte pixel
    stride) is exercised; optionally Adam7-interlaced."""
    h, w, c = samples.shape
    if interlace:
        parts = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7]
        data = b"".join(_filter_rows(p) for p in parts if p.size)
    else:
        data = _filter_rows(samples)
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, int(interlace))
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
           + _png_chunk(b"IDAT", zlib.compress(data)) + _png_chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


# ---------------------------------------------------------------- 8-bit


def test_png8_round_trip(tmp_path):
    arr = (_ramp(29, 37) * 255).round().astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.tensor.shape == (1, 3, 29, 37) and img.tensor.dtype == torch.float32
    assert img.bit_depth == 8 and img.format == "PNG" and img.alpha is None
    assert torch.equal((img.tensor * 255).round().to(torch.uint8)[0].permute(1, 2, 0),
                       torch.from_numpy(arr))
    save_image(tmp_path / "b.png", img.tensor, format="PNG", bit_depth=8)
    with Image.open(tmp_path / "b.png") as back:
        assert back.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(back), arr)


def test_save_clips_and_rounds(tmp_path):
    t = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 7.0, float("nan")]).repeat(3, 1, 1)
    save_image(tmp_path / "c.png", t, bit_depth=8)
    with Image.open(tmp_path / "c.png") as im:
        assert np.asarray(im)[0, :, 0].tolist() == [0, 0, 0, 1, 255, 255, 0]
    save_image(tmp_path / "c16.png", t, bit_depth=16)
    back = read_image(tmp_path / "c16.png")
    assert (back.tensor[0, 0, 0] * 65535).round().tolist() == [0, 0, 103, 154, 65535, 65535, 0]


def test_jpeg_round_trip(tmp_path):
    smooth = np.linspace(0, 1, 40 * 52 * 3, dtype=np.float32).reshape(40, 52, 3)
    save_image(tmp_path / "a.jpg", smooth, format="JPEG")
    with Image.open(tmp_path / "a.jpg") as im:
        assert im.format == "JPEG" and im.size == (52, 40)
        assert im.info.get("progressive") is None
    img = read_image(tmp_path / "a.jpg")
    assert img.format == "JPEG" and img.bit_depth == 8
    assert img.tensor.shape == (1, 3, 40, 52)
    assert (img.tensor[0].permute(1, 2, 0) - torch.from_numpy(smooth)).abs().mean() < 0.01
    with pytest.raises(ValueError):
        save_image(tmp_path / "x.jpg", smooth, format="JPEG", bit_depth=16)


# ---------------------------------------------------------------- 16-bit


@pytest.mark.parametrize("channels, interlace", [(3, False), (4, False), (3, True)])
def test_png16_color_read_full_precision(tmp_path, channels, interlace):
    rng = np.random.default_rng(channels)
    samples = rng.integers(0, 65536, (9, 11, channels), dtype=np.uint16)
    samples[0, 0, :3] = [0x0001, 0x00FF, 0xFF01]  # values that live in the low byte
    samples[..., 3:] = np.maximum(samples[..., 3:], 1)  # keep the alpha non-trivial
    path = tmp_path / "deep.png"
    _write_png16_all_filters(path, samples, interlace=interlace)
    with Image.open(path) as im:  # the premise: plain Pillow keeps only the high byte
        assert np.asarray(im).dtype == np.uint8
    img = read_image(path)
    assert img.bit_depth == 16
    got = (img.tensor[0].permute(1, 2, 0).double() * 65535).round().numpy().astype(np.uint16)
    np.testing.assert_array_equal(got, samples[..., :3])
    if channels == 4:
        np.testing.assert_array_equal((img.alpha.astype(np.float64) * 65535).round(), samples[..., 3])
    else:
        assert img.alpha is None


def test_png16_gray_and_gray_alpha(tmp_path):
    rng = np.random.default_rng(5)
    gray = rng.integers(0, 65536, (7, 6, 1), dtype=np.uint16)
    _write_png16_all_filters(tmp_path / "g.png", gray)
    img = read_image(tmp_path / "g.png")
    assert img.bit_depth == 16 and img.tensor.shape == (1, 3, 7, 6)
    for c in range(3):
        np.testing.assert_array_equal((img.tensor[0, c].double() * 65535).round().numpy(), gray[..., 0])
    la = rng.integers(0, 65536, (7, 6, 2), dtype=np.uint16)
    _write_png16_all_filters(tmp_path / "la.png", la)
    img = read_image(tmp_path / "la.png")
    assert img.bit_depth == 16
    np.testing.assert_array_equal((img.tensor[0, 1].double() * 65535).round().numpy(), la[..., 0])
    np.testing.assert_array_equal((img.alpha.astype(np.float64) * 65535).round(), la[..., 1])
    assert any("grayscale with alpha" in n for n in img.notes)


def test_png16_write_read_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 65536, (13, 10, 3), dtype=np.uint16)
    x = torch.from_numpy(samples.astype(np.float32) / 65535).permute(2, 0, 1)[None]
    save_image(tmp_path / "o.png", x, format="PNG", bit_depth=16, icc_profile=b"fake-icc")
    with Image.open(tmp_path / "o.png") as im:  # a valid PNG for an independent decoder
        im.load()
        assert im.size == (10, 13) and im.info["icc_profile"] == b"fake-icc"
    back = read_image(tmp_path / "o.png")
    assert back.bit_depth == 16 and back.icc_profile == b"fake-icc"
    got = (back.tensor[0].permute(1, 2, 0).double() * 65535).round().numpy()
    np.testing.assert_array_equal(got, samples)


def test_png16_rgba_write_is_valid_for_pillow(tmp_path):
    """A 16-bit RGBA output decodes in an independent decoder (Pillow keeps the
    high bytes) and reads back exactly, alpha included."""
    rng = np.random.default_rng(2)
    samples = rng.integers(0, 65536, (6, 9, 4), dtype=np.uint16)
    samples[0, 0] = [0x0001, 0x00FF, 0xFF01, 0x0002]  # values that live in the low byte
    x = samples.astype(np.float32) / 65535
    save_image(tmp_path / "a.png", x[..., :3], bit_depth=16, alpha=x[..., 3])
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "RGBA" and im.size == (9, 6)
        np.testing.assert_array_equal(np.asarray(im), samples >> 8)
    back = read_image(tmp_path / "a.png")
    assert back.bit_depth == 16
    np.testing.assert_array_equal((back.tensor[0].permute(1, 2, 0).double() * 65535).round().numpy(),
                                  samples[..., :3])
    np.testing.assert_array_equal((back.alpha.astype(np.float64) * 65535).round(), samples[..., 3])


# ---------------------------------------------------------------- conversions


def test_exif_orientation_is_applied(tmp_path):
    h, w = 20, 32
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = [250, 10, 10]  # left half red
    arr[:, w // 2:] = [10, 10, 250]  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = read_image(tmp_path / "rot.jpg")
    assert img.tensor.shape == (1, 3, w, h)  # portrait after rotation
    top, bottom = img.tensor[0, :, 2, h // 2], img.tensor[0, :, -3, h // 2]
    assert top[0] > 0.8 and top[2] < 0.2  # clockwise: the left (red) half goes to the top
    assert bottom[2] > 0.8 and bottom[0] < 0.2
    assert any("orientation" in note for note in img.notes)


def test_exif_orientation_16bit_png(tmp_path):
    samples = np.zeros((4, 6, 3), dtype=np.uint16)
    samples[0, 0] = 65535
    _write_png16_all_filters(tmp_path / "o.png", samples)
    # Re-write with an eXIf chunk before IDAT saying "rotate 180".
    data = (tmp_path / "o.png").read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 3
    chunk = _png_chunk(b"eXIf", exif.tobytes()[6:] if exif.tobytes().startswith(b"Exif") else exif.tobytes())
    at = data.index(b"IDAT") - 4
    (tmp_path / "o.png").write_bytes(data[:at] + chunk + data[at:])
    img = read_image(tmp_path / "o.png")
    assert img.bit_depth == 16 and img.tensor.shape == (1, 3, 4, 6)
    assert img.tensor[0, :, -1, -1].tolist() == [1.0, 1.0, 1.0]
    assert img.tensor[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(tmp_path, orientation):
    arr = (_ramp(5, 7, seed=orientation) * 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "o.png", exif=exif.tobytes())
    with Image.open(tmp_path / "o.png") as im:
        expected = np.asarray(ImageOps.exif_transpose(im))
    img = read_image(tmp_path / "o.png")
    np.testing.assert_array_equal((img.tensor[0].permute(1, 2, 0) * 255).round().numpy(), expected)


def test_grayscale_and_palette_become_rgb(tmp_path):
    gray = (_ramp(11, 9)[..., 0] * 255).astype(np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.tensor.shape == (1, 3, 11, 9) and img.bit_depth == 8
    for c in range(3):
        np.testing.assert_array_equal((img.tensor[0, c] * 255).round().numpy(), gray)
    assert any("grayscale" in n for n in img.notes)

    pal = Image.fromarray((_ramp(11, 9) * 255).astype(np.uint8)).convert("P")
    pal.save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    expected = np.asarray(pal.convert("RGB"))
    np.testing.assert_array_equal((img.tensor[0].permute(1, 2, 0) * 255).round().numpy(), expected)


def test_rgba_alpha_is_kept_aside(tmp_path):
    arr = (_ramp(8, 10) * 255).astype(np.uint8)
    alpha = np.full((8, 10), 255, dtype=np.uint8)
    alpha[2:5, 3:7] = 40
    Image.fromarray(np.dstack([arr, alpha])).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.tensor.shape == (1, 3, 8, 10)
    np.testing.assert_array_equal((img.tensor[0].permute(1, 2, 0) * 255).round().numpy(), arr)
    np.testing.assert_array_equal((img.alpha * 255).round(), alpha)
    assert any("alpha" in n for n in img.notes)
    save_image(tmp_path / "b.png", img.tensor, alpha=img.alpha)
    with Image.open(tmp_path / "b.png") as back:
        assert back.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(back)[..., 3], alpha)

    # A fully opaque alpha channel is simply dropped.
    Image.fromarray(np.dstack([arr, np.full((8, 10), 255, np.uint8)])).save(tmp_path / "o.png")
    assert read_image(tmp_path / "o.png").alpha is None


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such file"),
    ("directory", "directory"),
    ("text", "not an image"),
    ("truncated", "corrupt"),
])
def test_bad_inputs_raise_clear_errors(tmp_path, kind, message):
    path = tmp_path / "bad.png"
    if kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("hello, I am not a picture\n")
    elif kind == "truncated":
        Image.fromarray((_ramp(40, 52) * 255).astype(np.uint8)).save(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=message):
        read_image(path)


def test_corrupt_jpeg(tmp_path):
    path = tmp_path / "bad.jpg"
    Image.fromarray((_ramp(40, 52) * 255).astype(np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(ImageReadError):
        read_image(path)


# ---------------------------------------------------------------- atomic writes


def _leftovers(directory):
    return sorted(os.listdir(directory))


def test_atomic_write_failure_leaves_nothing(tmp_path, monkeypatch):
    def broken_save(self, fp, format=None, **params):
        fp.write(b"half an image")
        raise OSError("disk on fire")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(OSError, match="disk on fire"):
        save_image(tmp_path / "x.png", _ramp(4, 4))
    assert _leftovers(tmp_path) == []


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"previous")

    def broken_encode(self, outfile, rows):
        outfile.write(b"half a 16-bit image")
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(png.Writer, "write_packed", broken_encode)
    with pytest.raises(RuntimeError, match="encoder exploded"):
        save_image(target, _ramp(4, 4), bit_depth=16)
    assert _leftovers(tmp_path) == ["x.png"] and target.read_bytes() == b"previous"

    def interrupted(f):
        f.write(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert _leftovers(tmp_path) == ["x.png"] and target.read_bytes() == b"previous"


def test_atomic_write_replaces(tmp_path):
    target = tmp_path / "y.bin"
    atomic_write(target, lambda f: f.write(b"one"))
    atomic_write(target, lambda f: f.write(b"two"))
    assert target.read_bytes() == b"two" and _leftovers(tmp_path) == ["y.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


# ---------------------------------------------------------------- masks


def test_colorize_masks():
    k, h, w = 3, 8, 10
    masks = torch.zeros(k, h, w)
    masks[0, :, :5] = 1.0
    masks[2, :, 5:] = 1.0
    pic = colorize_masks(masks, (29, 37))
    assert pic.shape == (3, 29, 37) and pic.min() >= 0 and pic.max() <= 1
    left, right = pic[:, 14, 2], pic[:, 14, 36]
    assert torch.allclose(left, torch.from_numpy(images.SLOT_COLORS[0]), atol=1e-5)
    assert torch.allclose(right, torch.from_numpy(images.SLOT_COLORS[2]), atol=1e-5)
    # Uniform masks give the mean colour everywhere, batch dimension accepted.
    flat = colorize_masks(torch.full((1, k, h, w), 1 / k), (32, 40), padded=False)
    assert torch.allclose(flat, torch.from_numpy(images.SLOT_COLORS[:k].mean(0))[:, None, None]
                          .expand(3, 32, 40), atol=1e-5)


def test_icc_profile_kept_for_rgb_dropped_for_cmyk(tmp_path):
    arr = (_ramp(16, 16) * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "rgb.jpg", icc_profile=b"rgb-profile")
    img = read_image(tmp_path / "rgb.jpg")
    assert img.icc_profile == b"rgb-profile"
    save_image(tmp_path / "out.jpg", img.tensor, format="JPEG", icc_profile=img.icc_profile)
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.info.get("icc_profile") == b"rgb-profile"
    Image.fromarray(arr).convert("CMYK").save(tmp_path / "cmyk.jpg", icc_profile=b"cmyk-profile")
    img = read_image(tmp_path / "cmyk.jpg")
    assert img.icc_profile is None and img.tensor.shape == (1, 3, 16, 16)
    assert any("CMYK" in note for note in img.notes)
