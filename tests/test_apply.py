"""`run_study.py apply`: a user's own degraded image, no clean image, native size and mode."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

import run_study
from study.engine.apply import ApplyOptions, apply, padded_side, read_picture
from study.engine.autostop import WindowVariance
from study.config import TrialConfig
from study.engine.metrics import psnr

ROOT = Path(__file__).resolve().parent.parent
# Small and quick: 3 scales of 16 channels on a 45 x 61 image, a few seconds on 2 cores.
FAST = TrialConfig(noise_mode="ddpm_resample", timestep=100, scales=3, channels=16,
                   iterations=300, report_every=100, device="cpu")


def _save(a: np.ndarray, path: Path, mode: str | None = None) -> Path:
    Image.fromarray(a, mode=mode).save(path)
    return path


@pytest.fixture
def noisy_colour(tmp_path):
    """A non-square colour crop (45 x 61) of astronaut, and its sigma = 25/255 noisy copy."""
    clean = np.ascontiguousarray(skimage.data.astronaut()[100:280:4, 120:364:4][:45, :61])
    g = np.random.default_rng(0)
    noisy = np.clip(clean / 255 + g.normal(0, 25 / 255, clean.shape), 0, 1)
    noisy = (noisy * 255).round().astype(np.uint8)
    return clean, _save(noisy, tmp_path / "noisy.png")


def test_restores_a_noisy_colour_image_beyond_the_noisy_input(noisy_colour, tmp_path):
    clean, noisy_path = noisy_colour
    out = tmp_path / "restored.png"
    info = apply(FAST, str(noisy_path), out, ApplyOptions(quiet=True))
    with Image.open(out) as im:
        assert im.mode == "RGB" and im.size == (61, 45)
        restored = np.asarray(im)
    ref = torch.from_numpy(clean).permute(2, 0, 1)[None] / 255.0
    as_t = lambda a: torch.from_numpy(a.astype(np.float32) / 255).permute(2, 0, 1)[None]  # noqa: E731
    before, after = psnr(as_t(np.asarray(Image.open(noisy_path))), ref), psnr(as_t(restored), ref)
    assert before == pytest.approx(20.6, abs=0.6)  # sigma = 25/255 clipped
    assert after > before + 3.0, (before, after)  # measured 25.8-25.9 dB for seeds 0-2
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["iterations_run"] == 300 and meta["stop"] == "config" and meta["seconds"] > 0
    assert meta["config"]["noise_mode"] == "ddpm_resample" and meta["size_out"] == [61, 45]
    assert info["config"]["images"] == [str(noisy_path)]


def test_gray_16_bit_stays_16_bit_gray(tmp_path):
    a = (np.linspace(0, 65535, 37 * 23).reshape(23, 37)).astype(np.uint16)
    src = _save(a, tmp_path / "g16.png")
    with Image.open(src) as im:
        assert im.mode.startswith("I")
    out = tmp_path / "out.png"
    apply(FAST.replace(iterations=5), str(src), out, ApplyOptions(quiet=True))
    with Image.open(out) as im:
        assert im.mode.startswith("I;16") and im.size == (37, 23)
        assert np.asarray(im).max() > 255  # 16 bits used, not a scaled 8-bit image


def test_alpha_is_kept_and_sr_output_is_larger(tmp_path):
    a = np.zeros((13, 21, 4), np.uint8)
    a[..., :3], a[..., 3] = 120, np.arange(21, dtype=np.uint8)[None] * 10
    src = _save(a, tmp_path / "rgba.png", "RGBA")
    out = tmp_path / "big.png"
    info = apply(FAST.replace(iterations=3), str(src), out, ApplyOptions(task="sr", sr_factor=3, quiet=True))
    with Image.open(out) as im:
        assert im.mode == "RGBA" and im.size == (63, 39)
    assert info["size_out"] == [63, 39]


def test_inpaint_with_a_mask(tmp_path):
    g = np.random.default_rng(1)
    src = _save((g.random((20, 30)) * 255).astype(np.uint8), tmp_path / "gray.png")
    mask = _save(((g.random((20, 30)) > 0.5) * 255).astype(np.uint8), tmp_path / "mask.png")
    out = tmp_path / "filled.png"
    apply(FAST.replace(iterations=3), str(src), out, ApplyOptions(task="inpaint", mask=str(mask), quiet=True))
    with Image.open(out) as im:
        assert im.mode == "L" and im.size == (30, 20)


def test_stop_auto_stops_at_the_variance_minimum(noisy_colour, tmp_path):
    _, noisy_path = noisy_colour
    out = tmp_path / "auto.png"
    lines: list[str] = []
    opts = ApplyOptions(stop="auto", window=10, patience=30, max_iterations=2000, stop_rule="eswmv")
    info = apply(FAST.replace(report_every=20), str(noisy_path), out, opts, progress=lines.append)
    assert info["stop"] == "es-wmv"
    # The rule fired `patience` iterations after the minimum, far before the upper bound,
    # and the loop ended at the report after it (the trial loop checks at reports).
    assert info["fired_at"] == info["stop_iteration"] + 30 < 2000
    assert info["fired_at"] <= info["iterations_run"] < info["fired_at"] + 20
    assert any("wmv" in s for s in lines) and "stopped by ES-WMV at iteration" in lines[-1]


def test_window_variance_is_the_variance_of_the_last_window():
    torch.manual_seed(0)
    xs = [torch.rand(1, 1, 4, 5) for _ in range(7)]
    wv = WindowVariance(3, (1, 1, 4, 5), torch.device("cpu"))
    got = [float(wv.add(x, torch.tensor(i + 1))[0]) for i, x in enumerate(xs)]
    assert got[:2] == [math.inf, math.inf]  # the window is not full yet
    for end in (3, 7):  # the first full window, and one that slid over the ring
        last = torch.stack(xs[end - 3:end]).double()
        want = float(((last - last.mean(0)) ** 2).mean())
        assert got[end - 1] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("side,multiple,factor,want", [
    (45, 8, 1, 48), (48, 8, 1, 48), (3, 8, 1, 16), (13, 8, 3, 16), (10, 8, 2, 12), (7, 8, 4, 8)])
def test_padded_side(side, multiple, factor, want):
    p = padded_side(side, multiple, factor)
    assert p == want and p * factor % multiple == 0 and p * factor >= 2 * multiple


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run_study.py", "apply", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_restores_and_refuses_bad_input_in_one_sentence(noisy_colour, tmp_path, capsys):
    _, noisy = noisy_colour
    cfg = tmp_path / "best.json"
    cfg.write_text(json.dumps({"config": FAST.replace(iterations=20, report_every=10).to_dict()}))
    out = tmp_path / "r.png"
    ok = _cli("--config", str(cfg), "--image", str(noisy), "--out", str(out))
    assert ok.returncode == 0, ok.stderr
    assert "it     10/20" in ok.stdout and out.is_file() and out.with_suffix(".json").is_file()
    assert read_picture(out).x.shape == (1, 3, 45, 61)
    bad = [
        (["--image", str(tmp_path / "nope.png")], "cannot read image"),
        (["--image", str(noisy), "--task", "inpaint"], "--mask"),
        (["--image", str(noisy), "--mask", str(noisy)], "--mask goes with --task inpaint"),
        (["--image", str(noisy), "--sr-factor", "1", "--task", "sr"], "--sr-factor = 1"),
        (["--image", str(cfg)], "cannot read image"),
        (["--image", str(noisy), "--threads", "0"], "--threads 0"),
    ]
    # The refusals through the CLI's main() in this process (no interpreter start-up each).
    for extra, words in bad:
        out2 = tmp_path / "never.png"
        code = run_study.main(["apply", "--config", str(cfg), "--out", str(out2), *extra])
        err = capsys.readouterr().err
        assert code == 2 and words in err, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not out2.exists() and not out2.with_suffix(".json").exists()
    code = run_study.main(["apply", "--config", str(cfg), "--image", str(noisy), "--out", str(tmp_path / "x.bmp2")])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_cli_uses_one_thread_unless_told(noisy_colour, tmp_path):
    """apply follows train's rule: 1 torch thread by default (two on a busy 2-core machine
    spin against each other), --threads N otherwise."""
    _, noisy = noisy_colour
    cfg = tmp_path / "best.json"
    cfg.write_text(json.dumps({"config": FAST.replace(iterations=2, report_every=1).to_dict()}))
    before = torch.get_num_threads()
    try:
        for extra, want in (([], 1), (["--threads", "2"], 2)):
            torch.set_num_threads(3)
            args = ["apply", "--config", str(cfg), "--image", str(noisy), "--out", str(tmp_path / "t.png"), "--quiet"]
            assert run_study.main([*args, *extra]) == 0
            assert torch.get_num_threads() == want, extra
    finally:
        torch.set_num_threads(before)
