"""Tests of noise/: schedules, the DDPM forward process, and the DIP input modes."""

import math

import pytest
import torch

from noise import (DDPM_MODES, INPUT_MODES, add_noise, alphas_cumprod, cosine_betas,
                   from_model_range, linear_betas, make_betas, make_input, to_model_range)

ABAR = alphas_cumprod(linear_betas())
STOCHASTIC_MODES = ("gaussian_resample", "ddpm_resample", "ddpm_random_t")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def build(mode, observation, seed=0, timestep=100, reg_noise_std=1 / 30, input_depth=8):
    return make_input(mode, observation, timestep=timestep, input_depth=input_depth,
                      reg_noise_std=reg_noise_std, alphas_cumprod=ABAR, generator=gen(seed))


@pytest.fixture
def observation():
    return torch.rand(1, 3, 16, 12, generator=gen(123))


# --- schedules -----------------------------------------------------------------------

# Precise alpha_bar_t of the DDPM linear schedule (T = 1000) and the 3-figure values
# quoted in docs/science.md that they must round to.
GOLDEN_ABAR = {25: (0.9909652130824728, 0.991), 100: (0.8951415908975365, 0.895),
               200: (0.6563470055193468, 0.656), 300: (0.39401112252338205, 0.394),
               500: (0.07779665836502389, 0.078), 999: (4.0358297653756754e-05, 0.00004)}


@pytest.mark.parametrize("t", sorted(GOLDEN_ABAR))
def test_linear_alphas_cumprod_golden(t):
    precise, quoted = GOLDEN_ABAR[t]
    assert ABAR.dtype == torch.float64
    assert ABAR[t].item() == pytest.approx(precise, rel=1e-6)
    assert ABAR[t].item() == pytest.approx(quoted, rel=0.01)


def test_linear_betas_is_ddpm_linspace():
    betas = linear_betas(1000)
    assert torch.equal(betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64))
    assert ABAR[0].item() == pytest.approx(1 - 1e-4)


def test_cosine_betas_bounded_and_alpha_bar_monotone():
    betas = cosine_betas(1000)
    assert betas.dtype == torch.float64 and betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    abar = alphas_cumprod(betas)
    assert (abar[1:] < abar[:-1]).all()
    # Nichol & Dhariwal eq. 17 at the midpoint, up to the normalisation by alpha_bar(0).
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    assert abar[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)


def test_make_betas_dispatch_and_unknown_name():
    assert torch.equal(make_betas("linear", 50), linear_betas(50))
    assert torch.equal(make_betas("cosine", 50), cosine_betas(50))
    with pytest.raises(ValueError, match="unknown schedule 'quadratic'"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError):
        make_betas("linear", 0)


# --- forward process -----------------------------------------------------------------

def golden_pair():
    g = gen(0)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    return x0, torch.randn(4, 3, 8, 8, generator=g)


def test_add_noise_at_t0_is_almost_x0():
    x0, eps = golden_pair()
    xt = add_noise(x0, eps, 0, ABAR)
    torch.testing.assert_close(xt, math.sqrt(1 - 1e-4) * x0 + 0.01 * eps)
    assert (xt - x0).abs().max() < 5e-2


def test_add_noise_golden_numbers():
    x0, eps = golden_pair()
    xt = add_noise(x0, eps, 100, ABAR)
    assert xt.dtype == torch.float32 and xt.shape == (4, 3, 8, 8)
    assert xt.sum().item() == pytest.approx(3.8076276779174805, abs=1e-4)
    assert xt[0, 0, 0, 0].item() == pytest.approx(0.1539892703294754, abs=1e-6)
    assert xt[3, 2, 7, 7].item() == pytest.approx(1.1328539848327637, abs=1e-6)


def test_add_noise_vector_t_broadcasts_per_batch_element():
    x0, eps = golden_pair()
    t = torch.tensor([0, 10, 100, 999])
    xt = add_noise(x0, eps, t, ABAR)
    for i in range(4):
        torch.testing.assert_close(xt[i], add_noise(x0[i:i + 1], eps[i:i + 1], int(t[i]), ABAR)[0])
    assert xt.sum().item() == pytest.approx(21.46161651611328, abs=1e-4)


@pytest.mark.parametrize("t", [-1, 1000, torch.tensor([0, 1, 2, 1000]), torch.tensor([0, 1])])
def test_add_noise_rejects_bad_t(t):
    x0, eps = golden_pair()
    with pytest.raises(ValueError):
        add_noise(x0, eps, t, ABAR)


def test_add_noise_rejects_shape_mismatch_and_model_range_round_trips():
    x0, eps = golden_pair()
    with pytest.raises(ValueError, match="same shape"):
        add_noise(x0, eps[:2], 10, ABAR)
    torch.testing.assert_close(from_model_range(to_model_range(x0)), x0)
    assert to_model_range(torch.tensor([0.0, 1.0])).tolist() == [-1.0, 1.0]


# --- DIP input modes -----------------------------------------------------------------

