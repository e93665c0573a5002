"""The confirmation's parts without Ray or MLflow: the statistics (study/stats.py), which
trials it re-runs, its fresh seeds and its equal-compute budgets (study/confirm.py)."""
from __future__ import annotations

import json

import pytest
from scipy import stats as sps

from study import confirm, stats
from study.config import StudyConfig, TrialConfig
from study.studydir import StudyRecord
from study.tracking.store import TrialSummary


def _trial(tid: str, mode: str, value: float, completed: bool = True, loss: str = "mse",
           seed: int = 0, repeats: int = 1) -> TrialSummary:
    cfg = TrialConfig(noise_mode=mode, loss=loss, seed=seed, repeats=repeats).to_dict()
    return TrialSummary(run_id=f"r{tid}", name=f"{mode} {loss}", trial_id=tid, status="FINISHED",
                        completed=completed, params={"noise_mode": mode, "loss": loss},
                        metrics={"psnr_ema": value}, tags={"dip.config": json.dumps(cfg)}, start=0, end=0)


def test_mean_ci_is_scipy_bootstrap_and_holds_the_mean():
    v = [20.1, 21.3, 19.8, 22.0, 20.7, 21.1]
    m, (lo, hi) = stats.mean_ci(v)
    assert m == pytest.approx(sum(v) / 6) and lo < m < hi
    assert stats.mean_ci([3.0]) == (3.0, [3.0, 3.0])


def test_paired_is_wilcoxon_on_the_differences():
    a, b = [1.0, 2.5, 3.1, 4.2, 5.0], [0.5, 2.0, 3.3, 3.0, 4.1]
    c = stats.paired(a, b)
    assert c["p_value"] == pytest.approx(sps.wilcoxon([x - y for x, y in zip(a, b)]).pvalue)
    assert c["wins"] == 4 and c["n"] == 5 and c["mean_diff"] == pytest.approx(0.58)
    assert stats.paired([1.0, 2.0], [1.0, 2.0])["p_value"] is None  # no difference to test
    with pytest.raises(ValueError, match="one to one"):
        stats.paired([1.0], [1.0, 2.0])


def test_choose_best_of_each_variant_or_top_k():
    s = StudyConfig(name="x", root="/tmp")
    trials = [_trial("a", "uniform", 20), _trial("b", "uniform", 22), _trial("c", "ddpm", 21, loss="sure"),
              _trial("d", "ddpm", 25, completed=False), _trial("e", "ddpm", 19)]
    by_variant = confirm.choose(trials, s, ["noise_mode", "loss"], None)
    assert [t.trial_id for t in by_variant] == ["b", "c", "e"]  # ddpm sure and ddpm mse apart
    assert [t.trial_id for t in confirm.choose(trials, s, ["noise_mode"], None)] == ["b", "c"]
    assert [t.trial_id for t in confirm.choose(trials, s, ["noise_mode"], 2)] == ["b", "c"]


def test_a_study_with_no_completed_trial_is_refused():
    s = StudyConfig(name="x", root="/tmp")
    with pytest.raises(ValueError, match="no completed trial"):
        confirm.choose([_trial("a", "uniform", 20, completed=False)], s, ["noise_mode"], None)


def test_fresh_seeds_start_past_every_seed_used():
    s = StudyConfig(name="x", root="/tmp", trial=TrialConfig(seed=3, repeats=2))
    meta = StudyRecord(study=s, experiment_id="1", parent_run_id="p", space={}, created="")
    seeds = confirm.fresh_seeds([_trial("a", "uniform", 1, seed=10, repeats=3)], meta, 4)
    assert seeds == [12 + confirm.SEED_GAP + k for k in range(4)]


def test_equal_compute_halves_sure():
    cfgs = [TrialConfig(noise_mode="uniform", iterations=300),
            TrialConfig(noise_mode="ddpm", loss="sure", iterations=300)]
    assert confirm._budgets(cfgs, False) == [300, 300]
    assert confirm._budgets(cfgs, True) == [300, 150]


def test_bad_options_are_refused():
    for top, seeds, words in ((None, 0, "--seeds 0"), (0, 3, "--top 0")):
        with pytest.raises(ValueError, match=words):
            confirm.check_options(top, seeds, [])
    with pytest.raises(ValueError, match="unknown image"):
        confirm.check_options(None, 3, ["no-such-image"])
