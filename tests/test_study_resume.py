"""Ctrl-C a running study, then `resume` it: finished trials stay finished, unfinished ones
continue their own MLflow runs from their last checkpoint, and the trial count holds."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from faults import HOOK
from study.tracking.keys import to_mlflow
from studyutil import ROOT, check_study, cli, client, env, logged_iteration, marked_pids, read_json, wait_until

pytestmark = pytest.mark.slow
REPORT_EVERY = 10
FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "80",
         "--report-every", str(REPORT_EVERY), "--image-every", "50", "--scheduler", "fifo",
         "--max-concurrent", "1", "--num-samples", "3", "--checkpoint-every", "1"]


def _wait_for_pause(faults, proc: subprocess.Popen, uri: str, name: str, timeout: float = 240) -> str:
    """Until a trial paused (tests/faults.py) and MLflow holds its last report; returns its id.
    Tune's driver already has that report: a function trainable reports synchronously, its
    `tune.report` returns only once the driver processed the result and asked for the next."""
    path = faults / "paused"
    wait_until(lambda: path.exists() or proc.poll() is not None, f"{path} to appear", timeout)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    trial, event, at = path.read_text().split()
    last = int(at) if event == "end" else int(at) - REPORT_EVERY  # "report" pauses before its own
    wait_until(lambda: proc.poll() is not None or logged_iteration(uri, name, trial) >= last,
               f"iteration {last} of {trial} in MLflow", timeout)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return trial


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
    paused_trial = _wait_for_pause(faults, proc, uri, "ri")
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "resume ri" in out and "finished" not in out.split("interrupted")[-1]
    assert "Tuner.restore(" not in out and "FileNotFoundError" not in out, out[-3000:]  # ours alone

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


def _rotate_away(storage: Path) -> int:
    """What num_to_keep does while the driver's saved state lags, made certain: each trial's
    newest checkpoint moves to the next number and the older ones go, so whichever one Tune's
    state names is gone and a later one (the same state) is there. Returns the trials moved."""
    moved = 0
    for trial in {p.parent for p in storage.glob("*/*/checkpoint_*")}:
        ckpts = sorted(trial.glob("checkpoint_*"))
        n = int(ckpts[-1].name.rsplit("_", 1)[1])
        ckpts[-1].rename(trial / f"checkpoint_{n + 1:06d}")
        for old in ckpts[:-1]:
            shutil.rmtree(old)
        moved += 1
    return moved


def test_killed_driver_then_resume(tmp_path):
    """SIGKILL the driver and its local Ray (a crashed session) while the second trial runs,
    with no grace: Tune's saved state may lag the trials (a trial it calls running already
    finished in optuna.db, a checkpoint it names rotated away). `resume` continues the runs
    it left RUNNING, and every run ends, also where the checkpoint Tune names is gone
    (study/cluster/restore.py; `_rotate_away` makes sure it is)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    faults = tmp_path / "faults"
    faults.mkdir()
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "rk", "--root",
                             str(tmp_path), *FLAGS], cwd=ROOT, text=True,
                            env=env(**HOOK, DIP_FAULT_PAUSE="report:40#2", DIP_FAULT_DIR=str(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    _wait_for_pause(faults, proc, uri, "rk")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    # The crashed session's processes (its local Ray) carry DIP_FAULT_DIR: gone before `resume`.
    wait_until(lambda: not marked_pids("DIP_FAULT_DIR", str(faults)), "the killed session's end", 60)
    assert _rotate_away(tmp_path / "rk" / "ray") > 0
    r = cli("resume", "rk", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    parent, children = check_study(uri, "rk", n=3, iterations=80)
    assert all(c.data.tags.get("dip.completed") == "true" for c in children)


def _front_size(children, objectives: list[tuple[str, str]]) -> int:
    """The Pareto front of the completed runs, computed here from MLflow's numbers."""
    sign = {"max": 1.0, "min": -1.0}
    pts = [tuple(sign[d] * r.data.metrics[to_mlflow(m)] for m, d in objectives)
           for r in children if r.data.tags.get("dip.completed") == "true"]
    return sum(not any(q != p and all(a >= b for a, b in zip(q, p)) for q in pts) for p in pts)


def test_multi_objective_study_resumed_then_extended(tmp_path):
    """Two objectives (psnr_ema max, seconds min): Ctrl-C in the second trial, `resume`, then
    `extend` by 2. Each step's Pareto front counts every trial so far, the resumed one and
    the extension's included, as MLflow's numbers give it."""
    uri, faults = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "faults"
    faults.mkdir()
    objectives = [("psnr_ema", "max"), ("seconds", "min")]
    flags = [*FLAGS, "--objective", "psnr_ema", "--objective", "seconds"]
    proc = subprocess.Popen([sys.executable, "run_study.py", "run", "--name", "mo", "--root", str(tmp_path), *flags],
                            cwd=ROOT, text=True, env=env(**HOOK, DIP_FAULT_PAUSE="report:20#2",
                                                         DIP_FAULT_DIR=str(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    paused = _wait_for_pause(faults, proc, uri, "mo")
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]

    r = cli("resume", "mo", "--root", str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(uri, "mo", n=3, iterations=80)
    resumed = next(c for c in children if c.data.tags["dip.trial_id"] == paused)
    assert int(resumed.data.tags["dip.resumed_from"]) >= 10 and resumed.data.tags.get("dip.completed") == "true"
    k = _front_size(children, objectives)
    assert f"Pareto front: {k} of 3 trials" in r.stdout, r.stdout[-2000:]
    assert read_json(tmp_path / "mo" / "best.json")["front_size"] == k

    r = cli("extend", "mo", "--root", str(tmp_path), "--num-samples", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _, children = check_study(uri, "mo", n=5, iterations=80)
    k = _front_size(children, objectives)
    assert f"Pareto front: {k} of 5 trials" in r.stdout, r.stdout[-2000:]
    best = read_json(tmp_path / "mo" / "best.json")
    assert best["front_size"] == k and [o["metric"] for o in best["objectives"]] == ["psnr_ema", "seconds"]
    s = cli("status", "mo", "--root", str(tmp_path))
    assert s.returncode == 0 and f"Pareto front: {k} of 5 completed trials" in s.stdout, s.stdout
