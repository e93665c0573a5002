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

With held-out pixels (study/engine/holdout.py) the sums run over the kept pixels only and
the probe never touches a held-out one: the input is built from fill(y) (held-out pixels
replaced by their kept neighbours' mean, linear in y), so x(y + e b) = x + gain * e *
fill(b) with b zero on the held-out pixels, and no held-out value reaches the network.
"""
from __future__ import annotations

from typing import Callable

import torch

from study.engine.holdout import fill

# Finite-difference step on [0, 1] images: Metzler et al. take max(y) / 1000.
SURE_EPSILON = 1e-3


def forwards_per_step(loss: str) -> int:
    """Network forward passes of one training step: SURE's divergence probe is a second
    forward (`sure_losses`), so at equal compute a SURE trial runs half the iterations."""
    return 2 if loss == "sure" else 1


def sure_losses(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                gain: torch.Tensor, out: torch.Tensor, err: torch.Tensor,
                sigma: float | torch.Tensor, probe: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
    """SURE of K networks, (K,): `forward` maps K inputs to K outputs, `z` (K, C, H, W) the
    inputs that gave `out`, `gain` (K,) d(input)/d(y), `err` = out - y (0 on held-out
    pixels), `sigma` one for all or (K,) one per network, `probe` b (K, C, H, W) ~ N(0, I)
    drawn from the networks' own probe generators, `keep` (K, 1, H, W) 0 on held-out
    pixels (None: none held out)."""
    e = SURE_EPSILON
    if keep is not None:
        return _held_out_sure(forward, z, gain, out, err, sigma, probe * keep, keep)
    shifted = forward(z + (gain * e).view(-1, 1, 1, 1) * probe)
    n = err[0].numel()
    div = (probe * (shifted - out)).flatten(1).sum(1) / e
    return err.square().flatten(1).mean(1) - sigma**2 + 2 * sigma**2 * div / n


def _held_out_sure(forward: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor,
                   gain: torch.Tensor, out: torch.Tensor, err: torch.Tensor, sigma: float | torch.Tensor,
                   probe: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """SURE over the kept pixels: `probe` and `err` are 0 on the held-out ones, and the
    input moves by gain * e * fill(probe) (see the module docstring)."""
    e = SURE_EPSILON
    shifted = forward(z + (gain * e).view(-1, 1, 1, 1) * fill(probe, keep))
    n = keep.flatten(1).sum(1) * err.shape[1]
    div = (probe * (shifted - out)).flatten(1).sum(1) / e
    return err.square().flatten(1).sum(1) / n - sigma**2 + 2 * sigma**2 * div / n
