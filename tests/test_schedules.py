"""Noise schedules and step placement: agreement with diffusers, inverses, the density <-> sigmas maps."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import (density_of_sigmas, karras_sigmas, logsnr_uniform_sigmas, sigmas_from_density,
                                      time_uniform_sigmas)

# diffusers' own numpy-2 DeprecationWarnings are not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

CONFIGS = {
    "demo-linear": dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear"),
    "sd-scaled_linear": dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear"),
    "cosine": dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2"),
    "short-linear": dict(num_train_timesteps=37, beta_start=1e-3, beta_end=0.05, beta_schedule="linear"),
}
DEMO = NoiseSchedule.from_config(CONFIGS["demo-linear"])
HELPERS = {"time_uniform": time_uniform_sigmas, "karras": karras_sigmas, "logsnr_uniform": logsnr_uniform_sigmas}


def torch_module():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def log_range(schedule: NoiseSchedule) -> tuple[float, float]:
    return math.log(schedule.sigma_min), math.log(schedule.sigma_max)


# --- NoiseSchedule -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_from_config_equals_diffusers_alphas_cumprod(name):
    torch_module()
    from diffusers import DDPMScheduler
    theirs = DDPMScheduler(**CONFIGS[name]).alphas_cumprod.double().numpy()
    ours = NoiseSchedule.from_config(CONFIGS[name]).alphas_cumprod
    # float32 values as diffusers computes them; 2 ulp of slack for other CPUs' torch.linspace
    # (a float64 computation would be off by up to 9e-7 and fail)
    np.testing.assert_allclose(ours, theirs, rtol=2.5e-7, atol=0)


def test_from_config_reads_a_consistency_model_config():
    torch_module()
    from diffusers import CMStochasticIterativeScheduler
    scheduler = CMStochasticIterativeScheduler()
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    np.testing.assert_allclose(schedule.sigmas[::-1], scheduler.sigmas.numpy(), rtol=1e-9)
    assert schedule.sigma_min == pytest.approx(0.002, rel=1e-9) and schedule.sigma_max == pytest.approx(80.0)


def test_config_round_trips_through_json():
    restored = NoiseSchedule.from_config(json.loads(json.dumps(DEMO.to_config())))
    np.testing.assert_array_equal(restored.alphas_cumprod, DEMO.alphas_cumprod)


def test_bad_configs_and_schedules_are_refused():
    with pytest.raises(ValueError, match="'quadratic'.*linear, scaled_linear, squaredcos_cap_v2"):
        NoiseSchedule.from_config(dict(beta_schedule="quadratic"))
    with pytest.raises(ValueError, match="zero_snr"):
        NoiseSchedule.from_config(dict(beta_schedule="linear", rescale_betas_zero_snr=True))
    with pytest.raises(ValueError, match="decrease"):
        NoiseSchedule(np.array([0.5, 0.9, 0.1]))
    with pytest.raises(ValueError, match="between 0 and 1"):
        NoiseSchedule(np.array([1.0, 0.5]))


def test_sigmas_are_the_ve_sigmas_and_read_only():
    ac = DEMO.alphas_cumprod
    np.testing.assert_allclose(DEMO.sigmas, np.sqrt((1 - ac) / ac), rtol=1e-15)
    assert DEMO.sigma_min == DEMO.sigmas[0] < DEMO.sigma_max == DEMO.sigmas[-1]
    with pytest.raises(ValueError):
        DEMO.alphas_cumprod[0] = 0.5


def test_sigma_of_t_and_t_of_sigma_are_exact_at_integer_t():
    t = np.arange(DEMO.num_train_timesteps)
    np.testing.assert_array_equal(DEMO.sigma_of_t(t), DEMO.sigmas)
    np.testing.assert_array_equal(DEMO.t_of_sigma(DEMO.sigmas), t)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 999))
def test_t_of_sigma_inverts_sigma_of_t(t):
    assert float(DEMO.t_of_sigma(DEMO.sigma_of_t(t))) == pytest.approx(t, abs=1e-9)


def test_t_of_sigma_is_diffusers_sigma_to_t_and_clamps_outside_the_range():
    torch_module()
    from diffusers import EulerDiscreteScheduler
    sigmas = np.exp(np.random.default_rng(0).uniform(math.log(0.005), math.log(400), 200))
    log_sigmas = np.log(DEMO.sigmas)
    theirs = EulerDiscreteScheduler()._sigma_to_t(sigmas, log_sigmas)
    np.testing.assert_allclose(DEMO.t_of_sigma(sigmas), theirs, rtol=0, atol=1e-9)
    assert DEMO.t_of_sigma(1e-4) == 0 and DEMO.t_of_sigma(1e4) == 999


def test_schedule_functions_run_on_torch_and_agree_with_numpy():
    torch = torch_module()
    t = np.array([0.0, 3.5, 500.25, 998.9, 999.0])
    np.testing.assert_allclose(DEMO.sigma_of_t(torch.from_numpy(t)).numpy(), DEMO.sigma_of_t(t), rtol=1e-12)
    sigmas = DEMO.sigma_of_t(t)
    np.testing.assert_allclose(DEMO.t_of_sigma(torch.from_numpy(sigmas)).numpy(), t, atol=1e-9)


# --- step placement ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPERS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_helpers_give_n_decreasing_sigmas_from_sigma_max(helper, n):
    sigmas = HELPERS[helper](DEMO, n)
    assert sigmas.shape == (n,)
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[0] == pytest.approx(DEMO.sigma_max, rel=1e-12)
    assert sigmas[-1] >= DEMO.sigma_min * (1 - 1e-12)


@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 1000])
def test_time_uniform_is_diffusers_trailing_spacing(n):
    torch_module()
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    np.testing.assert_array_equal(DEMO.t_of_sigma(time_uniform_sigmas(DEMO, n)), scheduler.timesteps.numpy())


def test_karras_is_diffusers_karras():
    torch_module()
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(**CONFIGS["sd-scaled_linear"], use_karras_sigmas=True)
    scheduler.set_timesteps(12)
    schedule = NoiseSchedule.from_config(CONFIGS["sd-scaled_linear"])
    np.testing.assert_allclose(karras_sigmas(schedule, 12), scheduler.sigmas[:-1].numpy(), rtol=1e-6)


def test_uniform_density_gives_logsnr_uniform_spacing():
    for n in (1, 4, 13):
        np.testing.assert_allclose(sigmas_from_density(np.ones(32), n, *log_range(DEMO)),
                                   logsnr_uniform_sigmas(DEMO, n), rtol=1e-12)


def test_density_places_more_steps_where_it_is_higher():
    lo, hi = log_range(DEMO)
    density = np.ones(10)
    density[:5] = 9.0  # 90 % of the mass in the lower half of log-sigma
    log_sigmas = np.log(sigmas_from_density(density, 10, lo, hi))
    # the upper half holds 1/10 of the mass: step 1 sits on the midpoint, the 8 after it below
    assert log_sigmas[1] == pytest.approx((lo + hi) / 2, abs=1e-12) and np.all(log_sigmas[2:] < (lo + hi) / 2)


@pytest.mark.parametrize("make", [lambda s, n: karras_sigmas(s, n), lambda s, n: time_uniform_sigmas(s, n)],
                         ids=["karras", "time_uniform"])
@pytest.mark.parametrize("n", [4, 10, 25])
def test_density_of_sigmas_round_trips_within_a_bin(make, n):
    k = 200
    lo, hi = log_range(DEMO)
    sigmas = make(DEMO, n)
    density = density_of_sigmas(sigmas, k, lo, hi)
    assert density.shape == (k,) and np.all(density > 0) and density.sum() == pytest.approx(1.0)
    back = sigmas_from_density(density, n, lo, hi)
    assert np.max(np.abs(np.log(back) - np.log(sigmas))) <= (hi - lo) / k


@settings(max_examples=80, deadline=None)
@given(st.lists(st.floats(0, 100), min_size=1, max_size=40).filter(lambda w: max(w) > 1e-3),
       st.integers(1, 30))
def test_sigmas_from_density_is_decreasing_and_in_range_for_any_density(weights, n):
    lo, hi = log_range(DEMO)
    sigmas = sigmas_from_density(np.array(weights), n, lo, hi)
    assert sigmas.shape == (n,) and np.all(np.isfinite(sigmas))
    assert sigmas[0] == pytest.approx(DEMO.sigma_max, rel=1e-12)
    assert np.all(np.diff(sigmas) < 0)
    assert sigmas[-1] >= DEMO.sigma_min * (1 - 1e-12)


def test_sigmas_from_density_is_differentiable_under_torch():
    torch = torch_module()
    lo, hi = log_range(DEMO)
    density = torch.rand(12, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.1
    np.testing.assert_allclose(sigmas_from_density(density, 7, lo, hi, xp=torch).numpy(),
                               sigmas_from_density(density.numpy(), 7, lo, hi), rtol=1e-12)
    density.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: sigmas_from_density(w, 7, lo, hi, xp=torch), (density,),
                                    eps=1e-7, atol=1e-6, rtol=1e-5)
