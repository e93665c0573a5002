"""The study service: run, resume, extend and export a study. Orchestrates study/cluster/ (Ray)
and study/tracking/ (MLflow) without importing either library itself.

What a study keeps on disk is described in study/studydir.py, its one owner.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from study import export
from study import studydir, warmstart
from study.config import StudyConfig
from study.modes import config_uses
from study.results import BestTrial, FitSummary
from study.studydir import StudyRecord, StudyStage, read_study
from study.engine.imagefiles import preflight
from study.paths import check_writable, command, resume_hint

if TYPE_CHECKING:  # for the type checker only: these import Ray, MLflow and Optuna
    from study.cluster.context import StudyContext
    from study.cluster.tune import tune  # tune: Ray's, as the Ray room imports it
    from study.space import SearchSpace
    from study.tracking.store import StudyTracker


def _tracking():  # noqa: ANN202 - imported lazily: mlflow is slow to import
    from study.tracking import store as tracking

    return tracking


def preflight_study(s: StudyConfig) -> SearchSpace:
    """Everything that can be refused is refused here, before anything is written."""
    from study.space import load_space

    check_writable(Path(s.root), "root")
    if studydir.exists(s):
        raise ValueError(f"study {s.name!r} already exists under {s.root!r}; "
                         f"resume it with `resume {s.name}` or choose another --name")
    space = load_space(s.space_file or None, s.trial)
    preflight(s.trial)
    if s.tracking_uri:  # the default store lives under the root checked above
        _tracking().check_tracking_uri(s.tracking_uri)
    for line in warmstart.check(s):
        print(line, flush=True)
    return space


def start_relay(s: StudyConfig) -> None:
    """The study's MLflow relay, on this node."""
    from study.cluster import relay as rl

    rl.start_relay(s.name, s.spool_dir, s.resolved_tracking_uri)


def study_context(s: StudyConfig, experiment_id: str, parent: str, relay: bool = True) -> StudyContext:
    """Starts the study's MLflow relay (on this node; `relay` False: the caller has, with
    `start_relay`: a second start would drop the first's handle, and Ray the actor) and
    returns what every trial needs."""
    from study.cluster import context, relay as rl

    if relay:
        start_relay(s)
    return context.StudyContext(
        study=s.name, base=s.trial.to_dict(), experiment_id=experiment_id, parent_run_id=parent,
        relay=rl.relay_name(s.name), metric=s.metric, objectives=tuple(m for m, _ in s.objective_list),
        image_every=s.image_every,
        checkpoint_every=s.resolved_checkpoint_every, threads=max(1, int(s.cpus_per_trial)))


def check_storage(s: StudyConfig, nodes: int) -> None:
    """Every node writes its trials' checkpoints to the storage and a retry on another node
    reads them: on several nodes it must be an object store or a path every node mounts."""
    if nodes < 2 or s.shared_storage:
        return
    if "://" not in s.resolved_storage:
        raise ValueError(
            f"the Ray cluster has {nodes} nodes but storage {s.resolved_storage!r} is a folder on this "
            "node that the others cannot read; pass --storage s3://BUCKET/PREFIX (or gs://...), or "
            "--shared-storage if every node mounts that path")
    local = [i for i in s.trial.images if os.path.isabs(i)]
    if local:
        raise ValueError(
            f"the Ray cluster has {nodes} nodes but image {local[0]!r} is a file on this node; put it "
            "under the project folder (it travels to every node) and run from there, use a bundled "
            "image, or pass --shared-storage if every node mounts that path")


def _tracker(s: StudyConfig) -> StudyTracker:
    artifacts = None
    if s.resolved_tracking_uri.startswith("sqlite:"):
        artifacts = (Path(s.root) / "artifacts" / s.name).as_uri()
    return _tracking().StudyTracker(s.resolved_tracking_uri, s.name, artifacts)


def run(s: StudyConfig) -> int:
    from study.cluster import runtime, tune as st

    space = preflight_study(s)
    earlier = warmstart.gather(s, space) if s.warm_start else None  # reads, writes nothing
    runtime.connect(s.address)
    runtime.sigterm_as_sigint()  # after ray.init, whose own handler would end the driver at once
    try:
        gpus = st.gpus_per_trial(s)  # refuse an impossible request before writing anything
        check_storage(s, st.alive_nodes())
        fresh = not s.study_dir.exists()  # before the relay, which makes the folder's spool/
        Path(s.root).mkdir(parents=True, exist_ok=True)
        start_relay(s)  # now: its worker starts while the tracker below opens the store
        tracker = _tracker(s)
        note = f"DIP study {s.name}: {s.num_samples} trials, metric {s.metric}"
        warm = {warmstart.WARM_TAG: ",".join(s.warm_start)} if s.warm_start else {}
        parent = tracker.start_parent(s.to_dict(), space.spec, note, warm)
        try:
            studydir.write_study(StudyRecord(
                study=s, experiment_id=tracker.experiment_id, parent_run_id=parent, space=space.spec,
                created=time.strftime("%Y-%m-%dT%H:%M:%S")))
            if earlier is not None:  # before the searcher, which loads the record it makes
                warmstart.seed(s, space, earlier)
            tuner = st.build_tuner(s, space, study_context(s, tracker.experiment_id, parent, relay=False), gpus)
        except BaseException:
            _unwrite(s, tracker, parent, fresh)
            raise
        return _fit_and_finish(s, tracker, parent, tuner, list(space.spec))
    finally:
        st.shutdown()


