"""Everything Ray: the cluster connection, the trainable, the Tuner with OptunaSearch and an
early-stopping scheduler, and the callback that ends each trial's MLflow run."""
from __future__ import annotations

import logging
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study import images as img
from study.config import StudyConfig, TrialConfig
from study.jobs import job_working_dir
from study.space import OPTUNA_DB, SearchSpace, make_sampler, make_storage
from study.tracking import StudyTracker, TrialLogger
from study.trial import Trial, run_trial

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CKPT_FILE = "trial.pt"
# Shipped to every worker as the job's working_dir (so a real cluster runs this code).
RUNTIME_EXCLUDES = ["studies", "runs", "bench/results", "**/__pycache__",
                    ".pytest_cache", ".whl", "*.db"]


def _check_address(address: str) -> None:
    if address in ("", "auto") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not HOST:PORT, 'auto' or ray://HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ValueError(f"cannot reach the Ray cluster at {address!r}: {e.strerror or e}") from None


def connect(address: str) -> None:
    """Join the cluster at `address`, or start a local Ray ('' : this machine only)."""
    _check_address(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no network from here
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": RUNTIME_EXCLUDES}
    if job_working_dir():  # a Ray job's driver: the job ships the code; Ray refuses a second working_dir
        runtime_env = None
    try:
        ray.init(address=address or None, runtime_env=runtime_env, include_dashboard=False,
                 logging_level="WARNING", ignore_reinit_error=True)
    except ConnectionError as e:
        raise ValueError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None


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


@dataclass(frozen=True)
class StudyContext:
    """What every trial needs besides its sampled parameters (passed with with_parameters:
    OptunaSearch with a define-by-run space refuses a non-empty param_space)."""

    study: str
    base: dict[str, Any]         # TrialConfig.to_dict() of the study's base config
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    image_every: int
    threads: int


def _load_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=False)


def _log_images(log: TrialLogger, trial: Trial, step: int, final: bool) -> None:
    for name, image, at in trial.report_images(setup=step == 0, final=final):
        log.log_image(name, img.to_hwc(image), at)


def dip_trainable(config: dict[str, Any], ctx: StudyContext) -> None:
    cfg = TrialConfig.from_dict({**ctx.base, **config})
    torch.set_num_threads(ctx.threads)
    # One "Checkpoint successfully created" line per report drowns the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    tctx = tune.get_context()
    log = TrialLogger(ctx.tracking_uri, ctx.experiment_id, ctx.parent_run_id, ctx.study,
                      tctx.get_trial_id(), tctx.get_trial_name(), cfg.to_dict())
    trial, state = Trial(cfg), _load_state()
    log.set_tags({"dip.node_id": ray.get_runtime_context().get_node_id(),
                  "dip.device": str(trial.device), "dip.resumed_from": state["iteration"] if state else 0})
    if state is None:
        log.log_dict(cfg.to_dict(), "config.json")
        log.log_metrics(trial.observation_metrics(), 0)
        _log_images(log, trial, 0, final=False)

    def report(m: dict[str, float], t: Trial) -> None:
        log.log_metrics(m, t.iteration)
        last = t.iteration == cfg.iterations
        first = t.iteration <= cfg.report_every  # so even a trial stopped at once shows one
        if first or last or t.iteration % ctx.image_every < cfg.report_every:
            _log_images(log, t, t.iteration, final=last)
        if last:  # before tune.report: a scheduler may stop the trial at max_t right after it
            log.log_dict(t.result(m), "result.json")
            log.set_tags({"dip.completed": "true"})
        with tempfile.TemporaryDirectory() as d:
            torch.save(t.state_dict(), Path(d) / CKPT_FILE)
            tune.report(m, checkpoint=tune.Checkpoint.from_directory(d))

    try:
        run_trial(cfg, report, state=state, trial=trial)
    except Exception as e:  # the run records why; Tune marks the trial ERROR and goes on
        log.end("FAILED", f"{type(e).__name__}: {e}")
        raise
    log.end("FINISHED", "completed")


