"""Faults injected into real trials from the test side: the study service calls the hook
named by DIP_TEST_HOOK=faults:hook at each report and when training ends (study/cluster/trainable.py
`_test_hook`); nothing here is in the training loop. Each fault is chosen by a variable:

    DIP_FAULT_NAN_AT="N[:LR]"      the first report at iteration >= N raises TrialDiverged (the
                                   service's real failure path), for trials with lr >= LR
    DIP_FAULT_PAUSE="EVENT[:N][#K]" the K-th trial (default 1) to reach EVENT ("report" at
                                   iteration N, or "end": after its last report, before it
                                   returns) writes DIP_FAULT_DIR/paused and waits forever
    DIP_FAULT_SLOW_S="S"           every report sleeps S seconds: trials last at least that long
                                   whatever the machine's speed (an outage lands mid-trial)
    DIP_FAULT_BARRIER="N"          each trial waits at its first report until N trials got there
                                   (N trials run at once, so on N one-CPU nodes, one per node)
    DIP_FAULT_KILL_AT="N"          each trial's worker process SIGKILLs itself at its report at
                                   iteration N, once per trial (a lost worker or node), after
                                   that report's records reached the relay, before its checkpoint
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from study.engine.trial import TrialDiverged

HOOK = {"DIP_TEST_HOOK": "tests.faults:hook"}


def _once(name: str) -> bool:
    """True for the first caller across processes (an exclusive create in DIP_FAULT_DIR)."""
    try:
        os.close(os.open(Path(os.environ["DIP_FAULT_DIR"]) / name, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _trial_id() -> str:
    from ray import tune

    return tune.get_context().get_trial_id()


def _nan(event: str, trial: Any) -> None:
    spec = os.environ.get("DIP_FAULT_NAN_AT")
    if not spec or event != "report":
        return
    at, _, lr = spec.partition(":")
    if trial.iteration >= int(at) and trial.cfg.lr >= float(lr or 0):
        raise TrialDiverged(f"loss became nan at iteration {trial.iteration} (lr = {trial.cfg.lr}); "
                            "injected by tests/faults.py")


def _pause(event: str, trial: Any) -> None:
    spec = os.environ.get("DIP_FAULT_PAUSE")
    if not spec:
        return
    spec, _, k = spec.partition("#")
    want, _, at = spec.partition(":")
    if event != want or (at and trial.iteration != int(at)):
        return
    for i in range(1, int(k or 1) + 1):  # the K-th trial to get here is the one to pause
        if _once(f"reached-{i}"):
            break
    else:
        return
    if i != int(k or 1):
        return
    (Path(os.environ["DIP_FAULT_DIR"]) / "paused").write_text(f"{_trial_id()} {event} {trial.iteration}\n")
    while True:
        time.sleep(1)


def _kill(event: str, trial: Any) -> None:
    spec = os.environ.get("DIP_FAULT_KILL_AT")
    if spec and event == "reported" and trial.iteration == int(spec) and _once(f"killed-{_trial_id()}"):
        os.kill(os.getpid(), signal.SIGKILL)


def _slow(event: str, trial: Any) -> None:
    if event == "report" and os.environ.get("DIP_FAULT_SLOW_S"):
        time.sleep(float(os.environ["DIP_FAULT_SLOW_S"]))


def _barrier(event: str, trial: Any) -> None:
    n = int(os.environ.get("DIP_FAULT_BARRIER", "0"))
    if not n or event != "report" or not _once(f"arrived-{_trial_id()}"):
        return
    folder, deadline = Path(os.environ["DIP_FAULT_DIR"]), time.time() + 300
    while len(list(folder.glob("arrived-*"))) < n and time.time() < deadline:
        time.sleep(0.2)


def hook(event: str, trial: Any) -> None:
    _barrier(event, trial)
    _slow(event, trial)
    _nan(event, trial)
    _pause(event, trial)
    _kill(event, trial)
