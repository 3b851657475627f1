"""PSNR and SSIM against scikit-image configured as SPEC section 5, and by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from exposure_slot.metrics import psnr, ssim


def _pair(shape, seed, noise=0.08):
    """A random ground truth in [0, 1] and a noisy prediction that leaves [0, 1]."""
    rng = np.random.default_rng(seed)
    gt = rng.random(shape)
    pred = gt + noise * rng.standard_normal(shape) + 0.02
    return pred, gt


def _skimage_ssim(pred_chw, gt_chw):
    clipped = np.clip(pred_chw, 0, 1)
    # gaussian_weights with sigma 1.5 makes skimage use truncate 3.5: an 11-tap window
    # (radius 5); it then averages the SSIM map after cropping (11 - 1) // 2 = 5 pixels
    # from every side, i.e. over exactly the 'valid' region.
    return structural_similarity(clipped * 255, gt_chw * 255, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, data_range=255, channel_axis=0)


@pytest.mark.parametrize("shape,seed", [((3, 11, 11), 0), ((3, 23, 40), 1), ((3, 64, 37), 2)])
def test_ssim_matches_skimage(shape, seed):
    pred, gt = _pair(shape, seed)
    expected = _skimage_ssim(pred, gt)
    assert abs(ssim(pred, gt) - expected) < 1e-10
    assert abs(ssim(torch.from_numpy(pred), torch.from_numpy(gt)) - expected) < 1e-10


def test_ssim_averages_the_valid_region_only():
    pred, gt = _pair((3, 30, 33), seed=3, noise=0.3)
    clipped = np.clip(pred, 0, 1)
    per_channel = []
    for c in range(3):
        _, full_map = structural_similarity(clipped[c] * 255, gt[c] * 255, gaussian_weights=True,
                                            sigma=1.5, use_sample_covariance=False, data_range=255,
                                            full=True)
        per_channel.append((full_map[5:-5, 5:-5].mean(), full_map.mean()))
    valid = np.mean([v for v, _ in per_channel])
    whole = np.mean([w for _, w in per_channel])
    assert abs(ssim(pred, gt) - valid) < 1e-10
    assert abs(valid - whole) > 1e-4  # the border would change the result


def test_psnr_matches_skimage():
    pred, gt = _pair((3, 29, 41), seed=4)
    expected = peak_signal_noise_ratio(gt * 255, np.clip(pred, 0, 1) * 255, data_range=255)
    assert abs(psnr(pred, gt) - expected) < 1e-10
    assert abs(psnr(torch.from_numpy(pred), torch.from_numpy(gt)) - expected) < 1e-10


def test_identical_images():
    _, gt = _pair((3, 20, 24), seed=5)
    assert psnr(gt, gt) == math.inf
    assert abs(ssim(gt, gt) - 1.0) < 1e-12


def test_constant_offset_psnr():
    rng = np.random.default_rng(6)
    gt = 0.5 * rng.random((3, 17, 19))
    for offset in (0.1, 0.01, 0.25):
        # MSE = (255 * offset)^2, so PSNR = 20 log10(1 / offset).
        assert abs(psnr(gt + offset, gt) - 20 * math.log10(1 / offset)) < 1e-9


def test_prediction_is_clipped_but_ground_truth_is_not():
    rng = np.random.default_rng(7)
    gt = 0.5 * rng.random((3, 16, 16))
    ones = np.ones_like(gt)
    assert psnr(gt + 3.0, gt) == psnr(ones, gt)
    assert ssim(gt - 2.0, gt) == ssim(np.zeros_like(gt), gt)
    # The ground truth is taken as given: 2 - 1 = 1 -> 0 dB.
    assert abs(psnr(ones, ones * 2.0)) < 1e-12


def test_hwc_layout_and_float32():
    pred, gt = _pair((3, 25, 31), seed=8)
    expected_psnr, expected_ssim = psnr(pred, gt), ssim(pred, gt)
    hwc_pred, hwc_gt = pred.transpose(1, 2, 0), gt.transpose(1, 2, 0)
    assert abs(psnr(hwc_pred, hwc_gt, layout="HWC") - expected_psnr) < 1e-10
    assert abs(ssim(hwc_pred, hwc_gt, layout="HWC") - expected_ssim) < 1e-10
    p32, g32 = pred.astype(np.float32), gt.astype(np.float32)
    assert abs(ssim(p32, g32) - _skimage_ssim(p32.astype(np.float64), g32.astype(np.float64))) < 1e-10


def test_batches_give_one_value_per_image():
    pairs = [_pair((3, 21, 26), seed=s) for s in (9, 10, 11)]
    pred = np.stack([p for p, _ in pairs])
    gt = np.stack([g for _, g in pairs])
    values = ssim(pred, gt)
    assert isinstance(values, np.ndarray) and values.shape == (3,) and values.dtype == np.float64
    np.testing.assert_allclose(values, [_skimage_ssim(p, g) for p, g in pairs], rtol=0, atol=1e-10)
    tensor_values = psnr(torch.from_numpy(pred), torch.from_numpy(gt))
    assert isinstance(tensor_values, torch.Tensor) and tensor_values.dtype == torch.float64
    np.testing.assert_allclose(tensor_values.numpy(), [psnr(p, g) for p, g in pairs], rtol=0, atol=1e-12)
    hwc = psnr(pred.transpose(0, 2, 3, 1), gt.transpose(0, 2, 3, 1), layout="HWC")
    np.testing.assert_allclose(hwc, tensor_values.numpy(), rtol=0, atol=1e-12)


def test_errors():
    pred, gt = _pair((3, 20, 20), seed=12)
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(pred, gt[:, :19])
    with pytest.raises(ValueError, match="differ in shape"):
        ssim(pred[None], gt)
    with pytest.raises(ValueError, match="4 channels"):
        ssim(np.concatenate([pred, pred[:1]]), np.concatenate([gt, gt[:1]]))
    with pytest.raises(ValueError, match="smaller than the 11x11 SSIM window"):
        ssim(pred[:, :10], gt[:, :10])
    with pytest.raises(TypeError, match="uint8"):
        psnr((pred * 255).astype(np.uint8), gt)
    with pytest.raises(ValueError, match="expected \\[H, W, 3\\]"):
        psnr(pred[0], gt[0], layout="HWC")
    with pytest.raises(ValueError, match="layout"):
        psnr(pred, gt, layout="WHC")
