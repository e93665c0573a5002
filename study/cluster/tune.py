"""The trainable, the Tuner with OptunaSearch and an early-stopping scheduler, retries of
trials whose node died, and the callback that ends each trial's MLflow run. The cluster
connection is runtime.py's, the relay that carries MLflow writes relay.py's."""
from __future__ import annotations

import importlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from study.engine import images as img
from study.config import StudyConfig, TrialConfig, trial_run_name
from study.results import FitSummary
from study.cluster.relay import RelaySender, send
from study.paths import write_json
from study.tracking.records import TrialLogger, end_record, run_create_info, tags_record
from study.engine.trial import Trial, run_trial

if TYPE_CHECKING:
    from study.space import SearchSpace

CKPT_FILE = "trial.pt"
ERROR_KEY = "dip_error"  # in a trial's last result: why it failed (it is not retried)
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
    experiment_id: str
    parent_run_id: str
    relay: str                   # name of the study's Relay actor (MLflow writes go through it)
    metric: str                  # the study's objective (a failed trial reports it as NaN)
    image_every: int
    checkpoint_every: int        # reports between checkpoints (resolved, >= 1)
    threads: int


# --- the trainable ---

def _load_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    ckpt = _newest_checkpoint(ckpt)
    with ckpt.as_directory() as d:
        # weights_only: a checkpoint is tensors, numbers and strings; whoever can write the
        # storage must not be able to run code on the workers by unpickling.
        return torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)


def _newest_checkpoint(ckpt: tune.Checkpoint) -> tune.Checkpoint:
    """After a killed driver, Tune's saved experiment state lags the trials: the checkpoint
    it names may have been rotated away (num_to_keep) for newer ones. Then take the newest
    checkpoint of the trial still in the storage: it is later, never earlier."""
    import pyarrow.fs as pafs

    fs = ckpt.filesystem
    if fs.get_file_info(ckpt.path).type != pafs.FileType.NotFound:
        return ckpt
    parent = ckpt.path.rstrip("/").rsplit("/", 1)[0]
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(parent))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_"))
    if not found:
        raise FileNotFoundError(f"no checkpoint left under {parent}")
    return tune.Checkpoint(found[-1], filesystem=fs)


def _log_images(log: TrialLogger, trial: Trial, step: int, final: bool) -> None:
    for name, image, at in trial.report_images(setup=step == 0, final=final):
        log.log_image(name, img.to_hwc(image), at)


def _test_hook() -> Callable[[str, Trial], None]:
    """Faults for the study tests, injected from the test side: DIP_TEST_HOOK=module:function
    is called at each report ("report"; "reported" once its records are with the relay) and
    when training ends ("end"). Unset in use."""
    spec = os.environ.get("DIP_TEST_HOOK", "")
    if not spec:
        return lambda event, trial: None
    module, _, fn = spec.partition(":")
    return getattr(importlib.import_module(module), fn)


