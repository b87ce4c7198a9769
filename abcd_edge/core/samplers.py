"""Samplers that step a frozen denoiser through a given list of sigmas, one request at a time.

The runtime loop is the same for all of them::

    sampler = make_sampler("dpmpp-2m", schedule, sigmas)   # + **diffusers_options(name, config) for diffusers' ways
    x = sampler.prepare(noise)
    for i in range(len(sampler)):
        sample, t = sampler.model_input(x, i)
        x, x0_hat = sampler.step(x, i, denoiser(sample, t), noise=fresh_noise)  # x0_hat: the anytime image

Conventions (see core/noise.py for sigma):

- The state x is sampler-private. DDIM, DPM-Solver++ and LCM keep the VP state
  x = alpha * (x0 + sigma * eps) with alpha = 1 / sqrt(1 + sigma^2), as diffusers does; Euler,
  Euler-ancestral and consistency keep the VE state x = x0 + sigma * eps, as k-diffusion (and
  diffusers' Euler schedulers) do. prepare() puts every sampler at the same point, pure noise at
  sigma_0 (sigma_0 * noise in VE terms), so runs from the same noise are comparable across samplers;
  with unit_noise (diffusers' DDIM / DPM-Solver / LCM, and its Euler under "leading" spacing, whose
  init_noise_sigma is sqrt(sigma_0^2 + 1)) the VP state starts at the unit noise itself.
- prediction_type says what the model returns: "epsilon", "v_prediction" or "sample" for a VP
  diffusion model, fed the VP sample and the train timestep t_of_sigma(sigma); or "consistency"
  for a consistency model (Song et al. 2023, as diffusers' CMStochasticIterativeScheduler), fed
  x_VE / sqrt(sigma^2 + sigma_data^2) and the CM time 250 * log(sigma), whose output F gives
  x0 = c_skip * x_VE + c_out * F.
- After the last step the sampler has reached sigma = 0: x_next is the final image. (One exception,
  for diffusers parity: DDIM with final_sigma > 0, diffusers' set_alpha_to_one=False, ends at that
  noise level and returns that state as the image, as diffusers' pipelines decode it.)
- diffusers_options(name, scheduler_config) gives the keyword arguments of make_sampler that make a
  sampler step exactly as the diffusers scheduler of that config does (with the timesteps of
  core.placement.diffusers_timesteps): unit_noise, DDIM's final_sigma, LCM's timestep_scaling.

numpy only, and duck-typed: x, model_output, noise and sigmas may instead be torch tensors
(sigmas requiring grad), so a calibration can backpropagate through the steps to the sigmas.
Scalars are kept as Python floats on the numpy path (a numpy float64 scalar would turn float32
arrays into float64) and as 0-d tensors on the torch path (to keep their gradients).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.core.noise import NoiseSchedule, array_namespace

SAMPLER_NAMES = ("ddim", "dpmpp-2m", "euler", "consistency", "euler-ancestral", "lcm")
# The older sampler a newer one is costed as where a device profile predates it (same per-step arithmetic,
# give or take a noise draw): runtime.cost falls back to the base's measured sampler time.
SAMPLER_BASE = {"euler-ancestral": "euler", "lcm": "consistency"}
# The diffusers scheduler class each sampler is checked against (tests/test_scheduler_parity.py), and the
# sampler a diffusers scheduler config asks for (natural_sampler).
DIFFUSERS_SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp-2m": "DPMSolverMultistepScheduler",
                        "euler": "EulerDiscreteScheduler", "euler-ancestral": "EulerAncestralDiscreteScheduler",
                        "lcm": "LCMScheduler", "consistency": "CMStochasticIterativeScheduler"}
LCM_TIMESTEP_SCALING = 10.0  # LCMScheduler's default: the boundary condition is evaluated at 10 t
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "consistency")
SIGMA_DATA = 0.5  # the data std the consistency-model parametrisation assumes
# A consistency model maps any noise level to its x0 in one call; multistep sampling (re-noise, jump again)
# only refines, and gains nothing beyond a few steps (Song et al. 2023 report 1-2). Plans over a consistency
# model, whatever the sampler, are capped here. (The consistency sampler over a DDPM-style model is ancestral
# sampling, which keeps improving with steps: not capped.)
CONSISTENCY_MAX_STEPS = 8


def natural_sampler(prediction_type: str, scheduler_config: dict | None = None) -> str:
    """The sampler a model is made for (``--sampler default``): consistency for a consistency model; else the
    one of the diffusers scheduler class its ``scheduler_config`` names (lcm for LCMScheduler, euler for
    EulerDiscreteScheduler, euler-ancestral, dpmpp-2m), DDIM for any other (PNDM, DDPM) or none."""
    if prediction_type == "consistency":
        return "consistency"
    by_class = {cls: name for name, cls in DIFFUSERS_SCHEDULERS.items() if name != "consistency"}
    return by_class.get((scheduler_config or {}).get("_class_name"), "ddim")


def max_steps(sampler: str, prediction_type: str = "epsilon") -> int | None:
    """The most steps worth planning for ``sampler`` over a model of ``prediction_type`` (None: no cap):
    CONSISTENCY_MAX_STEPS over a consistency model, whichever sampler runs it, and for the lcm sampler (a
    latent consistency model is an epsilon model, known as one only by its sampler); no cap otherwise."""
    if prediction_type == "consistency" or sampler == "lcm":
        return CONSISTENCY_MAX_STEPS
    return None

# What the controller is told about the sampler: one-hot kind, order / 2, stochastic.
SAMPLER_DESCRIPTORS: dict[str, tuple[float, ...]] = {
    "ddim": (1.0, 0.0, 0.0, 0.0, 0.5, 0.0),
    "dpmpp-2m": (0.0, 1.0, 0.0, 0.0, 1.0, 0.0),
    "euler": (0.0, 0.0, 1.0, 0.0, 0.5, 0.0),
    "consistency": (0.0, 0.0, 0.0, 1.0, 0.5, 1.0),
    "euler-ancestral": (0.0, 0.0, 1.0, 0.0, 0.5, 1.0),
    # LCM is multistep consistency sampling (jump to x0, re-noise fully) in the VP state: the controller sees
    # the consistency sampler it is (a density calibrated for one serves the other)
    "lcm": (0.0, 0.0, 0.0, 1.0, 0.5, 1.0),
}


def alpha_of_sigma(sigma: Any) -> Any:
    """The VP signal scale at VE noise level sigma: x_VP = alpha * x_VE."""
    return (1 + sigma ** 2) ** -0.5


def cm_time(sigma: Any) -> Any:
    """The time a consistency model is conditioned on (diffusers' CMStochasticIterativeScheduler.sigma_to_t)."""
    return 1000 * 0.25 * _log(sigma + 1e-44)


def to_d(x: Any, sigma: Any, denoised: Any) -> Any:
    """The probability-flow ODE derivative dx/dsigma of a VE state (k-diffusion's to_d)."""
    return (x - denoised) / sigma


def _log(value: Any) -> Any:
    if isinstance(value, float):
        return math.log(value)
    return array_namespace(value).log(value)


def _per_sample(t: Any, x: Any) -> Any:
    """Scalar timestep t as a float32 vector with one entry per sample of x, in x's kind and device."""
    if array_namespace(x) is np:
        return np.full(len(x), float(t), dtype=np.float32)
    return array_namespace(x).as_tensor(t, dtype=array_namespace(x).float32, device=x.device).expand(len(x))


class Sampler:
    """One request's sampler over n decreasing sigmas; subclasses define the state space and step()."""

    name = ""
    vp_state = False  # True: x = alpha * (x0 + sigma * eps); False: x = x0 + sigma * eps
    stochastic = False  # True: step() needs fresh noise (on every step but the last)
    unit_noise = False  # True: prepare() starts the VP state at the unit noise (diffusers' init_noise_sigma)

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 interpolation: str = "log") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction type {prediction_type!r} is not supported; expected one of "
                            f"{', '.join(PREDICTION_TYPES)}")
        on_numpy = array_namespace(sigmas) is np
        sigmas = np.asarray(sigmas, dtype=np.float64) if on_numpy else sigmas
        values = (sigmas if on_numpy else sigmas.detach().cpu().numpy()).tolist()
        if sigmas.ndim != 1 or not values or values[-1] <= 0 or any(a <= b for a, b in zip(values, values[1:])):
            raise ValueError(f"sigmas must be a non-empty 1-D list of positive, strictly decreasing values, "
                             f"got {values}")
        if interpolation not in ("log", "linear"):
            raise ValueError(f"interpolation {interpolation!r} is not one of log, linear")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.interpolation = interpolation  # how sigma -> model timestep is read between train steps
        self.sigmas = sigmas
        self.timesteps = self._timesteps_of(sigmas)

    def _timesteps_of(self, sigmas: Any) -> Any:
        if self.prediction_type == "consistency":
            return cm_time(sigmas)
        return self.schedule.t_of_sigma(sigmas, self.interpolation)

    def replan(self, i: int, future: np.ndarray) -> None:
        """Replace the sigmas after step i with ``future`` (numpy; decreasing, below sigma_i).

        Call it after the model output of step i is in and before ``step(.., i, ..)``: that
        step then heads for the new sigma_{i+1}. Multistep history stays valid (it holds
        the sigmas actually visited).
        """
        future = np.asarray(future, np.float64)
        sigmas = np.concatenate([np.asarray(self.sigmas[: i + 1], np.float64), future])
        if np.any(np.diff(sigmas[i:]) >= 0) or sigmas[-1] <= 0:
            raise ValueError(f"replanned sigmas must stay positive and strictly decreasing, got {sigmas.tolist()}")
        new_t = self._timesteps_of(future)
        self.sigmas = sigmas
        self.timesteps = np.concatenate([np.asarray(self.timesteps[: i + 1]), new_t])

    def __len__(self) -> int:
        return len(self.sigmas)

    def sigma(self, i: int) -> Any:
        """sigma_i as a Python float (numpy sigmas) or 0-d tensor (torch sigmas); sigma_n = 0."""
        if i >= len(self.sigmas):
            return 0.0
        return float(self.sigmas[i]) if isinstance(self.sigmas, np.ndarray) else self.sigmas[i]

    def scale(self, sigma: Any) -> Any:
        """The factor from the VE state x0 + sigma * eps to this sampler's state."""
        return alpha_of_sigma(sigma) if self.vp_state else 1.0

    def prepare(self, noise: Any) -> Any:
        """The initial state from unit Gaussian noise: pure noise at sigma_0 (x_VE = sigma_0 * noise), or with
        unit_noise the VP sample = noise itself (x_VE = sqrt(sigma_0^2 + 1) * noise), as diffusers starts."""
        sigma = self.sigma(0)
        if self.unit_noise:
            return noise * 1.0 if self.vp_state else noise * (sigma ** 2 + 1) ** 0.5
        return noise * (sigma * self.scale(sigma))

    def model_input(self, x: Any, i: int) -> tuple[Any, Any]:
        """(sample, timesteps [B] float32) the denoiser must be called with at step i."""
        sigma = self.sigma(i)
        if self.prediction_type == "consistency":
            sample = x / (self.scale(sigma) * (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5)
        else:
            sample = x if self.vp_state else x / (sigma ** 2 + 1) ** 0.5
        return sample, _per_sample(self.timesteps[i], x)

    def denoised(self, x: Any, i: int, model_output: Any) -> Any:
        """x0, the clean-image estimate in data space, from the model output at step i,
        clipped to the schedule's ``clip_sample`` range when it has one (as diffusers' DDIM)."""
        x0 = self._x0(x, i, model_output)
        clip = self.schedule.clip_sample
        return x0 if clip is None else x0.clip(-clip, clip)

    def _x0(self, x: Any, i: int, model_output: Any) -> Any:
        sigma, scale = self.sigma(i), self.scale(self.sigma(i))
        if self.prediction_type == "epsilon":
            return (x - (scale * sigma) * model_output) / scale
        if self.prediction_type == "v_prediction":
            alpha = alpha_of_sigma(sigma)
            return (alpha ** 2 / scale) * x - (sigma * alpha) * model_output
        if self.prediction_type == "sample":
            return model_output
        # consistency-model boundary condition, with epsilon = sigma_min (Song et al. 2023, appendix C)
        sigma_min = self.schedule.sigma_min
        c_skip = SIGMA_DATA ** 2 / ((sigma - sigma_min) ** 2 + SIGMA_DATA ** 2)
        c_out = (sigma - sigma_min) * SIGMA_DATA / (sigma ** 2 + SIGMA_DATA ** 2) ** 0.5
        return c_out * model_output + (c_skip / scale) * x

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        """(x_next, x0_hat) from the model output at step i; noise is the fresh Gaussian a stochastic sampler uses."""
        raise NotImplementedError


class DDIM(Sampler):
    """DDIM (Song et al. 2021) in the VP state; eta = 0 is deterministic, eta = 1 is DDPM-like ancestral.

    final_sigma > 0 is diffusers' set_alpha_to_one=False: the last step goes to that noise level (the
    schedule's sigma_min, alphas_cumprod[0]) instead of 0, and that state is the image it returns.
    """

    name = "ddim"
    vp_state = True

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 eta: float = 0.0, final_sigma: float = 0.0, interpolation: str = "log") -> None:
        super().__init__(schedule, sigmas, prediction_type, interpolation)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if final_sigma < 0:
            raise ValueError(f"final_sigma must be >= 0, got {final_sigma}")
        self.eta = eta
        self.final_sigma = float(final_sigma)
        self.stochastic = eta > 0

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        last = i == len(self) - 1
        if last and not self.final_sigma:
            return x0, x0  # sigma_next = 0: every term but alpha_next * x0 vanishes
        if last:
            sigma_next = min(self.final_sigma, sigma)
        alpha, alpha_next = alpha_of_sigma(sigma), alpha_of_sigma(sigma_next)
        # the direction uses the unclipped estimate's noise, as diffusers' DDIM (use_clipped_model_output=False)
        eps = model_output if self.prediction_type == "epsilon" else (
            (x - alpha * self._x0(x, i, model_output)) / (alpha * sigma))
        # DDIM eq. 12 and 16 with s = alpha * sigma: std = eta * s_next * sqrt(1 - (sigma_next / sigma)^2),
        # and the eps direction keeps the rest of s_next^2
        s_next, shrink = alpha_next * sigma_next, 1 - (sigma_next / sigma) ** 2
        x_next = alpha_next * x0 + (s_next * (1 - self.eta ** 2 * shrink) ** 0.5) * eps
        if self.stochastic:
            if noise is None:
                raise ValueError(f"ddim with eta={self.eta} needs noise at step {i}")
            x_next = x_next + (self.eta * s_next * shrink ** 0.5) * noise
        return (x_next, x_next) if last else (x_next, x0)


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022) in the VP state, as diffusers' DPMSolverMultistepScheduler
    with solver_order=2, midpoint, final_sigmas_type="zero": first-order on the first step (no
    history yet) and on the last (the step to sigma = 0 has infinite log-SNR, so it is DDIM's).
    """

    name = "dpmpp-2m"
    vp_state = True

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 interpolation: str = "log") -> None:
        super().__init__(schedule, sigmas, prediction_type, interpolation)
        self._previous: tuple[Any, Any] | None = None  # (sigma, x0) of the last step taken

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        d = x0
        if self._previous is not None and i < len(self) - 1:
            sigma_prev, x0_prev = self._previous
            r = _log(sigma_prev / sigma) / _log(sigma / sigma_next)  # h_{i-1} / h_i, h = step in log-SNR
            d = x0 + (x0 - x0_prev) / (2 * r)
        self._previous = (sigma, x0)
        # x_next = (s_next / s) x - alpha_next (exp(-h) - 1) d, with exp(-h) = sigma_next / sigma, s = alpha * sigma
        alpha_next = alpha_of_sigma(sigma_next)
        s_ratio = alpha_next * sigma_next / (alpha_of_sigma(sigma) * sigma)
        x_next = s_ratio * x - (alpha_next * (sigma_next / sigma - 1)) * d
        return x_next, x0


class Euler(Sampler):
    """Euler on the probability-flow ODE in the VE state (Karras et al. 2022, algorithm 2 without churn)."""

    name = "euler"

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        sigma = self.sigma(i)
        x0 = self.denoised(x, i, model_output)
        return x + to_d(x, sigma, x0) * (self.sigma(i + 1) - sigma), x0


class EulerAncestral(Sampler):
    """Euler-ancestral (k-diffusion's sample_euler_ancestral, eta = 1) in the VE state, as diffusers'
    EulerAncestralDiscreteScheduler: an Euler step down to sigma_down, then fresh noise of std sigma_up, with
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and sigma_down^2 = sigma_next^2 - sigma_up^2
    (= sigma_next^4 / sigma^2). The last step (to sigma = 0) adds no noise and lands on x0.
    """

    name = "euler-ancestral"
    stochastic = True

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        if i == len(self) - 1:
            return x0, x0
        if noise is None:
            raise ValueError(f"euler-ancestral sampling needs noise at step {i}")
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = sigma_next ** 2 / sigma
        return x + to_d(x, sigma, x0) * (sigma_down - sigma) + sigma_up * noise, x0


class LCM(Sampler):
    """Latent-consistency multistep sampling (Luo et al. 2023) in the VP state, as diffusers' LCMScheduler.

    Each step takes the model's x0 (clipped where the schedule says) through the LCM boundary condition at
    the step's timestep t, scaled s = timestep_scaling * t:
    denoised = c_out * x0 + c_skip * x, c_skip = sigma_data^2 / (s^2 + sigma_data^2),
    c_out = s / sqrt(s^2 + sigma_data^2) (sigma_data = 0.5). denoised is the anytime image. Except after the
    last step, it is re-noised with fresh noise to the next level: x_next = alpha_next * denoised +
    sqrt(1 - alpha_next^2) * noise; the last step returns denoised. Over a consistency model (prediction
    type "consistency") the model's own parametrisation is the boundary condition; none is added.
    The guidance embedding an LCM UNet takes (timestep_cond) is a denoiser input, not the sampler's.
    """

    name = "lcm"
    vp_state = True
    stochastic = True

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 timestep_scaling: float = LCM_TIMESTEP_SCALING, interpolation: str = "log") -> None:
        super().__init__(schedule, sigmas, prediction_type, interpolation)
        if not timestep_scaling > 0:
            raise ValueError(f"timestep_scaling must be > 0, got {timestep_scaling}")
        self.timestep_scaling = float(timestep_scaling)

    def boundary(self, i: int) -> tuple[Any, Any]:
        """(c_skip, c_out) at step i's timestep (diffusers' get_scalings_for_boundary_condition_discrete)."""
        t = self.timesteps[i]
        s = (float(t) if isinstance(self.timesteps, np.ndarray) else t) * self.timestep_scaling
        return SIGMA_DATA ** 2 / (s ** 2 + SIGMA_DATA ** 2), s / (s ** 2 + SIGMA_DATA ** 2) ** 0.5

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        denoised = self.denoised(x, i, model_output)
        if self.prediction_type != "consistency":
            c_skip, c_out = self.boundary(i)
            denoised = c_out * denoised + c_skip * x
        if i == len(self) - 1:
            return denoised, denoised
        if noise is None:
            raise ValueError(f"lcm sampling needs noise at step {i}")
        sigma_next = self.sigma(i + 1)
        alpha_next = alpha_of_sigma(sigma_next)
        return alpha_next * denoised + (alpha_next * sigma_next) * noise, denoised


class ConsistencyMultistep(Sampler):
    """Multistep consistency sampling (Song et al. 2023, algorithm 1) in the VE state.

    Each step jumps to the clean estimate (clipped to [-1, 1]) and, except after the last, adds
    fresh noise back up to sigma_{i+1}, as CMStochasticIterativeScheduler: the noise std is
    sqrt(sigma_{i+1}^2 - sigma_min^2), sigma_min being the schedule's (the CM's epsilon).
    """

    name = "consistency"
    stochastic = True

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        x0 = self.denoised(x, i, model_output).clip(-1, 1)
        if i == len(self) - 1:
            return x0, x0
        if noise is None:
            raise ValueError(f"consistency sampling needs noise at step {i}")
        sigma_min, sigma_max = self.schedule.sigma_min, self.schedule.sigma_max
        sigma_next = max(sigma_min, min(self.sigma(i + 1), sigma_max))
        return x0 + noise * (sigma_next ** 2 - sigma_min ** 2) ** 0.5, x0


_SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDIM, DPMSolverPP2M, Euler, ConsistencyMultistep,
                                                                  EulerAncestral, LCM)}


def make_sampler(name: str, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 eta: float = 0.0, *, unit_noise: bool = False, final_sigma: float = 0.0,
                 timestep_scaling: float | None = None, interpolation: str = "log") -> Sampler:
    """A fresh sampler (one per request: it may keep multistep history) over the evaluation sigmas.

    eta and final_sigma apply to ddim only, timestep_scaling (default 10) to lcm only; unit_noise and
    interpolation (how a sigma between train steps maps to the model's timestep: "log", or "linear" as
    diffusers' Euler schedulers) to all. :func:`diffusers_options` gives them as a diffusers config implies.
    """
    if name not in _SAMPLERS:
        raise UserError(f"sampler {name!r} is not known; expected one of {', '.join(SAMPLER_NAMES)}")
    if name != "ddim" and (eta or final_sigma):
        raise UserError(f"eta and final_sigma apply to the ddim sampler only, not to {name!r}")
    if name != "lcm" and timestep_scaling is not None:
        raise UserError(f"timestep_scaling applies to the lcm sampler only, not to {name!r}")
    if name == "ddim":
        sampler = DDIM(schedule, sigmas, prediction_type, eta, final_sigma, interpolation=interpolation)
    elif name == "lcm":
        sampler = LCM(schedule, sigmas, prediction_type,
                      LCM_TIMESTEP_SCALING if timestep_scaling is None else timestep_scaling, interpolation)
    else:
        sampler = _SAMPLERS[name](schedule, sigmas, prediction_type, interpolation=interpolation)
    sampler.unit_noise = bool(unit_noise)
    return sampler


def diffusers_options(name: str, scheduler_config: dict | None, schedule: NoiseSchedule | None = None) -> dict:
    """make_sampler's keyword arguments that make sampler ``name`` step as diffusers' scheduler of that name
    does under ``scheduler_config`` (a scheduler_config.json dict, read as ``XScheduler.from_config`` would):

    - unit_noise: diffusers starts DDIM, DPM-Solver++ and LCM at latents = noise (init_noise_sigma 1) and its
      Euler schedulers at sqrt(sigma_0^2 + 1) * noise under "leading" spacing (sigma_0 * noise, our default,
      under "linspace" / "trailing");
    - interpolation (euler, euler-ancestral): "linear", the inverse of the np.interp that places their sigmas
      at fractional ("linspace") timesteps, so the model is fed diffusers' timesteps exactly;
    - final_sigma (ddim): set_alpha_to_one=False (DDIMScheduler's default is True) ends at alphas_cumprod[0],
      the schedule's sigma_min (``schedule`` is built from the config when not given);
    - timestep_scaling (lcm): the config's, default 10.

    Use it with the timesteps of ``core.placement.diffusers_timesteps(config, n, sampler=name)``.
    """
    cfg = scheduler_config or {}
    if name not in _SAMPLERS:
        raise UserError(f"sampler {name!r} is not known; expected one of {', '.join(SAMPLER_NAMES)}")
    if name == "consistency":
        return {}
    if name in ("euler", "euler-ancestral"):
        return {"unit_noise": cfg.get("timestep_spacing", "linspace") == "leading", "interpolation": "linear"}
    options: dict = {"unit_noise": True}
    if name == "ddim" and not cfg.get("set_alpha_to_one", True):
        options["final_sigma"] = (schedule or NoiseSchedule.from_config(cfg)).sigma_min
    if name == "lcm":
        options["timestep_scaling"] = float(cfg.get("timestep_scaling", LCM_TIMESTEP_SCALING))
    return options