@pytest.mark.parametrize("mode", INPUT_MODES)
def test_mode_shapes_and_views(mode, observation):
    dip_input = build(mode, observation)
    channels = 3 if mode in DDPM_MODES else 8
    assert dip_input.channels == channels
    assert dip_input.stochastic == (mode in STOCHASTIC_MODES or mode == "uniform")
    for x in (dip_input.train_input(gen(1)), dip_input.sample(gen(1))):
        assert x.shape == (1, channels, 16, 12) and x.dtype == torch.float32
    view = dip_input.view()
    assert view.shape == (1, 3, 16, 12) and view.min() >= 0 and view.max() <= 1


@pytest.mark.parametrize("mode", ["uniform", "gaussian", "ddpm"])
def test_fixed_modes_return_the_same_tensor(mode, observation):
    dip_input = build(mode, observation, reg_noise_std=0.0)
    assert not dip_input.stochastic
    assert torch.equal(dip_input.train_input(gen(1)), dip_input.train_input(gen(2)))
    assert torch.equal(dip_input.sample(gen(3)), dip_input.train_input(gen(4)))


def test_uniform_is_dip_reference_input(observation):
    dip_input = build("uniform", observation, reg_noise_std=1 / 30, input_depth=32)
    assert dip_input.z.min() >= 0 and dip_input.z.max() <= 0.1
    x = dip_input.train_input(gen(1))
    assert (x - dip_input.z).std().item() == pytest.approx(1 / 30, rel=0.1)


@pytest.mark.parametrize("mode", STOCHASTIC_MODES + ("uniform",))
def test_resample_modes_differ_between_calls(mode, observation):
    dip_input, g = build(mode, observation), gen(1)
    assert not torch.equal(dip_input.train_input(g), dip_input.train_input(g))


@pytest.mark.parametrize("mode", INPUT_MODES)
def test_same_seed_same_draws(mode, observation):
    a, b = build(mode, observation, seed=5), build(mode, observation, seed=5)
    assert torch.equal(a.z, b.z)
    ga, gb = gen(9), gen(9)
    for _ in range(3):
        assert torch.equal(a.train_input(ga), b.train_input(gb))


def test_ddpm_random_t_draws_within_range(observation):
    dip_input, g = build("ddpm_random_t", observation, timestep=5), gen(1)
    seen = set()
    for _ in range(200):
        dip_input.train_input(g)
        seen.add(dip_input.last_t)
    assert seen == set(range(6))


def test_ddpm_input_is_made_from_the_observation_not_the_clean_image():
    g = gen(7)
    clean = torch.rand(1, 3, 16, 16, generator=g)
    y = (clean + 0.5 * torch.randn(1, 3, 16, 16, generator=g)).clamp(0, 1)
    dip_input = build("ddpm", y, seed=11, timestep=50)
    # The same draw, computed independently: eps is the first draw of the generator.
    eps = torch.randn(1, 3, 16, 16, generator=gen(11))
    from_y = add_noise(2 * y - 1, eps, 50, ABAR)
    from_clean = add_noise(2 * clean - 1, eps, 50, ABAR)
    torch.testing.assert_close(dip_input.train_input(gen(0)), from_y)
    assert (dip_input.z - from_clean).abs().max() > 0.1
    # At t = 0 the input is (nearly) the observation: it tracks y, and the clean
    # image only as far as y does (corr(y, clean) is about 0.5 here).
    x = from_model_range(build("ddpm", y, timestep=0).z).flatten()
    corr = lambda a, b: torch.corrcoef(torch.stack([a, b.flatten()]))[0, 1].item()
    assert corr(x, y) > 0.99
    assert corr(x, clean) < corr(x, y) - 0.3


@pytest.mark.parametrize("mode", INPUT_MODES)
def test_state_dict_round_trip_restores_inputs(mode, observation):
    saved = build(mode, observation, seed=1)
    restored = build(mode, observation, seed=2)
    assert not torch.equal(saved.z, restored.z)
    restored.load_state_dict(saved.state_dict())
    assert torch.equal(saved.z, restored.z)
    assert torch.equal(saved.train_input(gen(3)), restored.train_input(gen(3)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="ddpm_plus"), "unknown input mode"),
    (dict(timestep=1000), "timestep"),
    (dict(timestep=-1), "timestep"),
    (dict(input_depth=0), "input_depth"),
    (dict(reg_noise_std=-0.1), "reg_noise_std"),
    (dict(observation=torch.rand(2, 3, 8, 8)), r"\(1, C, H, W\)"),
    (dict(observation=torch.rand(3, 8, 8)), r"\(1, C, H, W\)"),
])
def test_make_input_rejects_bad_arguments(kwargs, message, observation):
    args = dict(mode="ddpm", observation=observation, timestep=10, input_depth=8,
                reg_noise_std=0.0, alphas_cumprod=ABAR, generator=gen(0)) | kwargs
    with pytest.raises(ValueError, match=message):
        make_input(args.pop("mode"), args.pop("observation"), **args)
