"""The noise level of an image, estimated from the image alone (torch only).

`estimate_sigma` is the estimator the service uses (SURE with `sigma_estimate`, `apply
--sigma auto`): the patch-PCA estimator of Chen, Zhu and Heng, "An Efficient Statistical
Method for Image Noise Level Estimation", ICCV 2015. The covariance of the image's
overlapping patches has, for y = x + n with white noise n ~ N(0, sigma^2 I), eigenvalues
lambda_i(x) + sigma^2; a natural image's patches lie near a low-dimensional subspace, so
most of the smallest eigenvalues are sigma^2 alone. Chen et al. take the largest set of
smallest eigenvalues whose mean equals their median (the set that looks like one value
plus sampling spread) and return the square root of that mean.

Clipping: the service's observations are clip(x + n, 0, 1), which hides noise wherever
x lies within a few sigma of 0 or 1 (measured: bench/sigma_estimators.py). `clip_aware`
keeps only the patches whose mean lies at least `CLIP_MARGIN` estimated sigmas away
from both bounds and estimates again on those (one refinement from the first estimate).
The patch mean is a low-pass value, nearly independent of the noise in any one pixel,
so choosing patches by it does not select on the noise itself.

Colour: the patches hold every channel (Chen et al.'s own code does the same), so a
colour image gets one estimate, the noise model's one sigma.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 8          # patch side (Chen et al.'s code: 8)
MAX_PATCHES = 20_000  # the stride grows with the image to keep about this many patches
CLIP_MARGIN = 2.0  # clip_aware: patches whose mean lies this many sigmas inside (0, 1)
MIN_PATCHES = 64   # clip_aware: fewer patches than this away from the bounds: keep them all


def patches(y: torch.Tensor, size: int = PATCH) -> torch.Tensor:
    """(1, C, H, W) -> (N, C * size * size) overlapping patches, float64. Stride 1 up to
    about MAX_PATCHES patches (a 64 px image has 3,249: a colour patch has 192 values, and
    the covariance needs many more patches than that), then wider (Chen et al.: 3)."""
    stride = max(1, int((y.shape[-2] * y.shape[-1] / MAX_PATCHES) ** 0.5))
    return F.unfold(y.double(), size, stride=stride)[0].T


def pca_sigma_of(p: torch.Tensor) -> float:
    """Chen et al. 2015, Algorithm 1, on patches (N, d): sigma from the eigenvalues of
    their covariance."""
    x = p - p.mean(0, keepdim=True)
    lam = torch.linalg.eigvalsh(x.T @ x / p.shape[0]).clamp_min(0)  # ascending
    for r in range(lam.numel() - 1, 0, -1):  # the largest set whose mean is its median
        tail = lam[:r]
        tau = tail.mean()
        if int((tail > tau).sum()) == int((tail < tau).sum()):
            return float(tau.sqrt())
    return float(lam[0].sqrt())


def pca_sigma(y: torch.Tensor) -> float:
    """Chen et al. 2015 on all patches of `y` (1, C, H, W) in [0, 1]."""
    return pca_sigma_of(patches(y))


def estimate_sigma(y: torch.Tensor, clip_aware: bool = True) -> float:
    """The noise sigma of `y` (1, C, H, W) in [0, 1], on its scale (0.098 for 25/255): one
    value over all channels. `clip_aware`: estimate again on the patches away from 0 and
    1 (see the module docstring)."""
    if y.dim() != 4 or y.shape[0] != 1:
        raise ValueError(f"estimate_sigma takes one image (1, C, H, W), got shape {tuple(y.shape)}")
    if min(y.shape[-2:]) < PATCH:
        raise ValueError(f"an image of {y.shape[-1]}x{y.shape[-2]} px is too small to estimate its "
                         f"noise; allowed: sides of at least {PATCH} px")
    p = patches(y)
    sigma = pca_sigma_of(p)
    if not clip_aware:
        return sigma
    mean = p.mean(1)
    m = CLIP_MARGIN * sigma
    inside = (mean >= m) & (mean <= 1 - m)
    if int(inside.sum()) < max(MIN_PATCHES, p.shape[1] + 1):
        return sigma
    return pca_sigma_of(p[inside])
