"""The Tuner with OptunaSearch and an early-stopping scheduler, retries of trials whose
node died, and the callback that ends each trial's MLflow run: the driver's side. The
trainable (the worker's side) is trainable.py's, the cluster connection runtime.py's,
the relay that carries MLflow writes relay.py's."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import ray
from ray import tune
from ray.tune.experiment import Trial as TuneTrial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule, TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from study.cluster.placement import FALLBACK_KEY
from study.cluster.relay import send
from study.cluster.restore import resumable
from study.cluster.context import ERROR_KEY, StudyContext
from study.cluster.entry import dip_trainable
from study.config import StudyConfig
from study.paths import JsonObject, write_json
from study.results import FitSummary
from study.tracking.records import end_record, run_create_info, tags_record

if TYPE_CHECKING:
    from study.space import SearchSpace

# Default GPU share of a trial on a GPU cluster: two trials per GPU, so one trial's
# host-side work (evaluation, SSIM, images, checkpoints) overlaps the other's packed steps.
# Not more: issue 7 measured 4 processes on one H200 at 512 px slower in sum (55 it/s)
# than one (70), and a trial's repeats already pack several networks into one step.
DEFAULT_GPU_SHARE = 0.5


def gpus_per_trial(s: StudyConfig) -> float:
    """The study's request, or DEFAULT_GPU_SHARE when the cluster has GPUs; refuses what
    cannot run."""
    resources = ray.cluster_resources()
    cluster_gpus = resources.get("GPU", 0)
    g = s.gpus_per_trial if s.gpus_per_trial >= 0 else (DEFAULT_GPU_SHARE if cluster_gpus else 0.0)
    if g > 0 and cluster_gpus == 0:
        raise ValueError(f"gpus_per_trial = {g} but the Ray cluster has no GPU; allowed here: 0")
    cpus = resources.get("CPU", 0)
    if s.cpus_per_trial > cpus:
        raise ValueError(f"cpus_per_trial = {s.cpus_per_trial} but the Ray cluster has {cpus:g} CPUs")
    return g


class StopOnError(tune.Stopper):
    """Ends a trial that reported an error (see `_fail`) as a stopped trial, so Tune does not
    retry it as it retries a trial whose node or worker died."""

    def __call__(self, trial_id: str, result: dict[str, object]) -> bool:
        return bool(result.get(ERROR_KEY))

    def stop_all(self) -> bool:
        return False


class EndRunsCallback(tune.Callback):
    """Driver side: ends each trial's run as Tune ends the trial, tags retries, and keeps
    which trials started and which ended in a file, so the service knows exactly whether a study finished.
    Holds only plain data: it pickles into the experiment state and works after restore."""

    def __init__(self, study: str, iterations: int, scheduler: str, ended_file: str,
                 experiment_id: str, parent_run_id: str, role: str = "trial"):
        self.study, self.iterations, self.scheduler = study, iterations, scheduler
        self.ended_file = ended_file
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.retried_from: dict[str, list[int]] = {}
        self.role = role  # the runs it may create: the search's trials, or a confirmation's

    def _send(self, trial: TuneTrial, records: list[JsonObject]) -> None:
        """A trial that failed before its first record still gets its run (and the reason)."""
        create = run_create_info(self.experiment_id, self.parent_run_id, self.study, trial.trial_id,
                                 str(trial), trial.config, role=getattr(self, "role", "trial"))
        records = [{**r, "create": create} for r in records]
        try:
            send(self.study, records)
        except Exception as e:  # noqa: BLE001 - a callback that raises ends the whole study
            print(f"could not hand {len(records)} MLflow records to the relay: {e}", flush=True)

    def _mark(self, trial: TuneTrial, status: str) -> None:
        seen = read_trials(self.ended_file)
        seen[trial.trial_id] = status
        write_json(Path(self.ended_file), seen)

    def _ended(self, trial: TuneTrial, status: str, reason: str) -> None:
        self._send(trial, [end_record(status, reason, trial=trial.trial_id, if_open=True)])
        self._mark(trial, status)

    def on_trial_start(self, iteration: int, trials: list, trial: TuneTrial, **info: object) -> None:
        self._mark(trial, "RUNNING")

    def on_trial_recover(self, iteration: int, trials: list, trial: TuneTrial, **info: object) -> None:
        ckpt = trial.latest_checkpoint_result
        at = int(ckpt.metrics.get("iteration", 0)) if ckpt is not None else 0
        self.retried_from.setdefault(trial.trial_id, []).append(at)
        n = len(self.retried_from[trial.trial_id])
        print(f"trial {trial.trial_id} lost its worker ({_error_text(trial)}); retry {n} "
              f"from iteration {at}", flush=True)
        self._send(trial, [tags_record({"dip.retries": n, "dip.retried_from": ",".join(
            map(str, self.retried_from[trial.trial_id]))}, trial=trial.trial_id)])

    def on_trial_complete(self, iteration: int, trials: list, trial: TuneTrial, **info: object) -> None:
        error = trial.last_result.get(ERROR_KEY)
        if error:
            self._ended(trial, "FAILED", str(error))
            return
        it = int(trial.last_result.get("iteration", 0))
        if it >= self.iterations or trial.last_result.get("autostop_ended"):
            why = "completed" if it >= self.iterations else f"completed: ES-WMV stopped it at iteration {it}"
        else:
            why = f"stopped early by {self.scheduler} at iteration {it}"
        self._ended(trial, "FINISHED", why)

    def on_trial_error(self, iteration: int, trials: list, trial: TuneTrial, **info: object) -> None:
        n = len(self.retried_from.get(trial.trial_id, []))
        after = f" (after {n} retries)" if n else ""
        self._ended(trial, "FAILED", _error_text(trial) + after)


def read_trials(path: str) -> dict[str, str]:
    """Trial id -> RUNNING (started), FINISHED or FAILED (the driver saw it end), or LOST
    (started after the last state a killed driver saved; another trial took its place)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _error_text(trial: TuneTrial) -> str:
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
        return lines[-1] if lines else "the trial failed"
    except (OSError, TypeError):
        return "the trial failed (its worker died)"


