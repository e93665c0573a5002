"""A real study (local Ray, local MLflow store) that searches `sigma_estimate`: SURE
trials log `sigma_estimated` per image, the space asks the field only of them, the report
shows the estimate beside the true sigma, and the export replays (issue 23)."""
from __future__ import annotations

import json

import pytest

from studyutil import TINY, cli, read_json, study_runs
from study.tracking.keys import to_mlflow  # MLflow's key of a study metric (issue 21)

pytestmark = pytest.mark.slow
IMAGES = ("camera", "moon")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    space = root.parent / "space.yaml"
    space.write_text("sigma_estimate: [true, false]\nnoise_mode: [ddpm]\nloss: [mse, sure]\n"
                     "lr: {low: 0.001, high: 0.01, log: true}\n")
    p = cli("run", "--name", "est", "--root", str(root), "--num-samples", "5", "--space", str(space),
            "--max-concurrent", "2", "--seed", "0", "--scheduler", "fifo", *TINY, "--image", *IMAGES)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root


def test_sure_trials_log_the_estimate_and_only_they_are_asked(study):
    _, children = study_runs(f"sqlite:///{study}/mlflow.db", "est")
    estimated = 0
    for r in children:
        sure = r.data.params["loss"] == "sure"
        assert ("sigma_estimate" in r.data.params) == sure, (r.info.run_name, r.data.params)
        assert ("sigma_est=" in r.info.run_name) == sure, r.info.run_name
        est = sure and r.data.params["sigma_estimate"] == "True"
        assert all((to_mlflow(f"sigma_estimated/{i}") in r.data.metrics) == est for i in IMAGES), r.data.metrics
        if est:
            estimated += 1
            config = json.loads(r.data.tags["dip.config"])
            assert config["sigma_estimate"] is True and config["sigma"] == pytest.approx(25 / 255)
            assert 10 / 255 < r.data.metrics[to_mlflow("sigma_estimated/camera")] < 40 / 255
    assert estimated, "seed 0 drew no SURE trial with sigma_estimate true"


def test_the_report_shows_the_estimate_beside_the_true_sigma(study):
    r = cli("report", "est", "--root", str(study), "--no-baseline", "--no-log")
    assert r.returncode == 0, r.stderr
    text = (study / "est" / "report" / "report.md").read_text()
    assert "## Noise level: true and estimated" in text
    assert "| camera | 25.0 |" in text and "| moon | 25.0 |" in text


def test_export_replays_sigma_estimate(study, tmp_path):
    out = tmp_path / "best.json"
    assert cli("export", "est", "--root", str(study), "--out", str(out)).returncode == 0
    best = read_json(out)
    r = cli("train", "--config", str(out), "--out", str(tmp_path / "replay"), "--quiet")
    assert r.returncode == 0, r.stderr
    got = read_json(tmp_path / "replay" / "result.json")
    assert got["config"] == best["config"] and "sigma_estimate" in got["config"]
    assert ("sigma_estimated" in got) == (best["config"]["loss"] == "sure" and best["config"]["sigma_estimate"])
