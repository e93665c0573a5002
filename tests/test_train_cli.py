"""Tests of `python run_study.py train`: outputs, config replay, and user errors.

The happy path and one error run as real subprocesses; the other errors call
`run_study.main` in-process (each subprocess pays ~2.5 s of imports), where an uncaught
exception fails the test just as a traceback would fail the subprocess check.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import run_study

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--image", "camera", "--size", "32", "--scales", "2", "--channels", "8",
        "--input-depth", "8", "--iterations", "4", "--report-every", "2"]
RESULT_KEYS = {"psnr", "ssim", "psnr_ema", "psnr_best", "best_iteration", "psnr_observation",
               "ssim_observation", "iterations", "seconds", "config"}


def start(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    return subprocess.Popen([sys.executable, "run_study.py", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc):
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A good and a bad subprocess, started together (imports dominate their time)."""
    tmp = tmp_path_factory.mktemp("cli")
    good = start(*TINY, "--out", str(tmp / "run1"))
    bad = start(*TINY, "--image", "lena", "--out", str(tmp / "bad"))
    return {"good": (finish(good), tmp / "run1"), "bad": (finish(bad), tmp / "bad")}


@pytest.fixture(scope="module")
def first_run(runs):
    return runs["good"]


def test_train_exits_0_and_writes_result(first_run):
    proc, out = first_run
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "done:" in proc.stdout and "it      4/4" in proc.stdout
    result = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(result)
    assert result["iterations"] == 4 and result["config"]["size"] == 32
    assert result["config"]["images"] == ["camera"]


@pytest.mark.parametrize("name", ["observation.png", "input.png", "output.png"])
def test_train_writes_valid_pngs(first_run, name):
    _, out = first_run
    with Image.open(out / name) as im:
        im.verify()
    with Image.open(out / name) as im:
        assert im.format == "PNG" and im.size == (32, 32)


def test_config_replays_and_flags_override(first_run, tmp_path, capsys):
    _, out = first_run
    # result.json holds the config under "config", as a study export does.
    rc = run_study.main(["train", "--config", str(out / "result.json"), "--iterations", "2",
                         "--seed", "3", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    first = json.loads((out / "result.json").read_text())["config"]
    replay = json.loads((tmp_path / "result.json").read_text())["config"]
    assert replay == {**first, "iterations": 2, "seed": 3}


def test_bare_config_file_replays(tmp_path):
    cfg = {"images": ["coins"], "size": 16, "scales": 2, "channels": 8, "input_depth": 8,
           "iterations": 2, "noise_mode": "uniform"}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert run_study.main(["train", "--config", str(tmp_path / "c.json"), "--out",
                           str(tmp_path / "o"), "--quiet"]) == 0
    assert json.loads((tmp_path / "o" / "result.json").read_text())["config"]["images"] == ["coins"]


def _export(tmp_path, **machine):
    import torch

    from study.engine.machine import record
    cfg = {"images": ["coins"], "size": 16, "scales": 2, "channels": 8, "input_depth": 8,
           "iterations": 2, "noise_mode": "uniform", "device": "cpu"}
    here = {**record(torch.device("cpu")), "threads": "1"}  # train's default --threads
    (tmp_path / "best.json").write_text(json.dumps({"config": cfg, "machine": {**here, **machine}}))
    return str(tmp_path / "best.json")


def test_replay_on_another_machine_prints_one_notice(tmp_path, capsys):
    best = _export(tmp_path, cpu_isa="AVX2-or-other", torch="2.0.0")
    assert run_study.main(["train", "--config", best, "--out", str(tmp_path / "o"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("notice: "), err
    assert "cpu_isa AVX2-or-other -> " in err[0] and "torch 2.0.0 -> " in err[0] and " dB " in err[0]


def test_replay_on_the_same_machine_says_nothing(tmp_path, capsys):
    assert run_study.main(["train", "--config", _export(tmp_path), "--out", str(tmp_path / "o"),
                           "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "o" / "result.json").read_text())["machine"]["threads"] == "1"


def test_bad_input_subprocess_exits_2_without_traceback(runs):
    proc, out = runs["bad"]
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown image 'lena'")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()


BAD = {
    "unknown_image": (["--image", "lena"], "unknown image 'lena'"),
    "timestep": (["--timestep", "5000"], "timestep = 5000"),
    "lr": (["--lr", "-1"], "lr = -1.0"),
    "noise_mode": (["--noise-mode", "gaussian_blur"], "unknown noise_mode 'gaussian_blur'"),
    "size": (["--size", "30"], "size = 30"),
    "config_missing": (["--config", "{tmp}/nope.json"], "cannot read config file"),
    "config_invalid_json": (["--config", "{tmp}/bad.json"], "is not valid JSON"),
    "config_unknown_key": (["--config", "{tmp}/keys.json"], "unknown config key(s) learning_rate"),
    "corrupt_png": (["--image", "{tmp}/broken.png"], "cannot read image"),
    "stop_rule": (["--stop-rule", "median"], "unknown stop_rule 'median'; allowed: eswmv, holdout"),
    "holdout_fraction": (["--stop-rule", "holdout", "--holdout-fraction", "0.7"],
                         "holdout_fraction = 0.7 is out of range; allowed: (0, 0.5]"),
    "holdout_task": (["--stop-rule", "holdout", "--task", "sr"],
                     "stop_rule 'holdout' needs noise independent per pixel, so task 'sr' cannot use it"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{\"lr\": 0.1,")
    (tmp_path / "keys.json").write_text(json.dumps({"learning_rate": 0.1}))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    args, fragment = BAD[case]
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    rc = run_study.main(["train", *TINY, *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and fragment in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_unwritable_out_exits_2(capsys):
    rc = run_study.main(["train", *TINY, "--out", "/proc/x/run"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "/proc/x" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_cuda_exits_2(tmp_path, capsys):
    rc = run_study.main(["train", *TINY, "--device", "cuda", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "no CUDA device" in err
    assert not (tmp_path / "o" / "result.json").exists()


def test_repeats_train_every_seed_and_keep_each_network(tmp_path, capsys):
    rc = run_study.main(["train", *TINY, "--repeats", "2", "--seed", "4", "--out", str(tmp_path)])
    assert rc == 0
    assert "x 2 repeats (seeds 4..5)" in capsys.readouterr().out
    result = json.loads((tmp_path / "result.json").read_text())
    assert [(n["image"], n["repeat"], n["seed"]) for n in result["networks"]] == [
        ("camera", 0, 4), ("camera", 1, 5)]
    assert result["psnr"] == pytest.approx(sum(n["metrics"]["psnr"] for n in result["networks"]) / 2)
    assert "psnr_ema_repeat_std" in result
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "input.png", "observation.png", "output.png", "output_ema.png"]
