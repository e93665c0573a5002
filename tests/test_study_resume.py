"""Ctrl-C a running study, then `resume` it: finished trials stay finished, unfinished ones
continue their own MLflow runs from their last checkpoint, and the trial count holds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from studyutil import ROOT, check_study, cli, client, env

pytestmark = pytest.mark.slow
FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "200",
         "--report-every", "10", "--image-every", "50", "--scheduler", "fifo",
         "--max-concurrent", "1", "--num-samples", "3"]


def _wait_for_progress(uri: str, name: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until one trial finished and the next one has logged a few reports."""
    deadline = time.time() + timeout
    c = None
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        try:
            c = c or client(uri)
            exp = c.get_experiment_by_name(name)
            runs = c.search_runs([exp.experiment_id], "tags.`dip.role` = 'trial'") if exp else []
        except Exception:  # the store may not exist yet
            runs = []
        done = [r for r in runs if r.info.status == "FINISHED"]
        running = [r for r in runs if r.info.status == "RUNNING" and r.data.metrics.get("iteration", 0) >= 50]
        if done and running:
            return
        time.sleep(1)
    raise AssertionError("the study made no progress in time")


def test_sigint_then_resume(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # A terminal's Ctrl-C reaches the whole foreground process group: do the same.
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "ri", "--root",
                             str(tmp_path), *FLAGS], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_progress(uri, "ri", proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "resume ri" in out

    c = client(uri)
    exp = c.get_experiment_by_name("ri")
    runs = c.search_runs([exp.experiment_id])
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs), "a run stayed RUNNING"
    killed = {r.data.tags["dip.trial_id"]: r for r in runs
              if r.data.tags.get("dip.role") == "trial" and r.info.status == "KILLED"}
    assert killed, "the interrupted trial should be KILLED until resumed"
    before = {r.data.tags["dip.trial_id"]: r.info.run_id for r in runs if r.data.tags.get("dip.role") == "trial"}

    r = cli("resume", "ri", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent, children = check_study(uri, "ri", n=3, iterations=200)
    after = {x.data.tags["dip.trial_id"]: x for x in children}
    for tid, run_id in before.items():  # each trial kept its own run
        assert after[tid].info.run_id == run_id
    for tid in killed:  # continued from its checkpoint, not from scratch
        assert int(after[tid].data.tags["dip.resumed_from"]) >= 50
        assert after[tid].info.status == "FINISHED"
        assert after[tid].data.tags.get("dip.completed") == "true"
    assert (tmp_path / "ri" / "best.json").is_file()


def test_resume_unknown_study_is_refused(tmp_path):
    r = cli("resume", "nope", "--root", str(tmp_path))
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_killed_driver_then_resume(tmp_path):
    """SIGKILL the driver and its local Ray (a crashed session): runs it left RUNNING are
    continued by `resume`, and every run ends."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "rk", "--root",
                             str(tmp_path), *FLAGS], cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_progress(uri, "rk", proc)
    time.sleep(3)  # let Tune write its experiment state after the latest checkpoint
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(2)
    r = cli("resume", "rk", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent, children = check_study(uri, "rk", n=3, iterations=200)
    assert all(c.data.tags.get("dip.completed") == "true" for c in children)
