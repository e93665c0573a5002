"""Several objectives, `run --objective METRIC[:max|min]` (repeatable): parsing and refusals
(fast, no Ray), the Pareto front and `--pick` on hand-made trials, and one small end-to-end
study (slow) whose report, export, replay and status show the front."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import optuna
import pytest

import run_study
from study import export, pareto, warmstart
from study.config import StudyConfig, TrialConfig
from study.objectives import parse_objective
from study.results import BestTrial
from study.space import OPTUNA_DB, DEFAULT_SPACE, SearchSpace, add_warm_trials, finished_trials, make_storage
from study.tracking.store import TrialSummary
from studyutil import TINY, cli, read_json

ROOT = "/tmp/objectives-root"  # StudyConfig needs an absolute root; nothing is written there
TWO = ("psnr_ema:max", "seconds:min")


# --- parsing and validation -------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("psnr_ema", "psnr_ema:max"), ("loss", "loss:min"), ("psnr_ema:min", "psnr_ema:min"),
    ("seconds", "seconds:min"), ("autostop_iteration:min", "autostop_iteration:min"),
])
def test_an_objective_is_normalized_with_its_metric_direction(spec, want):
    assert parse_objective(spec) == want


@pytest.mark.parametrize("spec, words", [
    ("psnr_ema:up", "objective 'psnr_ema:up' has direction 'up'; allowed: max or min"),
    (":max", "objective ':max' is malformed; allowed: METRIC or METRIC:max or METRIC:min"),
    ("psnr_ema:max:x", "objective 'psnr_ema:max:x' is malformed"),
    ("psnr_ema:", "objective 'psnr_ema:' is malformed"),
    ("accuracy:max", "unknown objective metric 'accuracy' in 'accuracy:max'; allowed: psnr_ema"),
    ("accuracy", "unknown objective metric 'accuracy'; allowed: psnr_ema"),
])
def test_a_malformed_objective_is_refused_in_one_sentence(spec, words):
    with pytest.raises(ValueError) as e:
        StudyConfig(name="s", root=ROOT, objectives=(spec,))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_the_same_metric_twice_and_a_disagreeing_metric_are_refused():
    with pytest.raises(ValueError, match="objective metric 'psnr_ema' is given twice"):
        StudyConfig(name="s", root=ROOT, objectives=("psnr_ema:max", "psnr_ema:min"), scheduler="fifo")
    with pytest.raises(ValueError, match="metric 'psnr' is not the first objective's"):
        StudyConfig(name="s", root=ROOT, metric="psnr", objectives=TWO, scheduler="fifo")


@pytest.mark.parametrize("scheduler", ["asha", "median"])
def test_a_scheduler_with_several_objectives_is_refused_saying_why(scheduler):
    with pytest.raises(ValueError) as e:
        StudyConfig(name="s", root=ROOT, objectives=TWO, scheduler=scheduler)
    msg = str(e.value)
    assert msg.startswith(f"scheduler {scheduler!r} cannot run several objectives")
    assert "compares trials on one metric at each rung" in msg and "no single order" in msg
    assert msg.endswith("allowed: --scheduler fifo") and "\n" not in msg


def test_one_objective_keeps_todays_study():
    s = StudyConfig(name="s", root=ROOT, metric="loss", objectives=("loss",))  # asha is fine with one
    assert (s.metric, s.mode, s.multi_objective, s.objective_list) == ("loss", "min", False, [("loss", "min")])
    plain = StudyConfig(name="s", root=ROOT)
    assert plain.objective_list == [("psnr_ema", "max")] and not plain.multi_objective


def test_study_json_round_trip_and_an_old_one_without_the_field():
    s = StudyConfig(name="s", root=ROOT, objectives=["psnr_autostop", "autostop_iteration"],
                    metric="psnr_autostop", scheduler="fifo")
    d = json.loads(json.dumps(s.to_dict()))
    assert d["objectives"] == ["psnr_autostop:max", "autostop_iteration:min"]
    assert StudyConfig.from_dict(d) == s and s.mode == "max"
    d.pop("objectives")  # a study.json written before the field existed
    old = StudyConfig.from_dict(d)
    assert old.objectives == () and old.objective_list == [("psnr_autostop", "max")]


def _ns(*args: str):
    from study.cli.main import make_parser

    return make_parser().parse_args(["run", "--name", "s", "--root", ROOT, *args])


def test_flags_set_the_metric_from_the_first_objective():
    from study.cli.common import build_study

    s = build_study(_ns("--objective", "seconds:min", "--objective", "psnr_ema", "--scheduler", "fifo"))
    assert s.objectives == ("seconds:min", "psnr_ema:max") and (s.metric, s.mode) == ("seconds", "min")
    assert build_study(_ns("--metric", "psnr_ema", "--objective", "psnr_ema")).objectives == ("psnr_ema:max",)
    with pytest.raises(ValueError, match="metric 'psnr' is not the first objective's"):
        build_study(_ns("--metric", "psnr", "--objective", "psnr_ema"))


def test_a_preset_metric_gives_way_to_typed_objectives():
    from study.cli.common import build_study
    from study.cli.presets import apply_preset

    ns = _ns("--preset", "compare-modes", "--objective", "psnr_ema", "--objective", "seconds")
    s = build_study(apply_preset(ns))  # the preset ranks by psnr_autostop, with fifo
    assert s.objectives == TWO and s.metric == "psnr_ema" and s.scheduler == "fifo"


# --- the Pareto front and --pick --------------------------------------------------------

def _t(name: str, completed: bool = True, status: str = "FINISHED", **metrics: float) -> TrialSummary:
    return TrialSummary(run_id=f"run-{name}", name=f"uniform lr={name}", trial_id=f"id-{name}", status=status,
                        completed=completed, params={}, metrics=metrics, tags={"dip.trial_name": name},
                        start=0.0, end=0.0)


OBJ = [("psnr_ema", "max"), ("seconds", "min")]
TRIALS = [
    _t("trial_0000", psnr_ema=25.0, seconds=10.0),   # front: best psnr
    _t("trial_0001", psnr_ema=24.0, seconds=5.0),    # front
    _t("trial_0002", psnr_ema=23.0, seconds=6.0),    # dominated by trial_0001
    _t("trial_0003", psnr_ema=20.0, seconds=1.0),    # front: fastest
    _t("trial_0004", psnr_ema=24.0, seconds=5.0),    # a tie with trial_0001: both stay
    _t("trial_0005", psnr_ema=30.0),                 # no seconds: left out
    _t("trial_0006", psnr_ema=math.nan, seconds=0.5),  # not finite: left out
    _t("trial_0007", completed=False, psnr_ema=31.0, seconds=0.1),  # not completed
    _t("trial_0008", completed=False, status="FAILED", psnr_ema=32.0, seconds=0.1),
]


def test_the_front_is_the_non_dominated_completed_trials_in_row_order():
    members = pareto.front(TRIALS, OBJ)
    assert [t.trial for t in members] == ["trial_0000", "trial_0001", "trial_0004", "trial_0003"]
    assert pareto.front(TRIALS[::-1], OBJ) == members  # not listing order
    assert len(pareto.scored(TRIALS, OBJ)) == 5
    # Both directions turned: the same trials, minimising -psnr and maximising -seconds.
    flipped = [_t(t.trial, t.completed, t.status, **{k: -v for k, v in t.metrics.items()}) for t in TRIALS]
    assert [t.trial for t in pareto.front(flipped, [("psnr_ema", "min"), ("seconds", "max")])] == \
        [t.trial for t in members]
    assert pareto.front([], OBJ) == [] and pareto.front(TRIALS[5:], OBJ) == []


def test_pick_by_row_and_by_name_and_off_the_front_refused():
    members = pareto.front(TRIALS, OBJ)
    assert pareto.pick(TRIALS, members, "2").trial == "trial_0001"
    assert pareto.pick(TRIALS, members, "trial_0003").trial == "trial_0003"
    assert pareto.pick(TRIALS, members, "uniform lr=trial_0004").trial == "trial_0004"  # its run name
    for choice, words in (("0", "--pick 0 is not a row of the Pareto front; allowed: a row 1 to 4"),
                          ("5", "--pick 5 is not a row"),
                          ("trial_0002", "'trial_0002' is a trial of the study but not on its Pareto front"),
                          ("trial_0007", "not on its Pareto front"),
                          ("nosuch", "--pick 'nosuch' names no trial of the study; allowed: a row 1 to 4 "
                                     "or one of trial_0000, trial_0001, trial_0004, trial_0003")):
        with pytest.raises(ValueError) as e:
            pareto.pick(TRIALS, members, choice)
        assert words in str(e.value) and "\n" not in str(e.value)
    assert pareto.why_picked(members, members[0], None, OBJ) == \
        "best psnr_ema of the 4 trials on the Pareto front (trial_0000, row 1)"
    assert pareto.why_picked(members, members[3], "trial_0003", OBJ).startswith("--pick trial_0003 (trial_0003, row 4")


class _Tracker:
    def __init__(self, trials):
        self.trials = trials

    def trial_summaries(self):
        return self.trials

    def load_dict(self, run_id, name):
        return TrialConfig(lr=0.01).to_dict()


def test_export_writes_row_one_or_the_pick_and_says_why():
    s = StudyConfig(name="s", root=ROOT, objectives=TWO, scheduler="fifo")
    best = export.best_trial(_Tracker(TRIALS), s)
    d = best.to_dict()
    assert best.trial_id == "id-trial_0000" and d["front_size"] == 4 and d["value"] == 25.0
    assert d["objectives"] == [{"metric": "psnr_ema", "mode": "max", "value": 25.0},
                               {"metric": "seconds", "mode": "min", "value": 10.0}]
    assert d["picked"].startswith("best psnr_ema of the 4 trials on the Pareto front")
    other = export.best_trial(_Tracker(TRIALS), s, "4")
    assert other.trial_id == "id-trial_0003" and other.value == 20.0 and other.picked.startswith("--pick 4")
    with pytest.raises(ValueError, match="not on its Pareto front"):
        export.best_trial(_Tracker(TRIALS), s, "trial_0002")


def test_one_objective_exports_as_today():
    s = StudyConfig(name="s", root=ROOT)
    best = export.best_trial(_Tracker(TRIALS), s)
    assert best.trial_id == "id-trial_0005"  # best completed psnr_ema; seconds plays no part
    assert set(best.to_dict()) == {f.name for f in BestTrial.__dataclass_fields__.values()} - \
        {"objectives", "front_size", "picked", "machine", "confirmation"}  # no dip.machine.* tags here; not confirmed
    with pytest.raises(ValueError, match="--pick 1 chooses on a Pareto front, but study 's' has one objective"):
        export.best_trial(_Tracker(TRIALS), s, "1")


def test_status_lines_number_the_front_as_pick_does(monkeypatch):
    import study.tracking.store as store
    from study.cli.progress import progress_lines

    monkeypatch.setattr(store, "load_run_dict", lambda uri, run_id, name: {"noise_mode": [], "lr": {}})
    view = SimpleNamespace(trials=tuple(TRIALS), asked=9, status="FINISHED", tracking_uri="sqlite:////none.db",
                           parent_run_id="p", tags={},
                           params={"metric": "psnr_ema", "objectives": json.dumps(list(TWO))})
    lines = progress_lines(view, 0.0)
    at = next(i for i, x in enumerate(lines) if x.startswith("Pareto front: 4 of 5 completed trials"))
    assert lines[at + 1].startswith("  1. trial_0000  psnr_ema 25  seconds 10")
    assert lines[at + 4].startswith("  4. trial_0003")
    assert any(x.startswith("best so far: psnr_ema = 25.0000  trial_0000") for x in lines)


# --- warm start with several objectives ---------------------------------------------------

def test_warm_start_gives_every_objective_and_leaves_out_trials_lacking_one(tmp_path, monkeypatch, capsys):
    """An earlier single-objective study (psnr_ema) warm-starts a psnr_ema + seconds study:
    psnr_ema from its Optuna values, seconds from its MLflow runs; a trial without seconds
    is left out and counted."""
    import time

    import study.tracking.store as store
    from study import studydir
    from study.studydir import StudyRecord

    base = TrialConfig(size=32, scales=2, channels=8)
    space = SearchSpace(dict(DEFAULT_SPACE), base)
    a = StudyConfig(name="a", root=str(tmp_path), trial=base)
    studydir.write_study(StudyRecord(study=a, experiment_id="0", parent_run_id="p", space=space.spec,
                                     created=time.strftime("%Y-%m-%dT%H:%M:%S")))
    record = optuna.create_study(storage=make_storage(a.study_dir / OPTUNA_DB), study_name="a",
                                 direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1))
    for i in range(3):
        t = record.ask()
        space(t)
        record.tell(t, 20.0 + i)
    earlier = finished_trials(a.study_dir, "a")
    assert [t.values for t in earlier] == [(20.0,), (21.0,), (22.0,)]
    runs = [SimpleNamespace(status="FINISHED", params={k: str(v) for k, v in t.params.items()},
                            metrics={"seconds": 2.0 + t.number} if t.number else {}) for t in earlier]
    monkeypatch.setattr(store, "study_runs", lambda uri, name: runs)
    b = StudyConfig(name="b", root=str(tmp_path), trial=base, warm_start=("a",), objectives=TWO, scheduler="fifo")
    (w,) = warmstart.check(b)
    assert "objectives is psnr_ema (this study's: psnr_ema, seconds)" in w
    assert warmstart.seed(b, space) == 2
    assert "1 left out (outside this space, or no finite psnr_ema and seconds): a#0" in capsys.readouterr().out
    got = optuna.load_study(study_name="b", storage=make_storage(b.study_dir / OPTUNA_DB))
    assert len(got.directions) == 2 and [t.values for t in got.trials] == [[21.0, 3.0], [22.0, 4.0]]
    # A multi-objective record passes both values on.
    add_warm_trials(tmp_path / "c", "c", ["max", "min"], space, [(earlier[1], [21.0, 3.0])])
    assert finished_trials(tmp_path / "c", "c") == []  # warm-start trials are not passed on


# --- refusals through the real CLI: exit 2, one sentence, nothing written ------------------

@pytest.mark.parametrize("args, words", [
    (["--objective", "psnr_ema:up", "--scheduler", "fifo"], "objective 'psnr_ema:up' has direction 'up'"),
    (["--objective", "accuracy", "--objective", "seconds", "--scheduler", "fifo"],
     "unknown objective metric 'accuracy'"),
    (["--objective", "psnr_ema", "--objective", "seconds"], "scheduler 'asha' cannot run several objectives"),
])
def test_cli_refuses_before_anything_is_written(tmp_path, capsys, args, words):
    code = run_study.main(["run", "--name", "o", "--root", str(tmp_path / "root"), "--num-samples", "2",
                           *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "root").exists()


# --- one small study, end to end -----------------------------------------------------------

@pytest.fixture(scope="module")
def mo_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("mo")
    p = cli("run", "--name", "mo", "--root", str(root), "--num-samples", "4", "--objective", "psnr_ema:max",
            "--objective", "seconds:min", "--scheduler", "fifo", "--cpus-per-trial", "1", "--seed", "2", *TINY)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return root, p


def _front(root):
    from study.tracking.store import study_runs

    trials = study_runs(f"sqlite:///{root}/mlflow.db", "mo")
    return trials, pareto.front(trials, OBJ)


@pytest.mark.slow
def test_study_with_two_objectives_reports_exports_and_replays_its_front(mo_study, tmp_path, capsys):
    root, p = mo_study
    trials, members = _front(root)
    best = read_json(root / "mo" / "best.json")
    n = len(members)
    assert f"Pareto front: {n} of 4 trials (psnr_ema max, seconds min)" in p.stdout
    assert [o["metric"] for o in best["objectives"]] == ["psnr_ema", "seconds"] and best["front_size"] == n
    assert best["picked"].startswith(f"best psnr_ema of the {n} trials on the Pareto front ({members[0].trial}")
    assert best["mlflow_run_id"] == members[0].run_id and best["metric"] == "psnr_ema"
    # The report: the figure and the table of the front, numbered as --pick takes them.
    report = (root / "mo" / "report" / "report.md").read_text()
    assert "## Pareto front" in report and "(pareto_front.png)" in report
    assert (root / "mo" / "report" / "pareto_front.png").stat().st_size > 0
    assert f"| 1 | {members[0].trial} | `" in report and "| seconds (min) |" in report
    # export --pick: another member by row, the first by its trial name (the CLI in this
    # process: the same main() a shell runs, without an interpreter's start-up each time).
    def export(choice: str, out: str) -> tuple[int, str]:
        code = run_study.main(["export", "mo", "--root", str(root), "--out", str(tmp_path / out), "--pick", choice])
        return code, capsys.readouterr().err

    if n >= 2:
        code, err = export("2", "two.json")
        assert code == 0, err
        two = read_json(tmp_path / "two.json")
        assert two["mlflow_run_id"] == members[1].run_id != best["mlflow_run_id"]
        assert two["picked"].startswith(f"--pick 2 ({members[1].trial}, row 2 of {n}")
    code, err = export(members[0].trial, "one.json")
    assert code == 0 and read_json(tmp_path / "one.json")["mlflow_run_id"] == best["mlflow_run_id"], err
    off = [t.trial for t in trials if t not in members]
    for choice, words in ([str(n + 1), "is not a row of the Pareto front"], ["nosuch", "names no trial"],
                          *([[off[0], "not on its Pareto front"]] if off else [])):
        code, err = export(choice, "bad.json")
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "bad.json").exists()
    # The exported member replays its psnr_ema.
    r = cli("train", "--config", str(root / "mo" / "best.json"), "--out", str(tmp_path / "replay"), "--quiet")
    assert r.returncode == 0, r.stderr
    got = read_json(tmp_path / "replay" / "result.json")
    assert got["config"] == best["config"]
    assert got["psnr_ema"] == pytest.approx(best["metrics"]["psnr_ema"], abs=0.05)
    # status shows the front's size and its rows.
    assert run_study.main(["status", "mo", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"Pareto front: {n} of 4 completed trials" in out
    assert f"1. {members[0].trial}  psnr_ema" in out
