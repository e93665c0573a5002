"""The noise sigma a network uses: the one source for SURE (study/engine/sure.py) and
for anything else that needs the noise level of a network's observation.

With `sigma_estimate` (and a loss that uses it, study/modes.py LOSS_ONLY) it is estimated
from the observation (noise/sigma.py: Chen et al., ICCV 2015, with a clipping
correction); otherwise it is the config's `sigma`. The degradation always adds `sigma`:
the benchmark needs its ground truth.
"""
from __future__ import annotations

from typing import Literal

import torch

from noise.sigma import estimate_sigma
from study.config import TrialConfig
from study.modes import config_uses

SigmaSource = Literal["estimated", "given"]


def estimates_sigma(cfg: TrialConfig) -> bool:
    """Whether networks of `cfg` estimate their sigma instead of taking `cfg.sigma`."""
    return cfg.task == "denoise" and cfg.sigma_estimate and config_uses("sigma_estimate", cfg.to_dict())


def used_sigma(cfg: TrialConfig, observation: torch.Tensor) -> tuple[float, SigmaSource]:
    """The sigma a network of `cfg` fitting `observation` (1, C, H, W) uses, and where it
    comes from: ("estimated" from the observation, one value over its channels) or
    ("given": `cfg.sigma`)."""
    if estimates_sigma(cfg):
        return estimate_sigma(observation.detach().float().cpu()), "estimated"
    return cfg.sigma, "given"
