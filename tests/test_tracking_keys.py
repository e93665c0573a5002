"""The one translation between the study's names and MLflow's keys (study/tracking/keys.py),
and the saved view of the runs table (study/tracking/view.py), on a real local MLflow store."""
from __future__ import annotations

import json

import pytest

from study.tracking.keys import from_mlflow, image_to_mlflow, mlflow_keys, to_mlflow
from study.tracking.view import VIEW_TAG, save_trials_view, trials_link, view_state


@pytest.mark.parametrize("name, key", [
    ("psnr_ema", "fit/psnr_ema"), ("psnr_ema/camera", "images/camera/fit/psnr_ema"), ("loss", "fit/loss"),
    ("ssim_autostop", "fit/ssim_autostop"), ("psnr_estimate", "fit/psnr_estimate"),  # by pattern
    ("best_psnr_ema", "fit/best_psnr_ema"), ("loss/a/b", "images/a/b/fit/loss"), ("psnr_repeat_std", "fit/psnr_repeat_std"),
    ("autostop_fired/camera", "other/camera/autostop_fired"), ("iteration", "other/iteration"),
    ("forwards", "other/forwards"), ("sigma_estimated/moon", "other/moon/sigma_estimated"),
    ("system/cpu_utilization_percentage", "system/cpu_utilization_percentage"),
    ("trial/networks", "trial/networks"),
])
def test_each_name_has_one_key_and_reads_back(name, key):
    assert to_mlflow(name) == key and from_mlflow(key) == name


def test_the_ui_sorts_the_groups_in_reading_order():
    """MLflow sorts a run page's sections by name: the mean curves first, then per image its
    pictures and its curves, the rest after; one section of each kind per image."""
    keys = [to_mlflow(n) for n in ("autostop_fired/camera", "best_iteration", "psnr_ema/camera",
                                   "loss", "trial/cpus")] + [image_to_mlflow("camera/output")]
    sections = sorted({k.rsplit("/", 1)[0] for k in keys})
    assert sections == ["fit", "images/camera", "images/camera/fit", "other", "other/camera", "trial"]


def test_an_older_study_reads_as_itself():
    """Keys recorded before the groups are their own names, and a run is searched for both."""
    assert from_mlflow("psnr_ema/camera") == "psnr_ema/camera" and from_mlflow("iteration") == "iteration"
    assert mlflow_keys("iteration") == ("other/iteration", "iteration")


def test_the_saved_view_is_what_the_ui_loads(tmp_path):
    """An envelope {name, createdAt, updatedAt, state: JSON} in the experiment tag, its state
    the facets and the columns; the link carries only its key and the training workflow."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    exp = c.create_experiment("s", artifact_location=(tmp_path / "a").as_uri())
    save_trials_view(c, exp, [("loss", "min"), ("seconds", "min")], ["noise_mode", "lr"])
    envelope = json.loads(c.get_experiment(exp).tags[VIEW_TAG])
    assert {"name", "createdAt", "updatedAt"} <= set(envelope)
    state = json.loads(envelope["state"])
    assert state == view_state([("loss", "min"), ("seconds", "min")], ["noise_mode", "lr"])
    assert state["orderByKey"] == "metrics.`fit/loss`" and state["orderByAsc"] is True
    assert state["selectedColumns"] == state["columnOrder"] == [
        "params.`noise_mode`", "params.`lr`", "metrics.`fit/loss`", "metrics.`other/seconds`",
        "metrics.`fit/psnr_ema`", "metrics.`fit/psnr_autostop`", "metrics.`fit/psnr_best`", "attributes.`Duration`"]
    assert trials_link("http://h:1", exp) == \
        f"http://h:1/#/experiments/{exp}/runs?viewStateShareKey=dip-trials&workflowType=machine_learning"


def test_the_ui_link_falls_back_for_a_study_older_than_the_view(tmp_path):
    """`ui` prints the saved view's link where the store has it, else the former URL filter
    and sort (on the study's own key), both in the training workflow."""
    from mlflow.tracking import MlflowClient

    from study.cli.answer import study_link

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(tracking_uri=uri)
    old = c.create_experiment("old", artifact_location=(tmp_path / "a").as_uri())
    link = study_link("http://h:1", old, "psnr_ema", "max", uri)
    assert "orderByKey=metrics.%60psnr_ema%60" in link and "workflowType=machine_learning" in link
    new = c.create_experiment("new", artifact_location=(tmp_path / "b").as_uri())
    save_trials_view(c, new, [("psnr_ema", "max")], ["lr"])
    assert study_link("http://h:1", new, "psnr_ema", "max", uri) == trials_link("http://h:1", new)