class EndRunsCallback(tune.Callback):
    """Driver side: ends each trial's run as Tune ends the trial. Holds only strings, so it
    pickles into the experiment state and works again after Tuner.restore."""

    def __init__(self, tracking_uri: str, experiment: str, iterations: int, scheduler: str):
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.iterations, self.scheduler = iterations, scheduler
        self._tracker: StudyTracker | None = None

    def _t(self) -> StudyTracker:
        if self._tracker is None:
            self._tracker = StudyTracker(self.tracking_uri, self.experiment)
        return self._tracker

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tracker": None}

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        it = int(trial.last_result.get("iteration", 0))
        reason = ("completed" if it >= self.iterations
                  else f"stopped early by {self.scheduler} at iteration {it}")
        self._t().end_trial(trial.trial_id, "FINISHED", reason)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._t().end_trial(trial.trial_id, "FAILED", _error_text(trial))


def _error_text(trial: Any) -> str:
    try:
        lines = Path(trial.error_file).read_text().strip().splitlines()
        return lines[-1] if lines else "the trial failed"
    except (OSError, TypeError):
        return "the trial failed (its worker died)"


def _scheduler(s: StudyConfig) -> Any:
    if s.scheduler == "fifo":
        return FIFOScheduler()
    if s.scheduler == "median":
        return MedianStoppingRule(time_attr="iteration", grace_period=s.resolved_grace_period)
    return ASHAScheduler(time_attr="iteration", max_t=s.trial.iterations,
                         grace_period=min(s.resolved_grace_period, s.trial.iterations),
                         reduction_factor=s.reduction_factor)


def _trainable(s: StudyConfig, ctx: StudyContext, gpus: float) -> Any:
    resources = {"cpu": s.cpus_per_trial, "gpu": gpus}
    return tune.with_resources(tune.with_parameters(dip_trainable, ctx=ctx), resources)


class TrialName:
    """Trials numbered through the whole study, `extend` going on from `first`: Tune's
    experiment tag starts with the trial's 1-based count in this experiment."""

    def __init__(self, first: int = 0):
        self.first = first

    def __call__(self, trial: Any) -> str:
        count = str(trial.experiment_tag).split("_", 1)[0]
        return f"trial_{self.first + int(count) - 1:04d}" if count.isdigit() else str(trial.trial_id)


def build_tuner(s: StudyConfig, space: SearchSpace, ctx: StudyContext, gpus: float,
                first_trial: int = 0) -> tune.Tuner:
    """`gpus`: per trial, as `gpus_per_trial` resolved it; `first_trial`: the number of the
    first trial (earlier ones belong to the study `extend` adds to)."""
    search = OptunaSearch(space=space, metric=s.metric, mode=s.mode, sampler=make_sampler(s.seed),
                          storage=make_storage(s.study_dir / OPTUNA_DB), study_name=s.name)
    if s.max_concurrent:
        search = ConcurrencyLimiter(search, max_concurrent=s.max_concurrent)
    return tune.Tuner(
        _trainable(s, ctx, gpus),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search,
                                    scheduler=_scheduler(s), num_samples=s.num_samples,
                                    trial_name_creator=TrialName(first_trial)),
        run_config=tune.RunConfig(
            name="tune", storage_path=s.resolved_storage,
            callbacks=[EndRunsCallback(ctx.tracking_uri, s.name, s.trial.iterations, s.scheduler)],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,  # the status table with the metric; per-result dumps are in MLflow
        ),
    )


def experiment_path(s: StudyConfig) -> str:
    return f"{s.resolved_storage.rstrip('/')}/tune"


def can_restore(s: StudyConfig) -> bool:
    return tune.Tuner.can_restore(experiment_path(s))


def restore_tuner(s: StudyConfig, ctx: StudyContext) -> tune.Tuner:
    """Finished trials stay finished, unfinished ones continue from their last checkpoint;
    the searcher (Optuna's history) and the sample count come back from the saved state."""
    return tune.Tuner.restore(experiment_path(s), trainable=_trainable(s, ctx, gpus_per_trial(s)),
                              resume_unfinished=True, resume_errored=False)


def fit(tuner: tune.Tuner) -> dict[str, Any]:
    """Run the study; returns a summary. On SIGINT Tune returns normally with partial
    results: `complete` says whether every asked-for trial ended."""
    grid = tuner.fit()
    ended = grid.num_terminated + grid.num_errors
    return {"trials": len(grid), "terminated": grid.num_terminated, "errors": grid.num_errors,
            "ended": ended, "experiment_path": grid.experiment_path}


def shutdown() -> None:
    ray.shutdown()
