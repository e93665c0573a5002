"""The Optuna define-by-run space, driven by a real Optuna study."""
from __future__ import annotations

import pickle

import optuna
import pytest

from study.config import DDPM_MODES, NOISE_MODES, TrialConfig
from study.space import DEFAULT_SPACE, SearchSpace, load_space, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _proposals(space: SearchSpace, n: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(direction="maximize", sampler=make_sampler(seed))
    out = []

    def objective(trial: optuna.Trial) -> float:
        fixed = space(trial)
        out.append({**trial.params, **fixed})
        return float(trial.params.get("lr", 0.0))

    study.optimize(objective, n_trials=n)
    return out


def test_default_space_proposes_valid_configs():
    base = TrialConfig()
    props = _proposals(load_space(None, base), 30)
    assert {p["noise_mode"] for p in props} <= set(NOISE_MODES)
    assert len({p["noise_mode"] for p in props}) >= 4  # the modes are explored
    for p in props:
        assert ("timestep" in p) == (p["noise_mode"] in DDPM_MODES)  # t only where it matters
        assert 1e-4 <= p["lr"] <= 1e-1
        if "timestep" in p:
            assert 0 <= p["timestep"] <= 300
        base.replace(**p)  # every proposal is a valid TrialConfig


def test_seeded_sampler_repeats_its_proposals():
    space = load_space(None, TrialConfig())
    assert _proposals(space, 12, seed=7) == _proposals(space, 12, seed=7)
    assert _proposals(space, 12, seed=7) != _proposals(space, 12, seed=8)


def test_space_file_fixed_values_conditionals_and_widening(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("noise_mode: [uniform, ddpm]\nreg_noise_std: {low: 0.0, high: 0.1}\n"
                 "timestep: {low: 0, high: 999}\nloss: l1\nchannels: [8, 16]\n")
    props = _proposals(load_space(str(f), TrialConfig()), 20)
    for p in props:
        assert p["loss"] == "l1"  # fixed, returned as a constant
        assert p["channels"] in (8, 16)
        assert ("reg_noise_std" in p) == (p["noise_mode"] == "uniform")
        assert ("timestep" in p) == (p["noise_mode"] == "ddpm")
    assert max(p.get("timestep", 0) for p in props) > 300  # the file widened the range


def test_json_space_and_pickling(tmp_path):
    f = tmp_path / "space.json"
    f.write_text('{"lr": {"low": 0.001, "high": 0.01, "log": true}}')
    space = load_space(str(f), TrialConfig())
    assert space.spec == {"lr": {"low": 0.001, "high": 0.01, "log": True}}
    again = pickle.loads(pickle.dumps(space))  # Ray pickles the searcher with it
    assert again.spec == space.spec


def test_default_space_keeps_the_image_and_every_mode():
    """Its reason, checked: at the top of its t range the default linear schedule keeps
    alpha_bar near 0.39 (SCIENCE.md: past t ~ 300 little of the image survives), and every
    input mode is proposed."""
    from noise.schedules import alphas_cumprod, make_betas

    cfg = TrialConfig()
    abar = alphas_cumprod(make_betas(cfg.schedule, cfg.num_timesteps))
    high = DEFAULT_SPACE["timestep"]["high"]
    assert 0.35 < float(abar[high]) < 0.45 and DEFAULT_SPACE["timestep"]["low"] >= 0
    assert set(DEFAULT_SPACE["noise_mode"]) == set(NOISE_MODES)


@pytest.mark.parametrize("spec", [{}, {"lr": {"low": 1}}, {"lr": {"low": 1, "high": 2, "step": 1}}])
def test_malformed_spaces(spec):
    with pytest.raises(ValueError):
        SearchSpace(spec, TrialConfig())
