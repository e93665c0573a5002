"""DDPM noise schedules, the forward process, and the DIP input modes (torch only)."""

from noise.forward import add_noise, from_model_range, to_model_range
from noise.inputs import DDPM_MODES, INPUT_MODES, DipInput, make_input
from noise.schedules import SCHEDULES, alphas_cumprod, cosine_betas, linear_betas, make_betas

__all__ = [
    "DDPM_MODES", "INPUT_MODES", "SCHEDULES", "DipInput", "add_noise", "alphas_cumprod",
    "cosine_betas", "from_model_range", "linear_betas", "make_betas", "make_input",
    "to_model_range",
]
