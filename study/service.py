"""The study service: run, resume and export a study. Orchestrates study.tune (Ray) and
study.tracking (MLflow) without importing either library itself.

On disk, under ROOT (absolute):
    ROOT/mlflow.db                 the MLflow store (unless --tracking-uri names a server)
    ROOT/artifacts/NAME/           MLflow artifacts of study NAME (local store)
    ROOT/NAME/study.json           the StudyConfig and the ids of its experiment and parent run
    ROOT/NAME/ray/tune/            Ray Tune's results, checkpoints and searcher (Optuna) state
    ROOT/NAME/best.json            the exported best configuration
"""
from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from study import export
from study.config import DDPM_MODES, StudyConfig
from study.images import preflight
from study.paths import check_writable, write_json

STUDY_FILE = "study.json"


def read_study(root: str, name: str) -> dict[str, Any]:
    path = Path(root) / name / STUDY_FILE
    if not path.is_file():
        known = sorted(p.parent.name for p in Path(root).glob(f"*/{STUDY_FILE}")) if Path(root).is_dir() else []
        raise ValueError(f"no study {name!r} under {root!r}; studies there: {', '.join(known) or 'none'}")
    return json.loads(path.read_text())


def _tracking():  # noqa: ANN202 - imported lazily: mlflow is slow to import
    from study import tracking

    return tracking


def preflight_study(s: StudyConfig) -> Any:
    """Everything that can be refused is refused here, before anything is written."""
    from study.space import load_space

    check_writable(Path(s.root), "root")
    if (s.study_dir / STUDY_FILE).exists():
        raise ValueError(f"study {s.name!r} already exists under {s.root!r}; "
                         f"resume it with `resume {s.name}` or choose another --name")
    space = load_space(s.space_file or None, s.trial)
    preflight(s.trial)
    if s.tracking_uri:  # the default store lives under the root checked above
        _tracking().check_tracking_uri(s.tracking_uri)
    return space


def _context(s: StudyConfig, experiment_id: str, parent: str) -> Any:
    from study.tune import StudyContext

    return StudyContext(study=s.name, base=s.trial.to_dict(), tracking_uri=s.resolved_tracking_uri,
                        experiment_id=experiment_id, parent_run_id=parent,
                        image_every=s.image_every, threads=max(1, int(s.cpus_per_trial)))


def _tracker(s: StudyConfig) -> Any:
    artifacts = None
    if s.resolved_tracking_uri.startswith("sqlite:"):
        artifacts = (Path(s.root) / "artifacts" / s.name).as_uri()
    return _tracking().StudyTracker(s.resolved_tracking_uri, s.name, artifacts)


def run(s: StudyConfig) -> int:
    from study import tune as st

    space = preflight_study(s)
    st.connect(s.address)
    try:
        gpus = st.gpus_per_trial(s)  # refuse an impossible request before writing anything
        Path(s.root).mkdir(parents=True, exist_ok=True)
        tracker = _tracker(s)
        note = f"DIP study {s.name}: {s.num_samples} trials, metric {s.metric}"
        parent = tracker.start_parent(s.to_dict(), space.spec, note)
        write_json(s.study_dir / STUDY_FILE, {
            "study": s.to_dict(), "experiment_id": tracker.experiment_id, "parent_run_id": parent,
            "space": space.spec, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        tuner = st.build_tuner(s, space, _context(s, tracker.experiment_id, parent), gpus)
        return _fit_and_finish(s, tracker, parent, tuner, list(space.spec))
    finally:
        st.shutdown()


def resume(root: str, name: str, address: str = "") -> int:
    from study import tune as st

    meta = read_study(root, name)
    s = StudyConfig.from_dict(meta["study"])
    if address:
        s = dataclasses.replace(s, address=address)
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    st.connect(s.address)
    try:
        if not st.can_restore(s):
            raise ValueError(f"study {name!r} has no Ray state to resume at {st.experiment_path(s)}")
        tracker = _tracker(s)
        tracker.reopen(meta["parent_run_id"])
        tuner = st.restore_tuner(s, _context(s, meta["experiment_id"], meta["parent_run_id"]))
        return _fit_and_finish(s, tracker, meta["parent_run_id"], tuner, list(meta["space"]))
    finally:
        st.shutdown()


def _fit_and_finish(s: StudyConfig, tracker: Any, parent: str, tuner: Any, searched: list[str]) -> int:
    from study import tune as st

    summary = st.fit(tuner)
    complete = summary["ended"] >= s.num_samples
    best = export.best_trial(tracker, s)
    if best is not None:
        export.write(best, s.study_dir / "best.json")
    if not complete:
        n = tracker.end_open_children("KILLED", "the study was interrupted; resume continues it")
        tracker.finish_parent(parent, "KILLED", best, summary)
        print(f"\nstudy {s.name!r} interrupted: {summary['ended']} of {s.num_samples} trials ended "
              f"({n} runs marked KILLED). Continue it with:\n  "
              f"{_cmd('resume', s.name, '--root', s.root)}", flush=True)
        return 130
    tracker.end_open_children("KILLED", "the trial did not end with the study")
    tracker.finish_parent(parent, "FINISHED", best, summary)
    _print_done(s, best, summary, searched)
    return 0


def _cmd(*args: str) -> str:
    return " ".join(shlex.quote(a) for a in [sys.executable, "run_study.py", *args])


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _print_done(s: StudyConfig, best: dict[str, Any] | None, summary: dict[str, Any],
                searched: list[str]) -> None:
    print(f"\nstudy {s.name!r} finished: {summary['terminated']} trials ended, {summary['errors']} failed")
    if best is None:
        print("no trial reported the metric; nothing to export")
        return
    cfg = best["config"]
    shown = ", ".join(f"{k} {_fmt(cfg[k])}" for k in searched if k in cfg
                      and not (k == "timestep" and cfg["noise_mode"] not in DDPM_MODES))
    print(f"best trial {best['trial_id']}: {s.metric} = {best['value']:.4f}  ({shown})")
    print(f"best configuration exported to {s.study_dir / 'best.json'}")
    print(f"replay it:       {_cmd('train', '--config', str(s.study_dir / 'best.json'))}")
    ui = _cmd("ui", "--root", s.root) if not s.tracking_uri else f"open {s.tracking_uri}"
    print(f"open the MLflow UI: {ui}", flush=True)


def export_study(root: str, name: str, out: Path) -> dict[str, Any]:
    meta = read_study(root, name)
    s = StudyConfig.from_dict(meta["study"])
    _tracking().check_tracking_uri(s.resolved_tracking_uri)
    best = export.best_trial(_tracker(s), s)
    if best is None:
        raise ValueError(f"study {name!r} has no trial that reported {s.metric} yet; nothing to export")
    export.write(best, out)
    return best


def ui_command(root: str, host: str, port: int) -> list[str]:
    """The `mlflow ui` command line for the store under `root`."""
    db = Path(root) / "mlflow.db"
    if not db.is_file():
        raise ValueError(f"no MLflow store at {str(db)!r}; run a study with --root {root} first")
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{db}",
            "--host", host, "--port", str(port)]
