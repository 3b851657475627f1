"""PSNR and SSIM exactly as the published MSEC / SICE / LCDP numbers are computed
(SPEC section 5).

Both metrics take a prediction and its ground truth with values in ``[0, 1]``:

* layout ``"CHW"`` (default): one image ``[3, H, W]`` or a batch ``[B, 3, H, W]``;
* layout ``"HWC"``: one image ``[H, W, 3]`` or a batch ``[B, H, W, 3]`` (the layout
  of arrays from Pillow / ``np.asarray(image)``).

Torch tensors (on any device) and numpy arrays are accepted, in any floating dtype.
The prediction is clipped to ``[0, 1]`` (the ground truth is used as given), both
are scaled to ``[0, 255]`` and everything is computed in float64.

A single image gives a Python ``float``; a batch gives one value per image: a
float64 tensor ``[B]`` on the input's device for torch inputs, a float64 numpy
array ``[B]`` for numpy inputs.

* PSNR: ``10 log10(255^2 / MSE)`` with the MSE over all RGB values of the image
  (``inf`` for identical images).
* SSIM (Wang et al. 2004): an 11x11 Gaussian window with sigma 1.5, population
  (co)variances, ``C1 = (0.01 * 255)^2``, ``C2 = (0.03 * 255)^2``, evaluated on the
  'valid' region only (the 5-pixel border where the window would leave the image is
  cut off), averaged over that region per RGB channel, then over the channels. This
  equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=...)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "SSIM_WINDOW", "SSIM_SIGMA", "LAYOUTS"]

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_C1 = (0.01 * PEAK) ** 2
SSIM_C2 = (0.03 * PEAK) ** 2
LAYOUTS = ("CHW", "HWC")


def _as_batch(image, what: str, layout: str) -> torch.Tensor:
    """``image`` as a float64 ``[B, 3, H, W]`` tensor (a view where possible)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(image, np.ndarray):
        tensor = torch.from_numpy(image)
    elif isinstance(image, torch.Tensor):
        tensor = image.detach()
    else:
        raise TypeError(f"{what} must be a torch tensor or a numpy array, got {type(image).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{what} has dtype {tensor.dtype}; expected floating-point values in "
                        "[0, 1] (convert 8-bit images with x / 255)")
    expected = "[3, H, W] or [B, 3, H, W]" if layout == "CHW" else "[H, W, 3] or [B, H, W, 3]"
    if tensor.dim() not in (3, 4):
        raise ValueError(f"{what} has shape {list(tensor.shape)}; expected {expected} "
                         f"(layout {layout!r})")
    channel_dim = -3 if layout == "CHW" else -1
    if tensor.shape[channel_dim] != 3:
        raise ValueError(f"{what} has shape {list(tensor.shape)} with {tensor.shape[channel_dim]} "
                         f"channels; expected 3 RGB channels in {expected} (layout {layout!r})")
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(0)
    if layout == "HWC":
        tensor = tensor.permute(0, 3, 1, 2)
    return tensor.to(torch.float64)


def _prepare(pred, gt, layout: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both images as float64 ``[B, 3, H, W]`` on the [0, 255] scale, the prediction
    clipped, plus whether the input was batched."""
    p = _as_batch(pred, "prediction", layout)
    g = _as_batch(gt, "ground truth", layout)
    if pred.ndim != gt.ndim or p.shape != g.shape:
        raise ValueError(f"prediction {list(p.shape)} and ground truth {list(g.shape)} differ "
                         "in shape (both shown as [B, 3, H, W])")
    if p.device != g.device:
        raise ValueError(f"prediction is on {p.device} but ground truth on {g.device}")
    return p.clamp(0.0, 1.0) * PEAK, g * PEAK, pred.ndim == 4


def _result(values: torch.Tensor, batched: bool, like):
    if not batched:
        return float(values[0])
    return values if isinstance(like, torch.Tensor) else values.cpu().numpy()


def psnr(pred, gt, *, layout: str = "CHW"):
    """Peak signal-to-noise ratio in dB on the [0, 255] scale (see the module docs)."""
    p, g, batched = _prepare(pred, gt, layout)
    mse = (p - g).square().flatten(1).mean(dim=1)
    return _result(10.0 * torch.log10(PEAK ** 2 / mse), batched, pred)


def _gaussian_window(device) -> torch.Tensor:
    radius = SSIM_WINDOW // 2
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    window = torch.exp(-(x * x) / (2 * SSIM_SIGMA ** 2))
    return window / window.sum()


def ssim(pred, gt, *, layout: str = "CHW"):
    """Structural similarity on the [0, 255] scale (see the module docs)."""
    p, g, batched = _prepare(pred, gt, layout)
    _, channels, height, width = p.shape
    if height < SSIM_WINDOW or width < SSIM_WINDOW:
        raise ValueError(f"images of {height}x{width} pixels (HxW) are smaller than the "
                         f"{SSIM_WINDOW}x{SSIM_WINDOW} SSIM window")
    # The five local statistics of every channel, filtered in one grouped pass with
    # the separable window, without padding: only the 'valid' region is computed.
    stats = torch.stack([p, g, p * p, g * g, p * g], dim=2).flatten(1, 2)  # [B, 3*5, H, W]
    window = _gaussian_window(p.device)
    groups = stats.shape[1]
    stats = F.conv2d(stats, window.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    stats = F.conv2d(stats, window.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_p, mu_g, pp, gg, pg = stats.unflatten(1, (channels, 5)).unbind(dim=2)
    var_p = pp - mu_p * mu_p
    var_g = gg - mu_g * mu_g
    cov = pg - mu_p * mu_g
    ssim_map = ((2 * mu_p * mu_g + SSIM_C1) * (2 * cov + SSIM_C2)) / (
        (mu_p * mu_p + mu_g * mu_g + SSIM_C1) * (var_p + var_g + SSIM_C2))
    # Every channel has the same number of valid pixels, so the mean over channels of
    # the per-channel means is the mean over everything.
    return _result(ssim_map.flatten(1).mean(dim=1), batched, pred)