def _unwrite(s: StudyConfig, tracker: StudyTracker, parent: str, fresh: bool) -> None:
    """A study that failed before its first trial leaves nothing: no study folder (or, where
    the folder was there before, no record in it) and no parent run, so the same command can
    be run again once the cause is fixed."""
    from study.space import OPTUNA_DB

    if fresh:
        shutil.rmtree(s.study_dir, ignore_errors=True)
    else:
        for name in (studydir.STUDY_FILE, OPTUNA_DB):
            (s.study_dir / name).unlink(missing_ok=True)
    tracker.client.delete_run(parent)


def resume(root: str, name: str, address: str = "") -> int:
    from study.cluster import runtime, tune as st

    meta = read_study(root, name)
    s = meta.current
    if address:
        s = dataclasses.replace(s, address=address)
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    runtime.connect(s.address)
    runtime.sigterm_as_sigint()
    try:
        if not st.can_restore(s):
            raise ValueError(f"study {name!r} has no Ray state to resume at {st.experiment_path(s)}")
        check_storage(s, st.alive_nodes())
        tracker = _tracker(s)
        tracker.reopen(meta.parent_run_id)
        tuner = st.restore_tuner(s, study_context(s, meta.experiment_id, meta.parent_run_id))
        return _fit_and_finish(s, tracker, meta.parent_run_id, tuner, list(meta.space))
    finally:
        st.shutdown()


def _fit_and_finish(s: StudyConfig, tracker: StudyTracker, parent: str, tuner: tune.Tuner,
                    searched: list[str]) -> int:
    from study.cluster import relay as rl, tune as st
    from study.tracking.records import LOST_TAG, end_record, tags_record

    # What `status` shows beside the trials' shares: the cluster's GPUs as the study (re)starts.
    rl.send(s.name, [tags_record(st.cluster_tags(st.gpus_per_trial(s)), run_id=parent)])
    summary = st.fit(tuner, s)
    # Interrupted trials: their runs are KILLED until `resume` continues them.
    rl.send(s.name, [end_record("KILLED", "the study was interrupted; resume continues it",
                                trial=t, if_open=True) for t in summary.unended])
    rl.send(s.name, [r for t in summary.lost for r in (
        tags_record({LOST_TAG: "true"}, trial=t),
        end_record("KILLED", "lost with the killed driver: it started after the study's last saved "
                   "state, and resume ran another trial in its place", trial=t, if_open=True))])
    if not delivered(s):
        return 130
    best = export.best_trial(tracker, s)
    if best is not None:
        export.write(best, s.study_dir / "best.json")
    status = "FINISHED" if summary.complete else "KILLED"
    relay = rl.drain(s.name, _say)
    rl.send(s.name, tracker.finish_records(parent, status, best, summary.to_dict(),
                                           relay.lost))
    if not delivered(s):
        return 130
    if not summary.complete:
        print(f"\nstudy {s.name!r} interrupted: {summary.ended} of {s.num_samples} trials ended "
              f"({len(summary.unended)} runs marked KILLED). Continue it with:\n  "
              f"{resume_hint(s.name, s.root)}", flush=True)
        return 130
    _print_done(s, best, summary, searched)
    write_report(s.root, s.name)  # the study's answer, also under the parent run's report/
    return 0


def _say(line: str) -> None:
    print(line, flush=True)


def delivered(s: StudyConfig) -> bool:
    """Wait until MLflow has every record (however long the server is away); Ctrl-C leaves
    the rest on disk for `resume` and says so."""
    from study.cluster import relay as rl

    try:
        rl.drain(s.name, _say)
        return True
    except KeyboardInterrupt:
        print(f"\nstudy {s.name!r}: records not yet delivered to MLflow stay in {s.spool_dir}; "
              f"deliver them and continue with:\n  {resume_hint(s.name, s.root)}", flush=True)
        return False



def _fmt(v: object) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _print_done(s: StudyConfig, best: BestTrial | None, summary: FitSummary,
                searched: list[str]) -> None:
    print(f"\nstudy {s.name!r} finished: {summary.finished} trials finished, {summary.failed} failed")
    if summary.fell_back:  # never silently the CPU on a GPU node
        print(f"{summary.fell_back} of {summary.started} trials had a GPU from Ray but found no CUDA and "
              "trained on the CPU (tag dip.device_fallback): see the trials' warning, check the nodes' driver")
    if best is None:
        print("no trial reported the metric; nothing to export")
        return
    cfg = best.config
    shown = ", ".join(f"{k} {_fmt(cfg[k])}" for k in searched if k in cfg
                      and config_uses(k, cfg))
    if best.objectives:
        goals = ", ".join(f"{o['metric']} {o['mode']}" for o in best.objectives)
        print(f"Pareto front: {best.front_size} of {summary.ended} trials ({goals}); exported: {best.picked}")
        shown += "; " + ", ".join(f"{o['metric']} = {o['value']:.4g}" for o in best.objectives[1:])
    print(f"best trial {best.trial}: {s.metric} = {best.value:.4f}  ({shown}; Ray trial id {best.trial_id})")
    print(f"best configuration exported to {s.study_dir / 'best.json'}")
    print(f"replay it:       {command('train', '--config', str(s.study_dir / 'best.json'))}")
    ui = command("ui", "--root", s.root) if not s.tracking_uri else f"open {s.tracking_uri}"
    print(f"open the MLflow UI: {ui}", flush=True)


