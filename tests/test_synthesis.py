"""Synthetic exposure errors: the transfer functions, EV 0, monotonicity, mixed
fields, determinism, and the paired dataset."""

import pytest
import torch

from exposure_slot.data import DatasetError, SyntheticExposurePairs, synthesize
from exposure_slot.data.synthesis import (WHITE_POINT, ev_field, inverse_tone_curve, jpeg_round_trip,
                                          linear_to_srgb, srgb_to_linear, tone_curve)
from exposure_slot.images import read_image

from conftest import shared_path


@pytest.fixture(scope="module")
def photo():
    """A 96x128 window of a real photograph, [3,H,W] in [0,1]."""
    image = read_image(shared_path("data", "kodak", "kodim05.png")).tensor[0]
    return image[:, 200:296, 300:428].contiguous()


def test_srgb_transfer_functions_match_the_standard():
    # IEC 61966-2-1 values: 0.5 decodes to 0.214041..., the linear segment below 0.04045.
    assert srgb_to_linear(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(0.21404114, abs=1e-8)
    assert srgb_to_linear(torch.tensor(0.04, dtype=torch.float64)).item() == pytest.approx(0.04 / 12.92)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    assert torch.allclose(linear_to_srgb(srgb_to_linear(grid)), grid, atol=1e-12)
    # Continuous at the breakpoint.
    below, above = srgb_to_linear(torch.tensor([0.04045 - 1e-9, 0.04045 + 1e-9], dtype=torch.float64))
    assert abs(below - above) < 1e-8


def test_tone_curve_is_a_monotonic_shoulder_with_an_exact_inverse():
    scene = torch.linspace(0, WHITE_POINT, 2001, dtype=torch.float64)
    display = tone_curve(scene)
    assert display[-1].item() == pytest.approx(1.0)
    assert (display.diff() > 0).all()
    assert (display <= scene + 1e-15).all()  # compresses, never brightens
    assert torch.allclose(inverse_tone_curve(display), scene, atol=1e-10, rtol=1e-10)
    tiny = torch.tensor([1e-9], dtype=torch.float64)  # the stable root keeps dark values exact
    assert inverse_tone_curve(tiny).item() == pytest.approx(1e-9, rel=1e-6)


def test_ev_zero_is_the_identity(photo):
    assert torch.allclose(synthesize(photo, 0.0), photo, atol=2e-6)
    batch = torch.stack([photo, photo.flip(-1)])
    assert torch.allclose(synthesize(batch, 0), batch, atol=2e-6)


def test_result_is_monotonic_in_ev(photo):
    evs = [-2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0]
    outs = torch.stack([synthesize(photo, ev) for ev in evs])
    steps = outs.diff(dim=0)
    assert (steps >= -1e-6).all(), "a pixel got darker as the exposure went up"
    means = outs.mean(dim=(1, 2, 3))
    assert (means.diff() > 0.01).all()
    # Over-exposure saturates some pixels; under-exposure saturates none.
    assert (outs[-1] >= 1 - 1e-6).float().mean() > (photo >= 1 - 1e-6).float().mean()
    assert (outs[0] > 0).float().mean() == (photo > 0).float().mean()
    assert outs.min() >= 0 and outs.max() <= 1


def test_ev_field_spans_the_requested_range_smoothly():
    field = ev_field((64, 80), -1.5, 2.0, generator=torch.Generator().manual_seed(3))
    assert field.shape == (64, 80)
    assert field.min().item() == pytest.approx(-1.5, abs=1e-6)
    assert field.max().item() == pytest.approx(2.0, abs=1e-6)
    # Low frequency: neighbouring pixels differ by a small part of the range.
    assert field.diff(dim=0).abs().max() < 0.35 and field.diff(dim=1).abs().max() < 0.35


def test_mixed_exposure_brightens_and_darkens_regions(photo):
    out = synthesize(photo, (-2.0, 2.0), mixed=True, seed=7)
    change = (out - photo).mean(dim=0)  # per pixel
    darker = (change < -0.02).float().mean().item()
    brighter = (change > 0.02).float().mean().item()
    assert darker > 0.1 and brighter > 0.1, (darker, brighter)
    # A number means the symmetric range.
    assert torch.equal(synthesize(photo, 2.0, mixed=True, seed=7), out)


def test_mixed_is_deterministic_under_a_seed(photo):
    batch = torch.stack([photo, photo])
    a = synthesize(batch, (-2.0, 1.0), mixed=True, seed=11)
    b = synthesize(batch, (-2.0, 1.0), mixed=True, generator=torch.Generator().manual_seed(11))
    c = synthesize(batch, (-2.0, 1.0), mixed=True, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a[0], a[1]), "each image of a batch gets its own field"


def test_jpeg_round_trip_quantises_and_stays_close(photo):
    out = synthesize(photo, -1.0, jpeg_quality=90)
    plain = synthesize(photo, -1.0)
    assert torch.equal(out * 255, (out * 255).round())
    assert (out - plain).abs().mean() < 0.02
    assert not torch.equal(jpeg_round_trip(plain, 20), jpeg_round_trip(plain, 95))


def test_bad_arguments_are_named(photo):
    with pytest.raises(ValueError, match="RGB image"):
        synthesize(photo[:2], 1.0)
    with pytest.raises(TypeError, match="mixed=True"):
        synthesize(photo, (-1.0, 1.0))
    with pytest.raises(TypeError, match="float image"):
        synthesize((photo * 255).to(torch.uint8), 1.0)
    with pytest.raises(ValueError, match="either seed or generator"):
        synthesize(photo, 1.0, mixed=True, seed=1, generator=torch.Generator())


def test_dataset_items_are_reproducible_per_epoch():
    folder = shared_path("data", "kodak")
    photos = [folder / "kodim01.png", folder / "kodim02.png"]
    dataset = SyntheticExposurePairs(photos, crop=48, length=6, seed=5)
    assert len(dataset) == 6
    source, target = dataset[3]
    assert source.shape == target.shape == (3, 48, 48)
    assert not torch.equal(source, target)
    again = SyntheticExposurePairs(photos, crop=48, length=6, seed=5)[3]
    assert torch.equal(again[0], source) and torch.equal(again[1], target)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][1], target), "a new epoch takes new crops"
    with pytest.raises(IndexError):
        dataset[6]


