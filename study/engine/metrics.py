"""PSNR and SSIM against the clean image, from scikit-image (a well-kept implementation).

Both take (1, C, H, W) tensors in [0, 1] and use data_range = 1. The original experiment
passed data_range = 255 for [0, 1] images, which scores pure noise at SSIM ~0.99.
SSIM uses the settings of Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5,
population covariance; for RGB the mean of the per-channel SSIM.
"""
from __future__ import annotations

import numpy as np
import torch

# skimage.metrics is imported where it is used: it pulls in scipy.stats (~0.6 s), which a
# study's driver never needs and a trial only needs at its first evaluation.

DATA_RANGE = 1.0


def _hwc(x: torch.Tensor) -> np.ndarray:
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected an image of shape (1, C, H, W), got {tuple(x.shape)}")
    return x.detach().double().cpu().clamp(0, 1)[0].permute(1, 2, 0).numpy()


def psnr_batch(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """PSNR in dB (data range 1) of each image of a (K, C, H, W) batch, as a float64 (K,)
    tensor on the batch's device: the loop tracks the best PSNR of every network each
    iteration without waiting for the device. The formula of skimage's
    `peak_signal_noise_ratio` (a test pins the two together)."""
    if x.shape != ref.shape or x.dim() != 4:
        raise ValueError(f"expected two (K, C, H, W) batches of one shape, got {tuple(x.shape)} and {tuple(ref.shape)}")
    mse = ((x.detach().double().clamp(0, 1) - ref.detach().double()) ** 2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-30))


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB (data range 1) of one (1, C, H, W) image."""
    if x.shape != ref.shape:
        raise ValueError(f"shapes differ: {tuple(x.shape)} and {tuple(ref.shape)}")
    return float(psnr_batch(x, ref)[0])


def psnr_skimage(x: torch.Tensor, ref: torch.Tensor) -> float:
    """skimage's PSNR, the reference for `psnr` in the tests."""
    from skimage.metrics import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(_hwc(ref), _hwc(x), data_range=DATA_RANGE))


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004), data range 1."""
    from skimage.metrics import structural_similarity

    a, b = _hwc(x), _hwc(ref)
    return float(structural_similarity(
        b, a, data_range=DATA_RANGE, channel_axis=2, gaussian_weights=True, sigma=1.5,
        use_sample_covariance=False,
    ))
