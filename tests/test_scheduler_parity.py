"""Every sampler against the diffusers scheduler it stands for, step by step, on identical inputs.

For DDIM (DDIMScheduler), DPM-Solver++(2M) (DPMSolverMultistepScheduler, dpmsolver++, order 2, last step
first order to sigma = 0), Euler (EulerDiscreteScheduler), Euler-ancestral (EulerAncestralDiscreteScheduler)
and LCM (LCMScheduler), over the Stable-Diffusion schedule (scaled_linear 0.00085..0.012, 1000 steps):

- the timesteps: ``core.placement.diffusers_timesteps`` (the "diffusers" placement) equals the scheduler's
  ``timesteps`` after ``set_timesteps(n)``, and a sampler built on the placement's sigmas feeds the model those
  timesteps;
- the run: both sides start from the same unit noise (diffusers' ``noise * init_noise_sigma``), each calls the
  same fixed fake model on what its own convention feeds it (``model_input`` vs ``scale_model_input`` and the
  timestep), the stochastic ones get the same fresh noise per step, and both run free (no re-syncing), for
  n in {1, 2, 4, 8}: the model inputs, the x0 estimate (``pred_original_sample``; LCM's ``denoised``; DPM-Solver's
  converted model output) and the next state (``prev_sample``) agree at every step within float32 round-off.

Tolerance: the timestep fed to the model equals diffusers' exactly (float32), Euler's fractional "linspace" ones
included; TOL = 1e-5 for the rest: states relative to max(1, their largest |value|) (Euler's VE states reach ~60 at
sigma 14.6); x0 estimates absolute, divided by max(1, sigma): x0 = x - sigma * eps in float32 is known to no
better than ~1e-7 * sigma * |eps| on either side. What was measured is ~1e-6 or below (see the report).

Both sides keep the same state: VP x = alpha * (x0 + sigma * eps) for DDIM, DPM-Solver and LCM (the latents of
diffusers' pipelines), VE x = x0 + sigma * eps for the Euler samplers (diffusers' Euler sample). The conversion
is written out (``to_diffusers_state``) even where it is the identity.
"""
from __future__ import annotations

import numpy as np
import pytest

from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import TimestepPlacement, diffusers_sigmas, diffusers_timesteps
from abcd_edge.core.samplers import DIFFUSERS_SCHEDULERS, alpha_of_sigma, diffusers_options, make_sampler

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
STEPS = (1, 2, 4, 8)
TOL = 1e-5
DIFFUSERS_STATE = {"ddim": "vp", "dpmpp-2m": "vp", "lcm": "vp", "euler": "ve", "euler-ancestral": "ve"}

