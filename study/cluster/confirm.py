"""The confirmation's Ray part (study/confirm.py tells the story): one Tune trial per
variant, each the search's trainable (trainable.py) on the variant's own configuration
(its repeats are the fresh seeds, so its networks pack), ended and recorded by the same
callback as the search's trials, restorable after Ctrl-C like a study."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ray import tune
from ray.tune.experiment import Trial as TuneTrial

from study.cluster.context import StudyContext
from study.cluster.entry import dip_trainable
from study.cluster.restore import resumable
from study.cluster.tune import EndRunsCallback, StopOnError, fit_trials, result_loggers
from study.config import StudyConfig
from study.paths import JsonObject
from study.results import FitSummary

VARIANT_KEY = "variant"  # the one key Tune varies: the index of the variant a trial re-runs


def confirm_trainable(config: JsonObject, contexts: tuple[StudyContext, ...],
                      params: tuple[JsonObject, ...]) -> None:
    """Variant `config["variant"]`: its whole configuration is its context's base; `params`
    are what its MLflow run shows as parameters."""
    i = int(config[VARIANT_KEY])
    dip_trainable(dict(params[i]), contexts[i])


class ConfirmName:
    """confirm_NNNN: the variant's index (plain data, it pickles into Tune's state)."""

    def __call__(self, trial: TuneTrial) -> str:
        return f"confirm_{int(trial.config[VARIANT_KEY]):04d}"


def _trainable(s: StudyConfig, contexts: tuple[StudyContext, ...], params: tuple[JsonObject, ...],
               gpus: float) -> type:
    resources = {"cpu": s.cpus_per_trial, "gpu": gpus}
    return resumable(tune.with_resources(tune.with_parameters(confirm_trainable, contexts=contexts,
                                                              params=params), resources))


def experiment_path(s: StudyConfig, name: str) -> str:
    return f"{s.resolved_storage.rstrip('/')}/{name}"


def build_tuner(s: StudyConfig, name: str, contexts: tuple[StudyContext, ...],
                params: tuple[JsonObject, ...], gpus: float, ended_file: Path,
                iterations: int) -> tune.Tuner:
    """A Tune experiment `name` in the study's storage: one trial per variant, in order;
    `iterations`: the smallest budget among them (the callback's "completed" threshold)."""
    ctx = contexts[0]
    return tune.Tuner(
        _trainable(s, contexts, params, gpus),
        param_space={VARIANT_KEY: tune.grid_search(list(range(len(contexts))))},
        tune_config=tune.TuneConfig(num_samples=1, trial_name_creator=ConfirmName(), reuse_actors=True,
                                    max_concurrent_trials=s.max_concurrent or None),
        run_config=tune.RunConfig(
            name=name, storage_path=s.resolved_storage,
            callbacks=[EndRunsCallback(s.name, iterations, "fifo", str(ended_file), ctx.experiment_id,
                                       ctx.parent_run_id, role="confirm"), *result_loggers()],
            stop=StopOnError(), checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=s.max_failures), verbose=1))


def can_restore(s: StudyConfig, name: str) -> bool:
    return tune.Tuner.can_restore(experiment_path(s, name))


def restore_tuner(s: StudyConfig, name: str, contexts: tuple[StudyContext, ...],
                  params: tuple[JsonObject, ...], gpus: float) -> tune.Tuner:
    """Finished re-runs stay finished; interrupted ones go on from their last checkpoint."""
    return tune.Tuner.restore(experiment_path(s, name), trainable=_trainable(s, contexts, params, gpus),
                              resume_unfinished=True, resume_errored=False)


def fit(tuner: tune.Tuner, ended_file: Path, asked: int) -> FitSummary:
    return fit_trials(tuner, ended_file, asked)
