"""What every trial is handed (`StudyContext`) and what a failed one reports (`ERROR_KEY`):
light, for the driver, the trainable and its entry alike."""
from __future__ import annotations

from dataclasses import dataclass

from study.paths import JsonObject

ERROR_KEY = "dip_error"  # in a trial's last result: why it failed (it is not retried)
@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its sampled parameters (passed with with_parameters:
    OptunaSearch with a define-by-run space refuses a non-empty param_space)."""

    study: str
    base: JsonObject             # TrialConfig.to_dict() of the study's base config
    experiment_id: str
    parent_run_id: str
    relay: str                   # name of the study's Relay actor (MLflow writes go through it)
    metric: str                  # the study's objective (a failed trial reports it as NaN)
    image_every: int
    checkpoint_every: int        # reports between checkpoints (resolved, >= 1)
    threads: int
    objectives: tuple[str, ...] = ()  # every objective's metric (a failed trial reports each as NaN)
    role: str = "trial"          # "trial": the search's; "confirm": a re-run (study/confirm.py)
    run_name: str = ""           # the run's name ('' : what the trial tries, trial_run_name)
    tags: tuple[tuple[str, str], ...] = ()  # more tags for the run (a re-run names what it re-runs)
