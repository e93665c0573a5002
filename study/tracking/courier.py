"""Delivery of tracking records to MLflow: a `Courier` thread takes the records that the
study's relay stored in a durable spool (study/tracking/spool.py) and delivers them in
order, for as long as the server is away. Every trial record is keyed by trial id, so a
trial retried on another node, or resumed, continues its own run; metric steps already
delivered are not delivered again (see `Courier._high_water`).
"""
from __future__ import annotations

import base64
import io
import os
import threading
import time
from typing import Callable

from mlflow.entities import Metric, Param, Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from study.paths import JsonObject
from study.tracking.keys import image_to_mlflow, mlflow_keys, to_mlflow
from study.tracking.records import TRIAL_TAG, DeliveryStatus
from study.tracking.spool import Record, Spool
from study.tracking.store import REASON_TAG, TERMINAL, writer_client


def _find_trial_run(client: MlflowClient, experiment_id: str, trial_id: str) -> Run | None:
    runs = client.search_runs([experiment_id], f"tags.`{TRIAL_TAG}` = '{trial_id}'")
    return runs[0] if runs else None


def _end(client: MlflowClient, run_id: str, status: str, reason: str) -> None:
    client.set_tag(run_id, REASON_TAG, reason[:5000])
    client.set_terminated(run_id, status)


# Answers that will not change by asking again: the record is skipped (and counted).
PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
             "INVALID_STATE", "BAD_REQUEST", "PERMISSION_DENIED"}


class Undeliverable(Exception):
    """A record the server refuses for good (not an outage)."""


def _is_outage(e: Exception) -> bool:
    if isinstance(e, MlflowException):
        return e.error_code not in PERMANENT
    return isinstance(e, OSError) or type(e).__module__.startswith(("requests", "urllib3", "sqlalchemy"))


