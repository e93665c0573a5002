"""Shared by the trial tests: run a trial straight through, keeping its checkpoint at one
iteration, as the study service does."""
from __future__ import annotations

import io
from typing import Any

import torch

from study.config import TrialConfig
from study.engine.trial import run_trial


def run_keeping_checkpoint(cfg: TrialConfig, at: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the result of a straight run, its state at iteration `at`, reloaded with
    weights_only=True as the service loads checkpoints)."""
    saved = io.BytesIO()

    def checkpoint(metrics: dict[str, float], trial: Any) -> None:
        if trial.iteration == at:
            torch.save(trial.state_dict(), saved)

    straight = run_trial(cfg, checkpoint)
    saved.seek(0)
    return straight, torch.load(saved, weights_only=True)
