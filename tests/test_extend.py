"""`extend NAME --num-samples N` on a finished study: the same MLflow experiment and parent
run, earlier child runs untouched, N new ones numbered on, and Optuna's sampler
conditioned on every earlier trial (shown by replaying its first new proposal)."""
from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest

import run_study
from studyutil import check_study, cli, read_json, study_runs
from study.tracking.keys import to_mlflow

FLAGS = ["--size", "32", "--scales", "2", "--channels", "8", "--iterations", "20",
         "--report-every", "10", "--image-every", "20", "--scheduler", "fifo", "--max-concurrent", "2"]
# TPE proposes at random until this many trials are complete (Optuna's default).
STARTUP = optuna.samplers.TPESampler().__dict__.get("_n_startup_trials", 10)


def _first_proposal(db: str, name: str, seed: int, space_spec: dict) -> dict:
    """What TPE proposes next for the study in `db` (sqlite file), as the study's sampler would."""
    from study.config import TrialConfig
    from study.space import SearchSpace

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{db}",
                              sampler=optuna.samplers.TPESampler(seed=seed))
    trial = study.ask()
    SearchSpace(space_spec, TrialConfig(size=32, scales=2, channels=8))(trial)
    return trial.params


@pytest.mark.slow
def test_extend_a_finished_study(tmp_path):
    n, more = STARTUP, 2  # enough earlier trials that TPE is past its random start-up
    r = cli("run", "--name", "ex", "--root", str(tmp_path), "--num-samples", str(n), *FLAGS)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    parent0, before = study_runs(uri, "ex")
    db = tmp_path / "ex" / "optuna.db"
    shutil.copy(db, tmp_path / "before.db")
    meta = read_json(tmp_path / "ex" / "study.json")

    r = cli("extend", "ex", "--root", str(tmp_path), "--num-samples", str(more))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"{more} more trials (trial_{n:04d} on), {n + more} in all" in r.stdout
    parent, children = check_study(uri, "ex", n=n + more, iterations=20)
    assert parent.info.run_id == parent0.info.run_id and parent.data.tags["dip.asked"] == str(n + more)
    old = {c.info.run_id: c for c in before}
    for c in children:  # earlier runs unchanged
        if c.info.run_id in old:
            o = old[c.info.run_id]
            assert (c.info.status, c.info.end_time, c.data.metrics) == (o.info.status, o.info.end_time, o.data.metrics)
    def numbers(runs):  # Tune's trial names, numbered through the study
        return sorted(r.data.tags["dip.trial_name"] for r in runs)

    assert numbers(before) == [f"trial_{i:04d}" for i in range(n)]
    assert numbers(c for c in children if c.info.run_id not in old) == [f"trial_{i:04d}" for i in range(n, n + more)]

    # One Optuna study holds every trial, numbered on.
    study = optuna.load_study(study_name="ex", storage=f"sqlite:///{db}")
    trials = sorted(study.trials, key=lambda t: t.number)
    assert [t.number for t in trials] == list(range(n + more))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    # Its first new proposal is TPE's answer to the n earlier trials (replayed on a copy of
    # the record before `extend`, with the extension's seed), not what the same sampler
    # proposes without them (its random start-up).
    seed = meta["study"]["seed"] + n
    conditioned = _first_proposal(str(tmp_path / "before.db"), "ex", seed, meta["space"])
    assert trials[n].params == conditioned
    fresh = tmp_path / "fresh.db"
    optuna.create_study(study_name="ex", storage=f"sqlite:///{fresh}", direction="maximize")
    assert _first_proposal(str(fresh), "ex", seed, meta["space"]) != conditioned

    best = read_json(tmp_path / "ex" / "best.json")  # the best of all n + more trials
    done = [c for c in children if c.data.tags.get("dip.completed") == "true"]
    assert best["value"] == max(c.data.metrics[to_mlflow("psnr_ema")] for c in done)
    r = cli("status", "ex", "--root", str(tmp_path))
    assert r.returncode == 0 and f"{n + more} finished" in r.stdout and f"of {n + more} asked" in r.stdout, r.stdout
    r = cli("list", "--root", str(tmp_path))
    assert r.returncode == 0 and f"{n + more}/{n + more}" in r.stdout and "FINISHED" in r.stdout, r.stdout


def test_extend_bad_input(tmp_path, capsys):
    """Refused in one sentence before Ray starts (the CLI's main() in this process)."""
    def refused(*args: str) -> str:
        assert run_study.main(list(args)) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    for args, words in ((["nope", "--num-samples", "2"], "no study 'nope'"),
                        (["nope", "--num-samples", "0"], "--num-samples 0"),
                        (["nope", "--num-samples", "-3"], "--num-samples -3")):
        assert words in refused("extend", *args, "--root", str(tmp_path))
    # a relative --root is the current folder's (issue 25): the refusal names where it looked
    assert f"no study 'x' under '{Path.cwd() / 'relative/dir'}'" in refused(
        "extend", "x", "--num-samples", "2", "--root", "relative/dir")
    assert "does not exist" in refused("list", "--root", str(tmp_path / "none"))
    assert "no study 'nope'" in refused("status", "nope", "--root", str(tmp_path))
