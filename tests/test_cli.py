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
