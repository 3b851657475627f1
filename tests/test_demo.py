"""The shipped demo weights, the gamma baseline, the held-out benchmark and
``exposure-slot demo``."""

import pytest
import torch
from PIL import Image

import exposure_slot
from exposure_slot.backends import available_backends
from exposure_slot.cli import EXIT_OK, EXIT_USAGE, main
from exposure_slot.data import synthesize
from exposure_slot.demo import (BENCHMARK_EVS, DEMO_CASES, auto_levels_gamma, fit_longest_side,
                                format_benchmark, heldout_benchmark)
from exposure_slot.images import read_image, save_image
from exposure_slot.inference import optimize_for_inference
from exposure_slot.metrics import psnr
from exposure_slot.pretrained import PRETRAINED, WEIGHTS_DIR

from conftest import shared_path


@pytest.fixture(scope="module")
def demo_model():
    return exposure_slot.load_pretrained("demo")


@pytest.fixture(scope="module")
def heldout_photo():
    """Held-out kodim21 (never seen in training), downscaled to 192x128."""
    return fit_longest_side(read_image(shared_path("data", "kodak", "kodim21.png")).tensor[0], 192)


def test_shipped_weights_are_small_and_described(demo_model):
    path = WEIGHTS_DIR / PRETRAINED["demo"][0]
    assert path.stat().st_size <= 10 * 2 ** 20
    assert isinstance(demo_model, exposure_slot.ExposureSlot)
    assert demo_model.level == 2 and not demo_model.training
    assert demo_model.metadata["steps"] > 0
    assert "kodim01-18" in demo_model.metadata["data"]
    assert {"date", "batch_size"} <= set(demo_model.metadata)


def test_unknown_pretrained_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown pretrained weights 'msec'.*'demo'"):
        exposure_slot.load_pretrained("msec")


def _gain(model, photo, ev):
    """PSNR gain (dB) of the model's output over the uncorrected input."""
    mixed = ev == "mixed"
    source = synthesize(photo, (-2.0, 2.0) if mixed else ev, mixed=mixed, seed=0)
    with torch.inference_mode():
        corrected = model(source[None])[0]
    return psnr(corrected, photo) - psnr(source, photo)


@pytest.mark.parametrize("ev", [-1.5, 1.5])
def test_demo_model_corrects_global_exposure_errors(demo_model, heldout_photo, ev):
    gain = _gain(demo_model, heldout_photo, ev)
    assert gain > 1.0, f"demo model gains only {gain:.2f} dB over the uncorrected input"


def test_demo_model_meets_its_target_across_the_model_cards_conditions(demo_model, heldout_photo):
    """The model card's target: +3 dB over the no-op across EVs -2..+2 and mixed
    (on the full-size held-out set it is +5.3 dB; mixed alone is its weak case and is
    only part of the mean)."""
    gains = [_gain(demo_model, heldout_photo, ev) for ev in (-2.0, -1.5, -1.0, 1.0, 1.5, 2.0, "mixed")]
    assert sum(gains) / len(gains) > 3.0, f"gains {[round(g, 2) for g in gains]}"


def test_auto_levels_gamma_reaches_the_target_brightness(heldout_photo):
    dark = synthesize(heldout_photo, -2.0)
    out = auto_levels_gamma(dark, target_mean=0.4)
    luma = (torch.tensor([0.2126, 0.7152, 0.0722]).view(3, 1, 1) * out).sum(0)
    assert luma.mean().item() == pytest.approx(0.4, abs=0.01)
    assert psnr(out, heldout_photo) > psnr(dark, heldout_photo)
    batch = auto_levels_gamma(torch.stack([dark, synthesize(heldout_photo, 2.0)]), target_mean=0.4)
    assert torch.allclose(batch[0], out, atol=1e-6)


def test_heldout_benchmark_table(demo_model, heldout_photo):
    small = fit_longest_side(heldout_photo, 64)
    rows = heldout_benchmark(demo_model, [small])
    assert len(rows) == 3 * (len(BENCHMARK_EVS) + 1)
    no_op = [r for r in rows if r.method == "no-op"]
    direct = synthesize(small, BENCHMARK_EVS[0])
    assert no_op[0].psnr == pytest.approx(psnr(direct, small))
    table = format_benchmark(rows)
    assert table.count("\n") == 2 + len(BENCHMARK_EVS) + 1  # header, rule, conditions, mean
    assert "| mean |" in table and "demo model PSNR / SSIM" in table
    # `demo --benchmark` runs optimize_for_inference's copy on CPU: the same scores
    # (its float32 outputs are within ~1e-7 of the plain model's; 1e-3 dB, 1e-5 SSIM).
    fast_rows = heldout_benchmark(optimize_for_inference(demo_model), [small])
    for plain, fast in zip(rows, fast_rows, strict=True):
        assert (fast.condition, fast.method) == (plain.condition, plain.method)
        assert fast.psnr == pytest.approx(plain.psnr, abs=1e-3), plain
        assert fast.ssim == pytest.approx(plain.ssim, abs=1e-5), plain


def test_demo_command_end_to_end(tmp_path, capsys, heldout_photo):
    photo_path = tmp_path / "photo.png"
    save_image(photo_path, heldout_photo, format="PNG")
    out = tmp_path / "side_by_side.png"
    assert main(["demo", str(photo_path), "-o", str(out), "--size", "96"]) == EXIT_OK
    text = capsys.readouterr().out
    for label, _, _ in DEMO_CASES:
        assert label in text
    for backend in available_backends():
        assert f"{backend} " in text
    assert "optimized " in text  # optimize_for_inference's copy, what enhance runs
    with Image.open(out) as picture:
        width, height = picture.size
    assert (width, height) == (4 * 96 + 3 * 4, 3 * 64 + 2 * 4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    assert main(["demo", str(photo_path), "-o", str(tmp_path / "x.jpg")]) == EXIT_USAGE
    assert "must end in .png" in capsys.readouterr().err
    assert main(["demo", str(tmp_path / "missing.png"), "-o", str(out)]) == EXIT_USAGE
    assert "missing.png" in capsys.readouterr().err
