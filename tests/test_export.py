"""Choosing and writing the best trial (study/export.py), without Ray or MLflow."""
from __future__ import annotations

import json
import math

from study.config import TrialConfig, load_config_file
from study.engine.machine import from_tags
from study.results import BestTrial
from study.export import pick_best, write
from study.tracking.store import TrialSummary


def _t(tid, value, completed=True, status="FINISHED"):
    return TrialSummary(run_id=f"run-{tid}", name=tid, trial_id=tid, status=status, completed=completed,
                        params={}, metrics={"psnr_ema": value, "loss": -value}, tags={}, start=0.0, end=0.0)


def test_completed_trials_win_over_early_stopped_ones():
    trials = [_t("a", 30.0, completed=False), _t("b", 25.0), _t("c", 26.0)]
    assert pick_best(trials, "psnr_ema", "max").trial_id == "c"


def test_failed_and_nan_trials_never_win_and_min_mode_works():
    trials = [_t("a", math.nan), _t("b", 20.0), _t("c", 40.0, status="FAILED", completed=False)]
    assert pick_best(trials, "psnr_ema", "max").trial_id == "b"
    assert pick_best([_t("x", 20.0), _t("y", 22.0)], "loss", "min").trial_id == "y"
    assert pick_best([_t("z", 1.0, completed=False, status="FAILED")], "psnr_ema", "max") is None


def test_ties_do_not_depend_on_listing_order():
    trials = [_t("b", 25.0), _t("a", 25.0)]
    assert pick_best(trials, "psnr_ema", "max") == pick_best(trials[::-1], "psnr_ema", "max")


def test_best_trial_is_written_as_json_that_train_reads(tmp_path):
    best = BestTrial(study="st", metric="psnr_ema", mode="max", value=26.5, trial_id="b",
                     mlflow_run_id="run-b", completed=True, tracking_uri="sqlite:////x.db",
                     metrics={"psnr_ema": 26.5}, config=TrialConfig(lr=0.02).to_dict(),
                     exported_at="2026-11-27T20:00:00",
                     machine=from_tags({"dip.machine.torch": "2.14.1", "dip.machine.cpu_isa": "AVX512",
                                        "dip.device": "cpu"}))
    write(best, tmp_path / "best.json")
    data = json.loads((tmp_path / "best.json").read_text())
    assert data == best.to_dict() and data["mlflow_run_id"] == "run-b"
    assert data["machine"] == {"torch": "2.14.1", "cpu_isa": "AVX512"}  # where the trial ran
    assert TrialConfig.from_dict(load_config_file(tmp_path / "best.json")).lr == 0.02


def test_replay_notice_compares_what_the_numbers_depend_on():
    from study.engine.machine import replay_notice
    cpu = {"torch": "2.14.1", "device": "cpu", "cpu_isa": "AVX512", "cpu_vendor": "GenuineIntel", "cpu": "A",
           "gpu": "", "threads": "1"}
    assert replay_notice(cpu, cpu) is None and replay_notice({}, cpu) is None  # an older export
    assert replay_notice({**cpu, "cpu": "B"}, cpu) is None  # the model name alone is not compared
    assert "cpu_isa AVX2 -> AVX512" in replay_notice({**cpu, "cpu_isa": "AVX2"}, cpu)
    # MKL rounds apart on another vendor at the same ISA (tests/test_pinned.py)
    assert "cpu_vendor AuthenticAMD -> GenuineIntel" in replay_notice({**cpu, "cpu_vendor": "AuthenticAMD"}, cpu)
    old = {k: v for k, v in cpu.items() if k != "cpu_vendor"}  # an export from before the vendor was kept
    assert replay_notice(old, cpu) is None
    gpu = {**cpu, "device": "cuda", "gpu": "NVIDIA H200"}
    assert replay_notice({**gpu, "cpu_isa": "AVX2", "cpu_vendor": "AuthenticAMD"}, gpu) is None  # a GPU's kernels
    assert "not measured across devices" in replay_notice(gpu, cpu)