def _checkpoint_due(cfg: TrialConfig, iteration: int, every: int) -> bool:
    return iteration >= cfg.iterations or (iteration // cfg.report_every) % every == 0


def _save(trial: Trial, undelivered: list[dict[str, Any]], d: str) -> tune.Checkpoint:
    torch.save({**trial.state_dict(), "undelivered": undelivered}, Path(d) / CKPT_FILE)
    return tune.Checkpoint.from_directory(d)


def dip_trainable(config: dict[str, Any], ctx: StudyContext) -> None:
    cfg = TrialConfig.from_dict({**ctx.base, **config})
    torch.set_num_threads(ctx.threads)
    # One "Checkpoint successfully created" line per report drowns the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    tctx, sender = tune.get_context(), RelaySender(ctx.relay)
    # The run is named for what the trial tries (`ddpm_resample t=120 lr=3.2e-03`), so the
    # runs table and chart legends read without opening runs; Tune's name goes in a tag.
    name = trial_run_name(cfg, list(config))
    log = TrialLogger(sender, run_create_info(ctx.experiment_id, ctx.parent_run_id, ctx.study,
                                              tctx.get_trial_id(), name, cfg.used_dict()))
    log.set_tags({"dip.trial_name": tctx.get_trial_name()})
    last: dict[str, float] = {}
    try:
        _train(cfg, ctx, log, sender, last)
    except Exception as e:
        _fail(log, sender, ctx, last, f"{type(e).__name__}: {e}")
        raise
    sender.wait_all()


def _train(cfg: TrialConfig, ctx: StudyContext, log: TrialLogger, sender: RelaySender,
           last: dict[str, float]) -> None:
    hook, trial, state = _test_hook(), Trial(cfg), _load_state()
    if state is not None and state.get("undelivered"):
        sender(state.pop("undelivered"))  # what the lost attempt had not handed over
    log.set_tags({"dip.node_id": ray.get_runtime_context().get_node_id(),
                  "dip.device": str(trial.device), "dip.resumed_from": state["iteration"] if state else 0})
    if state is None:
        log.log_dict(cfg.to_dict(), "config.json")
        log.log_metrics({**trial.observation_metrics(), "iteration": 0}, 0)
        _log_images(log, trial, 0, final=False)
    log.flush()

    def report(m: dict[str, float], t: Trial) -> None:
        last.update(m)
        hook("report", t)
        log.log_metrics(m, t.iteration)
        final = t.iteration == cfg.iterations
        first = t.iteration <= cfg.report_every  # so even a trial stopped at once shows one
        if first or final or t.iteration % ctx.image_every < cfg.report_every:
            _log_images(log, t, t.iteration, final=final)
        if final:  # before tune.report: a scheduler may stop the trial at max_t right after it
            log.log_dict(t.result(m), "result.json")
            log.set_tags({"dip.completed": "true"})
        log.flush()
        undelivered = sender.settle()
        hook("reported", t)
        if not _checkpoint_due(cfg, t.iteration, ctx.checkpoint_every):
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            tune.report(m, checkpoint=_save(t, undelivered, d))

    run_trial(cfg, report, state=state, trial=trial)
    hook("end", trial)


def _fail(log: TrialLogger, sender: RelaySender, ctx: StudyContext, last: dict[str, float],
          reason: str) -> None:
    """A trial that raises (a bug, a diverged loss) would fail again on any node: it is not
    retried. Its run records why; the result below makes `StopOnError` end the trial."""
    log.end("FAILED", reason)
    log.flush()
    sender.wait_all()
    tune.report({ctx.metric: math.nan, "iteration": last.get("iteration", 0.0), ERROR_KEY: reason})


class StopOnError(tune.Stopper):
    """Ends a trial that reported an error (see `_fail`) as a stopped trial, so Tune does not
    retry it as it retries a trial whose node or worker died."""

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return bool(result.get(ERROR_KEY))

    def stop_all(self) -> bool:
        return False


class EndRunsCallback(tune.Callback):
    """Driver side: ends each trial's run as Tune ends the trial, tags retries, and keeps
    which trials started and which ended in a file, so the service knows exactly whether a study finished.
    Holds only plain data: it pickles into the experiment state and works after restore."""

    def __init__(self, study: str, iterations: int, scheduler: str, ended_file: str,
                 experiment_id: str, parent_run_id: str):
        self.study, self.iterations, self.scheduler = study, iterations, scheduler
        self.ended_file = ended_file
        self.experiment_id, self.parent_run_id = experiment_id, parent_run_id
        self.retried_from: dict[str, list[int]] = {}

    def _send(self, trial: Any, records: list[dict[str, Any]]) -> None:
        """A trial that failed before its first record still gets its run (and the reason)."""
        create = run_create_info(self.experiment_id, self.parent_run_id, self.study, trial.trial_id,
                                 str(trial), trial.config)
        records = [{**r, "create": create} for r in records]
        try:
            send(self.study, records)
        except Exception as e:  # noqa: BLE001 - a callback that raises ends the whole study
            print(f"could not hand {len(records)} MLflow records to the relay: {e}", flush=True)

    def _mark(self, trial: Any, status: str) -> None:
        seen = read_trials(self.ended_file)
        seen[trial.trial_id] = status
        write_json(Path(self.ended_file), seen)

    def _ended(self, trial: Any, status: str, reason: str) -> None:
        self._send(trial, [end_record(status, reason, trial=trial.trial_id, if_open=True)])
        self._mark(trial, status)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._mark(trial, "RUNNING")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        ckpt = trial.latest_checkpoint_result
        at = int(ckpt.metrics.get("iteration", 0)) if ckpt is not None else 0
        self.retried_from.setdefault(trial.trial_id, []).append(at)
        n = len(self.retried_from[trial.trial_id])
        print(f"trial {trial.trial_id} lost its worker ({_error_text(trial)}); retry {n} "
              f"from iteration {at}", flush=True)
        self._send(trial, [tags_record({"dip.retries": n, "dip.retried_from": ",".join(
            map(str, self.retried_from[trial.trial_id]))}, trial=trial.trial_id)])

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        error = trial.last_result.get(ERROR_KEY)
        if error:
            self._ended(trial, "FAILED", str(error))
            return
        it = int(trial.last_result.get("iteration", 0))
        self._ended(trial, "FINISHED", "completed" if it >= self.iterations
                    else f"stopped early by {self.scheduler} at iteration {it}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
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


class ResumableOptunaSearch(OptunaSearch):
    """After a killed driver, Tune's saved state lags Optuna's storage (optuna.db is written
    at once): a trial the state calls running may be finished there already, and its
    replayed results are no news to Optuna, which refuses them."""

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
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

    def __call__(self, trial: Any) -> str:
        count = str(trial.experiment_tag).split("_", 1)[0]
        return f"trial_{self.first + int(count) - 1:04d}" if count.isdigit() else str(trial.trial_id)


def build_tuner(s: StudyConfig, space: SearchSpace, ctx: StudyContext, gpus: float,
                first_trial: int = 0) -> tune.Tuner:
    """`gpus`: per trial, as `gpus_per_trial` resolved it; `first_trial`: the number of the
    first trial (earlier ones belong to the study `extend` adds to)."""
    from study.space import OPTUNA_DB, make_sampler, make_storage

    search = ResumableOptunaSearch(space=space, metric=s.metric, mode=s.mode, sampler=make_sampler(s.seed),
                          storage=make_storage(s.study_dir / OPTUNA_DB), study_name=s.name)
    if s.max_concurrent:
        search = ConcurrencyLimiter(search, max_concurrent=s.max_concurrent)
    return tune.Tuner(
        _trainable(s, ctx, gpus),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, search_alg=search,
                                    scheduler=_scheduler(s), num_samples=s.num_samples,
                                    trial_name_creator=TrialName(first_trial),
                                    # One worker process runs trial after trial: a fresh
                                    # process per trial (imports, runtime env) cost seconds.
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name="tune", storage_path=s.resolved_storage,
            callbacks=[EndRunsCallback(s.name, s.trial.iterations, s.scheduler, str(s.ended_file),
                                       ctx.experiment_id, ctx.parent_run_id)],
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


def restore_tuner(s: StudyConfig, ctx: StudyContext) -> tune.Tuner:
    """Finished trials stay finished, unfinished ones continue from their last checkpoint;
    the searcher (Optuna's history) and the sample count come back from the saved state."""
    return tune.Tuner.restore(experiment_path(s), trainable=_trainable(s, ctx, gpus_per_trial(s)),
                              resume_unfinished=True, resume_errored=False)


def fit(tuner: tune.Tuner, s: StudyConfig) -> FitSummary:
    """Run the study. On SIGINT Tune returns normally and marks the trials it interrupted
    TERMINATED, like finished ones, so a trial counts as ended only when the callback saw
    it end (`read_trials`): the study is complete when every asked-for trial did."""
    grid = tuner.fit()
    seen = read_trials(str(s.ended_file))
    # Trials the driver saw start but Tune no longer knows: a killed driver's saved state
    # predates them, so `resume` ran other trials in their place. Their runs are closed.
    known = {t.trial_id for t in grid._experiment_analysis.trials}
    lost = [t for t, v in seen.items() if v == "RUNNING" and t not in known]
    if lost:
        seen.update({t: "LOST" for t in lost})
        write_json(s.ended_file, seen)
    return FitSummary(asked=s.num_samples, started=len(grid),
                      finished=sum(v == "FINISHED" for v in seen.values()),
                      failed=sum(v == "FAILED" for v in seen.values()),
                      experiment_path=grid.experiment_path,
                      unended=tuple(t for t, v in seen.items() if v == "RUNNING"),
                      lost=tuple(lost))


def alive_nodes() -> int:
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def shutdown() -> None:
    ray.shutdown()
