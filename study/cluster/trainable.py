"""The trainable: what runs in a trial's Ray worker. It rebuilds the TrialConfig from
Ray's dict, trains it with study/engine/trial.py, sends every MLflow record through the
study's relay (relay.py), checkpoints through Tune and reports the metrics. A trial that
raises is not retried (`_fail`); one whose worker or node died is (tune.py)."""
from __future__ import annotations

import importlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Callable

import ray
import torch
from ray import tune

from study.cluster.context import ERROR_KEY, StudyContext
from study.cluster.placement import FALLBACK_KEY, placement_tags
from study.cluster.relay import RelaySender
from study.config import TrialConfig
from study.modes import trial_run_name
from study.engine import images as img
from study.engine import machine
from study.engine.sysmetrics import DEFAULT_EVERY, SystemSampler
from study.engine.trial import State, Trial, run_trial
from study.paths import JsonObject
from study.tracking.records import TrialLogger, run_create_info

CKPT_FILE = "trial.pt"
# --- the trainable ---

def _load_state() -> State | None:
    ckpt = tune.get_checkpoint()  # the newest left, where Tune named a rotated one (restore.py)
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        # weights_only: a checkpoint is tensors, numbers and strings; whoever can write the
        # storage must not be able to run code on the workers by unpickling.
        return torch.load(Path(d) / CKPT_FILE, map_location="cpu", weights_only=True)


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


def _checkpoint_due(cfg: TrialConfig, trial: Trial, every: int) -> bool:
    return trial.ended or (trial.iteration // cfg.report_every) % every == 0


def _save(trial: Trial, undelivered: list[JsonObject], samples: int, d: str) -> tune.Checkpoint:
    torch.save({**trial.state_dict(), "undelivered": undelivered, "sysmetrics_step": samples},
               Path(d) / CKPT_FILE)
    return tune.Checkpoint.from_directory(d)


def train(config: JsonObject, ctx: StudyContext) -> None:
    """A trial, in its worker (entry.dip_trainable calls it)."""
    cfg = TrialConfig.from_dict({**ctx.base, **config})
    torch.set_num_threads(ctx.threads)
    # One "Checkpoint successfully created" line per report drowns the progress table.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    tctx, sender = tune.get_context(), RelaySender(ctx.relay)
    # The run is named by the trial's name and what it tries (`trial_0003 ddpm_resample
    # t=120 lr=3.2e-03`), so the runs table and chart legends read without opening runs,
    # and the name the summary gives finds the run; Tune's name also goes in a tag.
    name = ctx.run_name or trial_run_name(cfg.to_dict(), list(config), tctx.get_trial_name())
    # Its params are what the space set: MLflow prints them all above every image card, and
    # a whole config there hides the images. The whole config goes in the dip.config tag.
    used = cfg.used_dict()
    searched = {k: v for k, v in used.items() if k in config}
    log = TrialLogger(sender, run_create_info(ctx.experiment_id, ctx.parent_run_id, ctx.study,
                                              tctx.get_trial_id(), name, searched, used, ctx.role))
    log.set_tags({"dip.trial_name": tctx.get_trial_name(), **dict(ctx.tags)})
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
    tags, fell_back = placement_tags(cfg.device, trial.device)
    log.set_tags({**tags, "dip.resumed_from": state["iteration"] if state else 0,
                  **machine.tags(trial.device)})  # what its numbers depend on, for export
    if state is None:
        log.log_dict(cfg.to_dict(), "config.json")
        log.log_metrics({**trial.observation_metrics(), **_share(trial), "iteration": 0}, 0)
        _log_images(log, trial, 0, final=False)
    # A retry's samples go on from the count its checkpoint saved, not from step 0 again.
    sampler = _sampler(trial, int(state.get("sysmetrics_step", 0)) if state else 0)
    log.set_tags(sampler.device_tags())
    log.log_system_metrics(sampler.drain())
    log.flush()

    def report(m: dict[str, float], t: Trial) -> None:
        last.update(m)
        hook("report", t)
        log.log_metrics(m, t.iteration)
        # Samples go to MLflow only, never into the dict Tune gets; one is taken at each
        # report and sent before tune.report, as a scheduler may end the trial inside it (Ray
        # 2.60 exits the thread there, or the actor goes before `finally` below runs).
        if not t.ended:
            sampler.mark()
        log.log_system_metrics(sampler.stop() if t.ended else sampler.drain())
        final = t.ended
        first = t.iteration <= cfg.report_every  # so even a trial stopped at once shows one
        if first or final or t.iteration % ctx.image_every < cfg.report_every:
            _log_images(log, t, t.iteration, final=final)
        if final:  # before tune.report: a scheduler may stop the trial at max_t right after it
            log.log_dict(t.result(m), "result.json")
            log.set_tags({"dip.completed": "true"})
        log.flush()
        undelivered = sender.settle()
        hook("reported", t)
        if final and t.iteration < cfg.iterations:  # stop = auto: ES-WMV ended it (EndRunsCallback)
            m = {**m, "autostop_ended": 1.0}
        if fell_back:  # for the driver's count (FitSummary.fell_back)
            m = {**m, FALLBACK_KEY: 1.0}
        if not _checkpoint_due(cfg, t, ctx.checkpoint_every):
            tune.report(m)
            return
        with tempfile.TemporaryDirectory() as d:
            tune.report(m, checkpoint=_save(t, undelivered, sampler.taken, d))

    try:
        run_trial(cfg, report, state=state, trial=trial)
    finally:  # a failed trial's last samples go out with its end record (_fail); a stopped one's now
        log.log_system_metrics(sampler.stop())
        log.flush()
    hook("end", trial)


def _sampler(trial: Trial, first: int = 0) -> SystemSampler:
    """System metrics every DIP_SYSMETRICS_EVERY seconds (default 5) in a daemon thread,
    their steps counted from `first`."""
    every = float(os.environ.get("DIP_SYSMETRICS_EVERY", DEFAULT_EVERY))
    return SystemSampler(trial.device, every, os.environ.get("CUDA_VISIBLE_DEVICES"), first).start()


def _share(trial: Trial) -> dict[str, float]:
    """What the trial holds (Ray's assignment) and trains: the report's cost per network."""
    held = ray.get_runtime_context().get_assigned_resources()
    return {"trial/gpus": held.get("GPU", 0.0), "trial/cpus": held.get("CPU", 0.0),
            "trial/networks": float(len(trial.networks))}


def _fail(log: TrialLogger, sender: RelaySender, ctx: StudyContext, last: dict[str, float],
          reason: str) -> None:
    """A trial that raises (a bug, a diverged loss) would fail again on any node: it is not
    retried. Its run records why; the result below makes `StopOnError` end the trial."""
    log.end("FAILED", reason)
    log.flush()
    sender.wait_all()
    nan = {m: math.nan for m in (ctx.objectives or (ctx.metric,))}
    tune.report({**nan, "iteration": last.get("iteration", 0.0), ERROR_KEY: reason})
