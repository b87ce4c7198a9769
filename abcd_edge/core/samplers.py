"""Samplers that step a frozen denoiser through a given list of sigmas, one request at a time.

The runtime loop is the same for all of them::

    sampler = make_sampler("dpmpp-2m", schedule, sigmas)
    x = sampler.prepare(noise)
    for i in range(len(sampler)):
        sample, t = sampler.model_input(x, i)
        x, x0_hat = sampler.step(x, i, denoiser(sample, t), noise=fresh_noise)  # x0_hat: the anytime image

Conventions (see core/noise.py for sigma):

- The state x is sampler-private. DDIM and DPM-Solver++ keep the VP state
  x = alpha * (x0 + sigma * eps) with alpha = 1 / sqrt(1 + sigma^2), as diffusers does; Euler and
  consistency keep the VE state x = x0 + sigma * eps, as k-diffusion does. prepare() puts every
  sampler at the same point, pure noise at sigma_0 (sigma_0 * noise in VE terms), so runs from
  the same noise are comparable across samplers.
- prediction_type says what the model returns: "epsilon", "v_prediction" or "sample" for a VP
  diffusion model, fed the VP sample and the train timestep t_of_sigma(sigma); or "consistency"
  for a consistency model (Song et al. 2023, as diffusers' CMStochasticIterativeScheduler), fed
  x_VE / sqrt(sigma^2 + sigma_data^2) and the CM time 250 * log(sigma), whose output F gives
  x0 = c_skip * x_VE + c_out * F.
- After the last step the sampler has reached sigma = 0: x_next is the final image.

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

SAMPLER_NAMES = ("ddim", "dpmpp-2m", "euler", "consistency")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "consistency")
SIGMA_DATA = 0.5  # the data std the consistency-model parametrisation assumes
# A consistency model maps any noise level to its x0 in one call; multistep sampling (re-noise, jump again)
# only refines, and gains nothing beyond a few steps (Song et al. 2023 report 1-2). Plans over a consistency
# model, whatever the sampler, are capped here. (The consistency sampler over a DDPM-style model is ancestral
# sampling, which keeps improving with steps: not capped.)
CONSISTENCY_MAX_STEPS = 8


def natural_sampler(prediction_type: str) -> str:
    """The sampler a model is made for (``--sampler default``): consistency for a consistency model, else DDIM."""
    return "consistency" if prediction_type == "consistency" else "ddim"


def max_steps(sampler: str, prediction_type: str = "epsilon") -> int | None:
    """The most steps worth planning for ``sampler`` over a model of ``prediction_type`` (None: no cap):
    CONSISTENCY_MAX_STEPS over a consistency model, whichever sampler runs it; no cap otherwise."""
    if prediction_type == "consistency":
        return CONSISTENCY_MAX_STEPS
    return None

# What the controller is told about the sampler: one-hot kind, order / 2, stochastic.
SAMPLER_DESCRIPTORS: dict[str, tuple[float, ...]] = {
    "ddim": (1.0, 0.0, 0.0, 0.0, 0.5, 0.0),
    "dpmpp-2m": (0.0, 1.0, 0.0, 0.0, 1.0, 0.0),
    "euler": (0.0, 0.0, 1.0, 0.0, 0.5, 0.0),
    "consistency": (0.0, 0.0, 0.0, 1.0, 0.5, 1.0),
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

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon") -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise UserError(f"prediction type {prediction_type!r} is not supported; expected one of "
                            f"{', '.join(PREDICTION_TYPES)}")
        on_numpy = array_namespace(sigmas) is np
        sigmas = np.asarray(sigmas, dtype=np.float64) if on_numpy else sigmas
        values = (sigmas if on_numpy else sigmas.detach().cpu().numpy()).tolist()
        if sigmas.ndim != 1 or not values or values[-1] <= 0 or any(a <= b for a, b in zip(values, values[1:])):
            raise ValueError(f"sigmas must be a non-empty 1-D list of positive, strictly decreasing values, "
                             f"got {values}")
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.sigmas = sigmas
        self.timesteps = cm_time(sigmas) if prediction_type == "consistency" else schedule.t_of_sigma(sigmas)

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
        new_t = cm_time(future) if self.prediction_type == "consistency" else self.schedule.t_of_sigma(future)
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
        """The initial state, pure noise at sigma_0, from unit Gaussian noise."""
        sigma = self.sigma(0)
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
    """DDIM (Song et al. 2021) in the VP state; eta = 0 is deterministic, eta = 1 is DDPM-like ancestral."""

    name = "ddim"
    vp_state = True

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 eta: float = 0.0) -> None:
        super().__init__(schedule, sigmas, prediction_type)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = eta
        self.stochastic = eta > 0

    def step(self, x: Any, i: int, model_output: Any, noise: Any = None) -> tuple[Any, Any]:
        sigma, sigma_next = self.sigma(i), self.sigma(i + 1)
        x0 = self.denoised(x, i, model_output)
        if i == len(self) - 1:
            return x0, x0  # sigma_next = 0: every term but alpha_next * x0 vanishes
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
        return x_next, x0


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022) in the VP state, as diffusers' DPMSolverMultistepScheduler
    with solver_order=2, midpoint, final_sigmas_type="zero": first-order on the first step (no
    history yet) and on the last (the step to sigma = 0 has infinite log-SNR, so it is DDIM's).
    """

    name = "dpmpp-2m"
    vp_state = True

    def __init__(self, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon") -> None:
        super().__init__(schedule, sigmas, prediction_type)
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


_SAMPLERS: dict[str, type[Sampler]] = {cls.name: cls for cls in (DDIM, DPMSolverPP2M, Euler, ConsistencyMultistep)}


def make_sampler(name: str, schedule: NoiseSchedule, sigmas: Any, prediction_type: str = "epsilon",
                 eta: float = 0.0) -> Sampler:
    """A fresh sampler (one per request: it may keep multistep history) over the evaluation sigmas."""
    if name not in _SAMPLERS:
        raise UserError(f"sampler {name!r} is not known; expected one of {', '.join(SAMPLER_NAMES)}")
    if name == "ddim":
        return DDIM(schedule, sigmas, prediction_type, eta)
    if eta:
        raise UserError(f"eta applies to the ddim sampler only, not to {name!r}")
    return _SAMPLERS[name](schedule, sigmas, prediction_type)
