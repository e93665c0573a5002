"""Records: every MLflow write made after a study started, as plain data (no mlflow import,
so a trial's worker never loads it). Trials and the driver hand batches of records to the
study's relay (study/cluster/relay.py), which spools them and has study/tracking/courier.py's Courier deliver
them. Every trial record is keyed by the trial id; the courier finds or creates its run.
"""
from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from study.paths import JsonObject
from study.tracking.spool import Record

TRIAL_TAG = "dip.trial_id"
STUDY_TAG = "dip.study"
ROLE_TAG = "dip.role"          # "study" for the parent, "trial" for the search's children, "confirm"
STAGE_TAG = "dip.stage"        # "confirm" on the confirmation's children (study/confirm.py)
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag for a child run
LOST_TAG = "dip.lost"          # a trial a killed driver's saved state never knew (not counted)
CONFIG_TAG = "dip.config"      # a trial's whole config (JSON); its params hold what the space set
MAX_PARAM_LEN = 6000           # MLflow's limit on a param value
MAX_TAG_LEN = 8000             # and on a tag value
SYSTEM_SERIES = "system"       # metrics records whose step is a sample count (system metrics)


@dataclass(frozen=True)
class DeliveryStatus:
    """Where a study's MLflow records stand (the courier's; the relay hands it over)."""

    pending_batches: int       # batches on disk, not yet with the server
    pending_bytes: int
    dropped: int               # images dropped to keep the spool under its bound
    skipped: int               # records for a run that does not exist (never deliverable)
    down_since: float | None   # time.time() when the server went away; None while it answers
    folder: str                # the spool's folder

    @property
    def lost(self) -> int:
        return self.dropped + self.skipped


def flat_params(d: JsonObject, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys, lists as JSON, values cut to the limit."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_params(v, f"{prefix}{k}."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[prefix + k] = text[:MAX_PARAM_LEN]
    return out


def _numeric(m: dict[str, object]) -> dict[str, float]:
    return {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _target(run_id: str | None, trial: str | None) -> Record:
    return {"run_id": run_id} if run_id else {"trial": trial}


def metrics_record(m: dict[str, float], step: int, *, run_id: str | None = None,
                   trial: str | None = None, ts: int | None = None) -> Record:
    return {"op": "metrics", **_target(run_id, trial), "step": int(step),
            "ts": int(time.time() * 1000) if ts is None else int(ts), "values": _numeric(m)}


def system_metrics_record(m: dict[str, float], step: int, ts: int, trial: str) -> Record:
    """A system-metrics sample (study/engine/sysmetrics.py): its step counts samples, not
    iterations, so `series` keeps it out of the courier's iteration high-water mark."""
    return {**metrics_record(m, step, trial=trial, ts=ts), "series": SYSTEM_SERIES}


def tags_record(tags: dict[str, object], *, run_id: str | None = None, trial: str | None = None) -> Record:
    return {"op": "tags", **_target(run_id, trial), "tags": {k: str(v) for k, v in tags.items()}}


def dict_record(d: JsonObject, name: str, *, run_id: str | None = None,
                trial: str | None = None) -> Record:
    return {"op": "dict", **_target(run_id, trial), "name": name, "data": d}


def end_record(status: str, reason: str, *, run_id: str | None = None, trial: str | None = None,
               if_open: bool = False) -> Record:
    """`if_open`: leave a run that already ended as it is (the driver's view of a trial)."""
    return {"op": "end", **_target(run_id, trial), "status": status, "reason": reason[:5000],
            "if_open": if_open}


def image_record(key: str, hwc: np.ndarray, step: int, trial: str) -> Record:
    """An image as PNG (with a step, so the UI's slider shows it over training). Images are
    the first records a full spool drops."""
    from PIL import Image

    a = np.asarray(hwc, dtype=np.float32)
    a = (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).save(buf, format="PNG")
    return {"op": "image", "trial": trial, "key": key, "step": int(step),
            "ts": int(time.time() * 1000), "png": base64.b64encode(buf.getvalue()).decode(),
            "droppable": True}


def _order(r: Record) -> int:
    """Within one report: a step's images before its metrics (the `iteration` metric marks
    the step delivered), and a run's end last."""
    return {"metrics": 1, "end": 2}.get(r["op"], 0)


def run_create_info(experiment_id: str, parent_run_id: str, study: str, trial_id: str,
                    name: str, params: JsonObject,
                    config: JsonObject | None = None, role: str = "trial") -> JsonObject:
    """What the courier needs to create a trial's run where none exists yet. `params`: what
    the search space set. MLflow's UI prints every param of a run above each of its image
    cards, so a whole config there pushes the images out of view; `config` (the whole
    config) goes in CONFIG_TAG, which the cards do not print. `role`: "trial" for the
    search's trials (what the export and the report rank), or the stage of a later one
    ("confirm"), which then also gets STAGE_TAG."""
    tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, STUDY_TAG: study, ROLE_TAG: role}
    if role != "trial":
        tags[STAGE_TAG] = role
    if config is not None:
        tags[CONFIG_TAG] = json.dumps(config)[:MAX_TAG_LEN]
    return {"experiment_id": experiment_id, "name": name, "trial": trial_id,
            "start_time": int(time.time() * 1000), "tags": tags, "params": flat_params(params)}


class TrialLogger:
    """Worker side: one trial's writes as records, handed to `sink` once per report (a
    call that must not wait for the server: the study's relay stores them on disk)."""

    def __init__(self, sink: Callable[[list[Record]], None], create: JsonObject):
        self.sink, self.trial = sink, create["trial"]
        self._buf: list[Record] = [{"op": "run", "trial": self.trial, "create": create}]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self._buf.append(metrics_record(metrics, step, trial=self.trial))

    def log_system_metrics(self, samples: list[Any]) -> None:
        """Samples of study/engine/sysmetrics.py (`step`, `ts`, `values`), one record each."""
        self._buf.extend(system_metrics_record(s.values, s.step, s.ts, self.trial) for s in samples)

    def log_image(self, key: str, hwc: np.ndarray, step: int) -> None:
        self._buf.append(image_record(key, hwc, step, self.trial))

    def log_dict(self, d: JsonObject, name: str) -> None:
        self._buf.append(dict_record(d, name, trial=self.trial))

    def set_tags(self, tags: dict[str, object]) -> None:
        self._buf.append(tags_record(tags, trial=self.trial))

    def end(self, status: str, reason: str) -> None:
        self._buf.append(end_record(status, reason, trial=self.trial))

    def flush(self) -> None:
        if self._buf:
            batch, self._buf = sorted(self._buf, key=_order), []
            self.sink(batch)
