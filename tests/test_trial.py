"""Tests of study/engine/trial.py: the DIP loop, its reports, checkpoints and failure modes."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from models import UNet
from study.config import NOISE_MODES, TASKS, TrialConfig
from study.engine.trial import Trial, TrialDiverged, resolve_device, run_trial
from trialutil import run_keeping_checkpoint

REPORT_KEYS = {"loss", "psnr", "ssim", "psnr_ema", "ssim_ema", "psnr_best", "best_iteration",
               "iteration", "seconds", "seconds_per_iteration",
               "psnr_autostop", "ssim_autostop", "autostop_iteration", "autostop_fired", "forwards",
               "holdout_mse", "psnr_estimate", "estimate_at_ceiling"}  # the default stop rule (denoise) is held-out pixels
HOLDOUT_KEYS = {"holdout_mse", "psnr_estimate", "estimate_at_ceiling"}
TIMING_KEYS = {"seconds", "seconds_per_iteration"}


def tiny(**kw):
    """A trial of a few milliseconds per iteration: camera 32 px gray, 2 scales of 8."""
    base = dict(size=32, scales=2, channels=8, input_depth=8, color="gray", iterations=6,
                report_every=3, device="cpu")
    return TrialConfig(**{**base, **kw})


def no_report(metrics, trial):
    pass


def untimed(m):
    return {k: v for k, v in m.items() if k not in TIMING_KEYS}


def test_short_run_beats_the_observation():
    # Measured: psnr 24.9 / 25.5 dB (seeds 0 / 1) against an observation of 20.3.
    cfg = tiny(channels=16, input_depth=32, noise_mode="uniform", iterations=150, lr=0.01,
               report_every=50)
    r = run_trial(cfg, no_report)
    assert max(r["psnr"], r["psnr_ema"]) > r["psnr_observation"] + 2
    assert r["iterations"] == 150 and r["config"] == cfg.to_dict()


@pytest.mark.parametrize("mode", ["uniform", "ddpm_random_t"])
def test_same_seed_same_metrics(mode):
    cfg = tiny(noise_mode=mode)
    a, b = run_trial(cfg, no_report), run_trial(cfg, no_report)
    assert untimed(a) == untimed(b)
    assert untimed(run_trial(cfg.replace(seed=1), no_report))["loss"] != a["loss"]


@pytest.mark.parametrize("mode", ["uniform", "gaussian_resample", "ddpm_random_t"])
def test_checkpoint_resume_is_exact(mode):
    cfg = tiny(noise_mode=mode, iterations=8, report_every=4)
    straight, state = run_keeping_checkpoint(cfg, 4)
    fresh = Trial(cfg)
    resumed = run_trial(cfg, no_report, state=state, trial=fresh)
    assert untimed(resumed) == untimed(straight)
    assert resumed["iterations"] == 8 and fresh.iteration == 8


def test_reports_do_not_change_training():
    # Evaluation draws from its own generator: reporting every step or once at the end
    # trains the same network.
    cfg = tiny(noise_mode="ddpm_resample", iterations=6)
    often = run_trial(cfg.replace(report_every=1), no_report)
    once = run_trial(cfg.replace(report_every=6), no_report)
    for k in ("loss", "psnr_ema", "psnr_best", "best_iteration"):
        assert often[k] == once[k]


def test_checkpoint_of_another_config_is_refused():
    state = Trial(tiny()).state_dict()
    with pytest.raises(ValueError, match="another configuration"):
        Trial(tiny(lr=0.02)).load_state_dict(state)


def test_report_cadence_and_keys():
    calls = []
    r = run_trial(tiny(iterations=10, report_every=4), lambda m, t: calls.append((dict(m), t)))
    assert [int(m["iteration"]) for m, _ in calls] == [4, 8, 10]
    for m, trial in calls:
        assert set(m) == REPORT_KEYS and isinstance(trial, Trial)
        assert all(math.isfinite(v) for v in m.values())
        assert 1 <= m["best_iteration"] <= m["iteration"]
    assert untimed(calls[-1][0]).items() <= r.items()
    assert {"psnr_observation", "ssim_observation", "iterations", "config"} <= set(r)


def test_resumed_at_the_end_reports_nothing_but_returns():
    cfg = tiny(iterations=3)
    trial = Trial(cfg)
    run_trial(cfg, no_report, trial=trial)
    calls = []
    r = run_trial(cfg, lambda m, t: calls.append(m), state=trial.state_dict())
    assert calls == [] and r["iterations"] == 3


def test_multi_image_metrics_per_image_and_mean():
    calls = []
    run_trial(tiny(images=("camera", "coins"), iterations=3), lambda m, t: calls.append(m))
    m = calls[-1]
    for key in ("psnr", "ssim", "psnr_ema", "loss"):
        per = [m[f"{key}/camera"], m[f"{key}/coins"]]
        assert m[key] == pytest.approx(sum(per) / 2)


def test_images_with_one_stem_keep_separate_metrics(tmp_path):
    rng = np.random.default_rng(0)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(rng.integers(0, 255, (32, 32), np.uint8)).save(tmp_path / folder / "x.png")
    trial = Trial(tiny(images=(str(tmp_path / "a"), str(tmp_path / "b"), "camera", "camera")))
    assert trial.image_labels == ["x", "x_1", "camera", "camera_3"]
    trial.step()
    assert {"psnr/x", "psnr/x_1", "psnr/camera", "psnr/camera_3"} <= set(trial.evaluate())


def test_nan_loss_raises_trial_diverged_at_the_report():
    # With BatchNorm and a sigmoid out, no lr the config allows (<= 10) makes the loss
    # overflow, so the divergence is injected as a NaN observation of one network. The
    # step does not wait for the device: the first report names the first bad iteration.
    trial = Trial(tiny(lr=0.5, images=("coins", "camera"), repeats=2, report_every=3))
    pack = trial.packs[0]
    assert [(n.label, n.repeat) for n in pack.networks][3] == ("camera", 1)
    pack.data.observation[3].fill_(math.nan)
    reports = []
    with pytest.raises(TrialDiverged) as e:
        run_trial(trial.cfg, lambda m, t: reports.append(m), trial=trial)
    msg = str(e.value)
    assert "nan" in msg and "iteration 1 " in msg and "'camera' (repeat 1, seed 1)" in msg
    assert "lr = 0.5" in msg and isinstance(e.value, RuntimeError)
    assert reports == [] and trial.iteration == 3
    # The other networks trained on, unaffected (they share no parameter).
    assert torch.isfinite(pack.loss[:3]).all()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("mode", NOISE_MODES)
def test_every_mode_and_task_runs(mode, task):
    r = run_trial(tiny(noise_mode=mode, task=task, iterations=5, report_every=5), no_report)
    assert r["iterations"] == 5
    # Held-out pixels (the default rule) only for denoise: the other tasks default to ES-WMV.
    keys = REPORT_KEYS if task == "denoise" else REPORT_KEYS - HOLDOUT_KEYS
    assert all(math.isfinite(r[k]) for k in keys) and not (set(r) & HOLDOUT_KEYS and task != "denoise")


@pytest.mark.parametrize("mode", ["ddpm_resample", "ddpm_random_t", "gaussian_resample", "uniform"])
def test_stochastic_output_averages_draws_of_the_trained_input(mode):
    trial = Trial(tiny(noise_mode=mode, eval_draws=3))
    trial.step()
    pack, net = trial.packs[0], trial.networks[0]
    assert net.dip_input.stochastic
    draws = []
    original = net.draw

    def spy(generator):
        assert generator is net.eval_gen  # never the training generator
        draws.append(original(generator))
        return draws[-1]

    net.draw = spy
    state = net.eval_gen.get_state()
    out = pack.eval_outputs(trial.cfg.eval_draws)
    assert len(draws) == 3
    with torch.no_grad():
        expected = torch.stack([pack.net(z) for z in draws]).mean(0)
    assert torch.allclose(out, expected)
    # The draws are the trained distribution's: replaying the generator reproduces them.
    net.eval_gen.set_state(state)
    assert torch.equal(net.dip_input.sample(net.eval_gen), draws[0])


def test_fixed_input_output_is_the_network_on_its_input():
    trial = Trial(tiny(noise_mode="ddpm"))
    trial.step()
    pack, net = trial.packs[0], trial.networks[0]
    with torch.no_grad():
        assert torch.allclose(pack.eval_outputs(trial.cfg.eval_draws), pack.net(net.dip_input.z))


def test_unet_runs():
    trial = Trial(tiny(net="unet", iterations=5))
    assert isinstance(trial.packs[0].net, UNet)
    r = run_trial(trial.cfg, no_report, trial=trial)
    assert math.isfinite(r["psnr"])


@pytest.mark.parametrize("task", ["denoise", "inpaint", "sr"])
def test_ddpm_input_is_built_from_the_observation(task):
    # ES-WMV: with held-out pixels (the denoise default) the input is built from the
    # observation with those filled in (tests/test_holdout.py).
    trial = Trial(tiny(noise_mode="ddpm", task=task, stop_rule="eswmv"))
    run = trial.networks[0]
    x0 = run.dip_input.x0
    assert torch.allclose(x0, 2 * run.data.input_image - 1)
    assert not torch.allclose(x0, 2 * run.data.clean - 1, atol=1e-3)
    if task == "denoise":
        assert torch.allclose(x0, 2 * run.data.observation - 1)


def test_cuda_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("mode", ["uniform", "ddpm_random_t"])
def test_repeat_r_is_the_trial_with_seed_plus_r(mode):
    # Bit-identical on the CPU: each network of a pack runs its own groups=1 convs
    # (models/packed.py set_convs), so its arithmetic does not depend on the pack.
    cfg = tiny(noise_mode=mode, images=("camera", "coins"), repeats=3, seed=5, iterations=4)
    packed = run_trial(cfg, no_report)
    nets = packed["networks"]
    assert [(n["image"], n["repeat"], n["seed"]) for n in nets] == [
        (image, r, 5 + r) for image in ("camera", "coins") for r in range(3)]
    for r in (1, 2):
        alone = run_trial(cfg.replace(seed=5 + r, repeats=1), no_report)["networks"]
        assert [n["metrics"] for n in nets if n["repeat"] == r] == [n["metrics"] for n in alone]


def test_metrics_mean_over_images_and_repeats_with_the_spread():
    cfg = tiny(images=("camera", "coins"), repeats=3, iterations=3)
    r = run_trial(cfg, no_report)
    per = {(n["image"], n["repeat"]): n["metrics"] for n in r["networks"]}
    assert len(per) == 6 and {"psnr", "psnr_observation"} <= set(per["coins", 2])
    assert r["psnr_ema"] == pytest.approx(sum(m["psnr_ema"] for m in per.values()) / 6)
    assert r["psnr/coins"] == pytest.approx(sum(per["coins", k]["psnr"] for k in range(3)) / 3)
    by_repeat = [(per["camera", k]["psnr"] + per["coins", k]["psnr"]) / 2 for k in range(3)]
    assert r["psnr_repeat_std"] == pytest.approx(float(np.std(by_repeat, ddof=1)))
    assert r["psnr_repeat_std"] > 0
    assert "psnr_repeat_std" not in run_trial(cfg.replace(repeats=1), no_report)


def test_report_images_name_what_a_report_shows():
    trial = Trial(tiny(images=("camera", "coins"), repeats=2, iterations=2))
    before = trial.state_dict()
    setup = list(trial.report_images(setup=True))
    assert [(n, s) for n, _, s in setup] == [  # MLflow's image cards open on step 0: each has one
        ("camera/observation", 0), ("camera/input", 0), ("camera/output", 0),
        ("coins/observation", 0), ("coins/input", 0), ("coins/output", 0)]
    # The untrained output leaves no trace: generators and BatchNorm buffers as before.
    after = trial.state_dict()
    for b, a in zip(before["networks"], after["networks"], strict=True):
        assert torch.equal(b["eval_gen"], a["eval_gen"])
        assert all(torch.equal(b["net"][k], a["net"][k]) for k in b["net"]), "a BatchNorm buffer moved"
    run_trial(trial.cfg, no_report, trial=trial)
    shown = list(trial.report_images(final=True))
    assert [(n, s) for n, _, s in shown] == [
        ("camera/output", 2), ("camera/output_ema", 2), ("coins/output", 2), ("coins/output_ema", 2)]
    for _, image, _ in shown:
        assert image.shape == (1, 1, 32, 32) and 0 <= image.min() and image.max() <= 1
    single = Trial(tiny())
    assert [n for n, _, _ in single.report_images(setup=True)] == ["observation", "input", "output"]


def test_output_ema_weights_sum_to_one_from_the_first_step():
    # Bias-corrected: after one step the average is the first output itself (not 1% of it).
    trial = Trial(tiny(noise_mode="ddpm"))
    pack, net = trial.packs[0], trial.networks[0]
    with torch.no_grad():
        first = pack.net(net.dip_input.z)
    trial.step()
    torch.testing.assert_close(pack.ema / trial.ema_norm, first)


def test_bias_correction_leaves_the_reference_length_unchanged():
    # The reference EMA starts at the first output: ref_n = raw_n + w**n * o_1, where
    # raw_n = sum_i (1 - w) w**(n - i) o_i; the corrected one is raw_n / (1 - w**n). For
    # outputs in [0, 1] they differ by at most w**(n-1) + w**n / (1 - w**n): 6e-7 at
    # n = 1500, a PSNR change below 1e-3 dB (bench/ema_bias.py measures it on training).
    w, g = 0.99, torch.Generator().manual_seed(0)
    outs = torch.rand(1500, 64, generator=g, dtype=torch.float64)
    ref, raw = outs[0].clone(), torch.zeros(64, dtype=torch.float64)
    for n, o in enumerate(outs, start=1):
        if n > 1:
            ref = ref * w + o * (1 - w)
        raw = raw * w + o * (1 - w)
    corrected = raw / (1 - w**1500)
    bound = w**1499 + w**1500 / (1 - w**1500)
    assert (corrected - ref).abs().max() <= bound < 6e-7
    torch.testing.assert_close(ref, raw + w**1500 * outs[0])


def test_forwards_count_sure_twice():
    """A trial's `forwards`: one network forward per MSE step, two per SURE step (its probe)."""
    got = {}
    for loss in ("mse", "sure"):
        r = run_trial(tiny(noise_mode="ddpm", loss=loss), no_report)
        got[loss] = r["forwards"]
    assert got == {"mse": 6.0, "sure": 12.0}
