"""Step placement: where n sampling steps go on a noise schedule.

- A step schedule is n strictly decreasing sigmas: the noise levels at which the denoiser is
  evaluated. Every sampler goes to sigma = 0 after the last of them.
- A placement kind (uniform, karras, logsnr, or a learned density) maps a mass position
  u in [0, 1) to a sigma; n steps sit at u = k/n.
- An importance density is a non-negative weight over K equal bins of log-sigma, bin 0 the
  lowest, bin K-1 the highest.

numpy only; the density functions also run on torch tensors (calibration backpropagates
through them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import numpy as np

from abcd_edge.core.noise import NoiseSchedule, constant_like, karras_ramp
from abcd_edge.errors import UserError

STATIC_PLACEMENTS = ("uniform", "karras", "logsnr")
KARRAS_RHO = 7.0


@dataclass
class Placement:
    """Where the steps of a request go: sigma at mass position u in [0, 1), counted from sigma_max.

    A plan of n steps sits at u = k/n; re-planning m steps after position u_i puts them at
    u_i + (1 - u_i) k/(m + 1), k = 1..m — the tail of a fresh (m+1)-step plan from where we are.
    """

    kind: str
    sigma_at: Callable[[np.ndarray], np.ndarray]

    def plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        u = np.arange(n) / n
        return self.sigma_at(u), u

    def replan(self, u_now: float, m: int) -> tuple[np.ndarray, np.ndarray]:
        u = u_now + (1 - u_now) * np.arange(1, m + 1) / (m + 1)
        return self.sigma_at(u), u


def static_placement(kind: str, schedule: NoiseSchedule) -> Placement:
    """A fixed rule: time-uniform (trailing, t = T (1 - u) - 1), Karras (rho = 7) or log-SNR uniform."""
    lo, hi = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    if kind == "uniform":
        steps = schedule.num_train_timesteps
        return Placement("uniform", lambda u: schedule.sigma_of_t(steps * (1 - u) - 1))
    if kind == "logsnr":
        return Placement("logsnr", lambda u: np.exp(hi - u * (hi - lo)))
    if kind == "karras":              # Karras et al.'s ramp, at u (the last step above sigma_min)
        return Placement("karras", lambda u: karras_ramp(u, schedule.sigma_min, schedule.sigma_max, KARRAS_RHO))
    raise ValueError(f"placement {kind!r} is not one of {', '.join(STATIC_PLACEMENTS)}")


def density_placement(density: np.ndarray, log_sigma_min: float, log_sigma_max: float,
                      kind: str = "controller") -> Placement:
    """The steps at equal increments of a density's mass (the controller's weight generator)."""
    return Placement(kind, lambda u: np.exp(log_sigma_at_mass(density, u, log_sigma_min, log_sigma_max)))


def time_uniform_sigmas(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """n steps evenly spaced in t from T-1 down (diffusers' "trailing" spacing), at integer timesteps."""
    steps = schedule.num_train_timesteps
    if not 1 <= n <= steps:
        raise ValueError(f"n must be between 1 and the {steps} train timesteps, got {n}")
    return schedule.sigma_of_t(np.round(steps - np.arange(n) * (steps / n)) - 1)


def karras_sigmas(schedule: NoiseSchedule, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) spacing from sigma_max to sigma_min inclusive, as k-diffusion's get_sigmas_karras."""
    return karras_ramp(np.linspace(0, 1, n), schedule.sigma_min, schedule.sigma_max, rho)


def logsnr_uniform_sigmas(schedule: NoiseSchedule, n: int) -> np.ndarray:
    """n steps at equal decrements of log-sigma from sigma_max, the last one decrement above sigma_min.

    This is what sigmas_from_density gives for a uniform density over [log sigma_min, log sigma_max].
    """
    return np.exp(np.linspace(math.log(schedule.sigma_max), math.log(schedule.sigma_min), n + 1)[:-1])


def sigmas_from_density(density: Any, n: int, log_sigma_min: float, log_sigma_max: float, xp: ModuleType = np) -> Any:
    """n decreasing sigmas placed at equal increments of a density's mass, counted from the top.

    density: K non-negative weights (not all zero) over equal bins of log-sigma spanning
    [log_sigma_min, log_sigma_max], bin 0 the lowest. sigma_0 = exp(log_sigma_max); sigma_i is where
    the mass above reaches i/n of the total, with the mass spread evenly inside each bin
    (piecewise-linear inverse CDF). With xp=torch the result is differentiable in density.
    """
    log_sigmas = log_sigma_at_mass(density, np.arange(1, n) / n, log_sigma_min, log_sigma_max, xp)
    return xp.exp(xp.concatenate([constant_like([log_sigma_max], log_sigmas), log_sigmas]))


def log_sigma_at_mass(density: Any, fractions: Any, log_sigma_min: float, log_sigma_max: float,
                      xp: ModuleType = np) -> Any:
    """The inverse CDF: log-sigma where the density's mass above reaches each fraction in [0, 1)."""
    mass = xp.flip(density, (0,))  # highest bin first
    above = xp.cumsum(mass, 0)  # mass above each bin's lower edge
    targets = above[-1] * constant_like(np.asarray(fractions, dtype=np.float64), above)
    k = len(mass)
    # the bin where each target is reached; its mass is > 0, so the division is safe
    j = (above[None, :] < targets[:, None]).sum(1).clip(0, k - 1)
    fraction = (targets - (above[j] - mass[j])) / mass[j]
    return log_sigma_max - (j + fraction) * ((log_sigma_max - log_sigma_min) / k)


def density_of_sigmas(sigmas: np.ndarray, k: int, log_sigma_min: float, log_sigma_max: float,
                      epsilon: float = 1e-3) -> np.ndarray:
    """A K-bin density (summing to 1) whose sigmas_from_density reproduces sigmas to within a bin.

    Step i of n owns the mass 1/n spread evenly over log-sigma between sigma_i and sigma_{i+1}
    (the last step down to log_sigma_min); each bin collects what falls in it. Mixed with
    epsilon of the uniform density so it is strictly positive (a usable KL anchor).
    """
    n = len(sigmas)
    bounds = np.clip(np.log(np.asarray(sigmas, dtype=np.float64)), log_sigma_min, log_sigma_max)
    edges = np.linspace(log_sigma_min, log_sigma_max, k + 1)
    # mass above each bin edge; all of it lies above the bottom edge, even a last step at sigma_min
    above = np.interp(edges, np.append(bounds, log_sigma_min)[::-1], np.arange(n + 1)[::-1] / n)
    above[0] = 1.0
    return (1 - epsilon) * (above[:-1] - above[1:]) + epsilon / k


DIFFUSERS_PLACEMENT = "diffusers"


_EULER_CLASSES = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
_DPM = "DPMSolverMultistepScheduler"
# options of a scheduler config that move diffusers' timesteps or sigmas off what diffusers_timesteps replays
_UNREPLAYED = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
               "use_flow_sigmas", "rescale_betas_zero_snr")


