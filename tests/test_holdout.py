"""The held-out-pixel stop rule (study/engine/holdout.py): J-invariance, the estimate,
checkpoints, and its validation."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from study.config import StudyConfig, TrialConfig, load_config_file
from study.engine.apply import ApplyOptions, apply
from study.engine.apply import stop_rule as apply_stop_rule
from study.engine import images as img
from study.engine.holdout import HoldOutStop, clipped_noise_power, fill, keep_mask
from study.engine.pack import network_for
from study.engine.trial import Trial, run_trial
from study.studydir import StudyRecord
from trialutil import run_keeping_checkpoint

CPU = torch.device("cpu")


def tiny(**kw):
    base = dict(size=32, scales=2, channels=8, color="gray", iterations=6, report_every=3,
                device="cpu", noise_mode="ddpm_resample", timestep=50, stop_rule="holdout",
                holdout_fraction=0.3)
    return TrialConfig(**{**base, **kw})


def no_report(metrics, trial):
    pass


def test_fill_uses_no_held_out_value_and_keeps_the_kept_ones():
    y = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    keep = keep_mask((16, 16), 0.4, seed=3)
    other = torch.where(keep > 0, y, torch.rand(y.shape, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(fill(y, keep), fill(other, keep))
    assert torch.equal(fill(y, keep) * keep, y * keep)
    held = (keep == 0).expand_as(y)
    assert not torch.allclose(fill(y, keep)[held], y[held])  # they were replaced


def test_the_mask_comes_from_the_seed():
    assert torch.equal(keep_mask((32, 32), 0.2, 5), keep_mask((32, 32), 0.2, 5))
    assert not torch.equal(keep_mask((32, 32), 0.2, 5), keep_mask((32, 32), 0.2, 6))
    frac = 1 - float(keep_mask((256, 256), 0.2, 0).mean())
    assert abs(frac - 0.2) < 0.01


def _trial(cfg: TrialConfig, observation: torch.Tensor, clean: torch.Tensor,
           keep: torch.Tensor | None) -> Trial:
    data = img.Degraded(clean, observation, observation, None)
    return Trial(cfg, networks=[network_for(cfg, data, "image", 0, cfg.seed, CPU, keep)])


def _observations(cfg: TrialConfig, keep: torch.Tensor):
    clean = img.load_image("camera", cfg.size, "gray")
    y = img.degrade(clean, cfg, torch.Generator().manual_seed(0)).observation
    noise = torch.rand(y.shape, generator=torch.Generator().manual_seed(9))
    return clean, y, torch.where(keep > 0, y, noise)  # the second differs on held-out pixels only


@pytest.mark.parametrize("mode,loss", [("ddpm_resample", "sure"), ("ddpm", "mse"), ("uniform", "mse")])
def test_held_out_values_never_reach_the_network(mode, loss):
    """J-invariance: changing only the observed values of the held-out pixels leaves every
    output of the trial unchanged (the loss, the outputs, their EMA, the weights); only
    the held-out error itself, which reads them, moves."""
    cfg = tiny(noise_mode=mode, loss=loss)
    keep = keep_mask((cfg.size, cfg.size), cfg.holdout_fraction, 1234)
    clean, y, y2 = _observations(cfg, keep)
    a, b = (_trial(cfg, obs, clean, keep) for obs in (y, y2))
    for _ in range(8):
        a.step(), b.step()
    ma, mb = a.evaluate(), b.evaluate()
    for key in ("loss", "psnr", "psnr_ema", "psnr_best", "ssim_ema"):
        assert ma[key] == mb[key], key
    assert torch.equal(a.packs[0].ema, b.packs[0].ema)
    assert torch.equal(a.packs[0].last_output, b.packs[0].last_output)
    for pa, pb in zip(a.packs[0].net.parameters(), b.packs[0].net.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert ma["holdout_mse"] != mb["holdout_mse"]


def test_the_invariance_test_can_fail():
    """Without holding out, the same change of the observation moves the outputs of a DDPM
    input (built from the observation), so the test above would see a leak."""
    cfg = tiny(noise_mode="ddpm", loss="mse", stop_rule="eswmv")
    keep = keep_mask((cfg.size, cfg.size), 0.3, 1234)
    clean, y, y2 = _observations(cfg, keep)
    a, b = (_trial(cfg, obs, clean, None) for obs in (y, y2))
    for _ in range(3):
        a.step(), b.step()
    assert not torch.equal(a.packs[0].ema, b.packs[0].ema)


def test_clipped_noise_power_matches_a_monte_carlo_draw():
    sigma = 25 / 255
    x = torch.tensor([0.0, 0.02, 0.1, 0.5, 0.97])
    n = torch.randn(200_000, 5, generator=torch.Generator().manual_seed(0)) * sigma
    mc = ((x + n).clamp(0, 1) - x).square().mean(0)
    assert torch.allclose(clipped_noise_power(x, sigma), mc, rtol=0.02)
    assert abs(float(clipped_noise_power(torch.tensor(0.5), sigma)) - sigma**2) < 1e-7


def test_the_estimate_recovers_the_true_psnr_of_an_output():
    """An output with a known error, the observation a clipped noisy dark image: the
    held-out estimate lands within 0.3 dB of the true PSNR on 256 x 256 pixels."""
    g = torch.Generator().manual_seed(0)
    sigma = 25 / 255
    clean = torch.rand(1, 1, 256, 256, generator=g) * 0.3  # dark: many clipped pixels
    y = (clean + sigma * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    out = (clean + 0.03 * torch.randn(clean.shape, generator=g)).clamp(0, 1)
    held = 1 - keep_mask((256, 256), 0.2, 1)
    rule = HoldOutStop(10, y, held, sigma)
    rule.track(out, out, torch.tensor(1))
    got = rule.estimates(out)[0]
    est = got["psnr_estimate"]
    true = float(10 * torch.log10(1 / (out - clean).square().mean()))
    assert abs(est - true) < 0.3, (est, true)
    assert got["estimate_at_ceiling"] == 0.0  # resolved, not a bound


def _smoother_output(clean, y, held, lam, gen):
    """An output shaped as a linear smoother's: a prediction g of independent error, taken
    as is on the held-out pixels and pulled by `lam` towards the observation on the kept
    ones (f = (1 - lam) g + lam y: the share lam of each kept pixel's noise is absorbed)."""
    g = clean + 0.08 * torch.randn(clean.shape, generator=gen)
    return torch.where(held > 0, g, (1 - lam) * g + lam * y)


def _held_only(out, y, held, sigma):
    """The estimate from the held-out error alone, less sigma^2 (what the rule had first)."""
    e = float((out - y).square().mul(held).sum() / held.sum())
    return 10 * math.log10(1 / (e - sigma**2))


def test_the_estimate_counts_the_noise_the_kept_pixels_absorbed():
    """The network fits the kept pixels and only predicts the held-out ones: the held-out
    error alone reads the whole output's PSNR low (here by over 1 dB); with the kept
    pixels' share of absorbed noise, from the two residuals, it lands within 0.3 dB."""
    gen = torch.Generator().manual_seed(0)
    sigma = 25 / 255
    # in [0.2, 0.8]: no value near 0 or 1, so no clipping (that correction has its own test)
    clean = 0.2 + 0.6 * img.load_image("camera", 128, "gray")
    y = (clean + sigma * torch.randn(clean.shape, generator=gen)).clamp(0, 1)
    held = 1 - keep_mask((128, 128), 0.1, 2)
    out = _smoother_output(clean, y, held, 0.25, gen)
    rule = HoldOutStop(10, y, held, sigma)
    rule.track(out, out, torch.tensor(1))
    est = rule.estimates(out)[0]["psnr_estimate"]
    true = float(10 * torch.log10(1 / (out - clean).square().mean()))
    assert abs(est - true) < 0.3, (est, true)
    assert _held_only(out, y, held, sigma) < true - 1


def test_the_control_variate_narrows_the_estimate_over_masks():
    """Over 24 draws of the held-out pixels of one observation (a smoother's output for
    each), the estimate varies less with the control variate than with it switched off
    (its shift rho_J - rho_all set to 0): what it takes out is the draw's chance, mostly
    the noise power the held-out pixels happen to hold. The mean stays within 0.3 dB."""
    sigma = 25 / 255
    clean = 0.35 + 0.3 * img.load_image("camera", 64, "gray")
    y = (clean + sigma * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    spread = {}
    for cv in (True, False):
        errors = []
        for seed in range(24):
            held = 1 - keep_mask((64, 64), 0.1, 100 + seed)
            out = _smoother_output(clean, y, held, 0.25, torch.Generator().manual_seed(5))
            rule = HoldOutStop(10, y, held, sigma)
            if not cv:
                rule.rho_shift.zero_()
            rule.track(out, out, torch.tensor(1))
            true = float(10 * torch.log10(1 / (out - clean).square().mean()))
            errors.append(rule.estimates(out)[0]["psnr_estimate"] - true)
        spread[cv] = float(np.std(errors))
        if cv:
            assert abs(np.mean(errors)) < 0.3, np.mean(errors)
    assert spread[True] < 0.9 * spread[False], spread


def test_holdout_trial_reports_the_estimate_and_resumes_from_a_checkpoint():
    cfg = tiny(iterations=12, report_every=4, patience=3)
    straight, state = run_keeping_checkpoint(cfg, at=8)
    assert math.isfinite(straight["psnr_estimate"]) and "psnr_estimate" in straight["networks"][0]["metrics"]
    resumed = run_trial(cfg, no_report, state=state)
    for key in ("psnr_autostop", "autostop_iteration", "psnr_estimate", "holdout_mse", "psnr_ema"):
        assert resumed[key] == straight[key], key


def test_a_checkpoint_with_other_held_out_pixels_is_refused():
    cfg = tiny(iterations=4, report_every=4)
    _, state = run_keeping_checkpoint(cfg, at=4)
    state["networks"][0]["autostop"]["held"] = 1 - state["networks"][0]["autostop"]["held"]
    with pytest.raises(ValueError, match="held-out pixels differ"):
        Trial(cfg).load_state_dict(state)


@pytest.mark.parametrize("kw,words", [
    (dict(stop_rule="median"), "unknown stop_rule 'median'"),
    (dict(holdout_fraction=0.0), "holdout_fraction = 0.0 is out of range; allowed: (0, 0.5]"),
    (dict(holdout_fraction=0.6), "holdout_fraction = 0.6 is out of range"),
    (dict(task="inpaint"), "task 'inpaint' cannot use it; allowed: task denoise"),
    (dict(task="sr"), "task 'sr' cannot"),
])
def test_bad_holdout_settings_get_one_sentence(kw, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        tiny(**kw)


def test_a_study_ranks_by_the_estimate_only_with_the_holdout_rule(tmp_path):
    StudyConfig(name="s", root=str(tmp_path), trial=tiny(), metric="psnr_estimate")
    with pytest.raises(ValueError, match="only with stop_rule holdout"):
        StudyConfig(name="s", root=str(tmp_path), trial=tiny(stop_rule="eswmv"), metric="psnr_estimate")


# --- apply --stop auto with held-out pixels ---

def _noisy_png(tmp_path):
    """A non-square gray crop (37 x 41) of camera, noisy at sigma 25/255."""
    clean = np.ascontiguousarray(skimage.data.camera()[::12, ::12][:37, :41])
    g = np.random.default_rng(0)
    noisy = np.clip(clean / 255 + g.normal(0, 25 / 255, clean.shape), 0, 1)
    path = tmp_path / "noisy.png"
    Image.fromarray((noisy * 255).round().astype(np.uint8)).save(path)
    return path


def test_apply_stops_on_held_out_pixels_and_estimates_the_psnr(tmp_path):
    cfg = tiny(size=64, scales=3, noise_mode="ddpm", timestep=25, loss="sure", report_every=10)
    lines: list[str] = []
    opts = ApplyOptions(stop="auto", patience=20, max_iterations=400, stop_rule="holdout")
    info = apply(cfg, str(_noisy_png(tmp_path)), tmp_path / "out.png", opts, progress=lines.append)
    assert info["stop"] == "holdout" and info["fired_at"] == info["stop_iteration"] + 20
    assert 10 < info["psnr_estimate"] < 60 and info["holdout_mse"] > 0
    assert info["estimate_at_ceiling"] in (True, False)  # whether the estimate is not resolved
    assert any("held-out mse" in s for s in lines) and "stopped by held-out pixels" in lines[-1]


def test_apply_refuses_held_out_pixels_for_inpainting(tmp_path):
    path = _noisy_png(tmp_path)
    opts = ApplyOptions(task="inpaint", mask=str(path), stop="auto", stop_rule="holdout")
    with pytest.raises(ValueError, match="task 'inpaint' cannot use it"):
        apply(tiny(), str(path), tmp_path / "out.png", opts)
    assert not (tmp_path / "out.png").exists()
    with pytest.raises(ValueError, match="unknown --stop-rule 'x'; allowed: eswmv, holdout"):
        ApplyOptions(stop="auto", stop_rule="x")


def test_the_report_puts_the_estimate_beside_the_truth_and_the_oracle_per_image():
    from study.report.images import ImageFacts
    from study.report.tables import TrialRow, estimate_section

    def row(name: str, **m: float) -> TrialRow:
        return TrialRow(name, name, "completed", "uniform", None, 0.01, 40, m)

    facts = [ImageFacts(lb, lb, b, 20.0, None, None, torch.zeros(1), torch.zeros(1), None)
             for lb, b in (("camera", 0.5), ("hubble", 0.08))]
    rows = [row("a", **{"psnr_estimate/camera": 27.0, "psnr_autostop/camera": 26.0, "psnr_best/camera": 27.5,
                        "psnr_estimate/hubble": 30.0, "psnr_autostop/hubble": 31.5, "psnr_best/hubble": 32.0,
                        "estimate_at_ceiling/camera": 0.0, "estimate_at_ceiling/hubble": 1.0}),
            row("b", **{"psnr_estimate/camera": 25.0, "psnr_autostop/camera": 25.5, "psnr_best/camera": 26.0,
                        "estimate_at_ceiling/camera": 1.0})]
    lines = estimate_section(rows, facts).splitlines()
    assert lines[2] == "| hubble | 0.08 | 1 | 30.00 | 31.50 | 32.00 | -1.50 (-1.50 .. -1.50) | 1 of 1 |"
    assert lines[3] == "| camera | 0.50 | 2 | 26.00 | 25.75 | 26.75 | +0.25 (-0.50 .. +1.00) | 1 of 2 |"
    assert estimate_section([row("c", psnr_autostop=20.0)], facts[:1]) == ""


def test_the_estimate_claims_no_mse_below_its_own_sampling_error():
    """A held-out error below the noise power (by chance, or a perfect output) gives the
    ceiling power * sqrt(2 / m), not an unbounded PSNR."""
    sigma = 25 / 255
    y = torch.full((1, 1, 64, 64), 0.5)  # the observation equals the output: error 0
    held = 1 - keep_mask((64, 64), 0.2, 0)
    rule = HoldOutStop(10, y, held, sigma)
    rule.track(y, y, torch.tensor(1))
    m = float(held.sum())
    want = 10 * math.log10(1 / (sigma**2 * math.sqrt(2 / m)))
    got = rule.estimates(y)[0]
    assert got["psnr_estimate"] == pytest.approx(want, abs=0.01)
    assert got["estimate_at_ceiling"] == 1.0  # not resolved, and it says so


# --- the default rule (chosen by measurement: docs/science.md) and older records ---

def test_the_default_rule_is_held_out_pixels_for_denoise_and_es_wmv_elsewhere():
    assert TrialConfig().stop_rule == "holdout"
    assert TrialConfig(task="inpaint").stop_rule == "eswmv"
    assert TrialConfig(task="sr", stop_rule="default").stop_rule == "eswmv"
    # The resolved rule is what a config records, so its replay runs the same rule.
    assert TrialConfig.from_dict(TrialConfig().to_dict()).stop_rule == "holdout"
    # `apply --task inpaint` with a denoise config falls back to the task's default.
    assert apply_stop_rule(TrialConfig(), ApplyOptions(task="inpaint", mask="m.png")) == "eswmv"
    assert apply_stop_rule(TrialConfig(), ApplyOptions()) == "holdout"
    # A default rule follows a new task; a rule named with the task is checked against it.
    assert TrialConfig().replace(task="inpaint").stop_rule == "eswmv"
    assert TrialConfig(task="inpaint").replace(task="denoise").stop_rule == "holdout"
    assert TrialConfig(stop_rule="eswmv").replace(task="inpaint", missing=0.3).stop_rule == "eswmv"
    with pytest.raises(ValueError, match="task 'sr' cannot use it"):
        TrialConfig().replace(task="sr", stop_rule="holdout")


def test_records_from_before_the_rule_existed_keep_es_wmv(tmp_path):
    old = {k: v for k, v in TrialConfig().to_dict().items() if k != "stop_rule"}
    export = tmp_path / "best.json"
    export.write_text(json.dumps({"config": old, "metric": "psnr_ema"}))
    assert TrialConfig.from_dict(load_config_file(export)).stop_rule == "eswmv"
    # A config a user writes by hand gets today's default.
    bare = tmp_path / "mine.json"
    bare.write_text(json.dumps({"lr": 0.02}))
    assert TrialConfig.from_dict(load_config_file(bare)).stop_rule == "holdout"
    # A study's record (study.json) written before the field: resume and extend keep ES-WMV.
    study = StudyConfig(name="s", root=str(tmp_path), trial=TrialConfig()).to_dict()
    study["trial"].pop("stop_rule")
    rec = StudyRecord.from_dict({"study": study, "experiment_id": "1", "parent_run_id": "p",
                                 "space": {}, "created": "now"})
    assert rec.study.trial.stop_rule == "eswmv"
