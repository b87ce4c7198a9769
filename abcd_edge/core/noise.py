"""Noise schedules: betas -> alphas_cumprod -> sigma, and the timestep <-> sigma maps.

Conventions used throughout the package:

- sigma is the k-diffusion / VE noise level, sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]),
  so that x_VE = x0 + sigma * eps and the VP sample the UNet sees is x_VE / sqrt(1 + sigma^2).
- Where the n sampling steps go is a *placement* (core/placement.py), not a noise schedule.

numpy only: the runtime imports this module on devices without torch. The few functions that
must also run on torch tensors (for calibration) take the array namespace from their input.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def array_namespace(x: Any) -> ModuleType:
    """numpy, or torch when x is a torch tensor (found without ever importing torch here)."""
    if type(x).__module__.split(".")[0] == "torch":
        return sys.modules["torch"]
    return np


def constant_like(values: Any, like: Any) -> Any:
    """values as an array of like's kind, dtype and device (numpy array or torch tensor)."""
    if array_namespace(like) is np:
        return np.asarray(values, dtype=np.asarray(like).dtype)
    return like.new_tensor(values)


def _linspace_float32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace(start, end, steps, dtype=float32), value for value.

    Betas are float32 in diffusers, and the model was trained on exactly those, so we build them
    the same way: float32 end points and step, each point start + step*i (or end - step*(steps-1-i)
    in the upper half) rounded once.
    """
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64(np.float32((end32 - start32) / np.float32(steps - 1))) if steps > 1 else 0.0
    i = np.arange(steps)
    points = np.where(i < steps // 2, np.float64(start32) + step * i, np.float64(end32) - step * (steps - 1 - i))
    return points.astype(np.float32)


def _cosine_betas(steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The squaredcos_cap_v2 betas (improved DDPM), as diffusers' betas_for_alpha_bar computes them."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)],
                    dtype=np.float32)


def karras_ramp(ramp: np.ndarray, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """Karras et al. (2022) eq. 5: sigma at ramp in [0, 1], sigma_max at 0 and sigma_min at 1."""
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete diffusion noise schedule, held as alphas_cumprod (float64, one per train timestep).

    ``clip_sample`` is the range x0 estimates are clipped to (diffusers' ``clip_sample`` /
    ``clip_sample_range``), or None. DDPM-style models trained on [-1, 1] data need it: their
    x0 estimate at high noise is badly conditioned, and unclipped samples saturate.
    """

    alphas_cumprod: np.ndarray
    clip_sample: float | None = None

    def __post_init__(self) -> None:
        ac = np.asarray(self.alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError(f"alphas_cumprod must be a 1-D array of at least 2 values, got shape {ac.shape}")
        if not (np.all(ac > 0) and np.all(ac < 1) and np.all(np.diff(ac) < 0)):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1 and strictly decrease")
        ac.setflags(write=False)
        object.__setattr__(self, "alphas_cumprod", ac)

    @classmethod
    def from_config(cls, cfg: dict) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config dict, equal to that scheduler's alphas_cumprod.

        Accepts an explicit "alphas_cumprod" list; the beta schedules linear, scaled_linear and
        squaredcos_cap_v2 (or "trained_betas"); or a consistency-model config (sigma_min, sigma_max,
        rho and no beta_schedule, as CMStochasticIterativeScheduler), whose Karras sigmas over the
        train steps become alphas_cumprod = 1 / (1 + sigma^2).
        """
        clip = float(cfg.get("clip_sample_range", 1.0)) if cfg.get("clip_sample") else None
        if cfg.get("alphas_cumprod") is not None:
            return cls(np.asarray(cfg["alphas_cumprod"], dtype=np.float64), clip)
        steps = int(cfg.get("num_train_timesteps", 1000))
        if "beta_schedule" not in cfg and "rho" in cfg:
            ramp = 1 - np.arange(steps) / (steps - 1)  # train step t has the CM's sigma at ramp 1 - t/(T-1)
            sigmas = karras_ramp(ramp, cfg.get("sigma_min", 0.002), cfg.get("sigma_max", 80.0), cfg["rho"])
            return cls(1 / (1 + sigmas ** 2), clip)
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True gives an infinite sigma_max; such schedules are not "
                             "supported")
        schedule = cfg.get("beta_schedule", "linear")
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], dtype=np.float32)
        elif schedule == "linear":
            betas = _linspace_float32(cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02), steps)
        elif schedule == "scaled_linear":
            betas = _linspace_float32(cfg.get("beta_start", 1e-4) ** 0.5, cfg.get("beta_end", 0.02) ** 0.5, steps) ** 2
        elif schedule == "squaredcos_cap_v2":
            betas = _cosine_betas(steps)
        else:
            raise ValueError(f"beta_schedule {schedule!r} is not supported; "
                             f"expected one of {', '.join(BETA_SCHEDULES)}")
        # torch.cumprod accumulates float32 in double and rounds each product to float32
        return cls(np.cumprod((1 - betas).astype(np.float64)).astype(np.float32).astype(np.float64), clip)

    def to_config(self) -> dict:
        """A JSON-ready dict that from_config turns back into this exact schedule."""
        cfg = {"num_train_timesteps": self.num_train_timesteps, "alphas_cumprod": self.alphas_cumprod.tolist()}
        if self.clip_sample is not None:
            cfg.update(clip_sample=True, clip_sample_range=self.clip_sample)
        return cfg

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigmas(self) -> np.ndarray:
        """The VE sigma of each train timestep, increasing with t."""
        return np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_of_t(self, t: Any) -> Any:
        """Sigma at continuous timestep(s) t in [0, T-1], linear in log-sigma between train steps.

        Exact at integer t. Works on numpy arrays, floats and torch tensors (differentiable in t).
        """
        xp = array_namespace(t)
        t = np.asarray(t, dtype=np.float64) if xp is np else (t if t.is_floating_point() else t.double())
        last = self.num_train_timesteps - 1
        low = xp.floor(t).clip(0, last)
        w = t - low
        low_i = low.astype(np.int64) if xp is np else low.long()
        sigmas = constant_like(self.sigmas, t)
        # sigma_low * ratio**w rather than exp(log-interpolation): exact when w == 0
        return sigmas[low_i] * (sigmas[(low_i + 1).clip(0, last)] / sigmas[low_i]) ** w

    def t_of_sigma(self, sigma: Any, interpolation: str = "log") -> Any:
        """Continuous timestep(s) of sigma, the inverse of sigma_of_t, clamped to [0, T-1].

        Linear interpolation of log-sigma over t, as diffusers' EulerDiscreteScheduler._sigma_to_t;
        ``interpolation="linear"``: of sigma itself, the inverse of the np.interp by which diffusers' Euler
        schedulers place sigmas at fractional timesteps. Both are exact at integer timesteps.
        Works on numpy arrays, floats and torch tensors (differentiable in sigma).
        """
        xp = array_namespace(sigma)
        sigma = np.asarray(sigma, dtype=np.float64) if xp is np else sigma
        if interpolation == "log":
            value, table = xp.log(sigma.clip(1e-10, None)), np.log(self.sigmas)
        elif interpolation == "linear":
            value, table = sigma, self.sigmas
        else:
            raise ValueError(f"interpolation {interpolation!r} is not one of log, linear")
        knots = constant_like(table, value)
        low = ((knots <= value[..., None]).sum(-1) - 1).clip(0, self.num_train_timesteps - 2)
        w = ((value - knots[low]) / (knots[low + 1] - knots[low])).clip(0, 1)
        return low + w
