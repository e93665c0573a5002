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


def _ask(s, space, n: int, first: int = 0) -> list[dict]:
    """The first `n` configs the study's searcher proposes, each told a result at once (as
    Tune asks it, without running a trial)."""
    from study.cluster.tune import make_searcher

    search = make_searcher(s, space)
    out = []
    for i in range(first, first + n):
        out.append(search.suggest(f"t{i}"))
        search.on_trial_complete(f"t{i}", {s.metric: 20.0 + i % 3, "training_iteration": 1})
    return out


def _study(tmp_path, n: int, **trial):
    from study.config import StudyConfig

    (tmp_path / "st").mkdir(exist_ok=True)
    return StudyConfig(name="st", root=str(tmp_path), num_samples=n, trial=TrialConfig(**trial))


def test_a_study_begins_with_one_trial_per_mode(tmp_path):
    """The demo's 8 trials with seed 0 drew two modes from TPE's start-up alone: the first
    six trials are now the six modes, their t and lr drawn by the sampler in the space."""
    s = _study(tmp_path, 8)
    props = _ask(s, load_space(None, s.trial), 8)
    assert [p["noise_mode"] for p in props[:6]] == list(NOISE_MODES)
    for p in props:
        assert 1e-4 <= p["lr"] <= 1e-1 and ("timestep" in p) == (p["noise_mode"] in DDPM_MODES)
        assert 0 <= p.get("timestep", 0) <= 300
    assert len({p["lr"] for p in props}) == 8  # sampled, not the base config's lr


def test_fewer_trials_than_modes_then_extend_queues_only_the_untried(tmp_path):
    space = load_space(None, TrialConfig())
    assert [p["noise_mode"] for p in _ask(_study(tmp_path, 2), space, 2)] == list(NOISE_MODES[:2])
    # `extend` by 5 opens with the 4 modes not tried yet, then the sampler's choice
    props = _ask(_study(tmp_path, 5), space, 5, first=2)
    assert [p["noise_mode"] for p in props[:4]] == list(NOISE_MODES[2:])
    study = optuna.load_study(study_name="st", storage=f"sqlite:///{tmp_path}/st/optuna.db")
    assert len(study.trials) == 7 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # every mode tried: a further `extend` queues nothing
    assert SearchSpace(dict(DEFAULT_SPACE), TrialConfig()).mode_points(
        6, {t.params["noise_mode"] for t in study.trials}) == []


def test_mode_points_only_for_a_searched_mode():
    base = TrialConfig()
    assert SearchSpace({"lr": {"low": 0.001, "high": 0.01}}, base).mode_points(4) == []
    assert SearchSpace({"noise_mode": "ddpm"}, base).mode_points(4) == []
    two = SearchSpace({"noise_mode": ["ddpm", "uniform", "ddpm"]}, base)
    assert two.mode_points(5) == [{"noise_mode": "ddpm"}, {"noise_mode": "uniform"}]
    assert two.mode_points(1) == [{"noise_mode": "ddpm"}] and two.mode_points(5, {"ddpm"}) == [{"noise_mode": "uniform"}]


def test_loss_is_asked_only_for_the_ddpm_modes(tmp_path):
    """SURE differs from MSE only for the inputs built from the observation, so a searched
    `loss` is asked only of DDPM trials; the others keep the base config's loss."""
    f = tmp_path / "space.yaml"
    f.write_text("noise_mode: [uniform, ddpm, ddpm_resample]\nloss: [mse, sure]\n")
    props = _proposals(load_space(str(f), TrialConfig()), 24)
    assert all(("loss" in p) == (p["noise_mode"] in DDPM_MODES) for p in props)
    assert {p.get("loss") for p in props if p["noise_mode"] != "uniform"} == {"mse", "sure"}


def test_a_base_loss_sure_with_the_uniform_mode_in_the_space_is_refused():
    with pytest.raises(ValueError, match="noise_mode = 'uniform' is not allowed: loss 'sure'"):
        SearchSpace({"noise_mode": ["uniform", "ddpm"]}, TrialConfig(loss="sure"))
