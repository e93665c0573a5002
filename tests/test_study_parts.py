"""Fast tests of small service parts that only end-to-end tests reached before: the
scheduler choice, MLflow's flattened params, `status`'s progress lines, the storage check
for several nodes, and trial numbering through `extend`s."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

from study.cli.progress import progress_lines
from study.cluster.tune import TrialName, _scheduler
from study.config import StudyConfig, TrialConfig
from study.service import check_storage
from study.tracking.records import MAX_PARAM_LEN, flat_params
from study.tracking.store import StudyView, TrialSummary


def study(**kw) -> StudyConfig:
    return StudyConfig(trial=TrialConfig(iterations=80, report_every=10), name="parts", root="/tmp/parts", **kw)


@pytest.mark.parametrize("name, kind", [("fifo", FIFOScheduler), ("median", MedianStoppingRule),
                                        ("asha", ASHAScheduler)])
def test_scheduler_by_name(name, kind):
    assert type(_scheduler(study(scheduler=name))) is kind


def test_asha_grace_never_exceeds_the_budget():
    sched = _scheduler(study(scheduler="asha", grace_period=500))
    assert sched._max_t == 80
    assert min(milestone for milestone, _ in sched._brackets[0]._rungs) == 80  # the first rung: the grace


def test_flat_params_dots_lists_and_cuts():
    out = flat_params({"a": 1, "trial": {"images": ["camera", "moon"], "lr": 0.01}, "long": "x" * 7000})
    assert out == {"a": "1", "trial.images": '["camera", "moon"]', "trial.lr": "0.01",
                   "long": "x" * MAX_PARAM_LEN}


def test_trial_names_go_on_through_extends():
    assert TrialName()(SimpleNamespace(experiment_tag="3_lr=0.01", trial_id="abc")) == "trial_0002"
    assert TrialName(first=10)(SimpleNamespace(experiment_tag="1_lr=0.01", trial_id="abc")) == "trial_0010"
    assert TrialName()(SimpleNamespace(experiment_tag="odd", trial_id="abc")) == "abc"


def test_storage_on_one_node_is_anything_but_several_need_a_shared_one():
    check_storage(study(), nodes=1)
    check_storage(study(storage="s3://bucket/ray"), nodes=3)
    check_storage(study(shared_storage=True), nodes=3)
    with pytest.raises(ValueError, match="others cannot read"):
        check_storage(study(), nodes=2)


def _trial(name, status, it, psnr, start, end):
    return TrialSummary(run_id=name, name=name, trial_id=name, status=status, completed=status == "FINISHED",
                        metrics={"iteration": it, "psnr_ema": psnr}, params={"lr": "0.01"},
                        tags={"dip.trial_name": name}, start=start, end=end)


def test_progress_lines_count_best_speed_and_eta(tmp_path):
    trials = (_trial("trial_0000", "FINISHED", 80, 25.0, 100, 140), _trial("trial_0001", "RUNNING", 40, 24.0, 140, 0))
    view = StudyView(name="p", tracking_uri=f"sqlite:///{tmp_path}/m.db", parent_run_id="none", status="RUNNING",
                     start=100, end=0, params={"metric": "psnr_ema", "trial.iterations": "80", "num_samples": "3"},
                     tags={}, trials=trials)
    lines = progress_lines(view, now=160)
    assert lines[0] == "trials: 1 finished, 1 running, 0 failed, 0 interrupted, 1 pending, of 3 asked"
    assert lines[1].startswith("best so far: psnr_ema = 25.0000  trial_0000")
    # 120 iterations over 60 s of trials running: 2 it/s; 80 + 40 left: at most 60 s
    assert lines[2] == "speed: 2.0 iterations/s over 1m00s of trials running (120 iterations); ETA at most 1m00s (early stopping may end it sooner)"