def export_study(root: str, name: str, out: Path, pick: str | None = None,
                 stage: str = "search") -> BestTrial:
    """The best trial (or, with several objectives, the Pareto front's member `pick` names)
    written to `out`; with stage "confirm" the variant with the best confirmed mean
    (NAME/confirm.json). Nothing is written when it is refused."""
    s = read_study(root, name).study
    if stage == "confirm":
        return _export_confirmed(s, out)
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    best = export.best_trial(_tracker(s), s, pick)
    if best is None:
        raise ValueError(f"study {name!r} has no trial that reported {s.metric} yet; nothing to export")
    export.write(best, out)
    return best


def _export_confirmed(s: StudyConfig, out: Path) -> BestTrial:
    import json

    path = s.study_dir / studydir.CONFIRM_FILE
    if not path.is_file():
        raise ValueError(f"study {s.name!r} has no confirmation yet ({path} is missing); run "
                         f"`confirm {s.name}` first, or export with --from search")
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    runs = _tracking().study_runs(s.resolved_tracking_uri, s.name, role="confirm")
    best = export.confirmed_best(s, json.loads(path.read_text()), runs)
    export.write(best, out)
    return best


def ui_command(root: str, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for the store under `root`."""
    db = Path(root) / "mlflow.db"
    if not db.is_file():
        raise ValueError(f"no MLflow store at {str(db)!r}; run a study with --root {root} first")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
            "--host", host, "--port", str(port)]


def extend(root: str, name: str, n: int, address: str = "") -> int:
    """Add `n` trials to a study: the same MLflow experiment and parent run, the same Optuna
    study (its sampler conditioned on every earlier trial), trial numbers going on, best.json
    replaced when a new trial beats it. An interrupted study is resumed first."""
    from study.cluster import runtime, tune as st
    from study.space import OPTUNA_DB, SearchSpace

    if n <= 0:
        raise ValueError(f"--num-samples {n} is not a number of trials to add; allowed: 1 or more")
    meta = read_study(root, name)
    last = meta.current
    view = _tracking().read_study_view(last.resolved_tracking_uri, name)
    if view is None or view.status != "FINISHED":  # interrupted, or its driver was killed
        print(f"study {name!r} did not finish: resuming it first", flush=True)
        code = resume(root, name, address)
        if code:
            return code
    if not (last.study_dir / OPTUNA_DB).is_file():
        print(f"warning: study {name!r} has no Optuna record ({OPTUNA_DB}): the sampler starts without "
              "the earlier trials", flush=True)
    first = last.num_samples
    k = len(meta.extensions) + 1
    base = meta.study
    # Its own Tune experiment; a seed of its own, or Optuna's start-up phase would propose
    # the first trials' values again.
    s = dataclasses.replace(last, num_samples=first + n, storage=f"{base.resolved_storage.rstrip('/')}/extend-{k}",
                            seed=(base.seed + first) % 2**32, address=address or last.address)
    space = SearchSpace(meta.space, s.trial)
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    runtime.connect(s.address)
    runtime.sigterm_as_sigint()
    try:
        gpus = st.gpus_per_trial(s)
        check_storage(s, st.alive_nodes())
        tracker = _tracker(s)
        parent = meta.parent_run_id
        tracker.reopen(parent)
        _tracking().set_run_tags(s.resolved_tracking_uri, parent, {"dip.asked": s.num_samples})
        stage = StudyStage(study=s, added=n, first_trial=first, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        studydir.write_study(meta.extended(stage))
        print(f"study {name!r}: {n} more trial{'s' if n > 1 else ''} (trial_{first:04d} on), "
              f"{s.num_samples} in all", flush=True)
        tuner = st.build_tuner(dataclasses.replace(s, num_samples=n), space,
                               study_context(s, meta.experiment_id, parent), gpus, first_trial=first)
        return _fit_and_finish(s, tracker, parent, tuner, list(meta.space))
    finally:
        st.shutdown()


def write_report(root: str, name: str) -> Path | None:
    """The study's report (ROOT/NAME/report/report.md, study/report/document.py), also logged to its
    parent run under `report/`; for the end of every study. A report that cannot be made
    does not fail the study: it says why and how to retry."""
    from study import report

    try:
        path = report.make_report(root, name)
    except Exception as e:  # noqa: BLE001 - a report that fails must not fail a finished study
        print(f"no report ({e}); retry with: {command('report', name, '--root', root)}", flush=True)
        return None
    print(f"report: {path}", flush=True)
    return path