# scheduler configs per sampler: what SD / SD-Turbo / SDXL-Turbo / LCM folders ship, and the class defaults
VARIANTS = {
    "ddim": {"sd15-leading": dict(clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading"),
             "trailing": dict(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing"),
             "leading-offset0": dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")},
    "dpmpp-2m": {"default-linspace": dict(),
                 "leading": dict(timestep_spacing="leading", steps_offset=1),
                 "trailing": dict(timestep_spacing="trailing")},
    "euler": {"turbo-trailing": dict(timestep_spacing="trailing"),
              "leading": dict(timestep_spacing="leading", steps_offset=1),
              "default-linspace": dict()},
    "euler-ancestral": {"turbo-trailing": dict(timestep_spacing="trailing"),
                        "leading": dict(timestep_spacing="leading", steps_offset=1),
                        "default-linspace": dict()},
    # LCM-Dreamshaper's config; and a small timestep_scaling, where the boundary condition is not ~identity
    "lcm": {"lcm-sd": dict(steps_offset=1, set_alpha_to_one=True, timestep_spacing="leading"),
            "scaling-0.1": dict(timestep_scaling=0.1)},
}
CASES = [(name, variant) for name, variants in VARIANTS.items() for variant in variants]


def make_scheduler(name: str, prediction_type: str = "epsilon", **config):
    cls = getattr(diffusers, DIFFUSERS_SCHEDULERS[name])
    if name == "dpmpp-2m":
        config = dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                      final_sigmas_type="zero", **config)
    return cls(**SD, prediction_type=prediction_type, **config)


def fake_net(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
    """A fixed nonlinear function of (sample, t) standing in for the UNet's clean-image estimate."""
    phase = np.sin(np.asarray(t, dtype=np.float32) * np.float32(0.013))[:, None, None, None]
    return (np.tanh(np.float32(0.8) * sample + np.float32(0.3) * phase) + np.float32(0.1) * sample).astype(np.float32)


def fake_model(schedule: NoiseSchedule, prediction_type: str):
    """An epsilon (or v) model of the VP sample and the timestep whose x0 estimate is fake_net: the same
    deterministic function on both sides, each side feeding it what its convention feeds a UNet."""
    def model(sample: np.ndarray, t: np.ndarray) -> np.ndarray:
        x0 = fake_net(sample, t)
        sigma = schedule.sigma_of_t(np.asarray(t, dtype=np.float64))[:, None, None, None]
        alpha = alpha_of_sigma(sigma)
        eps = (sample - alpha * x0) / (alpha * sigma)
        return (eps if prediction_type == "epsilon" else alpha * eps - alpha * sigma * x0).astype(np.float32)
    return model


def to_diffusers_state(sampler, x: np.ndarray, sigma: float) -> np.ndarray:
    """Our state in the convention diffusers' scheduler of the same name keeps (VP = alpha * VE)."""
    ours, theirs = ("vp" if sampler.vp_state else "ve"), DIFFUSERS_STATE[sampler.name]
    if ours == theirs:
        return x
    factor = alpha_of_sigma(sigma) if theirs == "vp" else 1 / alpha_of_sigma(sigma)
    return (x * factor).astype(np.float32)


def rel(ours, theirs) -> float:
    theirs = np.asarray(theirs, dtype=np.float64)
    return float(np.max(np.abs(np.asarray(ours, np.float64) - theirs)) / max(1.0, np.max(np.abs(theirs))))


def abs_diff(ours, theirs) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64))))


class NoiseFeed:
    """Stands in for diffusers' randn_tensor in a scheduler module: hands it our noise of the current step."""

    def __init__(self, noises):
        self.noises, self.i, self.draws = noises, 0, 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert tuple(shape) == SHAPE
        self.draws += 1
        return torch.from_numpy(self.noises[self.i]).to(dtype or torch.float32)


