"""Everything MLflow. Runs are driven through `MlflowClient` with explicit run ids (never
the fluent API's process-global active run), because a trial logs from a Ray worker and
the driver ends the run:

- the driver owns the study's parent run and ends every child run (FINISHED when a trial
  completes or ASHA stops it, FAILED with the reason, KILLED when the study is interrupted);
- a trial's worker finds its child run by the tag `dip.trial_id` (or creates it once),
  so a restored trial continues its own run and a resumed study never duplicates one.

Writes after a study has started never call the server from the training loop or the
driver's event loop: they become records (plain dicts, `*_record` below) that the study's
relay stores in a durable spool (study/tracking/spool.py) and a `Courier` thread
(study/tracking/courier.py) delivers in order, for as long as the server is away.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import sqlite3
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from mlflow.entities import Experiment, Param, Run, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from study.objectives import from_params
from study.paths import JsonObject
from study.tracking import template
from study.tracking.keys import from_mlflow, image_to_mlflow
from study.tracking.records import (ROLE_TAG, TRIAL_TAG, dict_record, end_record, flat_params,
                                    metrics_record, tags_record)
from study.tracking.spool import Record
from study.tracking.view import save_trials_view, trials_link

if TYPE_CHECKING:
    import numpy as np

    from study.results import BestTrial

COMPLETED_TAG = "dip.completed"  # "true" once a trial ran all its iterations
NAME_TAG = "dip.trial_name"      # Tune's trial name, trial_NNNN
REASON_TAG = "dip.end_reason"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
UNDELIVERED_TAG = "dip.undelivered"  # on the parent: records the spool had to drop


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Refuse an unusable tracking URI before any trial starts."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise ValueError(f"MLflow server {uri} answered /health with {r.status}")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ValueError(f"cannot reach the MLflow tracking server {uri!r}: {reason}") from None
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise ValueError(f"tracking URI {uri!r}: folder {str(folder)!r} does not exist")
    elif not uri.startswith(("postgresql", "mysql", "mssql", "databricks")):
        raise ValueError(
            f"unsupported tracking URI {uri!r}; allowed: http(s)://host:port, sqlite:///ABS/PATH.db, "
            "postgresql://..., mysql://..."
        )


class StoreNotReady(ValueError):
    """A study's sqlite store that its driver has not created (or finished migrating) yet."""


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _creating(uri: str) -> Iterator[None]:
    """One process at a time creates or migrates a sqlite store: MLflow 3.17's
    SqlAlchemyStore runs every migration when it opens a store without all its tables, and
    two at once fail (`table ... already exists`, alembic's `expected to match one row`).
    Readers never get here: they wait for `_ready`."""
    path = _sqlite_path(uri)
    if path is None:  # a server or a database owns its own schema
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _ready(path: Path) -> bool:
    """The store at `path` is at MLflow's schema head and has its default experiment, so
    opening it writes nothing. Read with sqlite3, read-only: MLflow would migrate."""
    from mlflow.store.db.utils import _get_latest_schema_revision

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)) as db:
            version = db.execute("SELECT version_num FROM alembic_version").fetchall()
            default = db.execute("SELECT 1 FROM experiments WHERE experiment_id = 0").fetchall()
    except sqlite3.Error:  # no such table yet, or the file is not a database yet
        return False
    return version == [(_get_latest_schema_revision(),)] and bool(default)


def writer_client(uri: str) -> MlflowClient:
    """A client that may create the store: the driver's (StudyTracker) and the relay's. A new
    sqlite store starts as a copy of this installation's migrated empty one (template.py)."""
    with _creating(uri):
        path = _sqlite_path(uri)
        if path is not None and not path.exists():
            template.seed_store(path)
        client = MlflowClient(tracking_uri=uri)
        if path is not None:  # opened under the lock: MLflow adds "Default" here. A server's
            client.search_experiments(max_results=1)  # store is its own (and it may be away)
        return client


def _flat_params(d: JsonObject) -> list[Param]:
    return [Param(k, v) for k, v in flat_params(d).items()]


@dataclass(frozen=True)
class TrialSummary:
    """A study's trial as its MLflow child run records it: the one reading of a child run,
    for the export, the report and `status`."""

    run_id: str
    name: str                      # the run's name (what it tries)
    trial_id: str                  # Ray Tune's trial id (tag dip.trial_id); '' if the run has none
    status: str                    # RUNNING, FINISHED, FAILED or KILLED
    completed: bool                # ran all its iterations (tag dip.completed)
    params: dict[str, str]         # its parameters as MLflow keeps them (strings)
    metrics: dict[str, float]      # latest value of each
    tags: dict[str, str]
    start: float                   # seconds since the epoch
    end: float                     # 0 while running

    @property
    def trial(self) -> str:
        """Tune's trial name: trial_NNNN, numbered through the study (else the run's name)."""
        return self.tags.get(NAME_TAG) or self.name

    @property
    def state(self) -> str:
        """completed, stopped early (by the scheduler), failed, or the run's status."""
        if self.completed:
            return "completed"
        if self.status == "FAILED":
            return "failed"
        return "stopped early" if self.status == "FINISHED" else self.status.lower()