def _scheduler(s: StudyConfig) -> TrialScheduler:
    if s.scheduler == "fifo":
        return FIFOScheduler()
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="iteration", grace_period=s.resolved_grace_period)
    return ASHAScheduler(time_attr="iteration", max_t=s.trial.iterations,
                         grace_period=min(s.resolved_grace_period, s.trial.iterations),
                         reduction_factor=s.reduction_factor)


def _trainable(s: StudyConfig, ctx: StudyContext, gpus: float) -> type:
    resources = {"cpu": s.cpus_per_trial, "gpu": gpus}
    return resumable(tune.with_resources(tune.with_parameters(dip_trainable, ctx=ctx), resources))


class ResumableOptunaSearch(OptunaSearch):
    """After a killed driver, Tune's saved state lags Optuna's storage (optuna.db is written
    at once): a trial the state calls running may be finished there already, and its
    replayed results are no news to Optuna, which refuses them."""

    def on_trial_result(self, trial_id: str, result: dict[str, object]) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except Exception as e:
            if type(e).__name__ != "UpdateFinishedTrialError":
                raise
            self._completed_trials.add(trial_id)  # its completion is recorded already


class TrialName:
    """Trials numbered through the whole study, `extend` going on from `first`: Tune's
    experiment tag starts with the trial's 1-based count in this experiment."""

    def __init__(self, first: int = 0):
        self.first = first

    def __call__(self, trial: TuneTrial) -> str:
        count = str(trial.experiment_tag).split("_", 1)[0]
        return f"trial_{self.first + int(count) - 1:04d}" if count.isdigit() else str(trial.trial_id)


def make_searcher(s: StudyConfig, space: SearchSpace) -> Searcher:
    """OptunaSearch on the study's Optuna record (`extend` conditions on every earlier
    trial), opening with one trial per input mode the record has not tried yet (Optuna's
    enqueue_trial with the mode alone: the sampler fills the rest). `resume` does not come
    here: Tune unpickles its searcher, and trials queued but not yet asked wait in the record."""
    from study.space import OPTUNA_DB, make_sampler, make_storage, tried_modes

    points = space.mode_points(s.num_samples, tried_modes(s.study_dir, s.name))
    # Several objectives: lists, and Optuna's study gets one direction per objective.
    metric, mode = (s.metric, s.mode) if not s.multi_objective else map(list, zip(*s.objective_list))
    search = ResumableOptunaSearch(space=space, metric=metric, mode=mode, sampler=make_sampler(s.seed),
                                   storage=make_storage(s.study_dir / OPTUNA_DB), study_name=s.name,
                                   points_to_evaluate=points or None)
    return ConcurrencyLimiter(search, max_concurrent=s.max_concurrent) if s.max_concurrent else search


