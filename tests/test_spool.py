"""The durable spool and the MLflow courier, without Ray: records survive a new owner,
the bound drops images first, and the courier delivers in order, skips steps a run already
has, and rides out a server that is not there yet."""
from __future__ import annotations

import time

import numpy as np
import pytest

from study.tracking.spool import Spool
from study.tracking.records import TrialLogger, end_record, metrics_record, run_create_info, tags_record
from study.tracking.courier import Courier
from studyutil import MlflowServer, client, wait_until
from study.tracking.keys import to_mlflow


@pytest.fixture(autouse=True)
def _restore_mlflow_env(monkeypatch):
    """A Courier sets MLflow's retry variables for its process: undo that after each test."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def test_spool_is_fifo_and_survives_a_new_owner(tmp_path):
    s = Spool(tmp_path)
    s.append([{"op": "a", "i": 1}, {"op": "a", "i": 2}])
    s.append([{"op": "a", "i": 3}])
    s.ack(1)
    s2 = Spool(tmp_path)  # a restarted relay continues where the last one stopped
    assert s2.head() == [{"op": "a", "i": 2}] and len(s2) == 2
    s2.ack(1)
    assert s2.head() == [{"op": "a", "i": 3}]
    s2.ack(1)
    assert s2.head() == [] and len(s2) == 0 and s2.size_bytes == 0
    s2.append([{"op": "a", "i": 4}])
    assert Spool(tmp_path).head() == [{"op": "a", "i": 4}]  # numbering goes on after emptying


def test_spool_bound_drops_images_first_and_counts(tmp_path):
    s = Spool(tmp_path, max_bytes=300)
    big = {"op": "image", "png": "x" * 400, "droppable": True}
    assert s.append([{"op": "metrics", "v": 1}, big]) == 1  # the image would pass the bound
    assert s.head() == [{"op": "metrics", "v": 1}]
    assert s.append([{"op": "metrics", "v": "y" * 700}]) == 1  # past twice the bound: refused
    assert Spool(tmp_path).dropped == 2


def _logger(sink, exp_id, trial="t1"):
    return TrialLogger(sink, run_create_info(exp_id, "parent-id", "st", trial, "my-trial", {"lr": 0.01}))


def test_courier_delivers_in_order_and_each_step_once(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = client(uri)
    exp = c.create_experiment("st", artifact_location=(tmp_path / "artifacts").as_uri())
    courier = Courier(Spool(tmp_path / "spool"), uri, say=lambda line: None).start()
    log = _logger(courier.put, exp)
    log.log_metrics({"iteration": 0, "psnr_observation": 20.0}, 0)
    log.log_image("output", np.zeros((16, 16, 3)), 10)
    log.log_metrics({"iteration": 10, "psnr": 21.0}, 10)
    log.flush()
    # A retried attempt re-runs step 10 (delivered) and goes on to 20: 10 is not logged again.
    again = _logger(courier.put, exp)
    again.log_metrics({"iteration": 10, "psnr": 21.5}, 10)
    again.log_metrics({"iteration": 20, "psnr": 22.0}, 20)
    again.set_tags({"dip.completed": "true"})
    again.flush()
    courier.put([end_record("FINISHED", "completed", trial="t1", if_open=True),
                 end_record("KILLED", "late", trial="t1", if_open=True)])  # ended runs stay ended
    _wait_empty(courier)
    courier.stop()
    runs = c.search_runs([exp])
    assert len(runs) == 1, "a retried trial must continue its own run"
    run = runs[0]
    assert run.info.run_name == "my-trial" and run.data.params["lr"] == "0.01"
    assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, to_mlflow("psnr"))] == [(10, 21.0), (20, 22.0)]
    assert [m.step for m in c.get_metric_history(run.info.run_id, to_mlflow("iteration"))] == [0, 10, 20]
    assert run.info.status == "FINISHED" and run.data.tags["dip.end_reason"] == "completed"
    assert [a.path for a in c.list_artifacts(run.info.run_id, "images")]


def test_courier_creates_the_run_of_a_trial_that_died_before_its_first_record(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    c = client(uri)
    exp = c.create_experiment("st", artifact_location=(tmp_path / "artifacts").as_uri())
    courier = Courier(Spool(tmp_path / "spool"), uri, say=lambda line: None).start()
    create = run_create_info(exp, "p", "st", "t9", "t9-name", {"lr": 0.1})
    courier.put([{**tags_record({"dip.retries": 1}, trial="t9"), "create": create},
                 {**end_record("FAILED", "worker died", trial="t9", if_open=True), "create": create}])
    _wait_empty(courier)
    courier.stop()
    (run,) = c.search_runs([exp])
    assert run.info.status == "FAILED" and run.data.tags["dip.end_reason"] == "worker died"


def _wait_empty(courier, timeout=60):
    deadline = time.time() + timeout
    while courier.status().pending_batches:
        assert time.time() < deadline, courier.status()
        time.sleep(0.2)


@pytest.mark.slow
def test_courier_waits_for_a_server_that_is_away(tmp_path):
    """Records written while no server listens are delivered once one starts there; the
    courier says so once each way, not once per call."""
    server = MlflowServer(tmp_path)  # its port is chosen now; nothing listens there yet
    uri = server.url
    lines: list[str] = []
    courier = Courier(Spool(tmp_path / "spool"), uri, say=lines.append, max_backoff=1.0).start()
    courier.put([metrics_record({"x": float(i)}, i, run_id="not-yet") for i in range(3)])
    wait_until(lambda: courier.status().down_since, "the courier seeing the server away", timeout=60)
    assert courier.status().pending_batches == 1 and courier.status().down_since
    try:
        server.start()
        c = client(uri)
        run_id = c.create_run(c.create_experiment("later", artifact_location=(tmp_path / "a").as_uri())).info.run_id
        courier.put([metrics_record({"y": 1.0}, 1, run_id=run_id)])
        _wait_empty(courier, timeout=120)
        courier.stop()
        assert [m.value for m in c.get_metric_history(run_id, to_mlflow("y"))] == [1.0]
        assert sum("unreachable" in x for x in lines) == 1 and sum("is back" in x for x in lines) == 1
        assert courier.status().skipped == 3  # the records for a run that never existed
    finally:
        server.stop()


@pytest.mark.parametrize("where", ["get_metric_history", "log_batch"])
def test_an_outage_inside_a_trials_first_delivery_loses_nothing(tmp_path, where):
    """The server goes away between creating or finding a trial's run and reading its
    high water (`get_metric_history`) or logging its params (`log_batch`): the record is
    tried again whole, the run gets its params and every step, nothing is skipped."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    c0 = MlflowClient(uri)
    exp = c0.create_experiment("x")
    parent = c0.create_run(exp).info.run_id
    courier = Courier(Spool(tmp_path / "spool"), uri, say=lambda s: None)
    real, failed = courier.client, []

    class Flaky:  # the real client, but the first call of `where` fails as a lost server does
        def __getattr__(self, name):
            def call(*a, **k):
                if name == where and not failed:
                    failed.append(name)
                    raise ConnectionError("server went away")
                return getattr(real, name)(*a, **k)
            return call

    courier.client = Flaky()
    courier.max_backoff = 0.2
    courier.start()
    batches: list = []
    log = TrialLogger(batches.append, run_create_info(exp, parent, "x", "t1", "n", {"lr": 0.01}))
    for step in (0, 10, 20):
        log.log_metrics({"iteration": step, "psnr": 1.0}, step)
        log.flush()
    for b in batches:
        courier.put(b)
    wait_until(lambda: not len(courier.spool), timeout=30, what="the spool to empty")
    run = c0.search_runs([exp], "tags.`dip.trial_id` = 't1'")[0]
    assert failed == [where] and courier.skipped == 0
    assert run.data.params == {"lr": "0.01"}
    assert [m.step for m in c0.get_metric_history(run.info.run_id, to_mlflow("iteration"))] == [0, 10, 20]
