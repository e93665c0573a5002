"""A study on a multi-host cluster built on this machine (tests/clusterutil.py): the Ray head
on the host, two worker nodes each in its own network and mount namespace, the MLflow server
and an S3 server (moto) reached by the head's bridge address, the driver on the host with
--storage s3://. Then the faults of a real cluster: the driver killed, a worker node killed
mid-trial, the MLflow server away. Needs root; 5 to 10 minutes on this 2-core machine,
depending on its load (figures in docs/cluster.md).

DIP_OUTAGE_S sets the MLflow outage of test_mlflow_outage_loses_nothing [20]; docs/cluster.md
has a manual run with 300.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from clusterutil import Cluster, usable
from faults import HOOK
from studyutil import TINY, check_study, client, tracebacks
from study.tracking.keys import to_mlflow

pytestmark = pytest.mark.slow
OUTAGE_S = float(os.environ.get("DIP_OUTAGE_S", "20"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = usable()
    if why:
        pytest.skip(why)
    c = Cluster.up(tmp_path_factory.mktemp("cluster"))
    try:
        yield c
    finally:
        c.down()


@pytest.fixture
def live(cluster):
    """The cluster with both workers and MLflow up (a test before may have stopped one)."""
    for w in cluster.workers:
        if w.raylet_pid() is None:
            cluster.restart_worker(w)
    if cluster.mlflow.proc.poll() is not None:
        cluster.mlflow.start()
    return cluster


# --- helpers ---

def tail(log: Path, n: int = 4000) -> str:
    return log.read_text()[-n:] if log.exists() else ""


def wait_for(what: str, cond: Callable[[], Any], proc: subprocess.Popen, log: Path,
             timeout: float = 180) -> Any:
    """Poll `cond` until it returns something truthy; fail if the driver ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the driver ended ({proc.returncode}) before {what}:\n{tail(log)}")
        try:
            got = cond()
        except Exception:  # the server may be busy; ask again
            got = None
        if got:
            return got
        time.sleep(0.5)
    kill_driver(proc)
    pytest.fail(f"no {what} within {timeout:.0f} s:\n{tail(log)}")


