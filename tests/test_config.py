"""Tests of study/config.py: defaults, round trips, and a ValueError for every bad value."""

import dataclasses
import json
import math

import pytest

from study.config import (BUNDLED_IMAGES, COLORS, LOSSES, NETWORKS, NOISE_MODES, SCHEDULES,
                          TASKS, UPSAMPLES, TrialConfig, load_config_file)


def test_defaults_are_valid():
    cfg = TrialConfig()
    assert cfg.images == ("camera",)
    assert cfg.is_ddpm and cfg.noise_mode in NOISE_MODES
    assert cfg.size % cfg.min_size == 0


def test_frozen_and_hashable():
    cfg = TrialConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0
    assert hash(cfg) == hash(TrialConfig())


def test_dict_round_trip_is_json_serialisable():
    cfg = TrialConfig(images=("camera", "coins"), noise_mode="ddpm_random_t", lr=0.003, seed=7)
    d = cfg.to_dict()
    assert d["images"] == ["camera", "coins"]
    assert TrialConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_json_file_round_trip(tmp_path):
    cfg = TrialConfig(task="inpaint", missing=0.3, net="unet", loss="l1", timestep=250)
    cfg.to_json(tmp_path / "c.json")
    assert TrialConfig.from_dict(load_config_file(tmp_path / "c.json")) == cfg


def test_study_export_shape_is_read(tmp_path):
    cfg = TrialConfig(timestep=42, iterations=17)
    export = {"config": cfg.to_dict(), "psnr": 28.1, "trial_id": "abc"}
    (tmp_path / "best.json").write_text(json.dumps(export))
    assert TrialConfig.from_dict(load_config_file(tmp_path / "best.json")) == cfg


def test_lists_become_tuples():
    cfg = TrialConfig.from_dict({"images": ["camera", "moon"]})
    assert cfg.images == ("camera", "moon") and isinstance(cfg.images, tuple)
    assert TrialConfig(images="camera").images == ("camera",)
    hash(cfg)


def test_replace_validates():
    assert TrialConfig().replace(lr=0.1).lr == 0.1
    with pytest.raises(ValueError, match="lr"):
        TrialConfig().replace(lr=-1.0)


@pytest.fixture
def paths(tmp_path):
    """A text file, an empty folder and a missing path, for the image checks."""
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "a.txt").write_text("x")
    return tmp_path


