"""A real study on a local Ray, recorded in a local MLflow store, exported and replayed."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from cdp import Chromium
from faults import HOOK
from study.tracking.keys import to_mlflow
from studyutil import (ROOT, TINY, best_child, check_study, cli, client, env, free_port, read_json, study_runs,
                       wait_http)

pytestmark = pytest.mark.slow
IMAGES = ("camera", "moon")  # two images per trial: the objective is their mean
# An image card's picture: MLflow serves a keyed image (`camera/output` -> `camera~output`)
# from the run's images/ artifacts.
IMAGE_SRC = re.compile(r'<img[^>]*\ssrc="[^"]*get-artifact\?path=images%2F[^"]*~[^"]*"')


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    space = root.parent / "space.yaml"
    space.write_text("noise_mode: [uniform, ddpm, ddpm_resample]\n"
                     "timestep: {low: 10, high: 200}\n"
                     "lr: {low: 0.001, high: 0.05, log: true}\n")
    # Trials with lr >= 0.02 diverge (NaN loss, injected by tests/faults.py) at their first
    # report: they must end FAILED with the reason, not be retried, and the study goes on.
    p = cli("run", "--name", "e2e", "--root", str(root), "--num-samples", "6", "--space",
            str(space), "--max-concurrent", "2", "--seed", "3", *TINY, "--image", *IMAGES,
            DIP_FAULT_NAN_AT="5:0.02", DIP_SYSMETRICS_EVERY="0.2", **HOOK)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, p


def test_trial_runs_hold_system_metrics(study):
    """With a sample every 0.2 s each trial run has its own system metrics, at 2 steps or more
    in every trial that ran to its end (one ASHA stops at a rung may end before its second)."""
    from test_sysmetrics import MACHINE

    root, _ = study
    c = client(f"sqlite:///{root}/mlflow.db")
    parent, children = study_runs(f"sqlite:///{root}/mlflow.db", "e2e")
    done = [r for r in children if r.data.tags.get("dip.completed") == "true"]
    assert done
    for r in done:
        names = set(r.data.metrics)
        assert MACHINE | {"trial/process_rss_megabytes"} <= names, sorted(names)
        for key in (*MACHINE, "trial/process_rss_megabytes"):
            hist = c.get_metric_history(r.info.run_id, key)
            assert len({m.step for m in hist}) >= 2, (key, [(m.step, m.timestamp) for m in hist])
            assert all(m.timestamp >= parent.info.start_time for m in hist)  # this study's
        assert r.data.metrics["trial/networks"] == len(IMAGES) and r.data.metrics["trial/cpus"] >= 1
    # However a trial ended (all its iterations, or ASHA at a rung, inside tune.report), its
    # run has a sample taken at or after its last report.
    ended = [r for r in children if r.info.status == "FINISHED"]
    assert any(r.data.tags.get("dip.completed") != "true" for r in ended), "no trial was stopped early"
    for r in ended:
        last = max(m.timestamp for m in c.get_metric_history(r.info.run_id, to_mlflow("iteration")))
        sampled = max(m.timestamp for m in c.get_metric_history(r.info.run_id, "system/cpu_utilization_percentage"))
        assert sampled >= last, (r.info.run_name, r.data.tags.get("dip.completed"), sampled - last)


def test_study_records_parent_children_metrics_images(study):
    root, _ = study
    parent, children = check_study(f"sqlite:///{root}/mlflow.db", "e2e", n=6, images=IMAGES)
    failed = [r for r in children if r.info.status == "FAILED"]
    assert failed, "the lr >= 0.02 trials should have failed"
    assert all(float(r.data.params["lr"]) >= 0.02 for r in failed)
    assert all("nan" in r.data.tags["dip.end_reason"].lower() for r in failed)
    assert all("dip.retries" not in r.data.tags for r in failed), "a diverged trial was retried"
    assert any(r.data.tags.get("dip.completed") == "true" for r in children)
    assert json.loads(parent.data.params["trial.images"]) == list(IMAGES)
    for r in children:  # runs named by the trial and what it tries, e.g. "trial_0002 ddpm t=120 lr=3.2e-03"
        trial, mode, *rest = r.info.run_name.split()
        assert mode == r.data.params["noise_mode"] and rest[-1].startswith("lr="), r.info.run_name
        assert any(x.startswith("t=") for x in rest) == (mode != "uniform"), r.info.run_name
        assert trial == r.data.tags["dip.trial_name"] and re.fullmatch(r"trial_\d{4}", trial), r.info.run_name
        # Params: what the space set (MLflow prints them above every image card); the whole
        # config is in a tag.
        assert set(r.data.params) <= {"noise_mode", "timestep", "lr"}, sorted(r.data.params)
        config = json.loads(r.data.tags["dip.config"])
        assert config["size"] == 32 and config["images"] == list(IMAGES)
        assert config["noise_mode"] == mode and float(r.data.params["lr"]) == config["lr"]
    # The study opens with one trial per mode its space offers; then TPE chooses.
    ostudy = optuna.load_study(study_name="e2e", storage=f"sqlite:///{root}/e2e/optuna.db")
    first = sorted(ostudy.trials, key=lambda t: t.number)[:3]
    assert [t.params["noise_mode"] for t in first] == ["uniform", "ddpm", "ddpm_resample"]
    assert {r.data.params["noise_mode"] for r in children} >= {"uniform", "ddpm", "ddpm_resample"}


def test_export_equals_best_child_and_parent(study, tmp_path):
    root, p = study
    uri = f"sqlite:///{root}/mlflow.db"
    parent, children = check_study(uri, "e2e", n=6, images=IMAGES)
    out = tmp_path / "best.json"
    e = cli("export", "e2e", "--root", str(root), "--out", str(out))
    assert e.returncode == 0, e.stderr
    best = read_json(out)
    want = best_child(children)
    assert best["mlflow_run_id"] == want.info.run_id
    assert best["value"] == pytest.approx(want.data.metrics[to_mlflow("psnr_ema")])
    assert parent.data.tags["dip.best_run_id"] == want.info.run_id
    assert best["config"]["noise_mode"] == want.data.params["noise_mode"]
    assert best["machine"]["device"] == "cpu" and best["machine"]["threads"] == "1"  # issue 24
    assert str(root / "e2e" / "best.json") in p.stdout  # the run printed where it exported
    # One name for the trial: the summary's, export's, best.json's, status's and the report's
    # is the first word of the MLflow run's name (what the UI shows).
    name = want.data.tags["dip.trial_name"]
    assert best["trial"] == name and want.info.run_name.split()[0] == name, (best["trial"], want.info.run_name)
    assert f"best trial {name}: psnr_ema = " in p.stdout and f"exported trial {name} " in e.stdout, e.stdout
    s = cli("status", "e2e", "--root", str(root))
    assert s.returncode == 0 and f"best so far: psnr_ema = {best['value']:.4f}  {name} " in s.stdout, s.stdout
    r = cli("report", "e2e", "--root", str(root), "--out", str(tmp_path / "report"), "--no-baseline", "--no-log")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"Best trial `{name}`" in (tmp_path / "report" / "report.md").read_text()


def test_replay_reproduces_the_best(study, tmp_path):
    root, _ = study
    best = root / "e2e" / "best.json"
    r = cli("train", "--config", str(best), "--out", str(tmp_path / "replay"), "--quiet")
    assert r.returncode == 0, r.stderr
    got, want = read_json(tmp_path / "replay" / "result.json"), read_json(best)
    assert got["config"] == want["config"]
    assert "notice" not in r.stderr  # the machine the trial ran on
    # Same seed and config on the same CPU: the same numbers, up to thread-count rounding.
    assert got["psnr_ema"] == pytest.approx(want["metrics"]["psnr_ema"], abs=0.05)
    r2 = cli("train", "--config", str(best), "--image", "moon", "--out", str(tmp_path / "moon"), "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert read_json(tmp_path / "moon" / "result.json")["config"]["images"] == ["moon"]


def _chromium() -> str | None:
    path = shutil.which("chromium")
    if path is None and os.environ.get("CI"):
        pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
    return path


def test_ui_shows_the_study_in_a_browser(study, tmp_path):
    """`run_study.py ui` serves the study's store and prints each study's link; headless
    Chromium opens it as a user would and sees (1) the objective's column holding numbers,
    (2) the model-training workflow, (3) a trial's page opening on a PSNR or loss group and
    (4) an image in every image card. DIP_SCREENSHOTS=docs/images keeps the README's
    screenshots."""
    root, _ = study
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (CI installs it)")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "run_study.py", "ui", "--root", str(root), "--port", str(port)],
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", ui, timeout=120)
        printed = [ui.stdout.readline() for _ in range(3)]
        link = next(line.split(": ", 1)[1].strip() for line in printed if line.strip().startswith("e2e: "))
        c = client(f"sqlite:///{root}/mlflow.db")
        exp_id = c.get_experiment_by_name("e2e").experiment_id
        child = next(r for r in c.search_runs([exp_id]) if r.data.tags.get("dip.role") == "trial"
                     and r.info.status == "FINISHED")
        base = f"http://127.0.0.1:{port}/#/experiments/{exp_id}"
        # The screenshot shows a trial that ran to the end: its slider spans every step.
        shown = next((r for r in c.search_runs([exp_id]) if r.data.tags.get("dip.completed") == "true"), child)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--hide-scrollbars"]
        objective = to_mlflow("psnr_ema")
        want = sorted(r.data.metrics[objective] for r in c.search_runs([exp_id], "tags.`dip.role` = 'trial'")
                      if objective in r.data.metrics)
        # Each page is read once what a user comes for is on it (polled in the page, not a
        # time budget): the table's numbers, the run's name, every image card's image loaded.
        text_has = "document.body.innerText.includes({})".format
        cells_ready = ("[...document.querySelectorAll({})].filter(e => /^-?[0-9]/.test(e.innerText.trim()))"
                       ".length >= {}").format(json.dumps(f'[col-id="metrics.`{objective}`"]'), len(want))
        images_ready = ("[...document.images].filter(i => i.src.includes('get-artifact?path=images%2F') && "
                        "i.complete && i.naturalWidth > 0).length >= {}").format
        # The trial's charts load lazily, as they scroll into view: a viewport tall enough
        # for the mean curves and both images' sections.
        metrics_url = f"{base}/runs/{shown.info.run_id}/model-metrics?workflowType=machine_learning"
        shots = Path(os.environ.get("DIP_SCREENSHOTS") or tmp_path).absolute()
        shots.mkdir(parents=True, exist_ok=True)
        browser_ = Chromium(browser, tmp_path / "profile", flags)
        try:
            runs_page = browser_.visit(f"{base}/runs", 1400, 900,
                                       f"{text_has(json.dumps('matching runs'))} && {text_has(json.dumps('study'))}")
            run_page = browser_.visit(f"{base}/runs/{child.info.run_id}", 1400, 900,
                                      f"{text_has(json.dumps(child.info.run_name))} && {text_has(json.dumps('psnr_ema'))}")
            link_page = browser_.visit(link, 1900, 900, cells_ready)
            metrics_page = browser_.visit(metrics_url, 1400, 5600, images_ready(4 * len(IMAGES)))
            browser_.visit(link, 1900, 560, cells_ready, screenshot=shots / "ui_study_link.png")
            browser_.visit(metrics_url, 1400, 2400, images_ready(4), screenshot=shots / "ui_trial_images.png")
        finally:
            browser_.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    (tmp_path / "link.html").write_text(link_page)
    (tmp_path / "model_metrics.html").write_text(metrics_page)
    # The experiment opens on its runs table: the parent run `study` with its 6 children.
    assert ">study<" in runs_page, runs_page[-2000:]
    assert re.search(r">7<(?:[^>]*>){0,6}\s*matching runs", runs_page), "the table should count 7 runs"
    assert child.info.run_name in run_page and "psnr_ema" in run_page
    # The printed link: the study's saved view, the trial runs only (6, no parent), sorted
    # by the study's metric, in the model-training workflow.
    assert f"/#/experiments/{exp_id}/runs?viewStateShareKey=" in link and "workflowType=machine_learning" in link
    assert re.search(r">6<(?:[^>]*>){0,6}\s*matching runs", link_page), "the link should show the 6 trials"
    assert ">study<" not in link_page and f"Sort: {objective}" in link_page.replace("<!-- -->", "")
    # (1) the objective's column holds a number for every trial that reported one
    cells = re.findall(rf'col-id="metrics.`{re.escape(objective)}`"[^>]*>(?:<[^>]+>)*([^<]*)<', link_page)
    cells = [x.strip() for x in cells if x.strip() not in ("", "-")]  # its header; a trial without one
    assert len(cells) == len(want) >= 3, cells
    assert sorted(float(x) for x in cells) == pytest.approx(want)
    for column in ("noise_mode", "timestep", "lr", to_mlflow("psnr_autostop"), to_mlflow("psnr_best")):
        assert f'col-id="{"params" if "/" not in column else "metrics"}.`{column}`"' in link_page, column
    # (2) the model-training workflow: its side bar (Runs, Models), not GenAI's
    assert re.search(r">Model registry<", link_page) and not re.search(r">(Evaluation runs|Prompts)<", link_page)
    # (3) a trial's page opens on the mean curves, a loss chart first; (4) every image card
    # (observation, input, output, output EMA of each image) shows an image at its step
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", metrics_page.replace("<!-- -->", "")))
    sections = re.findall(r"([\w/.-]+) \((\d+)\) Add chart", text)
    charts = re.findall(r'<h4[^>]*title="([^"]+)"', metrics_page)
    assert sections[0][0] == "fit" and charts[0] in (to_mlflow("loss"), to_mlflow("psnr")), (sections, charts[:3])
    assert [n for n, _ in sections if n.startswith("images/")] == [
        x for i in IMAGES for x in (f"images/{i}", f"images/{i}/fit")], sections
    cards = [t for t in charts if t.startswith("images/") and "/fit/" not in t]
    assert cards == [f"images/{i}/{n}" for i in IMAGES for n in ("input", "observation", "output", "output_ema")]
    assert "No image logged" not in metrics_page
    assert len(IMAGE_SRC.findall(metrics_page)) == len(cards), metrics_page[-3000:]
    assert ">Model registry<" in metrics_page  # the trial's page in the training workflow too
    assert all((shots / n).stat().st_size > 10_000 for n in ("ui_study_link.png", "ui_trial_images.png"))
    # Above the image cards only the params the space set: no whole config
    # (`images=[...], size=32, ...`) pushing them away.
    assert f"noise_mode={shown.data.params['noise_mode']}" in text, text[-3000:]
    assert not re.search(r"\b(size=32|channels=8|iterations=40|images=)", text), \
        re.findall(r".{80}\b(?:size=32|images=).{80}", text)[:2]
