"""Study presets: the bundled compare-modes preset, precedence, a user's own file, refusals."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from study.config import DDPM_MODES, NOISE_MODES
from study.cli.common import build_study
from study.cli.main import make_parser
from study.cli.presets import apply_preset, list_presets, load_preset
from study.space import load_space

ROOT = Path(__file__).resolve().parent.parent


def _study(*argv: str):
    ns = make_parser().parse_args(["run", "--root", "/tmp/presets-test", *argv])
    return build_study(apply_preset(ns))


def test_compare_modes_answers_the_question():
    """Every input mode, t over 0..300, dark images among several, 3 repeats."""
    p = load_preset("compare-modes")
    assert "compare-modes" in list_presets()
    space = load_space(str(p.space), _study("--preset", "compare-modes").trial)
    assert set(space.spec["noise_mode"]) == set(NOISE_MODES)
    assert space.spec["timestep"]["low"] == 0 and space.spec["timestep"]["high"] == 300
    assert "hubble_deep_field" in p.trial["images"] and len(p.trial["images"]) >= 3
    assert p.trial["repeats"] >= 3
    assert set(DDPM_MODES) <= set(space.spec["noise_mode"])


def test_cpu_profile_by_default_and_the_reference_on_gpus():
    s = _study("--preset", "compare-modes")
    assert (s.trial.size, s.trial.scales, s.trial.iterations) == (64, 3, 300)
    assert s.num_samples == 48 and s.name.startswith("compare-modes-")
    assert s.space_file.endswith("presets/compare-modes.space.yaml")
    assert s.trial.images == ("camera", "astronaut", "cell", "hubble_deep_field")
    g = _study("--preset", "compare-modes", "--gpus-per-trial", "1")
    assert (g.trial.size, g.trial.scales, g.trial.channels, g.trial.iterations) == (512, 5, 128, 3000)


def test_typed_flags_and_config_file_override_the_preset(tmp_path):
    s = _study("--preset", "compare-modes", "--size", "32", "--num-samples", "5",
               "--image", "camera", "--name", "mine")
    assert (s.trial.size, s.num_samples, s.trial.images, s.name) == (32, 5, ("camera",), "mine")
    cfg = tmp_path / "base.json"
    cfg.write_text(json.dumps({"iterations": 77, "lr": 0.003}))
    s = _study("--preset", "compare-modes", "--config", str(cfg))
    assert s.trial.iterations == 77 and s.trial.size == 64  # config over preset, preset elsewhere


def test_the_preset_line_names_what_the_user_overrode(capsys, tmp_path):
    _study("--preset", "compare-modes", "--repeats", "1", "--image", "camera")
    line = capsys.readouterr().out
    assert line.startswith("preset compare-modes (cpu profile): ") and "3 repeats" in line  # the preset's text
    assert "overridden: images camera (preset: camera astronaut cell hubble_deep_field), repeats 1 (preset: 3)" in line
    _study("--preset", "compare-modes")
    assert "overridden" not in capsys.readouterr().out


def test_a_users_own_preset_file(tmp_path):
    (tmp_path / "sp.yaml").write_text("noise_mode: [uniform, ddpm]\nlr: {low: 0.001, high: 0.01, log: true}\n")
    f = tmp_path / "mine.yaml"
    f.write_text("description: mine\nstudy: {num_samples: 3, metric: psnr}\n"
                 "trial: {images: [moon], iterations: 50}\nspace: sp.yaml\n")
    s = _study("--preset", str(f))
    assert (s.num_samples, s.metric, s.trial.images, s.trial.iterations) == (3, "psnr", ("moon",), 50)
    assert s.space_file == str(tmp_path / "sp.yaml") and s.name.startswith("mine-")


@pytest.mark.parametrize("text,words", [
    ("study: {samples: 3}\n", "unknown study setting(s) samples"),
    ("trial: {sizes: 3}\n", "unknown config field(s) sizes"),
    ("colour: red\n", "unknown key(s) colour"),
    ("space: missing.yaml\n", "does not exist"),
    ("profiles: {tpu: {size: 32}}\n", "unknown profile(s) tpu"),
    ("- a list\n", "must hold a mapping"),
])
def test_bad_preset_files_are_refused_in_one_sentence(tmp_path, text, words):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_preset(str(f))


def test_cli_refuses_an_unknown_preset_before_writing_anything(tmp_path):
    r = subprocess.run([sys.executable, "run_study.py", "run", "--preset", "nope", "--root", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown preset 'nope'; allowed: compare-modes" in r.stderr
    assert r.stderr.count("\n") == 1 and not any(tmp_path.iterdir())
