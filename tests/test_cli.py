"""The ``exposure-slot`` command line tool, end to end on small generated images."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from exposure_slot.cli import main, make_example_image

REPO = Path(__file__).resolve().parents[1]


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = make_example_image(w, h)
    return np.clip(base + 0.02 * rng.standard_normal(base.shape, dtype=np.float32), 0, 1)


def _save8(path: Path, h: int, w: int, seed: int = 0, **params) -> Path:
    Image.fromarray((_photo(h, w, seed) * 255).round().astype(np.uint8)).save(path, **params)
    return path


@pytest.fixture
def inputs(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    return d


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_texts(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "enhance" in out and "example-image" in out
    with pytest.raises(SystemExit):
        main(["enhance", "--help"])
    out = capsys.readouterr().out
    for option in ("--checkpoint", "--random-weights", "--save-masks", "--size-policy", "--backend"):
        assert option in out
    assert main([]) == 2  # no command: help and a usage exit code
    capsys.readouterr()


def test_enhance_mixed_batch_with_corrupt_file(tmp_path, inputs, capsys):
    good_png = _save8(inputs / "scene.png", 40, 52)
    odd_jpg = _save8(inputs / "odd.jpg", 29, 37, seed=1, quality=95)
    corrupt = inputs / "corrupt.png"
    corrupt.write_bytes(good_png.read_bytes()[:120])
    missing = inputs / "missing.png"
    out = tmp_path / "out"
    code, stdout, stderr = _run(
        ["enhance", good_png, corrupt, odd_jpg, missing, "-o", out, "--random-weights", "--save-masks"],
        capsys)
    assert code == 1
    assert "corrupt.png" in stderr and "missing.png" in stderr
    assert "NOT meaningful" in stderr
    assert "2 enhanced, 2 failed" in stderr
    assert sorted(os.listdir(out)) == ["odd.jpg", "odd_masks.png", "scene.png", "scene_masks.png"]
    with Image.open(out / "scene.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (52, 40)
    with Image.open(out / "odd.jpg") as im:
        assert im.format == "JPEG" and im.size == (37, 29)
    with Image.open(out / "odd_masks.png") as im:
        assert im.mode == "RGB" and im.size == (37, 29)
    # Per-image report: backend, size policy and what it did for 37x29.
    assert "backend" in stdout and "reflect-padded to 40x32" in stdout


def test_enhance_all_good_exit_zero_and_resize_policy(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 29, 37)
    code, stdout, stderr = _run(["enhance", src, "-o", tmp_path / "o", "--random-weights",
                                 "--size-policy", "resize", "--level", "3"], capsys)
    assert code == 0, stderr
    assert "1 enhanced, 0 failed" in stdout and "resized to 36x28" in stdout
    assert os.listdir(tmp_path / "o") == ["a.png"]


def test_enhance_16bit_and_alpha(tmp_path, inputs, capsys):
    from exposure_slot.images import read_image, save_image

    deep = inputs / "deep.png"
    save_image(deep, _photo(29, 37), bit_depth=16)
    alpha = np.ones((40, 52), dtype=np.float32)
    alpha[:10] = 0.25
    save_image(inputs / "rgba.png", _photo(40, 52), alpha=alpha)
    Image.fromarray((_photo(40, 52)[..., 0] * 255).astype(np.uint8), mode="L").save(inputs / "gray.png")
    out = tmp_path / "o"
    code, stdout, stderr = _run(["enhance", deep, inputs / "rgba.png", inputs / "gray.png",
                                 "-o", out, "--random-weights"], capsys)
    assert code == 0, stderr
    result = read_image(out / "deep.png")
    assert result.bit_depth == 16 and result.tensor.shape == (1, 3, 29, 37)
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA"
        np.testing.assert_array_equal(np.asarray(im)[..., 3], (alpha * 255).round())
    with Image.open(out / "gray.png") as im:
        assert im.mode == "RGB" and im.size == (52, 40)
    assert "alpha channel passed through" in stdout


def test_random_weights_are_deterministic(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 32, 40)
    for name in ("o1", "o2"):
        assert _run(["enhance", src, "-o", tmp_path / name, "--random-weights"], capsys)[0] == 0
    assert (tmp_path / "o1" / "a.png").read_bytes() == (tmp_path / "o2" / "a.png").read_bytes()


@pytest.mark.parametrize("content", [None, b"", b"not a checkpoint at all", "dir"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, inputs, capsys, content):
    src = _save8(inputs / "a.png", 32, 40)
    ckpt = tmp_path / "model.pth"
    if content == "dir":
        ckpt.mkdir()
    elif content is not None:
        ckpt.write_bytes(content)
    out = tmp_path / "out"
    code, stdout, stderr = _run(["enhance", src, "-o", out, "--checkpoint", ckpt], capsys)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "checkpoint" in lines[0] and "model.pth" in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_wrong_state_dict_is_one_clear_error(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 32, 40)
    ckpt = tmp_path / "other.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, ckpt)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", src, "-o", out, "--checkpoint", ckpt], capsys)
    assert code == 2 and "other.pth" in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_backend_is_usage_error(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 32, 40)
    code, _, stderr = _run(["enhance", src, "-o", tmp_path / "out", "--random-weights",
                            "--backend", "warp-drive"], capsys)
    assert code == 2 and "warp-drive" in stderr and "reference" in stderr
    assert not (tmp_path / "out").exists()


def test_setup_errors_write_nothing(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 32, 40)
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    code, _, stderr = _run(["enhance", src, "-o", blocker, "--random-weights"], capsys)
    assert code == 2 and "not a directory" in stderr
    if not torch.cuda.is_available():
        code, _, stderr = _run(["enhance", src, "-o", tmp_path / "o", "--random-weights",
                                "--device", "cuda"], capsys)
        assert code == 2 and "CUDA" in stderr and not (tmp_path / "o").exists()


def test_name_clash_and_self_overwrite_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    _save8(a / "x.png", 32, 40)
    _save8(b / "x.png", 32, 40, seed=3)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", a / "x.png", b / "x.png", "-o", out, "--random-weights"], capsys)
    assert code == 1 and "already written" in stderr and "1 enhanced, 1 failed" in stderr
    original = (a / "x.png").read_bytes()
    code, _, stderr = _run(["enhance", a / "x.png", "-o", a, "--random-weights"], capsys)
    assert code == 1 and "overwrite the input" in stderr
    assert (a / "x.png").read_bytes() == original


def test_too_small_image_fails_cleanly(tmp_path, inputs, capsys):
    tiny = _save8(inputs / "tiny.png", 3, 5)
    code, _, stderr = _run(["enhance", tiny, "-o", tmp_path / "o", "--random-weights"], capsys)
    assert code == 1 and "tiny.png" in stderr and "Traceback" not in stderr
    assert os.listdir(tmp_path / "o") == []


def test_example_image_is_deterministic(tmp_path, capsys):
    assert main(["example-image", str(tmp_path / "a.png"), "--size", "37x29"]) == 0
    assert main(["example-image", str(tmp_path / "b.png"), "--size", "37x29"]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    with Image.open(tmp_path / "a.png") as im:
        assert im.size == (37, 29) and im.mode == "RGB"
    scene = make_example_image(120, 80)
    luma = scene.mean(-1)
    assert luma[:, :20].mean() < 0.25 < luma[:, 50:70].mean()  # under-exposed left
    assert (scene[:, -20:] >= 0.999).mean() > 0.2  # clipped highlights on the right
    assert main(["example-image", str(tmp_path / "c.jpg")]) == 0
    with Image.open(tmp_path / "c.jpg") as im:
        assert im.format == "JPEG" and im.size == (512, 384)
    assert main(["example-image", str(tmp_path / "d.gif")]) == 2
    with pytest.raises(SystemExit):
        main(["example-image", str(tmp_path / "e.png"), "--size", "big"])
    capsys.readouterr()


def test_enhance_with_official_checkpoint(tmp_path, inputs, capsys, golden):
    """The authors' checkpoint format (shared/golden, levels 2 and 3) through the CLI;
    the written file is the model's output, quantised to 8 bits."""
    ckpt = tmp_path / f"MSEC_level{golden['level']}.pth"
    torch.save(golden["checkpoint"], ckpt)
    src = _save8(inputs / "scene.png", 29, 37)
    out = tmp_path / "out"
    code, stdout, stderr = _run(["enhance", src, "-o", out, "--checkpoint", ckpt, "--save-masks"], capsys)
    assert code == 0, stderr
    assert "NOT meaningful" not in stderr
    with Image.open(out / "scene.png") as im:
        assert im.size == (37, 29)
    with Image.open(out / "scene_masks.png") as im:
        assert im.size == (37, 29)
    # The CLI's output equals the library's, quantised to 8 bits.
    from exposure_slot import load_official
    from exposure_slot.images import read_image

    model = load_official(str(ckpt))
    x = read_image(src).tensor
    with torch.inference_mode():
        expected = (model(x).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
    with Image.open(out / "scene.png") as im:
        np.testing.assert_allclose(np.asarray(im).astype(np.float32), expected, atol=1)
    # --level is checked against the checkpoint.
    other_level = 5 - golden["level"]
    code, _, stderr = _run(["enhance", src, "-o", tmp_path / "o3", "--checkpoint", ckpt,
                            "--level", str(other_level)], capsys)
    assert code == 2 and "level" in stderr and not (tmp_path / "o3").exists()


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    scene = tmp_path / "scene.png"
    run = subprocess.run([sys.executable, "-m", "exposure_slot", "example-image", str(scene),
                          "--size", "40x32"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    run = subprocess.run([sys.executable, "-m", "exposure_slot", "enhance", str(scene),
                          str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"), "--random-weights"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1, run.stderr
    assert "nope.png" in run.stderr and "1 enhanced, 1 failed" in run.stderr
    assert (tmp_path / "out" / "scene.png").exists()


# --------------------------------------------------------------------------
# Folders and videos: same-size inputs go through the fixed-shape engine in batches


def _model_output_8bit(x: torch.Tensor) -> np.ndarray:
    """What the CLI's --random-weights model (seed 0, level 2) makes of ``x``, as
    8-bit samples [B, H, W, 3]."""
    import exposure_slot as es

    torch.manual_seed(0)
    model = es.ExposureSlot(level=2).eval()
    with torch.inference_mode():
        y = model(x)
    return (y.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()


def test_enhance_folder_batches_same_size_photos(tmp_path, inputs, capsys):
    """Four 32x40 photos go through the engine in batches of 3 (the last one
    partial); the odd one out and a broken file take the one-by-one path. The
    results are the network's, whichever path made them."""
    for i in range(4):
        _save8(inputs / f"same{i}.png", 32, 40, seed=i)
    _save8(inputs / "other.png", 29, 37, seed=9)
    (inputs / "broken.png").write_bytes(b"not a png")
    (inputs / "notes.txt").write_text("not an input")
    out = tmp_path / "out"
    code, stdout, stderr = _run(["enhance", inputs, "-o", out, "--random-weights",
                                 "--batch-size", "3", "--save-masks"], capsys)
    assert code == 1 and "broken.png" in stderr and "5 enhanced, 1 failed" in stderr
    assert stdout.count("engine, batch of 3") == 3 and stdout.count("engine, batch of 1") == 1
    assert "network" in stdout  # other.png, one by one
    names = sorted(os.listdir(out))
    assert names == sorted([f"same{i}{s}.png" for i in range(4) for s in ("", "_masks")]
                           + ["other.png", "other_masks.png"])
    for name in ("same0.png", "same3.png", "other.png"):
        with Image.open(inputs / name) as im:
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with Image.open(out / name) as im:
            got = np.asarray(im).astype(np.float32)
        # float32 everywhere: the same 8-bit values, up to a rounding tie.
        assert np.abs(got - _model_output_8bit(x)[0]).max() <= 1


def test_enhance_folder_in_bfloat16(tmp_path, inputs, capsys):
    """--precision bfloat16 on CPU: the engine's convolutions in bfloat16, the
    8-bit outputs within the 2e-2 bar (5 levels) of the float32 network's."""
    for i in range(2):
        _save8(inputs / f"p{i}.png", 32, 40, seed=i)
    out = tmp_path / "out"
    code, stdout, stderr = _run(["enhance", inputs, "-o", out, "--random-weights",
                                 "--precision", "bfloat16", "--batch-size", "2"], capsys)
    assert code == 0, stderr
    assert "engine, batch of 2" in stdout
    for i in range(2):
        with Image.open(inputs / f"p{i}.png") as im:
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        with Image.open(out / f"p{i}.png") as im:
            got = np.asarray(im).astype(np.float32)
        assert np.abs(got - _model_output_8bit(x)[0]).max() <= 5


def test_batch_options_are_checked(tmp_path, inputs, capsys):
    src = _save8(inputs / "a.png", 32, 40)
    for option in ("--batch-size", "--workers"):
        code, _, stderr = _run(["enhance", src, "-o", tmp_path / "o", "--random-weights",
                                option, "0"], capsys)
        assert code == 2 and option in stderr and not (tmp_path / "o").exists()
    if not torch.cuda.is_available():
        code, _, stderr = _run(["enhance", src, "-o", tmp_path / "o", "--random-weights",
                                "--precision", "float16"], capsys)
        assert code == 2 and "float16" in stderr and not (tmp_path / "o").exists()


def _write_video(path: Path, frames: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A short video of a moving scene; returns the frames as decoded (8-bit)."""
    from exposure_slot.images import VideoReader, VideoWriter

    base = (make_example_image(w, h) * 255).round().astype(np.uint8)
    with VideoWriter(path, w, h, 24) as writer:
        for i in range(frames):
            writer.write(np.roll(base, 3 * i, axis=1))
    with VideoReader(path) as reader:
        return np.stack(list(reader))


def test_enhance_video(tmp_path, inputs, capsys):
    pytest.importorskip("av", reason="videos need the 'video' extra (PyAV)")
    from exposure_slot.images import VideoReader

    decoded = _write_video(inputs / "clip.mp4", 7)
    out = tmp_path / "out"
    code, stdout, stderr = _run(["enhance", inputs / "clip.mp4", "-o", out, "--random-weights",
                                 "--batch-size", "3"], capsys)
    assert code == 0, stderr
    assert "7 frames" in stdout and "batch 3" in stdout and "1 enhanced, 0 failed" in stdout
    assert os.listdir(out) == ["clip.mp4"]
    with VideoReader(out / "clip.mp4") as reader:
        assert (reader.width, reader.height, reader.rate) == (64, 48, 24)
        got = np.stack(list(reader)).astype(np.float32)
    x = torch.from_numpy(decoded.astype(np.float32) / 255).permute(0, 3, 1, 2)
    expected = _model_output_8bit(x)
    assert got.shape == expected.shape == (7, 48, 64, 3)
    # The network's frames, through one more lossy encoding (chroma at half
    # resolution: about 2 levels on average on these tiny, colourful frames).
    coding = np.abs(got - expected).mean()
    assert coding <= 3.0
    assert np.abs(got - decoded).mean() > 5 * coding  # the correction shows


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupt"])
def test_failed_or_interrupted_video_leaves_nothing(tmp_path, inputs, capsys, monkeypatch, failure):
    pytest.importorskip("av", reason="videos need the 'video' extra (PyAV)")
    from exposure_slot import enhance

    _write_video(inputs / "clip.mkv", 6)
    calls = []
    encode = enhance._encode

    def failing_encode(*args):
        calls.append(1)
        if len(calls) == 2:  # after the first batch went into the file
            raise failure
        encode(*args)

    monkeypatch.setattr(enhance, "_encode", failing_encode)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", inputs / "clip.mkv", "-o", out, "--random-weights",
                            "--batch-size", "2"], capsys)
    if isinstance(failure, KeyboardInterrupt):
        assert code == 130 and "interrupted" in stderr
    else:
        assert code == 1 and "No space left" in stderr and "0 enhanced, 1 failed" in stderr
    assert os.listdir(out) == []  # neither the video nor its temporary file


def test_interrupted_folder_leaves_only_whole_files(tmp_path, inputs, capsys, monkeypatch):
    """Ctrl-C while the third batch runs: writes already queued finish or are
    dropped, each file whole or absent, no temporary files left."""
    from exposure_slot import enhance

    for i in range(5):
        _save8(inputs / f"p{i}.png", 32, 40, seed=i)
    calls = []
    run_engine = enhance._run_engine

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_engine(*args, **kwargs)

    monkeypatch.setattr(enhance, "_run_engine", interrupted)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", inputs, "-o", out, "--random-weights", "--batch-size", "1"],
                           capsys)
    assert code == 130 and "interrupted" in stderr
    names = os.listdir(out)
    assert set(names) <= {"p0.png", "p1.png"}
    for name in names:
        with Image.open(out / name) as im:
            im.load()  # whole files only


def test_video_changing_frame_size_fails_cleanly(tmp_path, inputs, capsys, monkeypatch):
    pytest.importorskip("av", reason="videos need the 'video' extra (PyAV)")
    from exposure_slot.images import VideoReader

    _write_video(inputs / "clip.mp4", 5)
    frames = VideoReader.__iter__

    def resized_midway(self):
        for number, frame in enumerate(frames(self), 1):
            yield frame if number < 4 else frame[:, :32]

    monkeypatch.setattr(VideoReader, "__iter__", resized_midway)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", inputs / "clip.mp4", "-o", out, "--random-weights",
                            "--batch-size", "2"], capsys)
    assert code == 1 and "frame 4 is 32x48 but the video started at 64x48" in stderr
    assert os.listdir(out) == []


def test_corrupt_video_fails_alone(tmp_path, inputs, capsys):
    pytest.importorskip("av", reason="videos need the 'video' extra (PyAV)")
    (inputs / "broken.mov").write_bytes(b"\x00\x01" * 300)
    _save8(inputs / "a.png", 32, 40)
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", inputs, "-o", out, "--random-weights"], capsys)
    assert code == 1 and "[2/2] FAILED" in stderr and "broken.mov" in stderr
    assert "not a video" in stderr and "1 enhanced, 1 failed" in stderr
    assert os.listdir(out) == ["a.png"]


def test_video_without_pyav_is_a_usage_error(tmp_path, inputs, capsys, monkeypatch):
    (inputs / "clip.mp4").write_bytes(b"\x00" * 64)
    monkeypatch.setitem(sys.modules, "av", None)  # import av raises ImportError
    out = tmp_path / "out"
    code, _, stderr = _run(["enhance", inputs / "clip.mp4", "-o", out, "--random-weights"], capsys)
    assert code == 2 and "exposure-slot[video]" in stderr and not out.exists()
