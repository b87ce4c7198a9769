"""The one step loop: a sampler over a denoiser, from noise to the x0 estimate.

Every caller runs its steps through :func:`run_steps` — the anytime runtime,
every static baseline of the bench, the teachers, the runtime bench's bare loop
and the calibration traces. What differs between them is said through hooks::

    before_step(i, sampler) -> reason | None   may I start step i? (a reason stops the loop)
    guard_ms(i)            -> float | None    abandon step i's call at this clock time
    after_call(i, sampler, ms)                 the call's measured time; may re-plan the
                                               sigmas after i (sampler.replan) before step i
    after_step(i, sampler, x0_prev, x0) -> reason | None   may I stop now?

and a ``callback(i, x0)`` that sees every x0 estimate (histories, traces).

Noise is drawn as the runtime always drew it: the initial noise is given, and a
stochastic sampler takes fresh noise from ``rng`` after each completed call.
Conditioning inputs (class labels; text embeddings and guidance later) are
passed to every denoiser call as keyword arguments. The loop is array-agnostic:
on torch tensors (a denoiser adapter over the diffusers UNet) calibration
backpropagates through it to the sigmas.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from abcd_edge.core.noise import constant_like
from abcd_edge.core.samplers import Sampler


class Hooks(Protocol):
    def before_step(self, i: int, sampler: Sampler) -> str | None: ...

    def guard_ms(self, i: int) -> float | None: ...

    def after_call(self, i: int, sampler: Sampler, ms: float) -> None: ...

    def after_step(self, i: int, sampler: Sampler, x0_prev: np.ndarray, x0: np.ndarray) -> str | None: ...


class NoHooks:
    """Run every step, no guard: the plain fixed-schedule loop."""

    def before_step(self, i: int, sampler: Sampler) -> str | None:
        return None

    def guard_ms(self, i: int) -> float | None:
        return None

    def after_call(self, i: int, sampler: Sampler, ms: float) -> None:
        pass

    def after_step(self, i: int, sampler: Sampler, x0_prev: np.ndarray, x0: np.ndarray) -> str | None:
        return None


class StopBelow(NoHooks):
    """StepDrop: stop before the first step (after the first) whose sigma is below a threshold."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def before_step(self, i: int, sampler: Sampler) -> str | None:
        return "stepdrop" if i > 0 and float(sampler.sigmas[i]) < self.sigma else None


class PerfClock:
    """A clock that only times calls (perf_counter): no deadline, nothing abandoned."""

    simulated = False

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self._t0) * 1e3

    def run_step(self, call, abandon, guard_ms):
        t0 = time.perf_counter()
        return call(), (time.perf_counter() - t0) * 1e3

    def disarm(self) -> None:
        pass


@dataclass
class LoopResult:
    """What a loop returns: the last x0 estimate, why it ended and each completed step's measured time."""

    x0: np.ndarray
    reason: str                  # done | a hook's reason | guard
    step_ms: list[float] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.step_ms)


class LoopInterrupted(KeyboardInterrupt):
    """Ctrl-C inside :func:`run_steps`, carrying the result so far: the last completed step's x0 (zeros
    when none finished), reason "interrupted", and the completed steps' times. Still a KeyboardInterrupt,
    so a caller that does not look for it stops as before."""

    def __init__(self, result: LoopResult):
        super().__init__()
        self.result = result


def run_steps(denoiser: Callable[..., np.ndarray], sampler: Sampler, noise: np.ndarray, *,
              rng: np.random.Generator | None = None, clock: Any = None, hooks: Hooks | None = None,
              conditioning: dict[str, np.ndarray] | None = None,
              callback: Callable[[int, np.ndarray], None] | None = None) -> LoopResult:
    """Step ``sampler`` from ``noise`` through ``denoiser`` until done or a hook stops it.

    The clock (started by the caller; default: perf_counter timing) runs each call
    so that a guard can abandon it. Before any step the x0 estimate is zeros (the
    data mean). The sampler may be re-planned by ``after_call`` while it runs: the
    loop re-reads its length each step. Ctrl-C raises :class:`LoopInterrupted` with the result so far.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    clock = clock if clock is not None else PerfClock()
    hooks = hooks if hooks is not None else NoHooks()
    conditioning = conditioning or {}
    abandon = getattr(denoiser, "abandon", lambda: None)
    x = sampler.prepare(noise)
    x0 = noise * 0          # numpy float32 or a torch tensor: the loop is array-agnostic
    result = LoopResult(x0=x0, reason="done")
    completed = 0           # steps whose x0 is in x0 (Ctrl-C may land between a step's parts)
    i = -1
    try:
        while i + 1 < len(sampler):
            i += 1
            reason = hooks.before_step(i, sampler)
            if reason is not None:
                result.reason = reason
                break
            sample, t = sampler.model_input(x, i)
            out, ms = clock.run_step(lambda: denoiser(sample, t, **conditioning), abandon, hooks.guard_ms(i))
            if out is None:
                result.reason = "guard"
                break
            hooks.after_call(i, sampler, ms)
            step_noise = constant_like(rng.standard_normal(noise.shape), x) if sampler.stochastic else None
            x, new_x0 = sampler.step(x, i, out, noise=step_noise)
            result.step_ms.append(ms)
            if callback is not None:
                callback(i, new_x0)
            reason = hooks.after_step(i, sampler, x0, new_x0)
            x0, completed = new_x0, i + 1
            if reason is not None:
                result.reason = reason
                break
    except KeyboardInterrupt:
        raise LoopInterrupted(LoopResult(x0=x0, reason="interrupted", step_ms=result.step_ms[:completed])) from None
    result.x0 = x0
    return result


def sample(denoiser: Callable[..., np.ndarray], sampler: Sampler, noise: np.ndarray,
           rng: np.random.Generator | None = None, keep_x0: bool = False,
           conditioning: dict[str, np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every step of ``sampler`` from ``noise``: (final x0, the x0 after each step if asked).

    The fixed-schedule run of teachers, evaluations and traces."""
    history: list[np.ndarray] = []
    result = run_steps(denoiser, sampler, noise, rng=rng, conditioning=conditioning,
                       callback=(lambda i, x0: history.append(x0)) if keep_x0 else None)
    return result.x0, history