def run_parity(name: str, config: dict, n: int, monkeypatch, prediction_type: str = "epsilon", eta: float = 0.0,
               seed: int = 0) -> dict:
    """Run our sampler and diffusers' scheduler side by side; the worst difference of each kind."""
    scheduler = make_scheduler(name, prediction_type, **config)
    scheduler.set_timesteps(n)
    cfg = dict(scheduler.config)
    schedule = NoiseSchedule.from_config(cfg)
    placement = TimestepPlacement(schedule, cfg, name)
    sigmas, _ = placement.plan(n)
    sampler = make_sampler(name, schedule, sigmas, prediction_type, eta=eta, **diffusers_options(name, cfg))
    model = fake_model(schedule, prediction_type)

    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    noises = [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]
    feed = NoiseFeed(noises)
    module = {"lcm": "scheduling_lcm", "euler-ancestral": "scheduling_euler_ancestral_discrete"}.get(name)
    if module is not None:
        monkeypatch.setattr(getattr(diffusers.schedulers, module), "randn_tensor", feed)

    x = sampler.prepare(noise)
    theirs = torch.from_numpy(noise) * scheduler.init_noise_sigma       # what diffusers' pipelines start from
    worst = {"start": rel(to_diffusers_state(sampler, x, sampler.sigma(0)), theirs.numpy()),
             "t": 0.0, "input": 0.0, "x0": 0.0, "x": 0.0}
    assert len(scheduler.timesteps) == len(sampler) == n
    for i, t in enumerate(scheduler.timesteps):
        sample, timestep = sampler.model_input(x, i)
        their_sample = scheduler.scale_model_input(theirs, t)
        their_t = np.full(SHAPE[0], float(t), dtype=np.float32)
        worst["t"] = max(worst["t"], abs_diff(timestep, their_t))
        worst["input"] = max(worst["input"], rel(sample, their_sample.numpy()))
        out, their_out = model(sample, timestep), model(their_sample.numpy(), their_t)

        x_pre = x
        feed.i = i
        kwargs = {"eta": eta, "variance_noise": torch.from_numpy(noises[i])} if name == "ddim" and eta else {}
        x, x0 = sampler.step(x, i, out, noise=noises[i] if sampler.stochastic else None)
        result = scheduler.step(torch.from_numpy(their_out), t, theirs, **kwargs)
        if name == "lcm":
            their_x0 = result.denoised
        elif name == "dpmpp-2m":
            their_x0 = scheduler.model_outputs[-1]        # dpmsolver++ converts the model output to x0
        else:
            their_x0 = result.pred_original_sample
        if name == "ddim" and sampler.final_sigma and i == n - 1:
            # set_alpha_to_one=False: diffusers' last step lands on alphas_cumprod[0], and that state is the image
            # its pipeline decodes; ours returns that state as the image too
            assert x0 is x
            x0 = sampler.denoised(x_pre, i, out)
        sigma = float(sampler.sigma(i))
        worst["x0"] = max(worst["x0"], abs_diff(x0, their_x0.numpy()) / max(1.0, sigma))
        theirs = result.prev_sample
        worst["x"] = max(worst["x"], rel(to_diffusers_state(sampler, x, float(sampler.sigma(i + 1))), theirs.numpy()))
        assert x.dtype == np.float32 and x0.dtype == np.float32
    if module is not None:      # every noise diffusers drew was ours (LCM draws on all steps but the last)
        assert feed.draws == (n - 1 if name == "lcm" else n)
    return worst


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("name,variant", CASES)
def test_sampler_matches_diffusers_scheduler_step_by_step(name, variant, n, monkeypatch):
    worst = run_parity(name, VARIANTS[name][variant], n, monkeypatch)
    print(f"\nPARITY {name} {variant} n={n} " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    assert worst.pop("t") == 0       # the model gets diffusers' timesteps exactly (Euler's fractional ones too)
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("name", ["ddim", "euler-ancestral", "lcm"])
def test_v_prediction_matches_diffusers(name, monkeypatch):
    config = next(iter(VARIANTS[name].values()))
    worst = run_parity(name, config, 4, monkeypatch, prediction_type="v_prediction")
    print(f"\nPARITY {name} v_prediction n=4 " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    assert max(worst.values()) <= TOL, worst


@pytest.mark.parametrize("variant", ["sd15-leading", "trailing"])
def test_ddim_with_eta_matches_diffusers_variance_noise(variant, monkeypatch):
    worst = run_parity("ddim", VARIANTS["ddim"][variant], 4, monkeypatch, eta=1.0)
    print(f"\nPARITY ddim eta=1 {variant} n=4 " + " ".join(f"{k}={v:.2e}" for k, v in worst.items()))
    assert max(worst.values()) <= TOL, worst


def test_lcm_boundary_condition_is_resolved_by_the_parity_tests():
    """The parity tests could not pass with the boundary condition dropped (denoised = pred_x0): under
    timestep_scaling 0.1 its terms move the x0 estimate far beyond TOL at every step count. (Under the default
    scaling 10 they are below 1e-6 at t >= 139, the lowest LCM timestep for n <= 8; there, as in diffusers,
    LCM sampling is DDIM-like jumps to pred_x0, and only the small-scaling variant guards the terms.)"""
    for n in STEPS:
        scheduler = make_scheduler("lcm", **VARIANTS["lcm"]["scaling-0.1"])
        scheduler.set_timesteps(n)
        cfg = dict(scheduler.config)
        schedule = NoiseSchedule.from_config(cfg)
        sampler = make_sampler("lcm", schedule, TimestepPlacement(schedule, cfg, "lcm").plan(n)[0],
                               **diffusers_options("lcm", cfg))
        assert sampler.timestep_scaling == 0.1
        x = sampler.prepare(np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32))
        out = fake_model(schedule, "epsilon")(*sampler.model_input(x, 0))
        pred_x0 = sampler.denoised(x, 0, out)
        _, denoised = sampler.step(x, 0, out, noise=np.zeros(SHAPE, np.float32))
        assert abs_diff(denoised, pred_x0) > 5 * TOL, n


# --- the timesteps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,variant", CASES)
def test_diffusers_placement_gives_the_schedulers_timesteps(name, variant):
    config = VARIANTS[name][variant]
    limit = 50 if name == "lcm" else 64
    for n in range(1, limit + 1):
        scheduler = make_scheduler(name, **config)
        scheduler.set_timesteps(n)
        cfg = dict(scheduler.config)
        theirs = scheduler.timesteps.numpy()
        # diffusers' "trailing" float arange sometimes overshoots to a stray last timestep -1 (62 for n = 61;
        # alphas_cumprod[-1] is pure noise): the placement drops it
        assert np.all(theirs[:-1] >= 0) and (theirs[-1] >= 0 or "trailing" in variant)
        theirs = theirs[theirs >= 0]
        ours = diffusers_timesteps(cfg, n, name)
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{name} {variant} n={n}")
        # and the sampler built on the placement's sigmas feeds the model those timesteps
        schedule = NoiseSchedule.from_config(cfg)
        sigmas, _ = TimestepPlacement(schedule, cfg, name).plan(n)
        sampler = make_sampler(name, schedule, sigmas, **diffusers_options(name, cfg))
        fed = np.array([sampler.model_input(np.zeros(SHAPE, np.float32), i)[1][0] for i in range(len(theirs))])
        # Euler "linspace" timesteps are fractional; diffusers interpolates their sigmas linearly, and the sampler
        # reads them back the same way (diffusers_options: interpolation "linear"): the same float32 timesteps
        np.testing.assert_array_equal(fed, theirs.astype(np.float32), err_msg=f"{name} {variant} n={n}")
        if hasattr(scheduler, "sigmas") and name != "lcm":
            np.testing.assert_allclose(sigmas, scheduler.sigmas[:len(theirs)].numpy(), rtol=1e-6)


def test_placement_without_a_sampler_follows_the_configs_class():
    lcm = dict(make_scheduler("lcm").config, _class_name="LCMScheduler")
    np.testing.assert_array_equal(diffusers_timesteps(lcm, 4), [999, 759, 499, 259])
    np.testing.assert_array_equal(diffusers_timesteps(lcm, 4), diffusers_timesteps(lcm, 4, "lcm"))
    pndm = dict(SD, _class_name="PNDMScheduler", steps_offset=1)      # SD 1.5's folder: DDIM's leading rule
    np.testing.assert_array_equal(diffusers_timesteps(pndm, 4), [751, 501, 251, 1])
    # the config names no timestep_spacing, so each class takes its own default (Euler's: linspace), as
    # XScheduler.from_config does
    for name in ("ddim", "dpmpp-2m", "euler", "euler-ancestral", "lcm"):
        scheduler = getattr(diffusers, DIFFUSERS_SCHEDULERS[name]).from_config(pndm)
        scheduler.set_timesteps(4)
        np.testing.assert_array_equal(diffusers_timesteps(pndm, 4, name), scheduler.timesteps.numpy(), err_msg=name)
    np.testing.assert_array_equal(diffusers_timesteps(pndm, 4, "euler"), [999, 666, 333, 0])


def test_diffusers_sigmas_are_the_schedules_at_integer_timesteps():
    schedule = NoiseSchedule.from_config(SD)
    t = np.arange(1000)
    np.testing.assert_array_equal(diffusers_sigmas(schedule, t), schedule.sigma_of_t(t.astype(np.float64)))