def _seconds(ms: int | None) -> float:
    return (ms or 0) / 1000


def _trial_summary(r: Run) -> TrialSummary:
    tags = dict(r.data.tags)
    return TrialSummary(
        run_id=r.info.run_id, name=r.info.run_name or "", trial_id=tags.get(TRIAL_TAG, ""),
        status=r.info.status, completed=tags.get(COMPLETED_TAG) == "true", params=dict(r.data.params),
        metrics={from_mlflow(k): v for k, v in r.data.metrics.items()}, tags=tags, start=_seconds(r.info.start_time), end=_seconds(r.info.end_time))


def _trials(client: MlflowClient, experiment_id: str, role: str = "trial") -> list[TrialSummary]:
    """Every child run of the experiment with tag dip.role = `role` (the search's trials,
    or a later stage's: "confirm")."""
    runs = client.search_runs([experiment_id], f"tags.`{ROLE_TAG}` = '{role}'", max_results=50000)
    return [_trial_summary(r) for r in runs]


class StudyTracker:
    """Driver side: the experiment and the parent run (written directly, at the start, when
    the server was just checked), reads for the export, and records for everything after."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        self.client = writer_client(uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # The kind tells MLflow 3's UI to open on the runs table, not the GenAI overview.
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_root,
                tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = exp.experiment_id

    def start_parent(self, settings: JsonObject, space: JsonObject, note: str,
                     tags: dict[str, str] | None = None) -> str:
        objectives = from_params({"metric": settings["metric"],
                                  "objectives": json.dumps(settings.get("objectives") or [])})
        save_trials_view(self.client, self.experiment_id, objectives, list(space))
        # The parent's page links to the trials table (a link relative to the UI's own address).
        link = trials_link("", self.experiment_id).lstrip("/")
        run = self.client.create_run(self.experiment_id, run_name="study", tags={
            ROLE_TAG: "study", MLFLOW_RUN_NOTE: f"{note}\n\n[The trials, best first]({link})", **(tags or {})})
        rid = run.info.run_id
        self.client.log_batch(rid, params=_flat_params(settings))
        self.client.log_dict(rid, space, "search_space.json")
        self.client.log_dict(rid, settings, "study.json")
        return rid

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def trial_summaries(self) -> list[TrialSummary]:
        return _trials(self.client, self.experiment_id)

    def load_dict(self, run_id: str, name: str) -> JsonObject:
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(self.client.download_artifacts(run_id, name, d)).read_text())

    @staticmethod
    def finish_records(run_id: str, status: str, best: BestTrial | None,
                       summary: JsonObject, undelivered: int) -> list[Record]:
        """What ends the parent run: the best trial, the summary (FitSummary.to_dict), what
        could not be delivered."""
        out: list[Record] = []
        if best is not None:
            out += [dict_record(best.to_dict(), "best.json", run_id=run_id),
                    metrics_record({f"best_{k}": v for k, v in best.metrics.items()}, 0, run_id=run_id),
                    tags_record({"dip.best_run_id": best.mlflow_run_id,
                                 "dip.best_trial_id": best.trial_id}, run_id=run_id)]
        out += [dict_record(summary, "summary.json", run_id=run_id),
                tags_record({UNDELIVERED_TAG: undelivered}, run_id=run_id)]
        if undelivered:
            out.append(tags_record({MLFLOW_RUN_NOTE: f"{undelivered} records (images first) could not "
                                    "be kept while the MLflow server was away; see dip.undelivered"},
                                   run_id=run_id))
        return out + [end_record(status, "the study ended" if status == "FINISHED"
                                 else "the study was interrupted; resume continues it", run_id=run_id)]


# Read-only views of studies, for `status` and `list` (study/cli/jobs.py): from MLflow
# alone, so they work from anywhere that reaches the tracking server.

@dataclass(frozen=True)
class StudyView:
    name: str
    tracking_uri: str
    parent_run_id: str
    status: str                    # the parent run's
    start: float
    end: float
    params: dict[str, str]         # the StudyConfig, flattened ("trial.iterations")
    tags: dict[str, str]
    trials: tuple[TrialSummary, ...]

    @property
    def asked(self) -> int:
        """Trials the study asks for (`extend` raises it)."""
        return int(self.tags.get("dip.asked") or self.params.get("num_samples") or 0)

    def gpu_line(self) -> str:
        """GPUs the running trials hold (their `trial/gpus`, Ray's assignment) of the cluster's
        (tag dip.cluster_gpus, as the study started); '' where neither has any."""
        running = [t for t in self.trials if t.status == "RUNNING" and t.metrics.get("trial/gpus")]
        held, total = sum(t.metrics["trial/gpus"] for t in running), float(self.tags.get("dip.cluster_gpus") or 0)
        if not (held or total):
            return ""
        share = self.tags.get("dip.gpus_per_trial")
        each = f", {share} GPU each" if share and share != "0" else ""
        n = len(running)
        return f"GPUs: {held:g} of {total:g} in use by {n} running trial{'s' if n != 1 else ''}{each}"


def _read_client(uri: str) -> MlflowClient:
    """A client that never creates or migrates the store (see `_creating`)."""
    path = _sqlite_path(uri)
    if path is not None and not (path.is_file() and _ready(path)):
        raise StoreNotReady(f"no MLflow store at {uri!r}" if not path.is_file() else
                            f"the MLflow store at {uri!r} is not ready: its driver is creating it, or an "
                            f"older MLflow made it (then `mlflow db upgrade {uri}`)")
    check_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def _study_view(client: MlflowClient, uri: str, exp: Experiment) -> StudyView | None:
    runs = client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'study'", max_results=1)
    if not runs:
        return None
    p = runs[0]
    trials = tuple(_trials(client, exp.experiment_id))
    return StudyView(name=exp.name, tracking_uri=uri, parent_run_id=p.info.run_id, status=p.info.status,
                     start=_seconds(p.info.start_time), end=_seconds(p.info.end_time),
                     params=dict(p.data.params), tags=dict(p.data.tags), trials=trials)


def read_study_view(uri: str, name: str) -> StudyView | None:
    """Study `name` on the tracking store at `uri`, or None if it has no such study."""
    client = _read_client(uri)
    exp = client.get_experiment_by_name(name)
    return _study_view(client, uri, exp) if exp is not None else None


def study_views(uri: str) -> list[StudyView]:
    """Every study on the tracking store at `uri`, oldest first."""
    client = _read_client(uri)
    views = [_study_view(client, uri, e) for e in client.search_experiments(max_results=50000)]
    return sorted((v for v in views if v is not None), key=lambda v: v.start)


def set_run_tags(uri: str, run_id: str, tags: dict[str, object]) -> None:
    MlflowClient(tracking_uri=uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


def load_run_dict(uri: str, run_id: str, name: str) -> JsonObject:
    """A JSON artifact of a run (e.g. the parent's search_space.json)."""
    with tempfile.TemporaryDirectory() as d:
        path = MlflowClient(tracking_uri=uri).download_artifacts(run_id, name, d)
        return json.loads(Path(path).read_text())


# --- Read-only queries for the report (study/report/document.py), and logging its folder. ---

def study_runs(uri: str, experiment: str, role: str = "trial") -> list[TrialSummary]:
    """Every trial (child run) of study `experiment`; role "confirm": its confirmation's."""
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    return _trials(client, exp.experiment_id, role)


def run_image(uri: str, run_id: str, key: str) -> np.ndarray | None:
    """The latest-step image logged under `key` with `log_image(key=..., step=...)`, as
    an H x W x C uint8 array, or None if the run has none."""
    import numpy as np
    from PIL import Image

    client = MlflowClient(tracking_uri=uri)
    # MLflow's file naming for keyed images; a study recorded before the `images/` group
    # has its images under the study's own name
    prefixes = tuple(k.replace("/", "~") + "+step+" for k in (image_to_mlflow(key), key))
    files = [f.path for f in client.list_artifacts(run_id, "images") if f.path.endswith(".png")]
    mine = [p for p in files if p.split("/", 1)[-1].startswith(prefixes[0])] or \
        [p for p in files if p.split("/", 1)[-1].startswith(prefixes[1])]
    found = [(int(p.split("+step+")[1].split("+")[0]), p) for p in mine]
    if not found:
        return None
    with tempfile.TemporaryDirectory() as d:
        with Image.open(client.download_artifacts(run_id, max(found)[1], d)) as im:
            a = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return a[:, :, None] if a.ndim == 2 else a


def log_folder(uri: str, run_id: str, folder: str | Path, artifact_path: str) -> None:
    """Log every file under `folder` to `run_id` under `artifact_path`."""
    MlflowClient(tracking_uri=uri).log_artifacts(run_id, str(folder), artifact_path)
