"""The study report, and what a user sees of a study: run names."""
from __future__ import annotations

import pytest

from study.config import TrialConfig, trial_run_name

SEARCHED = ["noise_mode", "timestep", "lr"]


@pytest.mark.parametrize("changes,searched,want", [
    ({"noise_mode": "ddpm_resample", "timestep": 120, "lr": 0.0032}, SEARCHED, "ddpm_resample t=120 lr=3.2e-03"),
    ({"noise_mode": "uniform", "timestep": 120, "lr": 0.02}, SEARCHED, "uniform lr=0.02"),  # no t for uniform
    ({"noise_mode": "ddpm_random_t", "timestep": 0, "lr": 1e-4}, SEARCHED, "ddpm_random_t t=0 lr=1.0e-04"),
    ({"noise_mode": "ddpm", "channels": 16, "reg_noise_std": 0.05}, ["channels", "reg_noise_std"], "ddpm channels=16"),
    ({"noise_mode": "uniform", "reg_noise_std": 0.05}, ["reg_noise_std", "loss"], "uniform reg=0.05 loss=mse"),
    ({"noise_mode": "gaussian"}, [], "gaussian"),
])
def test_trial_run_name_says_what_the_trial_tries(changes, searched, want):
    assert trial_run_name(TrialConfig(**changes), searched) == want
