"""A study, then `confirm`: the finalists re-run on fresh seeds through Ray as child runs of
the study's parent (real Ray, real MLflow store), NAME/confirm.json, the report's Confirmed
section, `export --from confirm` replayed by `train`, --equal-compute, Ctrl-C then the
same command, and the refusals (exit 2, nothing written)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from faults import HOOK
from study.tracking.keys import to_mlflow  # MLflow's key of a study metric (issue 21)
from studyutil import ROOT, cli, client, env, read_json, study_runs, wait_until

pytestmark = pytest.mark.slow
FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "40",
         "--report-every", "10", "--image-every", "20", "--scheduler", "fifo", "--max-concurrent", "1"]
# Uniform (MSE: the loss is asked only for the DDPM inputs) and ddpm with SURE: the search
# opens with one trial per mode, so two trials give one variant of each.
SPACE = ("noise_mode: [uniform, ddpm]\ntimestep: {low: 10, high: 200}\n"
         "lr: {low: 0.002, high: 0.02, log: true}\nloss: [sure]\n")
KEYS = {"seeds", "images", "metric", "reference", "variants", "bm3d", "forwards"}
VARIANT_KEYS = {"run", "config", "search_value", "values", "mean", "ci95", "vs_reference"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("confirm")
    (root.parent / "space.yaml").write_text(SPACE)
    p = cli("run", "--name", "c", "--root", str(root), "--num-samples", "2", "--seed", "3",
            "--space", str(root.parent / "space.yaml"), *FLAGS)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root


def _refused(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert words in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def confirmed(study, tmp_path_factory):
    """The refusals first (before any confirmation, so --from confirm has nothing yet)."""
    root = study
    out = tmp_path_factory.mktemp("out") / "best.json"
    _refused(cli("export", "c", "--root", str(root), "--out", str(out), "--from", "confirm"),
             "no confirmation yet")
    bad = root.parent / "bad.png"
    bad.write_bytes(b"not a png")
    for args, words in ((["nope"], "no study 'nope'"), (["c", "--seeds", "0"], "--seeds 0"),
                        (["c", "--top", "0"], "--top 0"), (["c", "--images", str(bad)], "cannot read image")):
        _refused(cli("confirm", *args, "--root", str(root)), words)
    _refused(cli("export", "c", "--root", str(root), "--out", str(out), "--from", "later"), "invalid choice")
    assert not out.exists() and not (root / "c" / "confirm").exists() and not (root / "c" / "confirm.json").exists()
    p = cli("confirm", "c", "--root", str(root), "--seeds", "3")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, read_json(root / "c" / "confirm.json")


def _search_seeds(uri: str) -> set[int]:
    _, children = study_runs(uri, "c")
    cfgs = [json.loads(r.data.tags["dip.config"]) for r in children]
    return {c["seed"] + k for c in cfgs for k in range(c["repeats"])}


def test_confirm_json_fresh_seeds_remeasured_and_in_mlflow(confirmed):
    root, r = confirmed
    uri = f"sqlite:///{root}/mlflow.db"
    assert KEYS <= set(r) and r["metric"] == "psnr_ema" and len(r["seeds"]) == 3
    assert not set(r["seeds"]) & _search_seeds(uri), "a confirmation seed was used by the search"
    assert r["reference"] == next(v["run"] for v in r["variants"] if v["config"]["noise_mode"] == "uniform")
    parent, children = study_runs(uri, "c")
    search = {x.info.run_name: x for x in children}
    c = client(uri)
    for v in r["variants"]:
        assert VARIANT_KEYS <= set(v) and len(v["values"]) == 3
        assert {x["seed"] for x in v["values"]} == set(r["seeds"])
        assert v["search_value"] == pytest.approx(search[v["run"]].data.metrics[to_mlflow("psnr_ema")])
        run = c.get_run(v["confirm_run_id"])  # a run of its own, not the search trial's
        assert run.data.tags["dip.stage"] == "confirm" and run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["dip.confirms"] == search[v["run"]].info.run_id
        assert run.data.metrics[to_mlflow("psnr_ema")] == pytest.approx(v["mean"], abs=1e-6)
        assert run.data.metrics[to_mlflow("forwards")] == r["forwards"][v["run"]]
        low, high = v["ci95"]
        assert low <= v["mean"] <= high
    ref = next(v for v in r["variants"] if v["run"] == r["reference"])
    other = next(v for v in r["variants"] if v["run"] != r["reference"])
    diffs = [a["psnr_ema"] - b["psnr_ema"] for a, b in zip(other["values"], ref["values"])]
    assert other["vs_reference"]["mean_diff"] == pytest.approx(sum(diffs) / 3)
    assert other["vs_reference"]["wins"] == sum(d > 0 for d in diffs) and other["vs_reference"]["n"] == 3
    assert len(r["bm3d"]["values"]) == 3 and r["bm3d"]["vs_reference"]["n"] == 3
    # SURE: two forwards per step, at the same 40 iterations
    assert r["forwards"] == {ref["run"]: 40.0, other["run"]: 80.0}


def test_report_shows_the_confirmed_section(confirmed):
    root, r = confirmed
    text = (root / "c" / "report" / "report.md").read_text()
    assert "## Confirmed" in text and "**Confirmed answer**" in text
    assert (root / "c" / "report" / "confirmed_values.png").stat().st_size > 1000
    for v in r["variants"]:
        assert f"`{v['run']}`" in text and f"{v['mean']:.2f}" in text


def test_export_from_confirm_replays(confirmed, tmp_path):
    root, r = confirmed
    out = tmp_path / "best.json"
    e = cli("export", "c", "--root", str(root), "--out", str(out), "--from", "confirm")
    assert e.returncode == 0, e.stderr
    best = read_json(out)
    top = max(r["variants"], key=lambda v: v["mean"])
    assert best["confirmation"]["pairs"] == 3 and best["value"] == pytest.approx(top["mean"])
    t = cli("train", "--config", str(out), "--out", str(tmp_path / "replay"), "--quiet")
    assert t.returncode == 0, t.stderr
    nets = read_json(tmp_path / "replay" / "result.json")["networks"]
    got = {(n["image"], n["seed"]): n["metrics"]["psnr_ema"] for n in nets}
    want = {(x["image"], x["seed"]): x["psnr_ema"] for x in top["values"]}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= 0.01 for k in want), (got, want)


def test_ctrl_c_then_same_command_with_equal_compute(confirmed, tmp_path):
    """Ctrl-C while the second re-run runs; the same command finishes it and re-runs nothing
    that finished. --equal-compute: the SURE variant runs half the iterations, equal forwards."""
    root, _ = confirmed
    faults = tmp_path / "faults"
    faults.mkdir()
    args = ["confirm", "c", "--root", str(root), "--seeds", "1", "--equal-compute"]
    proc = subprocess.Popen([sys.executable, "run_study.py", *args], cwd=ROOT, text=True,
                            env=env(**HOOK, DIP_FAULT_PAUSE="report:10#2", DIP_FAULT_DIR=str(faults)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    wait_until(lambda: (faults / "paused").exists() or proc.poll() is not None, "a paused re-run", 300)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, out[-3000:]
    assert "the same command" in out
    uri = f"sqlite:///{root}/mlflow.db"
    c = client(uri)

    def runs():
        exp = c.get_experiment_by_name("c")
        return {r.data.tags["dip.variant"]: r for r in c.search_runs(
            [exp.experiment_id], "tags.`dip.stage` = 'confirm'") if "equal" in r.data.tags["dip.confirm_plan"]}

    before = runs()
    assert before["0"].info.status == "FINISHED" and before["1"].info.status == "KILLED"
    p = cli(*args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "confirm_0000 started" not in p.stdout
    after = runs()
    assert len(after) == 2 and after["0"].info.end_time == before["0"].info.end_time
    steps = [m.step for m in c.get_metric_history(after["0"].info.run_id, to_mlflow("psnr"))]
    assert steps and steps == sorted(set(steps)), "the finished re-run was run again"
    r = read_json(root / "c" / "confirm.json")
    assert r["equal_compute"]
    its = {v["config"]["loss"]: v["iterations"] for v in r["variants"]}
    assert its == {"mse": 40, "sure": 20}
    assert len(set(r["forwards"].values())) == 1 and list(r["forwards"].values())[0] == 40.0
