"""Trials that fail on a real local Ray: a worker process killed mid-trial is retried from
its checkpoint in the same MLflow run, every metric step logged once; when the retries are
spent, the trial ends FAILED with the reason."""
from __future__ import annotations

import pytest

from faults import HOOK
from studyutil import check_study, cli, client
from study.tracking.keys import to_mlflow

pytestmark = pytest.mark.slow
FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "60",
         "--report-every", "10", "--image-every", "20", "--scheduler", "fifo",
         "--max-concurrent", "2", "--num-samples", "2", "--checkpoint-every", "2"]


def _run(tmp_path, name, *extra):
    faults = tmp_path / "faults"
    faults.mkdir(exist_ok=True)
    # Each trial's worker dies once, at iteration 30, after handing that report's records
    # to the relay and before its checkpoint: the last checkpoint is at iteration 20.
    return cli("run", "--name", name, "--root", str(tmp_path), *FLAGS, *extra, **HOOK,
               DIP_FAULT_KILL_AT="30", DIP_FAULT_DIR=str(faults))


def test_lost_worker_is_retried_in_its_own_run(tmp_path):
    r = _run(tmp_path, "rt")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, children = check_study(uri, "rt", n=2, iterations=60)
    c = client(uri)
    for run in children:
        assert run.info.status == "FINISHED" and run.data.tags["dip.completed"] == "true"
        assert run.data.tags["dip.retries"] == "1"
        assert run.data.tags["dip.retried_from"] == "20"
        assert run.data.tags["dip.resumed_from"] == "20"
        # Steps 21-30 ran twice; step 30 was delivered by the lost attempt and is not again.
        steps = [m.step for m in c.get_metric_history(run.info.run_id, to_mlflow("iteration"))]
        assert steps == [0, 10, 20, 30, 40, 50, 60], steps
        assert [m.step for m in c.get_metric_history(run.info.run_id, to_mlflow("psnr"))] == [10, 20, 30, 40, 50, 60]
    assert r.stdout.count("lost its worker") == 2


def test_spent_retries_end_failed_with_the_reason(tmp_path):
    r = _run(tmp_path, "rf", "--max-failures", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "0 trials finished, 2 failed" in r.stdout
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _, children = check_study(uri, "rf", n=2, iterations=60)
    for run in children:
        assert run.info.status == "FAILED"
        assert "died" in run.data.tags["dip.end_reason"].lower(), run.data.tags["dip.end_reason"]
