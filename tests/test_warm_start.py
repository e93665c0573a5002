"""`run --warm-start OTHER`: the earlier trials that fit the new space go into the new
study's Optuna record (fast, a real sqlite record, no Ray), bad input is refused before
anything is written, and end to end (slow) the warm-started study keeps its own trials,
runs and numbering through `extend`."""
from __future__ import annotations

import time
from types import SimpleNamespace

import optuna
import pytest

import run_study
from study import studydir, warmstart
from study.config import StudyConfig, TrialConfig
from study.space import (DEFAULT_SPACE, OPTUNA_DB, WARM_START_ATTR, SearchSpace, add_warm_trials,
                         finished_trials, fits, make_storage, warm_start_counts)
from study.studydir import StudyRecord
from studyutil import TINY, check_study, cli, client, read_json

BASE = TrialConfig(size=32, scales=2, channels=8)
STARTUP = 10  # TPE's random start-up (Optuna's default n_startup_trials)


def _space(spec: dict | None = None) -> SearchSpace:
    return SearchSpace(dict(spec or DEFAULT_SPACE), BASE)


def _earlier(root, name: str, n: int, space: SearchSpace, metric: str = "psnr_ema", **trial) -> StudyConfig:
    """An earlier study under `root`: study.json and an Optuna record of `n` trials asked as
    OptunaSearch asks them (define-by-run), told a value, plus one failed trial."""
    s = StudyConfig(name=name, root=str(root), trial=BASE.replace(**trial), metric=metric)
    studydir.write_study(StudyRecord(study=s, experiment_id="0", parent_run_id="p", space=space.spec,
                                     created=time.strftime("%Y-%m-%dT%H:%M:%S")))
    study = optuna.create_study(storage=make_storage(s.study_dir / OPTUNA_DB), study_name=name,
                                direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(n):
        t = study.ask()
        space(t)
        study.tell(t, 20.0 + i)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    return s


def test_distributions_match_what_suggest_records():
    """TPE reads a warm-start trial only if its distributions equal those the define-by-run
    space records when it suggests."""
    space = _space({**DEFAULT_SPACE, "channels": [8, 16], "reg_noise_std": {"low": 0.0, "high": 0.1}})
    study = optuna.create_study()
    for _ in range(20):
        t = study.ask()
        space(t)
        for name, d in t.distributions.items():
            assert next(p for p in space.params if p.name == name).distribution() == d


@pytest.mark.parametrize("params, ok", [
    ({"noise_mode": "ddpm", "timestep": 120, "lr": 1e-3}, True),
    ({"noise_mode": "uniform", "lr": 1e-3}, True),              # a uniform trial has no t
    ({"noise_mode": "uniform", "timestep": 5, "lr": 1e-3}, False),  # a name the space does not ask
    ({"noise_mode": "ddpm", "lr": 1e-3}, False),                # a name missing
    ({"noise_mode": "ddpm", "timestep": 400, "lr": 1e-3}, False),   # outside the range
    ({"noise_mode": "ddpm", "timestep": 12.5, "lr": 1e-3}, False),  # not an integer
    ({"noise_mode": "ddpm", "timestep": 120, "lr": 0.5}, False),
    ({"noise_mode": "perlin", "lr": 1e-3}, False),              # not a choice
    ({"noise_mode": "ddpm", "timestep": 120, "lr": 1e-3, "channels": 8}, False),
])
def test_fits_the_default_space(params, ok):
    assert fits(_space(), params) is ok


def test_fits_a_narrower_space_with_a_fixed_mode():
    space = _space({"noise_mode": "ddpm", "timestep": {"low": 0, "high": 100}, "lr": DEFAULT_SPACE["lr"]})
    assert fits(space, {"timestep": 50, "lr": 1e-3})
    assert not fits(space, {"timestep": 150, "lr": 1e-3})
    assert not fits(space, {"noise_mode": "ddpm", "timestep": 50, "lr": 1e-3})  # it was searched there


def test_seed_adds_the_fitting_trials_marked(tmp_path, capsys):
    narrow = _space({**DEFAULT_SPACE, "timestep": {"low": 0, "high": 150}})
    _earlier(tmp_path, "a", STARTUP + 2, _space())
    s = StudyConfig(name="b", root=str(tmp_path), trial=BASE, warm_start=("a",))
    earlier = finished_trials(tmp_path / "a", "a")
    want = [t for t in earlier if fits(narrow, t.params)]
    assert len(earlier) == STARTUP + 2 and 0 < len(want) < len(earlier)  # the failed one is not finished

    assert warmstart.seed(s, narrow) == len(want)
    line = capsys.readouterr().out.strip()
    left = [f"a#{t.number}" for t in earlier if t not in want]
    assert line.count("\n") == 0 and f"{len(want)} earlier trials (a {len(want)})" in line
    assert f"{len(left)} left out" in line and ", ".join(left) in line, line
    study = optuna.load_study(study_name="b", storage=make_storage(tmp_path / "b" / OPTUNA_DB))
    got = study.get_trials()
    assert [(t.params, t.value, t.user_attrs[WARM_START_ATTR], t.user_attrs["warm_start_number"]) for t in got] \
        == [(t.params, t.value, "a", t.number) for t in want]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in got)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert warm_start_counts(tmp_path / "b", "b") == {"a": len(want)}
    # A study warm-started itself does not pass those trials on: they are a's.
    assert finished_trials(tmp_path / "b", "b") == []


