"""Everything MLflow. Runs are driven through `MlflowClient` with explicit run ids (never
the fluent API's process-global active run), because a trial logs from a Ray worker and
the driver ends the run:

- the driver owns the study's parent run and ends every child run (FINISHED when a trial
  completes or ASHA stops it, FAILED with the reason, KILLED when the study is interrupted);
- a trial's worker finds its child run by the tag `dip.trial_id` (or creates it once),
  so a restored trial continues its own run and a resumed study never duplicates one.
"""
from __future__ import annotations

import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

TRIAL_TAG = "dip.trial_id"
STUDY_TAG = "dip.study"
ROLE_TAG = "dip.role"          # "study" for the parent, "trial" for children
REASON_TAG = "dip.end_reason"
TERMINAL = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_LEN = 6000           # MLflow's limit on a param value


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


def _flat_params(d: dict[str, Any], prefix: str = "") -> list[Param]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flat_params(v, f"{prefix}{k}.")
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out.append(Param(prefix + k, text[:MAX_PARAM_LEN]))
    return out


def _find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str) -> Any | None:
    runs = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0] if runs else None


def _end(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    client.set_tag(run_id, REASON_TAG, reason[:5000])
    client.set_terminated(run_id, status)


def _metrics(m: dict[str, float], step: int) -> list[Metric]:
    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, step) for k, v in m.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


class StudyTracker:
    """Driver side: the experiment, the parent run, and the end of every child run."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None):
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            # The kind tells MLflow 3's UI to open on the runs table, not the GenAI overview.
            self.experiment_id = self.client.create_experiment(
                experiment, artifact_location=artifact_root,
                tags={"mlflow.experimentKind": "custom_model_development"})
        else:
            self.experiment_id = exp.experiment_id

    def start_parent(self, settings: dict[str, Any], space: dict[str, Any], note: str) -> str:
        run = self.client.create_run(self.experiment_id, run_name="study", tags={
            ROLE_TAG: "study", MLFLOW_RUN_NOTE: note})
        rid = run.info.run_id
        self.client.log_batch(rid, params=_flat_params(settings))
        self.client.log_dict(rid, space, "search_space.json")
        self.client.log_dict(rid, settings, "study.json")
        return rid

    def reopen(self, run_id: str) -> None:
        self.client.update_run(run_id, status="RUNNING")

    def child_runs(self) -> list[Any]:
        return self.client.search_runs([self.experiment_id], f"tags.`{ROLE_TAG}` = 'trial'",
                                       max_results=50000)

    def trial_summaries(self) -> list[dict[str, Any]]:
        """Each child run as plain data: ids, status, latest metrics, completion."""
        return [{
            "mlflow_run_id": r.info.run_id, "trial_id": r.data.tags.get(TRIAL_TAG),
            "status": r.info.status, "metrics": dict(r.data.metrics),
            "completed": r.data.tags.get("dip.completed") == "true",
            "end_reason": r.data.tags.get(REASON_TAG, ""),
        } for r in self.child_runs()]

    def load_dict(self, run_id: str, name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as d:
            return json.loads(Path(self.client.download_artifacts(run_id, name, d)).read_text())

    def end_trial(self, trial_id: str, status: str, reason: str) -> None:
        run = _find_trial_run(self.client, self.experiment_id, trial_id)
        if run is not None and run.info.status not in TERMINAL:
            _end(self.client, run.info.run_id, status, reason)

    def end_open_children(self, status: str, reason: str) -> int:
        """End every child run still RUNNING (an interrupted study); returns how many."""
        n = 0
        for run in self.child_runs():
            if run.info.status not in TERMINAL:
                _end(self.client, run.info.run_id, status, reason)
                n += 1
        return n

    def finish_parent(self, run_id: str, status: str, best: dict[str, Any] | None,
                      summary: dict[str, Any]) -> None:
        if best is not None:
            self.client.log_dict(run_id, best, "best.json")
            self.client.log_batch(run_id, metrics=_metrics(
                {f"best_{k}": v for k, v in best["metrics"].items()}, 0))
            for k, v in {"best_run_id": best["mlflow_run_id"], "best_trial_id": best["trial_id"]}.items():
                self.client.set_tag(run_id, f"dip.{k}", v)
        self.client.log_dict(run_id, summary, "summary.json")
        self.client.set_terminated(run_id, status)


class TrialLogger:
    """Worker side: logs one trial's params, metrics and images into its child run."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, study: str,
                 trial_id: str, trial_name: str, config: dict[str, Any]):
        self.client = MlflowClient(tracking_uri=uri)
        found = _find_trial_run(self.client, experiment_id, trial_id)
        # Steps already logged: a restored trial repeats the reports between its last
        # checkpoint and the interruption, with the same values; they are not logged twice.
        self.logged_until = 0
        if found is not None:  # a restored trial continues its own run
            self.run_id = found.info.run_id
            self.logged_until = int(found.data.metrics.get("iteration", 0))
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            run = self.client.create_run(experiment_id, run_name=trial_name, tags={
                MLFLOW_PARENT_RUN_ID: parent_run_id, TRIAL_TAG: trial_id, STUDY_TAG: study,
                ROLE_TAG: "trial"})
            self.run_id = run.info.run_id
            self.client.log_batch(self.run_id, params=_flat_params(config))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if step > self.logged_until or step == 0:
            self.client.log_batch(self.run_id, metrics=_metrics(metrics, step))

    def log_image(self, key: str, hwc: Any, step: int) -> None:
        """An image with a step, so the MLflow UI's slider shows it over training."""
        if step > self.logged_until or step == 0:
            self.client.log_image(self.run_id, hwc, key=key, step=step)

    def log_dict(self, d: dict[str, Any], name: str) -> None:
        self.client.log_dict(self.run_id, d, name)

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end(self, status: str, reason: str) -> None:
        _end(self.client, self.run_id, status, reason)

