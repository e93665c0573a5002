"""The study report, and what a user sees of a study: run names."""
from __future__ import annotations

import pytest

from study.config import TrialConfig
from study.modes import trial_run_name

SEARCHED = ["noise_mode", "timestep", "lr"]


@pytest.mark.parametrize("changes,searched,want", [
    ({"noise_mode": "ddpm_resample", "timestep": 120, "lr": 0.0032}, SEARCHED, "ddpm_resample t=120 lr=3.2e-03"),
    ({"noise_mode": "uniform", "timestep": 120, "lr": 0.02}, SEARCHED, "uniform lr=0.02"),  # no t for uniform
    ({"noise_mode": "ddpm_random_t", "timestep": 0, "lr": 1e-4}, SEARCHED, "ddpm_random_t t=0 lr=1.0e-04"),
    ({"noise_mode": "ddpm", "channels": 16, "reg_noise_std": 0.05}, ["channels", "reg_noise_std"], "ddpm channels=16"),
    ({"noise_mode": "uniform", "reg_noise_std": 0.05}, ["reg_noise_std", "loss"], "uniform reg=0.05 loss=mse"),
    ({"noise_mode": "gaussian"}, [], "gaussian"),
])
def test_trial_run_name_says_what_the_trial_tries(changes, searched, want):
    assert trial_run_name(TrialConfig(**changes).to_dict(), searched) == want
    # A trial's run: its name first (what the summary, status, export and the report call it).
    assert trial_run_name(TrialConfig(**changes).to_dict(), searched, "trial_0007") == f"trial_0007 {want}"


# --- the report, on a study recorded in a real MLflow store and a real Optuna storage ---
# The runs are written the way a study records them (tags dip.role / dip.completed,
# params, metrics per image, keyed images), so the test needs no Ray and takes seconds.

import json  # noqa: E402

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from study import report  # noqa: E402
from study.config import StudyConfig  # noqa: E402
from study.space import OPTUNA_DB, make_storage  # noqa: E402

IMAGES = ("camera", "hubble_deep_field")  # brightness 0.51 and 0.08
SPACE = {"noise_mode": ["uniform", "ddpm", "ddpm_resample"], "timestep": {"low": 0, "high": 300, "log": False},
         "lr": {"low": 0.001, "high": 0.05, "log": True}}
# (mode, t, lr, state, psnr_ema on camera, on hubble): DDPM inputs lose on the bright image
# and win on the dark one, so the report must call the claim consistent.
TRIALS = [("uniform", None, 0.01, "completed", 24.0, 26.0), ("uniform", None, 0.02, "completed", 23.0, 25.0),
          ("ddpm", 50, 0.01, "completed", 23.5, 28.0), ("ddpm", 200, 0.005, "completed", 22.5, 27.0),
          ("ddpm_resample", 120, 0.0032, "stopped early", 18.0, 20.0), ("ddpm_resample", 80, 0.04, "failed", 0, 0)]


def _record_study(root, observation_offset: float = 0.0):
    root.mkdir(parents=True, exist_ok=True)
    s = StudyConfig(name="fab", root=str(root), trial=TrialConfig(
        images=IMAGES, size=32, scales=2, channels=8, iterations=40, repeats=2))
    facts = report.image_facts(s.trial, baseline=False)  # the observations' PSNR, as a trial logs it
    obs = {f"psnr_observation/{f.label}": f.observation_psnr + observation_offset for f in facts}
    c = MlflowClient(s.resolved_tracking_uri)
    exp = c.create_experiment("fab", artifact_location=(root / "artifacts" / "fab").as_uri())
    parent = c.create_run(exp, run_name="study", tags={"dip.role": "study"}).info.run_id
    (root / "fab").mkdir()
    (root / "fab" / "study.json").write_text(json.dumps({
        "study": s.to_dict(), "experiment_id": exp, "parent_run_id": parent, "space": SPACE,
        "created": "2026-11-27T20:00:00"}))
    ostudy = optuna.create_study(study_name="fab", storage=make_storage(root / "fab" / OPTUNA_DB),
                                 direction="maximize")
    dists = {"noise_mode": optuna.distributions.CategoricalDistribution(SPACE["noise_mode"]),
             "timestep": optuna.distributions.IntDistribution(0, 300),
             "lr": optuna.distributions.FloatDistribution(0.001, 0.05, log=True)}
    for k, (mode, t, lr, state, cam, hub) in enumerate(TRIALS):
        tags = {"dip.role": "trial", "mlflow.parentRunId": parent}
        if state == "completed":
            tags["dip.completed"] = "true"
        run = c.create_run(exp, run_name=f"trial_{k:04d}", tags=tags).info.run_id
        params = {"noise_mode": mode, "lr": str(lr), "timestep": str(t or 100)}
        for key, v in params.items():
            c.log_param(run, key, v)
        if state != "failed":
            m = {"psnr_ema": (cam + hub) / 2, "psnr_ema/camera": cam, "psnr_ema/hubble_deep_field": hub,
                 "psnr_best": (cam + hub) / 2 + 0.5, "psnr_best/camera": cam + 0.5,
                 "psnr_best/hubble_deep_field": hub + 0.5, "best_iteration": 30.0, "psnr_ema_repeat_std": 0.1,
                 "iteration": 40.0 if state == "completed" else 10.0, **obs}
            for key, v in m.items():
                c.log_metric(run, key, v, step=int(m["iteration"]))
            p = {"noise_mode": mode, "lr": lr, **({"timestep": t} if t is not None else {})}
            ostudy.add_trial(optuna.trial.create_trial(params=p, distributions={n: dists[n] for n in p},
                                                       value=m["psnr_ema"]))
        for label in IMAGES:
            c.log_image(run, np.full((32, 32, 3), 0.5, np.float32), key=f"{label}/output_ema", step=40)
        c.set_terminated(run, "FAILED" if state == "failed" else "FINISHED")
    return s, c, parent