def test_tpe_conditions_on_the_added_trials(tmp_path):
    """Past its start-up, TPE proposes from the added trials: not what it proposes at random."""
    space = _space()
    _earlier(tmp_path, "a", STARTUP + 2, space)
    add_warm_trials(tmp_path, "b", ["max"], space, [(t, [t.value]) for t in finished_trials(tmp_path / "a", "a")])

    def first(storage: str) -> dict:
        study = optuna.create_study(study_name="b", storage=storage, direction="maximize", load_if_exists=True,
                                    sampler=optuna.samplers.TPESampler(seed=3))
        t = study.ask()
        space(t)
        return t.params

    assert first(f"sqlite:///{tmp_path / OPTUNA_DB}") != first(f"sqlite:///{tmp_path / 'fresh.db'}")


def test_another_metric_takes_the_mlflow_value(tmp_path, monkeypatch, capsys):
    """Studies with other objectives give the new metric's value from their child runs,
    found by the searched params; a trial without that metric is left out."""
    import study.tracking.store as store

    _earlier(tmp_path, "a", 3, _space(), metric="ssim_ema")
    earlier = finished_trials(tmp_path / "a", "a")
    runs = [SimpleNamespace(status="FINISHED", params={k: str(v) for k, v in t.params.items()},
                            metrics={"psnr_ema": 30.0 + t.number} if t.number else {}) for t in earlier]
    monkeypatch.setattr(store, "study_runs", lambda uri, name: runs)
    s = StudyConfig(name="b", root=str(tmp_path), trial=BASE, warm_start=("a",))
    assert any("objective is ssim_ema (this study's: psnr_ema)" in w for w in warmstart.check(s))
    assert warmstart.seed(s, _space()) == 2
    assert "1 left out" in capsys.readouterr().out
    study = optuna.load_study(study_name="b", storage=make_storage(tmp_path / "b" / OPTUNA_DB))
    assert [t.value for t in study.trials] == [31.0, 32.0]


def test_check_warns_on_another_task_and_images(tmp_path):
    _earlier(tmp_path, "a", 1, _space())
    _earlier(tmp_path, "c", 1, _space(), task="inpaint", images=("astronaut",))
    s = StudyConfig(name="b", root=str(tmp_path), trial=BASE, warm_start=("a", "c"))
    (w,) = warmstart.check(s)
    assert "'c'" in w and "task is inpaint" in w and "image set is astronaut" in w and w.count("\n") == 0


def test_config_and_flag(tmp_path):
    s = StudyConfig.from_dict({**StudyConfig(name="b", root=str(tmp_path), warm_start=("a", "c")).to_dict()})
    assert s.warm_start == ("a", "c")
    for bad, words in ((("b",), "'b' is not the name of another study"), (("a", "a"), "names a study twice"),
                       (("x/y",), "'x/y' is not the name")):
        with pytest.raises(ValueError, match=words):
            StudyConfig(name="b", root=str(tmp_path), warm_start=bad)
    from study.cli.common import build_study
    from study.cli.main import make_parser

    ns = make_parser().parse_args(["run", "--name", "b", "--root", str(tmp_path), "--warm-start", "a",
                                   "--warm-start", "c"])
    assert build_study(ns).warm_start == ("a", "c")