def build_tuner(s: StudyConfig, space: SearchSpace, ctx: StudyContext, gpus: float,
                first_trial: int = 0) -> tune.Tuner:
    """`gpus`: per trial, as `gpus_per_trial` resolved it; `first_trial`: the number of the
    first trial (earlier ones belong to the study `extend` adds to)."""
    search = make_searcher(s, space)
    return tune.Tuner(
        _trainable(s, ctx, gpus),
        # With several objectives Tune's own metric is the first (its progress table and
        # result grid take one); the searcher has them all, and the scheduler is fifo.
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search,
                                    scheduler=_scheduler(s), num_samples=s.num_samples,
                                    trial_name_creator=TrialName(first_trial),
                                    # One worker process runs trial after trial: a fresh
                                    # process per trial (imports, runtime env) cost seconds.
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name="tune", storage_path=s.resolved_storage,
            callbacks=[EndRunsCallback(s.name, s.trial.iterations, s.scheduler, str(s.ended_file),
                                       ctx.experiment_id, ctx.parent_run_id), *result_loggers()],
            stop=StopOnError(),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            # A trial whose worker or node dies goes on from its last checkpoint on a live node.
            failure_config=tune.FailureConfig(max_failures=s.max_failures),
            verbose=1,  # the status table with the metric; per-result dumps are in MLflow
        ),
    )


def experiment_path(s: StudyConfig) -> str:
    return f"{s.resolved_storage.rstrip('/')}/tune"


def can_restore(s: StudyConfig) -> bool:
    return tune.Tuner.can_restore(experiment_path(s))


def result_loggers() -> list[tune.Callback]:
    """Tune's own result files (result.json, progress.csv) in every trial's folder, without its
    default third, TensorBoard's: MLflow is the study's logger, and tensorboardX imports torch
    into the driver while the first trials start (1.3 s of CPU on 2 cores,
    bench/study_overhead.py). Tune adds its defaults unless TUNE_DISABLE_AUTO_CALLBACK_LOGGERS
    is 1 (runtime.connect sets it; a user's 0 brings TensorBoard back)."""
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    return [CSVLoggerCallback(), JsonLoggerCallback()]


def restore_tuner(s: StudyConfig, ctx: StudyContext) -> tune.Tuner:
    """Finished trials stay finished, unfinished ones continue from their last checkpoint;
    the searcher (Optuna's history) and the sample count come back from the saved state."""
    return tune.Tuner.restore(experiment_path(s), trainable=_trainable(s, ctx, gpus_per_trial(s)),
                              resume_unfinished=True, resume_errored=False)


def _no_restore_hint(record: logging.LogRecord) -> bool:
    """Drops Tune's "Resume experiment with: Tuner.restore(...)" after Ctrl-C (ray/tune/tune.py):
    the service prints the project's own resume command, the one that works."""
    return "Tuner.restore(" not in record.getMessage()


def fit(tuner: tune.Tuner, s: StudyConfig) -> FitSummary:
    """Run the study. On SIGINT Tune returns normally and marks the trials it interrupted
    TERMINATED, like finished ones, so a trial counts as ended only when the callback saw
    it end (`read_trials`): the study is complete when every asked-for trial did."""
    tune_log = logging.getLogger("ray.tune.tune")
    if _no_restore_hint not in tune_log.filters:
        tune_log.addFilter(_no_restore_hint)
    return fit_trials(tuner, s.ended_file, s.num_samples)


def fit_trials(tuner: tune.Tuner, ended_file: Path, asked: int) -> FitSummary:
    """`fit` for any Tuner whose EndRunsCallback keeps `ended_file` (the confirmation's too)."""
    grid = tuner.fit()
    seen = read_trials(str(ended_file))
    # Trials the driver saw start but Tune no longer knows: a killed driver's saved state
    # predates them, so `resume` ran other trials in their place. Their runs are closed.
    known = {t.trial_id for t in grid._experiment_analysis.trials}
    lost = [t for t, v in seen.items() if v == "RUNNING" and t not in known]
    if lost:
        seen.update({t: "LOST" for t in lost})
        write_json(ended_file, seen)
    fell_back = sum(bool((t.last_result or {}).get(FALLBACK_KEY)) for t in grid._experiment_analysis.trials)
    return FitSummary(asked=asked, started=len(grid),
                      finished=sum(v == "FINISHED" for v in seen.values()),
                      failed=sum(v == "FAILED" for v in seen.values()),
                      experiment_path=grid.experiment_path,
                      unended=tuple(t for t, v in seen.items() if v == "RUNNING"),
                      lost=tuple(lost), fell_back=fell_back)


def cluster_tags(gpus: float) -> dict[str, str]:
    """The cluster's GPUs and CPUs now and each trial's GPU share, for `status`'s GPU line."""
    resources = ray.cluster_resources()
    return {"dip.cluster_gpus": f"{resources.get('GPU', 0):g}", "dip.cluster_cpus": f"{resources.get('CPU', 0):g}",
            "dip.gpus_per_trial": f"{gpus:g}"}


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def shutdown() -> None:
    ray.shutdown()
