"""Input modes, and the one owner of the rule "this field only matters for some modes":
the search space asks such a field only for those modes, run names, MLflow params, the
report and `status` show it only for them. Standard library only.
"""
from __future__ import annotations

from typing import Literal, get_args

NoiseMode = Literal[
    "uniform", "gaussian", "gaussian_resample", "ddpm", "ddpm_resample", "ddpm_random_t"
]
NOISE_MODES: tuple[str, ...] = get_args(NoiseMode)
DDPM_MODES: tuple[str, ...] = ("ddpm", "ddpm_resample", "ddpm_random_t")

# Fields that only matter for some input modes: the search space suggests them, run names
# and the report show them, only for those modes.
MODE_ONLY = {"timestep": DDPM_MODES, "reg_noise_std": ("uniform",)}
# Fields the search space asks only for some modes, though every mode uses them: SURE
# differs from MSE only for the inputs built from the observation (study/config.py `check_sure`).
SEARCHED_ONLY = {"loss": DDPM_MODES}


def mode_uses(name: str, mode: str) -> bool:
    """Whether field `name` matters for input mode `mode` (True unless it is mode-only and
    `mode` is not among its modes)."""
    return mode in MODE_ONLY.get(name, (mode,))


def mode_searches(name: str, mode: str) -> bool:
    """Whether the search space asks field `name` for a trial of input mode `mode`."""
    return mode_uses(name, mode) and mode in SEARCHED_ONLY.get(name, (mode,))