def test_dataset_windows_keep_the_whole_scene():
    path = shared_path("data", "kodak", "kodim03.png")
    photo = read_image(path).tensor[0]
    whole = SyntheticExposurePairs(path, crop=32, window=(1.0, 1.0), length=2, seed=2)
    source, target = whole[0]
    assert target.shape == (3, 32, 32)
    # A window of the full shorter side, scaled down 16x: about the photo's mean colour.
    side = min(photo.shape[-2:])
    assert abs(target.mean() - photo[:, :side, :side].mean()) < 0.1
    assert torch.allclose(target.mean(dim=(1, 2)), photo.mean(dim=(1, 2)), atol=0.1)
    with pytest.raises(ValueError, match="window"):
        SyntheticExposurePairs(path, crop=32, window=(0.0, 1.0))


def test_dataset_ev_choices():
    photo = shared_path("data", "kodak", "kodim03.png")
    globals_only = SyntheticExposurePairs(photo, crop=64, length=4, mixed_prob=0.0, ev_range=(1.0, 1.0))
    for index in range(4):
        source, target = globals_only[index]
        assert torch.allclose(source, synthesize(target, 1.0))
    mixed_only = SyntheticExposurePairs(photo, crop=64, length=4, mixed_prob=1.0)
    for index in range(4):
        source, target = mixed_only[index]
        change = (source - target).mean(dim=0)
        assert (change < -0.01).any() and (change > 0.01).any(), "every item mixes both errors"


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(DatasetError, match="larger than the smallest photo side"):
        SyntheticExposurePairs(shared_path("data", "kodak", "kodim01.png"), crop=1024)
    with pytest.raises(DatasetError, match="cannot read photo"):
        SyntheticExposurePairs([tmp_path / "missing.png"])
    with pytest.raises(DatasetError, match="no images"):
        SyntheticExposurePairs(tmp_path)