def test_unknown_study_is_refused_and_nothing_written(tmp_path, capsys):
    _earlier(tmp_path, "a", 1, _space())
    _earlier(tmp_path, "c", 1, _space())
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_study.main(["run", "--name", "b", "--root", str(tmp_path), "--warm-start", "a",
                           "--warm-start", "nope", "--num-samples", "2", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "no study 'nope' to warm-start from" in err and "studies there: a, c" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no study folder, no MLflow store


def test_unreadable_record_is_refused_and_nothing_written(tmp_path, capsys):
    _earlier(tmp_path, "a", 2, _space())
    (tmp_path / "a" / OPTUNA_DB).write_bytes(b"not a database, a damaged copy")
    before = sorted(p.name for p in tmp_path.iterdir())
    code = run_study.main(["run", "--name", "b", "--root", str(tmp_path), "--warm-start", "a",
                           "--num-samples", "2", *TINY])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "the Optuna record of study 'a'" in err and "cannot be read" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # read before anything is written


def test_a_study_that_fails_before_its_first_trial_leaves_nothing(tmp_path):
    """What run() undoes when the warm start or the tuner fails after the record is written
    (a real sqlite MLflow store and study folder, the steps run() takes)."""
    from study import service
    from study.space import add_warm_trials

    s = StudyConfig(name="b", root=str(tmp_path), trial=BASE)
    tracker = service._tracker(s)
    parent = tracker.start_parent(s.to_dict(), _space().spec, "note")
    studydir.write_study(StudyRecord(study=s, experiment_id=tracker.experiment_id, parent_run_id=parent,
                                     space=_space().spec, created="now"))
    add_warm_trials(s.study_dir, "b", ["max"], _space(), [])
    assert studydir.exists(s) and (s.study_dir / OPTUNA_DB).is_file()
    service._unwrite(s, tracker, parent, fresh=True)
    assert not s.study_dir.exists() and studydir.study_names(str(tmp_path)) == []
    assert tracker.client.get_run(parent).info.lifecycle_stage == "deleted"
    # A folder that was there before stays, without the record.
    s.study_dir.mkdir()
    (s.study_dir / "keep.txt").write_text("theirs")
    studydir.write_study(StudyRecord(study=s, experiment_id=tracker.experiment_id, parent_run_id=parent,
                                     space=_space().spec, created="now"))
    service._unwrite(s, tracker, tracker.start_parent(s.to_dict(), _space().spec, "note"), fresh=False)
    assert sorted(p.name for p in s.study_dir.iterdir()) == ["keep.txt"]


@pytest.mark.slow
def test_warm_started_study_and_its_extend(tmp_path):
    flags = ["--root", str(tmp_path), "--max-concurrent", "2", *TINY]
    r = cli("run", "--name", "a", "--num-samples", "4", *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = cli("run", "--name", "b", "--num-samples", "2", "--warm-start", "a", *flags)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "warm start: 4 earlier trials (a 4) added to the sampler's record; none left out" in r.stdout
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def record() -> list[optuna.trial.FrozenTrial]:
        return optuna.load_study(study_name="b", storage=f"sqlite:///{tmp_path / 'b' / OPTUNA_DB}").trials

    trials = record()
    assert len(trials) == 6 and sum(t.user_attrs.get(WARM_START_ATTR) == "a" for t in trials) == 4
    parent, children = check_study(uri, "b", n=2)
    assert parent.data.tags[warmstart.WARM_TAG] == "a" and parent.data.params["warm_start"] == '["a"]'
    assert read_json(tmp_path / "b" / "study.json")["study"]["warm_start"] == ["a"]
    report = (tmp_path / "b" / "report" / "report.md").read_text()
    assert "began from 4 finished trials of earlier studies (4 from `a`)" in report

    r = cli("extend", "b", "--root", str(tmp_path), "--num-samples", "1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 more trial (trial_0002 on), 3 in all" in r.stdout and "warm start:" not in r.stdout
    trials = record()
    assert len(trials) == 7 and sum(WARM_START_ATTR in t.user_attrs for t in trials) == 4
    parent, children = check_study(uri, "b", n=3)
    assert sorted(c.data.tags["dip.trial_name"] for c in children) == ["trial_0000", "trial_0001", "trial_0002"]
    assert len(client(uri).search_runs([client(uri).get_experiment_by_name("a").experiment_id])) == 5
