"""The DDPM forward (noising) process q(x_t | x_0) in closed form.

Reference: Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models", eq. 4.
"""

from typing import Union

import torch

Timestep = Union[int, torch.Tensor]


def to_model_range(x01: torch.Tensor) -> torch.Tensor:
    """Map an image from [0, 1] to [-1, 1].

    DDPM scales images to [-1, 1] before noising (Ho et al. 2020, sec. 3.3); we do
    the same so that a timestep t means the same signal-to-noise ratio as there.
    """
    return 2.0 * x01 - 1.0


def from_model_range(x: torch.Tensor) -> torch.Tensor:
    """Map an image from [-1, 1] back to [0, 1] (inverse of `to_model_range`)."""
    return (x + 1.0) / 2.0


def _check_t(t: Timestep, num_timesteps: int, batch: int) -> torch.Tensor:
    """Validate t and return it as a CPU LongTensor of shape () or (batch,)."""
    if isinstance(t, torch.Tensor):
        if t.dtype.is_floating_point or t.dtype == torch.bool or t.ndim > 1:
            raise ValueError(f"t must be an int or a 1-D integer tensor, got {t.dtype} {tuple(t.shape)}")
        if t.ndim == 1 and t.shape[0] != batch:
            raise ValueError(f"t has {t.shape[0]} timesteps but x0 has batch size {batch}")
        t = t.to("cpu", torch.long)
    elif isinstance(t, int) and not isinstance(t, bool):
        t = torch.tensor(t, dtype=torch.long)
    else:
        raise ValueError(f"t must be an int or an integer tensor, got {type(t).__name__}")
    if t.numel() and (t.min() < 0 or t.max() >= num_timesteps):
        raise ValueError(f"t must lie in 0..{num_timesteps - 1}, got {t.tolist()}")
    return t


def add_noise(
    x0: torch.Tensor, eps: torch.Tensor, t: Timestep, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """Sample x_t ~ q(x_t | x_0): xt = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

    DDPM eq. 4, with the noise `eps` passed in so the result is deterministic
    (as in diffusers' `DDPMScheduler.add_noise`). `t` is an int, or a LongTensor of
    shape (B,) with one timestep per batch element, broadcast over the other dims.
    The coefficients are computed in float64 and cast to x0's dtype and device.
    """
    if x0.shape != eps.shape:
        raise ValueError(f"x0 and eps must have the same shape, got {tuple(x0.shape)} and {tuple(eps.shape)}")
    if alphas_cumprod.ndim != 1:
        raise ValueError(f"alphas_cumprod must be 1-D, got shape {tuple(alphas_cumprod.shape)}")
    batch = x0.shape[0] if x0.ndim else 1
    t = _check_t(t, alphas_cumprod.shape[0], batch)
    abar = alphas_cumprod.to("cpu", torch.float64)[t]
    if abar.ndim == 1:
        # One coefficient per batch element, broadcast over C, H, W.
        abar = abar.reshape(-1, *([1] * (x0.ndim - 1)))
    signal = abar.sqrt().to(x0.device, x0.dtype)
    noise = (1.0 - abar).sqrt().to(x0.device, x0.dtype)
    return signal * x0 + noise * eps