def test_report_answers_per_mode_per_image_with_baseline_and_optuna(tmp_path):
    s, c, parent = _record_study(tmp_path)
    path = report.make_report(str(tmp_path), "fab")
    md = path.read_text()
    assert path == tmp_path / "fab" / "report" / "report.md"
    # Per mode: counts by state, best and median over completed trials only.
    assert "| uniform | 2 | 2 | 0 | 0 | 25.00 | 24.50 |" in md
    assert "| ddpm | 2 | 2 | 0 | 0 | 25.75 | 25.25 |" in md
    assert "| ddpm_resample | 2 | 0 | 1 | 1 | - | - |" in md
    assert "best input mode is **ddpm** (25.25, 2 trials)" in md and "uniform input: 24.50" in md
    # Per image, darkest first, with brightness, the BM3D baseline and the oracle labelled.
    hub, cam = md.index("| hubble_deep_field | 0.07"), md.index("| camera | 0.5")
    assert hub < cam
    row = md[hub:md.index("\n", hub)].split(" | ")
    obs, bm3d = float(row[2]), float(row[3])
    assert 19 < obs < 24 and bm3d > obs + 2, row  # BM3D really denoised the same observation
    assert "psnr_best (oracle)" in md and "**oracle**" in md
    assert "consistent with the claim" in md and "hubble_deep_field (brightness 0.08): +2.00 dB" in md
    assert "Check: the regenerated observations match" in md
    assert "`ddpm_resample t=120 lr=3.2e-03`" in md  # every trial, named for what it tries
    for fig in ("metric_vs_timestep.png", "metric_vs_lr.png", "best_outputs.png", "optuna_history.png",
                "optuna_importances.png", "optuna_slice.png", "psnr_ema_vs_timestep_hubble_deep_field.png"):
        assert f"]({fig})" in md and (path.parent / fig).stat().st_size > 2000, fig
    # Logged to the parent run under report/.
    logged = {f.path for f in c.list_artifacts(parent, "report")}
    assert "report/report.md" in logged and "report/best_outputs.png" in logged


def test_report_warns_when_the_baseline_saw_other_observations(tmp_path):
    _record_study(tmp_path, observation_offset=0.5)
    md = report.make_report(str(tmp_path), "fab", out=tmp_path / "r", log=False).read_text()
    assert "**Warning**: the observations regenerated for the baseline differ" in md


def test_report_without_baseline_says_so_and_shows_none(tmp_path):
    from PIL import Image

    _record_study(tmp_path)
    md = report.make_report(str(tmp_path), "fab", out=tmp_path / "r", baseline=False, log=False).read_text()
    assert "BM3D" not in md and "Baseline: none (report --no-baseline)" in md, md
    with Image.open(tmp_path / "r" / "best_outputs.png") as grid:  # observation | output | clean
        assert grid.width == 3 * (128 + 2) + 2, grid.size


def test_a_study_root_copied_elsewhere_reports_where_it_lies(tmp_path):
    """rsync a root from a cluster's head to a laptop: the study there reads its own MLflow
    store and writes its report there, not into the path it was made under."""
    import shutil

    _record_study(tmp_path / "made")
    shutil.copytree(tmp_path / "made", tmp_path / "here")
    shutil.rmtree(tmp_path / "made")
    path = report.make_report(str(tmp_path / "here"), "fab", baseline=False, log=False)
    assert path == tmp_path / "here" / "fab" / "report" / "report.md" and "trial_0000" in path.read_text()
    assert not (tmp_path / "made").exists()


def test_report_refuses_an_unknown_study_in_one_sentence(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    r = subprocess.run([sys.executable, "run_study.py", "report", "nope", "--root", str(tmp_path)],
                       cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no study 'nope'" in r.stderr and r.stderr.count("\n") == 1


def test_every_trial_table_is_best_first_in_the_objectives_direction():
    """A minimised objective (loss, seconds) lists its smallest value first; trials without
    it come last either way."""
    from study.config import TrialConfig
    from study.report.tables import TrialRow, trials_appendix

    def row(name: str, **m: float) -> TrialRow:
        return TrialRow(name, name, "completed", "uniform", None, 0.01, 40, m)

    rows = [row("a", loss=0.3), row("b", loss=0.1), row("c"), row("d", loss=0.2)]

    def order(mode: str) -> list[str]:
        text = trials_appendix(rows, "loss", TrialConfig(), [], mode)
        return [line.split("|")[1].strip() for line in text.splitlines()[4:]]

    assert order("min") == ["b", "d", "a", "c"]
    assert order("max") == ["a", "d", "b", "c"]


def test_the_report_grid_is_torchvisions_layout():
    """report/images.py tiles the best outputs itself (torchvision costs 2 s to import)."""
    import torch
    from torchvision.utils import make_grid

    from study.report.images import tile_grid

    tiles = [torch.rand(3, 16, 12, generator=torch.Generator().manual_seed(k)) for k in range(7)]
    for ncol in (3, 4):
        assert torch.equal(tile_grid(tiles, ncol), make_grid(tiles, nrow=ncol, padding=2, pad_value=1.0))
