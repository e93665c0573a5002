"""SURE: Stein's unbiased risk estimate of the MSE to the clean image, from the noisy
observation alone (Stein 1981; as a training loss: Metzler et al. 2018, "Unsupervised
learning with Stein's unbiased risk estimator"; for DIP fed the noisy image: Jo et al.,
ICCV 2021, "Rethinking deep image prior for denoising").

For y = x + n, n ~ N(0, sigma^2 I) and a denoiser f(y) with n pixels,

    SURE = ||y - f(y)||^2 / n - sigma^2 + 2 sigma^2 div_y(f(y)) / n

has the expectation of ||x - f(y)||^2 / n. The divergence term is what MSE lacks: a
network that copies the observation's noise through its input (the DDPM inputs are built
from y) has a large div_y and pays for it. It is estimated by Monte Carlo with one probe
b ~ N(0, I) per step (Ramani et al. 2008):

    div_y(f) ~ b . (f(x(y + e b)) - f(x(y))) / e

where x(y) is the network input built from y. The DDPM input is linear in y,
x = sqrt(alpha_bar_t) * (2 y - 1) + sqrt(1 - alpha_bar_t) * eps, so with the same eps
x(y + e b) = x + gain * e * b, gain = 2 sqrt(alpha_bar_t) (`Draw.gain`).
"""
from __future__ import annotations

from typing import Callable

import torch

# Finite-difference step on [0, 1] images: Metzler et al. take max(y) / 1000.
SURE_EPSILON = 1e-3


def forwards_per_step(loss: str) -> int:
    """Network forward passes of one training step: SURE's divergence probe is a second
    forward (`sure_losses`), so at equal compute a SURE trial runs half the iterations."""
    return 2 if loss == "sure" else 1


def sure_losses(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                gain: torch.Tensor, out: torch.Tensor, err: torch.Tensor,
                sigma: float | torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """SURE of K networks, (K,): `forward` maps K inputs to K outputs, `z` (K, C, H, W) the
    inputs that gave `out`, `gain` (K,) d(input)/d(y), `err` = out - y, `sigma` one for
    all or (K,) one per network, `probe` b (K, C, H, W) ~ N(0, I) drawn from the networks'
    own probe generators."""
    e = SURE_EPSILON
    shifted = forward(z + (gain * e).view(-1, 1, 1, 1) * probe)
    n = err[0].numel()
    div = (probe * (shifted - out)).flatten(1).sum(1) / e
    return err.square().flatten(1).mean(1) - sigma**2 + 2 * sigma**2 * div / n
