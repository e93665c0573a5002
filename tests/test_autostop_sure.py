"""No-reference stopping (ES-WMV) inside every trial, and the SURE loss."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run_study
from study.config import TrialConfig
from study.engine.autostop import AutoStop
from study.engine.sure import sure_losses
from study.engine.trial import Trial, run_trial
from trialutil import run_keeping_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def tiny(**kw):
    base = dict(size=32, scales=2, channels=8, color="gray", iterations=6, report_every=3,
                device="cpu", noise_mode="ddpm_resample", timestep=50)
    return TrialConfig(**{**base, **kw})


def no_report(metrics, trial):
    pass


def untimed(m):
    return {k: v for k, v in m.items() if "seconds" not in k}


# --- ES-WMV ---

def test_autostop_fires_patience_after_the_minimum_and_then_holds():
    """Outputs whose window variance falls to a minimum at iteration 6 and rises after:
    the rule fires at 6 + patience, and later outputs no longer move its pick."""
    a = AutoStop(window=2, patience=3, shape=torch.Size((1, 1, 2, 2)), crop=(2, 2),
                 device=torch.device("cpu"))
    steps = [0.0, 4.0, 1.0, 3.0, 2.0, 2.5, 2.6, 5.0, 0.0, 9.0, 9.1, 20.0]  # |diff| 4,3,2,1,.5,.1,...
    for it, v in enumerate(steps, start=1):
        ema = torch.full((1, 1, 2, 2), float(it))
        a.track(torch.full((1, 1, 2, 2), v), ema, torch.tensor(it))
    assert int(a.iteration[0]) == 7  # the pair (2.5, 2.6) has the lowest variance
    assert int(a.fired_at[0]) == 10  # 7 + patience; (9.0, 9.1) at 11 ties nothing: it had fired
    assert float(a.output(torch.zeros(1, 1, 2, 2))[0, 0, 0, 0]) == 7.0  # the EMA at iteration 7


def test_every_trial_reports_where_autostop_would_stop():
    cfg = tiny(iterations=40, report_every=10, window=5, patience=10)
    r = run_trial(cfg, no_report)
    for key in ("psnr_autostop", "ssim_autostop", "autostop_iteration", "autostop_fired"):
        assert math.isfinite(r[key]) and all(key in n["metrics"] for n in r["networks"])
    assert 5 <= r["autostop_iteration"] <= 40 and r["iterations"] == 40  # stop = budget runs on


def test_stop_auto_ends_the_trial_once_every_network_stopped():
    cfg = tiny(iterations=600, report_every=5, window=5, patience=15, repeats=2, lr=0.02)
    r = run_trial(cfg.replace(stop="auto"), no_report)
    assert r["autostop_fired"] == 1.0 and r["iterations"] < 600
    fired = max(n["metrics"]["autostop_iteration"] for n in r["networks"]) + 15
    assert fired <= r["iterations"] < fired + 5  # the first report after the last one fired
    # The same networks run to the budget pick the same point with the same output.
    full = run_trial(cfg, no_report)
    for a, b in zip(r["networks"], full["networks"], strict=True):
        assert a["metrics"]["autostop_iteration"] == b["metrics"]["autostop_iteration"]
        assert a["metrics"]["psnr_autostop"] == b["metrics"]["psnr_autostop"]


@pytest.mark.parametrize("loss", ["mse", "sure"])
def test_checkpoint_resume_keeps_the_rule_and_the_probes(loss):
    cfg = tiny(iterations=12, report_every=4, window=3, patience=4, loss=loss)
    straight, state = run_keeping_checkpoint(cfg, 4)
    resumed = run_trial(cfg, no_report, state=state, trial=Trial(cfg))
    assert untimed(resumed) == untimed(straight)


# --- SURE ---

def test_sure_is_mse_minus_sigma2_plus_the_divergence_term():
    """For a linear network f(x) = a x, x = gain * y + c, the finite difference is exact:
    div_y f = a * gain * |b|^2 / n * n for the probe b."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand((2, 1, 4, 4), generator=g)
    z, probe = torch.randn((2, 1, 4, 4), generator=g), torch.randn((2, 1, 4, 4), generator=g)
    gain, a, sigma = torch.tensor([0.5, 2.0]), 0.3, 0.1
    out = a * z
    err = out - y
    got = sure_losses(lambda x: a * x, z, gain, out, err, sigma, probe)
    n = 16
    div = a * gain * probe.square().flatten(1).sum(1)
    want = err.square().flatten(1).mean(1) - sigma**2 + 2 * sigma**2 * div / n
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_sure_pack_of_k_equals_k_lone_networks():
    cfg = tiny(loss="sure", repeats=3, seed=4, iterations=8, report_every=4)
    nets = run_trial(cfg, no_report)["networks"]
    for r in range(3):
        alone = run_trial(cfg.replace(seed=4 + r, repeats=1), no_report)["networks"][0]
        for key in ("psnr_ema", "loss", "psnr_autostop"):
            assert nets[r]["metrics"][key] == pytest.approx(alone["metrics"][key], abs=1e-3), (r, key)


def test_sure_trains_a_different_network_than_mse():
    a = run_trial(tiny(loss="mse"), no_report)
    b = run_trial(tiny(loss="sure"), no_report)
    assert a["loss"] != b["loss"] and math.isfinite(b["psnr_ema"])


@pytest.mark.parametrize("change,words", [
    ({"task": "inpaint"}, "loss 'sure' needs a known noise sigma"),
    ({"noise_mode": "uniform"}, "allowed: noise_mode ddpm, ddpm_resample, ddpm_random_t"),
])
def test_sure_where_it_means_nothing_is_refused(change, words):
    with pytest.raises(ValueError, match=words):
        tiny(loss="sure", **change)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_study.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args,words", [
    (["train", "--loss", "sure", "--task", "sr"], "loss 'sure' needs a known noise sigma"),
    (["train", "--stop", "auto", "--window", "0"], "window = 0 is out of range"),
    (["train", "--stop", "sometimes"], "unknown stop 'sometimes'; allowed: budget, auto"),
    (["run", "--metric", "psnr_autostopp"], "unknown metric 'psnr_autostopp'"),
    (["run", "--loss", "sure", "--task", "inpaint"], "loss 'sure' needs a known noise sigma"),
])
def test_bad_input_is_one_sentence_exit_2_nothing_written(tmp_path, capsys, args, words):
    where = ["--out", str(tmp_path / "out")] if args[0] == "train" else \
        ["--root", str(tmp_path / "root"), "--name", "x"]
    code = run_study.main([*args, *where])  # the CLI's main() in this process
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "root" / "x").exists()


def test_train_prints_and_records_the_autostop_point(tmp_path):
    r = _cli("train", "--size", "32", "--scales", "2", "--channels", "8", "--iterations", "20",
             "--report-every", "10", "--window", "5", "--patience", "5", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "autostop" in r.stdout.splitlines()[-2] and "autostop" in r.stdout.splitlines()[-1]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["stop"] == "budget" and "psnr_autostop" in result