def kill_driver(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then anything left in its session (all ours)."""
    for kill in (lambda: os.kill(proc.pid, signal.SIGKILL), lambda: os.killpg(proc.pid, signal.SIGKILL)):
        try:
            kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_driver(proc)
        pytest.fail(f"the driver did not end within {timeout:.0f} s:\n{tail(log)}")
    return log.read_text()


def trial_runs(uri: str, name: str) -> list[Any]:
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return []
    return c.search_runs([exp.experiment_id], "tags.`dip.role` = 'trial'", max_results=100)


def steps(uri: str, run_id: str, metric: str = "psnr") -> list[int]:
    return [m.step for m in client(uri).get_metric_history(run_id, to_mlflow(metric))]


def whole_steps(iterations: int, every: int = 10) -> list[int]:
    return list(range(every, iterations + 1, every))


# --- the tests ---

def test_study_on_two_worker_nodes_with_s3_storage(live, tmp_path):
    # The first two trials wait for each other at their first report (tests/faults.py):
    # each holds a worker's only CPU, so they run one per worker on any machine. The fault
    # folder is outside /tmp, which each worker has its own of.
    faults = Path(f"/var/tmp/dipfaults-{live.marker}")
    faults.mkdir(parents=True, exist_ok=True)
    try:
        r = live.cli("run", "--name", "s3a", "--root", str(tmp_path), "--num-samples", "3",
                     "--scheduler", "fifo", *live.study_flags("s3a"), *TINY, "--iterations", "200",
                     "--image-every", "100", **HOOK, DIP_FAULT_BARRIER="2", DIP_FAULT_DIR=str(faults))
    finally:
        shutil.rmtree(faults, ignore_errors=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(live.tracking_uri, "s3a", n=3, iterations=200)
    ips = live.node_ips()
    ran_on = {ips[c.data.tags["dip.node_id"]] for c in children}
    assert ran_on == {w.ip for w in live.workers}, f"trials ran on {ran_on}"
    keys = live.s3_keys("s3a/")
    assert any(re.search(r"^s3a/tune/experiment_state-.*\.json$", k) for k in keys), keys
    results = {k.split("/")[2] for k in keys if k.endswith("/result.json")}
    assert len(results) == 3, f"{len(results)} trial folders with a result.json on S3: {keys}"
    ckpts = [k for k in keys if re.search(r"/checkpoint_\d+/trial\.pt$", k)]
    assert ckpts, f"no checkpoint on S3: {keys}"
    # Nothing of Ray on the driver's disk: the study folder holds the service's own files.
    assert not (tmp_path / "s3a" / "ray").exists()


def test_driver_killed_then_resume_from_s3(live, tmp_path):
    log = tmp_path / "driver.log"
    args = [*TINY, "--iterations", "200", "--image-every", "100"]
    proc = live.driver(log, "run", "--name", "s3b", "--root", str(tmp_path), "--num-samples", "3",
                       "--max-concurrent", "2", "--scheduler", "fifo", *live.study_flags("s3b"), *args)
    # Once a trial has ended and Tune's state is on S3, one trial runs and one is to start.
    wait_for("a finished trial", lambda: [r for r in trial_runs(live.tracking_uri, "s3b")
                                          if r.info.status == "FINISHED"], proc, log)
    wait_for("the experiment state on S3", lambda: [k for k in live.s3_keys("s3b/tune/")
                                                     if "experiment_state" in k], proc, log)
    kill_driver(proc)
    assert len([r for r in trial_runs(live.tracking_uri, "s3b") if r.info.status == "FINISHED"]) < 3
    r = live.cli("resume", "s3b", "--root", str(tmp_path))
    assert r.returncode == 0, tail(log) + r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(live.tracking_uri, "s3b", n=3, iterations=200)
    for c in children:
        assert c.info.status == "FINISHED", (c.info.run_name, c.data.tags.get("dip.end_reason"))
        assert steps(live.tracking_uri, c.info.run_id) == whole_steps(200), c.info.run_name
    assert not (tmp_path / "s3b" / "ray").exists()


def test_mlflow_outage_loses_nothing(live, tmp_path):
    """The server stopped for DIP_OUTAGE_S seconds mid-study: the trials keep training, every
    step arrives once the server is back, and the study exits 0."""
    log, iters = tmp_path / "driver.log", 200
    # Each report sleeps 1 s (tests/faults.py): a trial lasts over 20 s whatever the
    # machine's speed, so the outage lands while the trials train.
    proc = live.driver(log, "run", "--name", "s3d", "--root", str(tmp_path), "--num-samples", "2",
                       "--scheduler", "fifo", *live.study_flags("s3d"), *TINY,
                       "--iterations", str(iters), "--image-every", "100", **HOOK, DIP_FAULT_SLOW_S="1")
    # Both trials are training (their runs made, a step of each logged) before the server
    # goes: an outage inside the courier's first delivery for a trial (between creating its
    # run and logging its params or reading its last step) loses that trial's params or
    # steps, a race of the courier's, not what this test is for.
    wait_for("a logged step of both trials", lambda: len([
        r for r in trial_runs(live.tracking_uri, "s3d") if steps(live.tracking_uri, r.info.run_id)]) == 2,
        proc, log)
    live.mlflow.stop()
    down = time.time()
    try:
        time.sleep(OUTAGE_S)
    finally:
        live.mlflow.start()  # same store, same port
    up = time.time()
    out = finish(proc, log, timeout=300 + OUTAGE_S)
    ended = time.time()
    assert proc.returncode == 0, out[-4000:]
    assert not tracebacks(out), out[-4000:]
    back = re.search(r"is back after (\d+) s; delivering (\d+) waiting batches", out)
    assert "is unreachable" in out and back, out[-4000:]  # the user is told, each way
    _, children = check_study(live.tracking_uri, "s3d", n=2, iterations=iters)
    c = client(live.tracking_uri)
    stamps = []
    for run in children:
        assert run.info.status == "FINISHED", (run.info.run_name, run.data.tags.get("dip.end_reason"))
        history = c.get_metric_history(run.info.run_id, to_mlflow("psnr"))
        assert [m.step for m in history] == whole_steps(iters), run.info.run_name
        stamps += [m.timestamp / 1000 for m in history]
    # Training went on while the server was away (steps are stamped when they are logged).
    during = sum(down + 1 < t < up - 1 for t in stamps)
    print(f"\nMLflow server down {up - down:.0f} s: {during} of {len(stamps)} steps logged while it "
          f"was down; the relay saw it back after {back[1]} s and delivered {back[2]} batches; "
          f"the study ended {ended - up:.0f} s after the restart")
    assert during, "no step was logged during the outage"


def test_worker_killed_mid_trial_is_retried(live, tmp_path):
    """SIGKILL the raylet of the node running a trial: the trial is retried from its last
    checkpoint on the other node, in the same MLflow run, every step logged exactly once."""
    log, iters = tmp_path / "driver.log", 600
    victim = live.workers[0]
    node_id = next(i for i, ip in live.node_ips().items() if ip == victim.ip)
    proc = live.driver(log, "run", "--name", "s3c", "--root", str(tmp_path), "--num-samples", "2",
                       "--scheduler", "fifo", "--max-failures", "2", "--checkpoint-every", "5",
                       *live.study_flags("s3c"), *TINY, "--iterations", str(iters),
                       "--image-every", "300")

    def running_on_victim() -> Any:
        for r in trial_runs(live.tracking_uri, "s3c"):
            if r.data.tags.get("dip.node_id") == node_id and max(steps(live.tracking_uri, r.info.run_id), default=0) >= 60:
                return r  # past its first checkpoint (step 50)
        return None

    run = wait_for("a trial past step 60 on the victim node", running_on_victim, proc, log)
    os.kill(victim.raylet_pid(), signal.SIGKILL)
    out = finish(proc, log)
    assert proc.returncode == 0, out[-4000:]
    _, children = check_study(live.tracking_uri, "s3c", n=2, iterations=iters)
    assert run.info.run_id in {c.info.run_id for c in children}  # the retry kept its run
    for c in children:
        assert c.info.status == "FINISHED", (c.info.run_name, c.data.tags.get("dip.end_reason"))
        assert c.data.tags.get("dip.completed") == "true", c.info.run_name
        assert steps(live.tracking_uri, c.info.run_id) == whole_steps(iters), c.info.run_name
    tags = next(c for c in children if c.info.run_id == run.info.run_id).data.tags
    assert tags.get("dip.retries") == "1", tags
    at = int(tags["dip.retried_from"])  # the iteration of the checkpoint it went on from
    assert at >= 50 and at % 50 == 0, tags  # a checkpoint every 5 reports of 10 iterations