class Courier:
    """Delivers a spool's records to MLflow in order from a background thread, for as long
    as the server is away: one warning line when it goes, one when it is back."""

    def __init__(self, spool: Spool, uri: str, say: Callable[[str], None] = print,
                 max_backoff: float = 15.0):
        # One attempt per call: this thread does its own waiting, without a 4-minute stall
        # inside MLflow's retries, and a partitioned server costs 20 s, not 120, per try.
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.spool, self.uri, self.say, self.max_backoff = spool, uri, say, max_backoff
        self.client = writer_client(uri)
        self.skipped = 0                  # records the server refused for good
        self.down_since: float | None = None
        self._runs: dict[str, str] = {}   # trial id -> run id
        self._hw: dict[str, int] = {}     # run id -> highest metric step delivered
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mlflow-courier", daemon=True)

    def start(self) -> "Courier":
        self._thread.start()
        return self

    def put(self, records: list[Record]) -> None:
        self.spool.append(records)
        self._wake.set()

    def status(self) -> DeliveryStatus:
        return DeliveryStatus(len(self.spool), self.spool.size_bytes, self.spool.dropped,
                              self.skipped, self.down_since, str(self.spool.folder))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _loop(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            batch = self.spool.head()
            if not batch:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            done = self._deliver(batch)
            if done:
                self.spool.ack(done)
            if done < len(batch):  # the server is away: wait, then try the same record again
                self._stop.wait(backoff)
                backoff = min(2 * backoff, self.max_backoff)
            else:
                backoff = 0.5

    def _deliver(self, batch: list[Record]) -> int:
        """Delivers records in order; returns how many are done (delivered or refused)."""
        for i, rec in enumerate(batch):
            try:
                self._apply(rec)
            except Undeliverable as e:
                self._refused(rec, e)
            except Exception as e:  # noqa: BLE001 - sorted into outage or refusal below
                if not _is_outage(e):
                    self._refused(rec, e)
                    continue
                if self.down_since is None:
                    self.down_since = time.time()
                    self.say(f"MLflow server {self.uri} is unreachable ({_short(e)}); training goes "
                             f"on and its records wait on disk in {self.spool.folder}")
                return i
            if self.down_since is not None:
                self.say(f"MLflow server {self.uri} is back after {time.time() - self.down_since:.0f} s; "
                         f"delivering {len(self.spool)} waiting batches")
                self.down_since = None
        return len(batch)

    def _refused(self, rec: Record, e: Exception) -> None:
        self.skipped += 1
        if self.skipped <= 5:
            self.say(f"MLflow refused a {rec.get('op')} record for {rec.get('trial') or rec.get('run_id')}: "
                     f"{_short(e)}")

    # --- applying one record ---
    def _run_id(self, rec: Record) -> str:
        if rec.get("run_id"):
            return rec["run_id"]
        trial = rec["trial"]
        if trial not in self._runs:
            found = _find_trial_run(self.client, rec["create"]["experiment_id"], trial) \
                if "create" in rec else self._search_any(trial)
            if found is None:
                if "create" not in rec:
                    raise Undeliverable(f"no run for trial {trial}")
                found = self._create(rec["create"])
            if "create" in rec:  # again if an outage cut the first try short after create_run
                self._log_params(found, rec["create"]["params"])
            hw = self._high_water(found.info.run_id)
            # Known only once complete: an outage above leaves nothing half-known, and the
            # record is tried again from the search.
            self._runs[trial], self._hw[found.info.run_id] = found.info.run_id, hw
        return self._runs[trial]

    def _log_params(self, run: Run, params: dict[str, str]) -> None:
        """The params the run lacks (MLflow refuses to change one, not to be sent none)."""
        have = run.data.params
        missing = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(missing), 100):  # MLflow's limit per batch
            self.client.log_batch(run.info.run_id, params=missing[i:i + 100])

    def _search_any(self, trial: str) -> Run | None:
        runs = self.client.search_runs(self._experiments(), f"tags.`{TRIAL_TAG}` = '{trial}'")
        return runs[0] if runs else None

    def _experiments(self) -> list[str]:
        return [e.experiment_id for e in self.client.search_experiments()]

    def _create(self, c: JsonObject) -> Run:
        # Started when the trial did, not when a record reached a server that was away.
        return self.client.create_run(c["experiment_id"], start_time=c.get("start_time"),
                                      run_name=c["name"], tags=c["tags"])

    def _high_water(self, run_id: str) -> int:
        """The highest step of `iteration` already in the run: a retried or resumed trial
        re-runs the steps after its checkpoint, and those delivered before stay as they are."""
        return max((m.step for key in set(mlflow_keys("iteration"))
                    for m in self.client.get_metric_history(run_id, key)), default=-1)

    def _apply(self, rec: Record) -> None:
        op, run_id = rec["op"], self._run_id(rec)
        c = self.client
        trial = rec.get("trial")
        if op == "run":
            c.update_run(run_id, status="RUNNING")  # a retried or resumed trial goes on in it
        elif op in ("metrics", "image") and trial and "series" not in rec and rec["step"] <= self._hw[run_id]:
            return  # a step this run already has (system samples count their own steps)
        elif op == "metrics":
            ms = [Metric(to_mlflow(k), v, rec["ts"], rec["step"]) for k, v in rec["values"].items()]
            for i in range(0, len(ms), 1000):
                c.log_batch(run_id, metrics=ms[i:i + 1000])
            if trial and "series" not in rec:
                self._hw[run_id] = max(self._hw[run_id], rec["step"])
        elif op == "image":
            from PIL import Image

            image = Image.open(io.BytesIO(base64.b64decode(rec["png"])))
            c.log_image(run_id, image, key=image_to_mlflow(rec["key"]), step=rec["step"], timestamp=rec["ts"])
        elif op == "tags":
            c.log_batch(run_id, tags=[RunTag(k, v) for k, v in rec["tags"].items()])
        elif op == "dict":
            c.log_dict(run_id, rec["data"], rec["name"])
        elif op == "end":
            if rec["if_open"] and c.get_run(run_id).info.status in TERMINAL:
                return
            _end(c, run_id, rec["status"], rec["reason"])
        else:
            raise Undeliverable(f"unknown record op {op!r}")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:200]
