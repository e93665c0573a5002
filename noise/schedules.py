"""Beta schedules of the DDPM forward process, as pure float64 functions.

References:
    Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models" (DDPM).
    Nichol, Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models".
"""

import math

import torch

SCHEDULES = ("linear", "cosine")


def _check_num_timesteps(num_timesteps: int) -> None:
    if isinstance(num_timesteps, bool) or not isinstance(num_timesteps, int) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")


def linear_betas(
    num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> torch.Tensor:
    """Linear schedule of DDPM (Ho et al. 2020, sec. 4): betas from 1e-4 to 0.02.

    Not rescaled by 1000 / T (as some codebases do for short chains), so that
    T = 1000 gives exactly the paper's schedule.
    """
    _check_num_timesteps(num_timesteps)
    if not 0.0 < beta_start <= beta_end < 1.0:
        raise ValueError(
            f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def cosine_betas(
    num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999
) -> torch.Tensor:
    """Cosine schedule of Nichol & Dhariwal (2021), eq. 17.

    alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2) and
    beta_t = min(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta); the clip keeps
    the last steps from a singular beta = 1 near t = T.
    """
    _check_num_timesteps(num_timesteps)
    if not 0.0 < max_beta < 1.0:
        raise ValueError(f"max_beta must lie in (0, 1), got {max_beta}")
    steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    betas = 1 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(max=max_beta)


def make_betas(name: str, num_timesteps: int) -> torch.Tensor:
    """The betas of the schedule called `name` (one of SCHEDULES), float64 of shape (T,)."""
    if name == "linear":
        return linear_betas(num_timesteps)
    if name == "cosine":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s <= t} (1 - beta_s) (DDPM, eq. 4), in float64.

    Index t = 0 is the first noising step, so alpha_bar_0 = 1 - beta_0, not 1.
    """
    if betas.ndim != 1 or betas.numel() == 0:
        raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
    return torch.cumprod(1.0 - betas.to(torch.float64), dim=0)
