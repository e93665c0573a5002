"""What a study yields, as frozen records that cross rooms: how its trials ended
(FitSummary) and its best trial (BestTrial)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from study.paths import JsonObject


@dataclass(frozen=True)
class FitSummary:
    """How a study's trials ended, as the driver saw it (written to the parent run)."""

    asked: int                # trials the study asks for
    started: int              # trials Tune created
    finished: int             # ended FINISHED: completed, or stopped early by the scheduler
    failed: int               # ended FAILED: an error, or retries spent
    experiment_path: str      # Ray Tune's experiment folder or URI
    unended: tuple[str, ...] = ()  # ids of started trials that did not end (interrupted)
    lost: tuple[str, ...] = ()     # ids of trials a killed driver's saved state never knew
    fell_back: int = 0             # trials with a GPU assigned that found no CUDA and ran on the CPU

    @property
    def ended(self) -> int:
        return self.finished + self.failed

    @property
    def complete(self) -> bool:
        return self.ended >= self.asked

    def to_dict(self) -> JsonObject:
        return {**dataclasses.asdict(self), "unended": list(self.unended), "lost": list(self.lost),
                "ended": self.ended,
                "complete": self.complete}



@dataclass(frozen=True)
class BestTrial:
    """A study's best trial as exported (best.json) and recorded on the parent run; its
    `config` is what `train --config` and `apply --config` replay."""

    study: str                   # the study's name
    metric: str                  # the study's objective
    mode: str                    # max or min
    value: float                 # the objective's value at the trial's last report
    trial_id: str                # Ray Tune's trial id (MLflow tag dip.trial_id)
    mlflow_run_id: str           # the trial's child run
    completed: bool              # ran all its iterations (else stopped early: a fallback)
    tracking_uri: str            # where the run is
    metrics: dict[str, float]    # every metric of the trial's last report
    config: JsonObject           # the trial's complete TrialConfig (to_dict)
    exported_at: str             # local time of the export
    # Several objectives only (a study of one keeps the fields above alone):
    objectives: tuple[JsonObject, ...] = ()  # {metric, mode, value} per objective, the first `metric`
    front_size: int = 0          # trials on the Pareto front (study/pareto.py)
    picked: str = ""             # which member of the front and why
    # Where the trial ran (study/engine/machine.py): torch, device, cpu_isa, cpu, gpu, threads.
    machine: dict[str, str] = dataclasses.field(default_factory=dict)
    trial: str = ""              # the trial's name, trial_NNNN: the first word of its MLflow run's name
    # `export --from confirm` only: {stage, pairs, seeds, images, ci95, search_run, search_value}
    confirmation: JsonObject | None = None

    def to_dict(self) -> JsonObject:
        d = dataclasses.asdict(self)
        if self.confirmation is None:
            d.pop("confirmation")
        if not self.objectives:
            for k in ("objectives", "front_size", "picked"):
                d.pop(k)
        else:
            d["objectives"] = list(self.objectives)
        if not self.machine:  # a trial from before the record
            d.pop("machine")
        return d