def diffusers_timesteps(config: dict, n: int, sampler: str | None = None) -> np.ndarray:
    """The timesteps diffusers' scheduler uses for n steps (its ``set_timesteps(n)``), under ``config`` (a
    scheduler_config.json dict). The scheduler is the diffusers class of ``sampler``
    (``core.samplers.DIFFUSERS_SCHEDULERS``: DDIM, DPMSolverMultistep, EulerDiscrete, EulerAncestralDiscrete,
    LCM) loaded from the config as ``XScheduler.from_config(config)`` would (keys it lacks take that class's
    defaults); without a sampler, the config's own ``_class_name``.

    ``LCMScheduler``: its skipping-step lattice (``original_inference_steps``, default 50: timesteps
    k (1..50) * T/50 - 1, n of them at floor(linspace(0, 50, n, endpoint=False)) from the top);
    ``DPMSolverMultistepScheduler`` (default "linspace"): n + 1 points with the last dropped (linspace
    round(linspace(0, T - 1, n + 1)), leading (0..n) * (T // (n + 1)) + offset; trailing as below);
    Euler (default "linspace"): float timesteps, fractional under linspace (linspace(0, T - 1, n) in float32);
    any other (DDIMScheduler, PNDM, DDPM): ``timestep_spacing`` (default "leading") with ``steps_offset``, as
    DDIMScheduler.set_timesteps: leading (0..n-1) * (T // n) reversed + offset; trailing round(T, T - T/n,
    ...) - 1; linspace round(linspace(0, T - 1, n)) reversed. Integer timesteps come back as int64, Euler's as
    float64. n is capped at what the scheduler accepts (LCM: its original steps). One departure: where
    diffusers' "trailing" float arange overshoots and appends a timestep -1 (n = 61, T = 1000: 62 timesteps, the
    last indexing alphas_cumprod[-1], pure noise), that -1 is dropped: n timesteps, the last at 15.
    """
    from abcd_edge.core.samplers import DIFFUSERS_SCHEDULERS

    if sampler is not None and sampler not in DIFFUSERS_SCHEDULERS:
        raise UserError(f"sampler {sampler!r} has no diffusers scheduler; expected one of "
                         f"{', '.join(DIFFUSERS_SCHEDULERS)}")
    unreplayed = [key for key in _UNREPLAYED if config.get(key)]
    if config.get("interpolation_type", "linear") != "linear":
        unreplayed.append(f"interpolation_type={config['interpolation_type']!r}")
    if unreplayed:
        raise UserError(f"scheduler config sets {', '.join(unreplayed)}: diffusers' timesteps for it are not "
                         f"replayed; use another placement")
    cls = DIFFUSERS_SCHEDULERS[sampler] if sampler is not None else config.get("_class_name")
    steps = int(config.get("num_train_timesteps", 1000))
    offset = int(config.get("steps_offset", 0))
    if cls == "CMStochasticIterativeScheduler":
        raise UserError("the consistency sampler has no diffusers timestep spacing; use another placement")
    if cls == "LCMScheduler":
        original = int(config.get("original_inference_steps", 50))
        n = min(n, original)
        origin = (np.arange(1, original + 1) * (steps // original) - 1)[::-1]
        return origin[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]
    n = min(n, steps)
    euler = cls in _EULER_CLASSES
    spacing = config.get("timestep_spacing", "linspace" if euler or cls == _DPM else "leading")
    if euler:                           # float timesteps (fractional under linspace), else as DDIM's
        if spacing == "linspace":
            return np.linspace(0, steps - 1, n, dtype=np.float32)[::-1].astype(np.float64)
        return diffusers_timesteps({**config, "timestep_spacing": spacing}, n, "ddim").astype(np.float64)
    if cls == _DPM:                     # n + 1 points, the last (t = 0) dropped; "trailing" as DDIM's
        if config.get("lambda_min_clipped", -math.inf) != -math.inf:
            raise UserError("a finite lambda_min_clipped is not replayed; use another placement")
        if spacing == "linspace":
            return np.linspace(0, steps - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if spacing == "leading":
            return (np.arange(n + 1) * (steps // (n + 1))).round()[::-1][:-1].astype(np.int64) + offset
    if spacing == "linspace":
        return np.linspace(0, steps - 1, n).round()[::-1].astype(np.int64)
    if spacing == "trailing":     # diffusers' float arange can end at ~0, giving a stray t = -1 (e.g. n = 61): dropped
        timesteps = np.round(np.arange(steps, 0, -steps / n)).astype(np.int64) - 1
        return timesteps[timesteps >= 0]
    if spacing == "leading":
        return (np.arange(n) * (steps // n)).round()[::-1].astype(np.int64) + offset
    raise UserError(f"timestep_spacing {spacing!r} is not one of leading, trailing, linspace")


def diffusers_sigmas(schedule: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """The sigmas diffusers steps at ``timesteps``: the train sigmas linearly interpolated (np.interp, as its
    Euler schedulers do at fractional timesteps); exactly ``schedule.sigma_of_t`` at integer timesteps."""
    t = np.asarray(timesteps, dtype=np.float64)
    return np.interp(t, np.arange(schedule.num_train_timesteps, dtype=np.float64), schedule.sigmas)


class TimestepPlacement(Placement):
    """diffusers' own timesteps (:func:`diffusers_timesteps`): ``plan(n)`` gives exactly the sigmas of the
    timesteps diffusers' scheduler would use for n steps (the runtime then steps what diffusers' pipeline
    steps); re-planning places the rest on the log-sigma line through the plan's points (extended one
    interval below its last, so every position u < 1 has a positive, strictly smaller sigma).
    ``sampler``: whose diffusers scheduler class sets the timesteps (see diffusers_timesteps)."""

    def __init__(self, schedule: NoiseSchedule, config: dict, sampler: str | None = None):
        self.schedule, self.config, self.sampler = schedule, dict(config), sampler
        self._knots: tuple[np.ndarray, np.ndarray] | None = None
        super().__init__(DIFFUSERS_PLACEMENT, self._sigma_at)

    def plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        sigmas = diffusers_sigmas(self.schedule, diffusers_timesteps(self.config, n, self.sampler))
        m = len(sigmas)                      # fewer than n where the scheduler caps the steps
        u = np.arange(m) / m
        logs = np.log(sigmas)
        end = logs[-1] - (logs[-2] - logs[-1]) if m > 1 else math.log(self.schedule.sigma_min) - 1.0
        self._knots = (np.append(u, 1.0), np.append(logs, end))
        return sigmas, u

    def _sigma_at(self, u: np.ndarray) -> np.ndarray:
        if self._knots is None:
            raise RuntimeError("a diffusers placement is re-planned only after plan(n)")
        return np.exp(np.interp(np.asarray(u, np.float64), *self._knots))