# (overrides, fragments the message must contain: the bad value and what is allowed).
# "{tmp}" is replaced by the fixture's folder.
BAD = {
    "timestep_high": ({"timestep": 1000}, ["timestep", "1000", "[0, 999]"]),
    "timestep_negative": ({"timestep": -1}, ["timestep", "-1", "[0, 999]"]),
    "timestep_vs_T": ({"num_timesteps": 50, "timestep": 50}, ["timestep", "50", "[0, 49]"]),
    "lr_zero": ({"lr": 0.0}, ["lr", "0.0", "(0, 10]"]),
    "lr_negative": ({"lr": -1.0}, ["lr", "-1.0", "(0, 10]"]),
    "lr_nan": ({"lr": math.nan}, ["lr", "nan", "finite number"]),
    "lr_inf": ({"lr": math.inf}, ["lr", "inf", "finite number"]),
    "lr_string": ({"lr": "0.01"}, ["lr", "'0.01'", "number"]),
    "noise_mode": ({"noise_mode": "bogus"}, ["noise_mode", "'bogus'", *NOISE_MODES]),
    "task": ({"task": "deblur"}, ["task", "'deblur'", *TASKS]),
    "net": ({"net": "resnet"}, ["net", "'resnet'", *NETWORKS]),
    "schedule": ({"schedule": "quadratic"}, ["schedule", "'quadratic'", *SCHEDULES]),
    "loss": ({"loss": "huber"}, ["loss", "'huber'", *LOSSES]),
    "color": ({"color": "cmyk"}, ["color", "'cmyk'", *COLORS]),
    "upsample": ({"upsample": "bicubic"}, ["upsample", "'bicubic'", *UPSAMPLES]),
    "image_name": ({"images": ("lena",)}, ["'lena'", "camera", "astronaut"]),
    "image_missing_file": ({"images": ("{tmp}/nope.png",)}, ["nope.png", "not a file or folder"]),
    "image_not_image": ({"images": ("{tmp}/notes.txt",)}, ["notes.txt", "PNG or JPEG"]),
    "image_empty_folder": ({"images": ("{tmp}/empty",)}, ["empty", "no PNG or JPEG"]),
    "image_folder_no_images": ({"images": ("{tmp}/only_text",)}, ["only_text", "no PNG or JPEG"]),
    "images_empty": ({"images": ()}, ["at least one image"]),
    "images_not_a_list": ({"images": 5}, ["images", "5"]),
    "image_not_a_string": ({"images": ("camera", 3)}, ["3", "name or a path"]),
    "size_not_divisible": ({"size": 60, "scales": 3}, ["size = 60", "multiple of 8"]),
    "size_too_small_for_scales": ({"size": 32, "scales": 5}, ["size = 32", "5 scales", "at least 64"]),
    "size_below_ssim_window": ({"size": 8, "scales": 2}, ["size = 8", "[16, 4096]"]),
    "size_float": ({"size": 64.0}, ["size", "64.0", "an integer"]),
    "sr_size": ({"task": "sr", "size": 48, "scales": 2, "sr_factor": 5}, ["size = 48", "sr_factor = 5"]),
    "iterations_zero": ({"iterations": 0}, ["iterations = 0", "[1, "]),
    "iterations_bool": ({"iterations": True}, ["iterations", "True", "an integer"]),
    "seed_negative": ({"seed": -1}, ["seed = -1", "[0, "]),
    "seed_bool": ({"seed": False}, ["seed", "False", "an integer"]),
    "scales_zero": ({"scales": 0}, ["scales = 0", "[1, 8]"]),
    "channels_zero": ({"channels": 0}, ["channels = 0", "[1, 1024]"]),
    "sigma_negative": ({"sigma": -0.1}, ["sigma = -0.1", "[0, 1]"]),
    "missing_one": ({"missing": 1.0}, ["missing = 1.0", "[0, 1)"]),
    "ema_weight_one": ({"ema_weight": 1.0}, ["ema_weight = 1.0", "[0, 1)"]),
    "eval_draws_zero": ({"eval_draws": 0}, ["eval_draws = 0", "[1, "]),
    "report_every_zero": ({"report_every": 0}, ["report_every = 0", "[1, "]),
    "num_timesteps_one": ({"num_timesteps": 1}, ["num_timesteps = 1", "[2, "]),
    "reg_noise_negative": ({"reg_noise_std": -0.1}, ["reg_noise_std = -0.1", "[0, 10]"]),
    "device": ({"device": "gpu"}, ["'gpu'", "cpu", "cuda:N"]),
    "device_index": ({"device": "cuda:x"}, ["'cuda:x'", "cuda:N"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_value_raises_value_error_naming_it(case, paths):
    overrides, fragments = BAD[case]
    overrides = {k: tuple(s.replace("{tmp}", str(paths)) if isinstance(s, str) else s for s in v)
                 if k == "images" and isinstance(v, tuple) else v for k, v in overrides.items()}
    with pytest.raises(ValueError) as e:
        TrialConfig(**overrides)
    msg = str(e.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


def test_unknown_key_names_it_and_the_allowed_keys():
    with pytest.raises(ValueError) as e:
        TrialConfig.from_dict({"learning_rate": 0.1, "lr": 0.1})
    assert "learning_rate" in str(e.value) and "lr" in str(e.value) and "timestep" in str(e.value)


@pytest.mark.parametrize("name", BUNDLED_IMAGES)
def test_bundled_names_pass(name):
    TrialConfig(images=(name,))


def test_png_file_and_folder_pass(tmp_path):
    (tmp_path / "a.PNG").write_bytes(b"")  # pixels are read later, by images.preflight
    TrialConfig(images=(str(tmp_path / "a.PNG"), str(tmp_path)))


@pytest.mark.parametrize("content, fragment", [
    (None, "cannot read"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
])
def test_load_config_file_errors(tmp_path, content, fragment):
    path = tmp_path / "c.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError) as e:
        load_config_file(path)
    assert fragment in str(e.value) and "c.json" in str(e.value)


def test_load_config_file_on_a_folder(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_config_file(tmp_path)


def test_config_choices_match_the_libraries():
    """config.py is standard library only, so it spells the choices out itself; these must
    stay the lists that noise/ and models/ actually implement."""
    import models
    import noise
    from models.skip import UPSAMPLES
    from study import config

    assert config.NOISE_MODES == noise.INPUT_MODES
    assert config.DDPM_MODES == noise.DDPM_MODES
    assert config.SCHEDULES == noise.SCHEDULES
    assert config.NETWORKS == models.NETWORKS
    assert set(config.UPSAMPLES) == set(UPSAMPLES)


def test_study_record_round_trips_through_json_with_its_stages():
    import json

    from study.config import StudyConfig
    from study.studydir import StudyRecord, StudyStage

    first = StudyConfig(name="st", root="/r", num_samples=4)
    rec = StudyRecord(study=first, experiment_id="1", parent_run_id="p", space={"lr": {"low": 0.001}},
                      created="2026-11-27T20:00:00")
    assert rec.current == first
    more = StudyConfig(name="st", root="/r", num_samples=6, storage="/r/st/ray/extend-1")
    rec2 = rec.extended(StudyStage(study=more, added=2, first_trial=4, created="2026-11-27T21:00:00"))
    back = StudyRecord.from_dict(json.loads(json.dumps(rec2.to_dict())))
    assert back == rec2 and back.current == more and back.extensions[0].first_trial == 4
    with pytest.raises(ValueError, match="unknown study.json key"):
        StudyRecord.from_dict({**rec.to_dict(), "colour": "red"})


def test_used_dict_holds_only_the_fields_the_mode_uses():
    uniform, ddpm = TrialConfig(noise_mode="uniform"), TrialConfig(noise_mode="ddpm")
    assert "timestep" not in uniform.used_dict() and "reg_noise_std" in uniform.used_dict()
    assert "timestep" in ddpm.used_dict() and "reg_noise_std" not in ddpm.used_dict()
    # sigma_estimate matters only with SURE (study/modes.py LOSS_ONLY)
    assert set(uniform.to_dict()) - set(uniform.used_dict()) == {"timestep", "sigma_estimate"}
    assert "sigma_estimate" in TrialConfig(noise_mode="ddpm", loss="sure").used_dict()
