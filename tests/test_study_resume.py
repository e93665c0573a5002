"""Ctrl-C a running study, then `resume` it: finished trials stay finished, unfinished ones
continue their own MLflow runs from their last checkpoint, and the trial count holds."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from faults import HOOK
from studyutil import ROOT, check_study, cli, client, env

pytestmark = pytest.mark.slow
FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "80",
         "--report-every", "10", "--image-every", "50", "--scheduler", "fifo",
         "--max-concurrent", "1", "--num-samples", "3", "--checkpoint-every", "1"]


def _wait_for_file(path, proc: subprocess.Popen, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, f"{path} did not appear in time"
        time.sleep(0.5)
    time.sleep(1)  # the paused trial's last report reaches the driver
    return path.read_text()


# Where Ctrl-C lands, made deterministic by pausing one trial there (tests/faults.py): in the
# first trial's middle; after a trial's last report but before it returned (the moment a
# finished-looking trial is not finished); in the second trial, after the first ended.
# `resume` is checked after the subtlest moment only (each resume starts Ray again).
MOMENTS = [("report:40#1", False), ("end#1", True), ("report:20#2", False)]


@pytest.mark.parametrize("moment, then_resume", MOMENTS)
def test_sigint_then_resume(tmp_path, moment, then_resume):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    faults = tmp_path / "faults"
    faults.mkdir()
    # A terminal's Ctrl-C reaches the whole foreground process group: do the same.
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "ri", "--root",
                             str(tmp_path), *FLAGS], cwd=ROOT, text=True,
                            env=env(**HOOK, DIP_FAULT_PAUSE=moment, DIP_FAULT_DIR=str(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    paused_trial = _wait_for_file(faults / "paused", proc).split()[0]
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "resume ri" in out and "finished" not in out.split("interrupted")[-1]

    c = client(uri)
    exp = c.get_experiment_by_name("ri")
    runs = c.search_runs([exp.experiment_id])
    assert all(r.info.status in ("FINISHED", "FAILED", "KILLED") for r in runs), "a run stayed RUNNING"
    trials = {r.data.tags["dip.trial_id"]: r for r in runs if r.data.tags.get("dip.role") == "trial"}
    assert trials[paused_trial].info.status == "KILLED", "the interrupted trial must wait for resume"
    parent = next(r for r in runs if r.data.tags.get("dip.role") == "study")
    assert parent.info.status == "KILLED"
    if not then_resume:
        return

    r = cli("resume", "ri", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent, children = check_study(uri, "ri", n=3, iterations=80)
    after = {x.data.tags["dip.trial_id"]: x for x in children}
    for tid, run in trials.items():  # each trial kept its own run
        assert after[tid].info.run_id == run.info.run_id
    resumed = after[paused_trial]  # continued from its checkpoint, not from scratch
    assert int(resumed.data.tags["dip.resumed_from"]) >= 10
    assert resumed.info.status == "FINISHED" and resumed.data.tags.get("dip.completed") == "true"
    assert (tmp_path / "ri" / "best.json").is_file()


def test_resume_unknown_study_is_refused(tmp_path):
    r = cli("resume", "nope", "--root", str(tmp_path))
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and "Traceback" not in r.stderr


def test_killed_driver_then_resume(tmp_path):
    """SIGKILL the driver and its local Ray (a crashed session) while the second trial runs,
    with no grace: Tune's saved state may lag the trials (a trial it calls running already
    finished in optuna.db, a checkpoint it names rotated away). `resume` continues the runs
    it left RUNNING, and every run ends."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    faults = tmp_path / "faults"
    faults.mkdir()
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "rk", "--root",
                             str(tmp_path), *FLAGS], cwd=ROOT, text=True,
                            env=env(**HOOK, DIP_FAULT_PAUSE="report:40#2", DIP_FAULT_DIR=str(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_file(faults / "paused", proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(2)
    r = cli("resume", "rk", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent, children = check_study(uri, "rk", n=3, iterations=80)
    assert all(c.data.tags.get("dip.completed") == "true" for c in children)
