"""Samplers: step-by-step parity with diffusers, exact recovery under an oracle denoiser, torch gradients."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from abcd_edge.errors import UserError
from abcd_edge.core.samplers import (PREDICTION_TYPES, SAMPLER_BASE, SAMPLER_DESCRIPTORS, SAMPLER_NAMES, SIGMA_DATA,
                                     alpha_of_sigma, make_sampler)
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas

# diffusers' own numpy-2 DeprecationWarnings are not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (2, 3, 8, 8)
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")
SD_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DEMO_CONFIG = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
CUSTOM_TIMESTEPS = [999, 850, 601, 400, 233, 101, 37, 5]
TOL = 1e-5


def torch_module():
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def fake_net(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A fixed nonlinear function of (sample, t) standing in for a network; float32 in, float32 out."""
    phase = np.sin(np.asarray(t, dtype=np.float32) * np.float32(0.013))[:, None, None, None]
    return (np.tanh(np.float32(0.8) * sample + np.float32(0.3) * phase) + np.float32(0.1) * sample).astype(np.float32)


def fake_model(schedule: NoiseSchedule, prediction_type: str):
    """A fake model of the given prediction type whose clean-image estimate is fake_net (so it stays O(1)).

    A consistency model's output is fake_net itself. Keeping x0 of order 1, as a trained model's
    is, keeps the states of order 1 too, where float32 resolves 1e-5.
    """
    def model(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
        x0 = fake_net(sample, t)
        if prediction_type in ("sample", "consistency"):
            return x0
        sigma = schedule.sigma_of_t(t.astype(np.float64))[:, None, None, None]
        alpha = alpha_of_sigma(sigma)
        eps = (sample - alpha * x0) / (alpha * sigma)
        return (eps if prediction_type == "epsilon" else alpha * eps - alpha * sigma * x0).astype(np.float32)
    return model


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def rng_noise(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


# --- parity with diffusers, one step at a time on identical inputs -------------------------------------------------


def run_in_lockstep(sampler, scheduler, x, noises=None, step_kwargs=None):
    """Step our sampler and a diffusers scheduler from the same x with the same model output.

    After each step the next input is the scheduler's state (re-synced), so float32 round-off
    cannot build up. Returns the worst |difference| of states, model inputs and x0 estimates, the
    last divided by max(1, sigma): in float32, x0 = x_VE - sigma * eps cannot be known better than
    about 1e-7 * sigma * |eps| by anyone (at sigma = 157, ours and diffusers' both sit 3e-5 from
    the float64 value), so 1e-5 absolute is asked for sigma <= 1 and 1e-5 relative to sigma above.
    """
    torch = torch_module()
    model = fake_model(sampler.schedule, sampler.prediction_type)
    worst = {"x": 0.0, "x0": 0.0, "sample": 0.0}
    for i, t in enumerate(scheduler.timesteps):
        sample, timestep = sampler.model_input(x, i)
        assert sample.dtype == np.float32 and timestep.dtype == np.float32 and timestep.shape == (SHAPE[0],)
        theirs_sample = scheduler.scale_model_input(torch.from_numpy(x), t).numpy()
        worst["sample"] = max(worst["sample"], max_diff(sample, theirs_sample))
        out = model(sample, timestep)
        noise = None if noises is None else noises[i]
        x_next, x0 = sampler.step(x, i, out, noise=noise)
        assert x_next.dtype == np.float32 and x0.dtype == np.float32
        kwargs = dict(step_kwargs or {})
        if noise is not None and "variance_noise" in kwargs:
            kwargs["variance_noise"] = torch.from_numpy(noise)
        result = scheduler.step(torch.from_numpy(out), t, torch.from_numpy(x), **kwargs)
        worst["x"] = max(worst["x"], max_diff(x_next, result.prev_sample.numpy()))
        theirs_x0 = getattr(result, "pred_original_sample", None)
        if theirs_x0 is None and hasattr(scheduler, "model_outputs"):
            theirs_x0 = scheduler.model_outputs[-1]  # DPM-Solver++: the converted model output is x0
        if theirs_x0 is not None:
            worst["x0"] = max(worst["x0"], max_diff(x0, theirs_x0.numpy()) / max(1.0, sampler.sigma(i)))
        x = result.prev_sample.numpy()
    return worst


@pytest.mark.parametrize("config", [SD_CONFIG, DEMO_CONFIG], ids=["scaled_linear", "linear"])
@pytest.mark.parametrize("prediction_type", VP_PREDICTIONS)
def test_ddim_eta0_matches_first_order_dpm_solver_on_custom_timesteps(config, prediction_type):
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(**config, prediction_type=prediction_type, solver_order=1,
                                            algorithm_type="dpmsolver++", final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=CUSTOM_TIMESTEPS)
    schedule = NoiseSchedule.from_config(config)
    sampler = make_sampler("ddim", schedule, schedule.sigma_of_t(np.array(CUSTOM_TIMESTEPS)), prediction_type)
    np.testing.assert_array_equal(sampler.timesteps, CUSTOM_TIMESTEPS)
    x = sampler.prepare(rng_noise(0))
    worst = run_in_lockstep(sampler, scheduler, x)
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("prediction_type", VP_PREDICTIONS)
@pytest.mark.parametrize("eta", [0.0, 0.6, 1.0])
def test_ddim_matches_ddim_scheduler_with_variance_noise(prediction_type, eta):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(**DEMO_CONFIG, prediction_type=prediction_type, clip_sample=False,
                              set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(10)
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    sampler = make_sampler("ddim", schedule, time_uniform_sigmas(schedule, 10), prediction_type, eta=eta)
    np.testing.assert_array_equal(sampler.timesteps, scheduler.timesteps.numpy())
    assert sampler.stochastic == (eta > 0)
    noises = [rng_noise(10 + i) for i in range(len(sampler))]
    worst = run_in_lockstep(sampler, scheduler, sampler.prepare(rng_noise(1)), noises=noises,
                            step_kwargs={"eta": eta, "variance_noise": None})
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("prediction_type", VP_PREDICTIONS)
@pytest.mark.parametrize("timesteps", [CUSTOM_TIMESTEPS, [999, 500], [999, 940, 700, 640, 300, 10, 0]],
                         ids=["8-steps", "2-steps", "uneven"])
def test_dpmpp_2m_matches_diffusers_on_custom_timesteps(prediction_type, timesteps):
    from diffusers import DPMSolverMultistepScheduler
    scheduler = DPMSolverMultistepScheduler(**SD_CONFIG, prediction_type=prediction_type, solver_order=2,
                                            algorithm_type="dpmsolver++", lower_order_final=True,
                                            final_sigmas_type="zero")
    scheduler.set_timesteps(timesteps=timesteps)
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    sampler = make_sampler("dpmpp-2m", schedule, schedule.sigma_of_t(np.array(timesteps)), prediction_type)
    worst = run_in_lockstep(sampler, scheduler, sampler.prepare(rng_noise(2)))
    assert max(worst.values()) <= TOL, worst


def test_dpmpp_2m_is_second_order_between_first_and_last_step():
    """With a model whose x0 estimate changes from step to step, 2M must differ from DDIM in the middle."""
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    sigmas = schedule.sigma_of_t(np.array(CUSTOM_TIMESTEPS))
    ddim, dpm = make_sampler("ddim", schedule, sigmas), make_sampler("dpmpp-2m", schedule, sigmas)
    x = ddim.prepare(rng_noise(3))
    model = fake_model(schedule, "epsilon")
    gaps = []
    for i in range(len(ddim)):
        out = model(*ddim.model_input(x, i))
        x_ddim, _ = ddim.step(x, i, out)
        x_dpm, _ = dpm.step(x, i, out)
        gaps.append(max_diff(x_ddim, x_dpm))
        x = x_ddim
    assert gaps[0] < 1e-6 and gaps[-1] < 1e-6 and min(gaps[1:-1]) > 1e-3, gaps


@pytest.mark.parametrize("prediction_type", VP_PREDICTIONS)
def test_euler_matches_euler_discrete_scheduler_on_karras_sigmas(prediction_type):
    from diffusers import EulerDiscreteScheduler
    scheduler = EulerDiscreteScheduler(**SD_CONFIG, prediction_type=prediction_type)
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    sigmas = karras_sigmas(schedule, 8)
    scheduler.set_timesteps(sigmas=[*sigmas, 0.0])
    # diffusers keeps sigmas in float32; step ours on the same values
    sampler = make_sampler("euler", schedule, scheduler.sigmas[:-1].double().numpy(), prediction_type)
    np.testing.assert_allclose(sampler.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=1e-3)
    worst = run_in_lockstep(sampler, scheduler, sampler.prepare(rng_noise(4)))
    assert max(worst.values()) <= TOL, worst


# diffusers' CM timesteps are the original ts reversed: [22, 0] is the paper's two steps, at sigma_max and
# then at sigma(ramp 22/39)
@pytest.mark.parametrize("timesteps", [[30, 17, 5, 0], [22, 0], [0]], ids=["4-steps", "2-steps", "1-step"])
def test_consistency_matches_cm_stochastic_iterative_scheduler(timesteps):
    torch = torch_module()
    from diffusers import CMStochasticIterativeScheduler
    scheduler = CMStochasticIterativeScheduler()
    scheduler.set_timesteps(timesteps=timesteps)
    schedule = NoiseSchedule.from_config(dict(scheduler.config))
    sampler = make_sampler("consistency", schedule, scheduler.sigmas[:-1].double().numpy(), "consistency")
    np.testing.assert_allclose(sampler.timesteps, scheduler.timesteps.numpy(), rtol=0, atol=1e-4)
    # the scheduler draws its noise from a generator on every step; replay the same draws for ours
    replay = torch.Generator().manual_seed(7)
    noises = [torch.randn(SHAPE, generator=replay).numpy() for _ in timesteps]
    x = sampler.prepare(rng_noise(5))
    np.testing.assert_allclose(x, rng_noise(5) * scheduler.init_noise_sigma, rtol=1e-6)
    worst = run_in_lockstep(sampler, scheduler, x, noises=noises,
                            step_kwargs={"generator": torch.Generator().manual_seed(7)})
    assert max(worst.values()) <= TOL, worst


# --- every sampler, every prediction type: an oracle denoiser is reproduced exactly -------------------------------


def oracle(schedule: NoiseSchedule, x0: np.ndarray, prediction_type: str):
    """The perfect model for a single clean image x0, answering from (sample, t) alone."""
    def model(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
        sample = sample.astype(np.float64)
        if prediction_type == "consistency":
            sigma = np.exp(t[0] / 250.0)
            x_ve = sample * (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
            c_skip = SIGMA_DATA ** 2 / ((sigma - schedule.sigma_min) ** 2 + SIGMA_DATA ** 2)
            c_out = (sigma - schedule.sigma_min) * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
            return ((x0 - c_skip * x_ve) / c_out).astype(np.float32)
        sigma = float(schedule.sigma_of_t(float(t[0])))
        alpha = alpha_of_sigma(sigma)
        eps = (sample - alpha * x0) / (alpha * sigma)
        out = {"epsilon": eps, "sample": x0 + 0 * sample, "v_prediction": alpha * eps - alpha * sigma * x0}
        return out[prediction_type].astype(np.float32)
    return model


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 1.0), ("dpmpp-2m", 0.0), ("euler", 0.0),
                                      ("consistency", 0.0), ("euler-ancestral", 0.0), ("lcm", 0.0)])
def test_oracle_denoiser_is_recovered_at_every_step(name, eta, prediction_type):
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    x0 = np.random.default_rng(6).uniform(-0.9, 0.9, SHAPE)
    model = oracle(schedule, x0, prediction_type)
    # a consistency model is the identity at sigma_min (c_out = 0), so no oracle answers there: stop above it
    sampler = make_sampler(name, schedule, logsnr_uniform_sigmas(schedule, 6), prediction_type, eta=eta)
    x = sampler.prepare(rng_noise(7))
    for i in range(len(sampler)):
        x, x0_hat = sampler.step(x, i, model(*sampler.model_input(x, i)), noise=rng_noise(20 + i))
        assert max_diff(x0_hat, x0) < 2e-3, (i, max_diff(x0_hat, x0))
    assert max_diff(x, x0) < 2e-3


def test_prepare_starts_every_sampler_at_the_same_noisy_point():
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    sigmas = karras_sigmas(schedule, 5)
    noise = rng_noise(8)
    samplers = [make_sampler(name, schedule, sigmas) for name in SAMPLER_NAMES]
    vp_inputs = [sampler.model_input(sampler.prepare(noise), 0)[0] for sampler in samplers]
    for sample in vp_inputs[1:]:
        assert max_diff(sample, vp_inputs[0]) < 1e-6
    assert max_diff(vp_inputs[0], noise * sigmas[0] * alpha_of_sigma(sigmas[0])) < 1e-6


# --- API details ---------------------------------------------------------------------------------------------------


def test_unknown_names_are_refused_with_the_accepted_ones():
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    sigmas = karras_sigmas(schedule, 3)
    with pytest.raises(ValueError, match=r"'heun'.*ddim, dpmpp-2m, euler, consistency"):
        make_sampler("heun", schedule, sigmas)
    with pytest.raises(UserError, match=r"'x0'.*epsilon"):
        make_sampler("ddim", schedule, sigmas, prediction_type="x0")
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler", schedule, sigmas, eta=0.5)
    with pytest.raises(ValueError, match="decreasing"):
        make_sampler("euler", schedule, sigmas[::-1])


def test_sampler_options_apply_to_their_samplers_only_and_configs_pick_the_natural_sampler():
    from abcd_edge.core.samplers import CONSISTENCY_MAX_STEPS, diffusers_options, max_steps, natural_sampler
    schedule = NoiseSchedule.from_config(SD_CONFIG)
    sigmas = karras_sigmas(schedule, 3)
    with pytest.raises(UserError, match="ddim"):
        make_sampler("euler", schedule, sigmas, final_sigma=schedule.sigma_min)
    with pytest.raises(UserError, match="lcm"):
        make_sampler("ddim", schedule, sigmas, timestep_scaling=10.0)
    assert make_sampler("lcm", schedule, sigmas).timestep_scaling == 10.0
    assert natural_sampler("epsilon", {"_class_name": "LCMScheduler"}) == "lcm"
    assert natural_sampler("epsilon", {"_class_name": "EulerAncestralDiscreteScheduler"}) == "euler-ancestral"
    assert natural_sampler("epsilon", {"_class_name": "PNDMScheduler"}) == natural_sampler("epsilon") == "ddim"
    assert natural_sampler("consistency", {"_class_name": "LCMScheduler"}) == "consistency"
    assert max_steps("lcm") == max_steps("ddim", "consistency") == CONSISTENCY_MAX_STEPS and max_steps("ddim") is None
    sd15 = dict(SD_CONFIG, set_alpha_to_one=False, steps_offset=1)
    assert diffusers_options("ddim", sd15) == {"unit_noise": True, "final_sigma": schedule.sigma_min}
    assert diffusers_options("lcm", dict(SD_CONFIG, timestep_scaling=5)) == {"unit_noise": True,
                                                                            "timestep_scaling": 5.0}
    assert diffusers_options("euler", dict(SD_CONFIG, timestep_spacing="trailing")) == {
        "unit_noise": False, "interpolation": "linear"}
    # unit_noise: the VP state starts at the noise itself (diffusers' init_noise_sigma 1 / sqrt(sigma_0^2 + 1))
    noise = rng_noise(11)
    for name in ("ddim", "euler"):
        sampler = make_sampler(name, schedule, sigmas, unit_noise=True)
        assert max_diff(sampler.model_input(sampler.prepare(noise), 0)[0], noise) < 1e-6


def test_stochastic_samplers_demand_noise_except_on_the_last_step():
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    for name, eta in [("ddim", 0.5), ("consistency", 0.0), ("euler-ancestral", 0.0), ("lcm", 0.0)]:
        sampler = make_sampler(name, schedule, karras_sigmas(schedule, 2), eta=eta)
        x = sampler.prepare(rng_noise(9))
        with pytest.raises(ValueError, match="noise"):
            sampler.step(x, 0, fake_net(*sampler.model_input(x, 0)))
        x_last, x0 = sampler.step(x, 1, fake_net(*sampler.model_input(x, 1)))
        np.testing.assert_array_equal(x_last, x0)


def test_descriptors_cover_every_sampler_with_one_length():
    assert set(SAMPLER_DESCRIPTORS) == set(SAMPLER_NAMES)
    assert len({len(z) for z in SAMPLER_DESCRIPTORS.values()}) == 1
    # distinct, except that lcm is shown to the controller as the consistency sampler it is
    assert SAMPLER_DESCRIPTORS["lcm"] == SAMPLER_DESCRIPTORS["consistency"]
    others = [z for name, z in SAMPLER_DESCRIPTORS.items() if name != "lcm"]
    assert len(set(others)) == len(others)
    assert set(SAMPLER_BASE) <= set(SAMPLER_NAMES) and set(SAMPLER_BASE.values()) <= set(SAMPLER_NAMES)


def test_runtime_modules_do_not_import_torch():
    code = "import sys, abcd_edge.core.samplers, abcd_edge.core.noise; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# --- torch: the same code, differentiable in the sigmas ------------------------------------------------------------


def torch_loop(torch, name, sigmas, x_noise, noises, eta=0.0):
    """Run a whole sampler on torch tensors with a smooth fake model that ignores t."""
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    sampler = make_sampler(name, schedule, sigmas, eta=eta)
    x = sampler.prepare(x_noise)
    for i in range(len(sampler)):
        sample, _ = sampler.model_input(x, i)
        x, _ = sampler.step(x, i, torch.tanh(0.8 * sample) + 0.1 * sample, noise=noises[i])
    return x


@pytest.mark.parametrize("name,eta", [("ddim", 0.0), ("ddim", 0.7), ("dpmpp-2m", 0.0), ("euler", 0.0),
                                      ("euler-ancestral", 0.0), ("lcm", 0.0)])
def test_torch_gradient_wrt_sigmas_matches_finite_differences(name, eta):
    torch = torch_module()
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    # Karras ends at sigma_min, where t_of_sigma is clamped (a kink that finite differences halve); LCM's
    # boundary condition depends on t, so it is checked on sigmas that stay above sigma_min
    plan = logsnr_uniform_sigmas(schedule, 4) if name == "lcm" else karras_sigmas(schedule, 4)
    sigmas = torch.tensor(plan, dtype=torch.float64, requires_grad=True)
    x_noise = torch.from_numpy(rng_noise(10)[:1, :, :4, :4]).double()
    noises = [torch.from_numpy(rng_noise(30 + i)[:1, :, :4, :4]).double() for i in range(4)]
    weights = torch.linspace(-1, 1, x_noise.numel(), dtype=torch.float64).reshape(x_noise.shape)

    def loss(s):
        return (torch_loop(torch, name, s, x_noise, noises, eta) * weights).sum()

    assert torch.autograd.gradcheck(loss, (sigmas,), eps=1e-6, atol=1e-6, rtol=1e-4)
    # and the torch run is the numpy run
    with torch.no_grad():
        np_sampler = make_sampler(name, schedule, sigmas.detach().numpy(), eta=eta)
        x = np_sampler.prepare(x_noise.numpy())
        for i in range(4):
            sample, _ = np_sampler.model_input(x, i)
            x, _ = np_sampler.step(x, i, np.tanh(0.8 * sample) + 0.1 * sample, noise=noises[i].numpy())
        assert max_diff(torch_loop(torch, name, sigmas, x_noise, noises, eta).numpy(), x) < 1e-12


def test_torch_model_timestep_is_differentiable_in_sigma():
    torch = torch_module()
    schedule = NoiseSchedule.from_config(DEMO_CONFIG)
    sigmas = torch.tensor(karras_sigmas(schedule, 4), dtype=torch.float64, requires_grad=True)
    sampler = make_sampler("euler", schedule, sigmas)
    _, t = sampler.model_input(torch.zeros(SHAPE), 1)
    assert t.dtype == torch.float32 and t.shape == (SHAPE[0],)
    t[0].backward()
    s = sigmas.detach()[1].item()
    h = 1e-6 * s
    expected = (schedule.t_of_sigma(s + h) - schedule.t_of_sigma(s - h)) / (2 * h)
    assert sigmas.grad[1].item() == pytest.approx(expected, rel=1e-4)


def test_ddim_clip_sample_matches_diffusers_default():
    """With clip_sample (DDPM-style configs), x0 is clipped and the direction keeps the raw noise,
    as diffusers' DDIMScheduler does by default (use_clipped_model_output=False)."""
    import torch
    from diffusers import DDIMScheduler

    from abcd_edge.core.samplers import make_sampler
    from abcd_edge.core.noise import NoiseSchedule

    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=True,
               timestep_spacing="trailing")
    ref = DDIMScheduler(**cfg)
    ref.set_timesteps(5)                  # a stride that divides 1000: DDIMScheduler steps by a fixed stride
    schedule = NoiseSchedule.from_config(cfg)
    assert schedule.clip_sample == 1.0
    smp = make_sampler("ddim", schedule, schedule.sigma_of_t(ref.timesteps.numpy().astype(float)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    for i, t in enumerate(ref.timesteps):
        out = (1.7 * rng.standard_normal(x.shape)).astype(np.float32)   # large outputs: x0 leaves [-1, 1]
        r = ref.step(torch.from_numpy(out), t, torch.from_numpy(x))
        x_next, x0 = smp.step(x, i, out)
        assert np.abs(x0).max() <= 1.0
        assert np.abs(x0 - r.pred_original_sample.numpy()).max() <= 1e-5
        assert np.abs(x_next - r.prev_sample.numpy()).max() <= 1e-5
        x = r.prev_sample.numpy()


def test_replan_replaces_future_sigmas_and_timesteps():
    from abcd_edge.core.samplers import make_sampler
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import time_uniform_sigmas

    schedule = NoiseSchedule.from_config(dict(num_train_timesteps=1000, beta_schedule="linear"))
    smp = make_sampler("dpmpp-2m", schedule, time_uniform_sigmas(schedule, 10))
    x = smp.prepare(np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32))
    for i in range(2):
        _, t = smp.model_input(x, i)
        x, _ = smp.step(x, i, np.zeros_like(x))
    future = np.array([0.8, 0.2])
    smp.replan(1, future)
    assert len(smp) == 4 and np.allclose(smp.sigmas[2:], future)
    assert np.allclose(smp.timesteps, schedule.t_of_sigma(np.asarray(smp.sigmas)))
    with pytest.raises(ValueError):
        smp.replan(1, np.array([1000.0]))          # must stay below sigma_1
    for i in range(2, 4):
        x, x0 = smp.step(x, i, np.zeros_like(x))
    assert np.isfinite(x).all()
