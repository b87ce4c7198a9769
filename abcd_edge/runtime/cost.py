"""The cost model: what a step and finishing cost, and the one answer to "how many steps fit".

The runtime, calibration and the bench all ask :class:`CostModel`; it is built
from one batch of a device profile (:meth:`CostModel.from_profile`) and scaled by
the online correction (:class:`OnlineCorrection`), which only the runtime updates.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from abcd_edge.core.samplers import SAMPLER_BASE
from abcd_edge.formats.profile import BatchProfile

EWMA_ALPHA = 0.3
GUARD_SLACK_MS = 1.0       # watchdog wake-up + unwinding an abandoned call (OS scheduling, measured ~0.1-0.5 ms)
ABANDON_FRACTION = 0.15    # ORT checks `terminate` between kernels: an abandon waits for the kernel in flight,
                           # up to this share of a step (seen: 2.4 ms on a 16 ms batch-4 step)
TAIL_WINDOW_STEPS = 256    # the observed step tail: 99th percentile of the last 256 steps' measured / p50,
TAIL_MIN_STEPS = 32        # once at least 32 were measured
SUM_Z = 2.33               # the 99 % level of a normal sum of step times


@dataclass
class CostModel:
    """Step and finishing latency: the tail for the hard rule, mean and spread for planning.

    Everything scales with the online correction, an EWMA of measured / profile-p50 step time.
    The step tail is the larger of the profile's (times the correction) and the tail of the
    steps measured lately: a machine noisier now than when it was profiled widens it.
    """

    step_p50_ms: float
    step_tail_ms: float
    finish_tail_ms: float
    sampler_tail_ms: float
    decision_tail_ms: float
    step_mean_ms: float = 0.0
    step_std_ms: float = 0.0
    finish_p50_ms: float = 0.0
    sampler_p50_ms: float = 0.0
    correction: float = 1.0
    observed_tail_ratio: float = 0.0   # 99th percentile of recent measured / p50 steps (0: none yet)

    @classmethod
    def from_profile(cls, bp: BatchProfile, sampler: str, decision_tail_ms: float = 0.0,
                     tails: tuple[float, float] | None = None, correction: float = 1.0,
                     observed_tail_ratio: float = 0.0) -> "CostModel":
        """From one batch of a profile; ``tails`` (step, finishing) replace the profile's p99s when given."""
        step_tail, finish_tail = tails if tails is not None else (bp.step.p99_ms, bp.finish.p99_ms)
        # a profile older than a sampler times it as its base (samplers.SAMPLER_BASE: lcm -> consistency, ...)
        own = bp.sampler_ms.get(sampler) or bp.sampler_ms[SAMPLER_BASE.get(sampler, sampler)]
        return cls(step_p50_ms=bp.step.p50_ms, step_tail_ms=step_tail, finish_tail_ms=finish_tail,
                   sampler_tail_ms=own.p99_ms, decision_tail_ms=decision_tail_ms,
                   step_mean_ms=bp.step.mean_ms, step_std_ms=bp.step.cv * bp.step.mean_ms,
                   finish_p50_ms=bp.finish.p50_ms, sampler_p50_ms=own.p50_ms,
                   correction=correction, observed_tail_ratio=observed_tail_ratio)

    @property
    def guard_slack_ms(self) -> float:
        """Time kept free after the guard fires: wake-up, the kernel in flight, unwinding."""
        return GUARD_SLACK_MS + ABANDON_FRACTION * self.step_p50_ms * self.correction

    def next_step_ms(self) -> float:
        """The tail of the next step (denoiser + sampler + decision): what the hard rule adds."""
        tail = max(self.step_tail_ms * self.correction, self.step_p50_ms * self.observed_tail_ratio)
        return tail + self.sampler_tail_ms + self.decision_tail_ms

    @property
    def median_step_ms(self) -> float:
        """A step at its p50 (denoiser + sampler), no margin: BuCo-MWG's frozen surrogate."""
        return self.step_p50_ms + self.sampler_p50_ms

    def minimum_ms(self) -> float:
        """The smallest achievable response: one step + finishing at the tail, and the guard's slack."""
        return self.next_step_ms() + self.finish_tail_ms + self.guard_slack_ms

    def may_start(self, elapsed_ms: float, limit_ms: float, next_step_ms: float | None = None) -> bool:
        """The hard rule: elapsed + the next step's tail + finishing + slack must fit the limit."""
        tail = self.next_step_ms() if next_step_ms is None else next_step_ms
        return elapsed_ms + tail + self.finish_tail_ms + self.guard_slack_ms <= limit_ms

    def guard_ms(self, limit_ms: float) -> float:
        """When a step still running must be abandoned: only finishing (and the slack) left."""
        return limit_ms - self.finish_tail_ms - self.guard_slack_ms

    def observe(self, measured_ms: float) -> None:
        ratio = measured_ms / self.step_p50_ms
        self.correction = (1 - EWMA_ALPHA) * self.correction + EWMA_ALPHA * ratio

    def steps_that_fit(self, available_ms: float, level: str = "tail", cap: int | None = None) -> int:
        """How many steps fit ``available_ms``; the one formula every caller uses.

        ``level`` says how the steps are costed:

        * ``"tail"``   each step at its tail (n x p99 + finishing tail + slack <= B): a static
                       schedule, which has no guard, can only plan this way (the bench's K);
        * ``"sum"``    the *sum* of n steps at the 99 % level, n mean + 2.33 sqrt(n) std, plus one
                       tail and finishing (the anytime plan: the hard rule, re-planning and the
                       guard still protect each step, so it may plan far closer to the limit);
        * ``"median"`` each step at its p50 with no margin (BuCo-MWG's frozen surrogate, the oracle).
        """
        if level == "tail":
            n = int((available_ms - self.finish_tail_ms - self.guard_slack_ms) // self.next_step_ms())
        elif level == "median":
            n = int((available_ms - self.finish_p50_ms - GUARD_SLACK_MS) // self.median_step_ms)
        elif level == "sum":
            n = self._steps_whose_sum_fits(available_ms, cap if cap is not None else 1000)
        else:
            raise ValueError(f"level {level!r} is not one of tail, sum, median")
        n = max(n, 0)
        return n if cap is None else min(n, cap)

    def budget_for(self, n: int, spare_steps: float = 0.5) -> float:
        """The inverse of the tail level: a budget in which n steps fit with ``spare_steps`` of a step to spare."""
        return self.finish_tail_ms + self.guard_slack_ms + (n + spare_steps) * self.next_step_ms()

    def _steps_whose_sum_fits(self, available_ms: float, cap: int) -> int:
        mean = self.step_mean_ms * self.correction + self.sampler_tail_ms + self.decision_tail_ms
        std = self.step_std_ms * self.correction
        spare = available_ms - self.finish_tail_ms - self.guard_slack_ms - (self.next_step_ms() - mean)
        if cap * mean + SUM_Z * math.sqrt(cap) * std <= spare:
            return cap
        # n mean + z sqrt(n) std <= spare is a quadratic in sqrt(n)
        root = (-SUM_Z * std + math.sqrt((SUM_Z * std) ** 2 + 4 * mean * max(spare, 0.0))) / (2 * mean)
        return max(min(int(root * root + 1e-9), cap), 0)

    def physical_limit(self, available_ms: float, step_ms: float | None = None) -> int:
        """floor((B - finishing p50) / step): the most steps the device could do, no margin at all.

        ``step_ms`` defaults to the profile's p50 (pass a measured median to judge a run)."""
        return math.floor((available_ms - self.finish_p50_ms) / (step_ms or self.step_p50_ms))


@dataclass
class OnlineCorrection:
    """What a session learns across requests: the EWMA correction and the recent measured / p50 ratios."""

    correction: float = 1.0
    step_ratios: dict[int, deque] = field(default_factory=dict)   # per batch

    def observed_tail_ratio(self, batch: int) -> float:
        ratios = self.step_ratios.get(batch)
        if ratios is None or len(ratios) < TAIL_MIN_STEPS:
            return 0.0
        return float(np.quantile(np.fromiter(ratios, float), 0.99))

    def update(self, batch: int, cost: CostModel, measured_ms: list[float]) -> None:
        """After a request: keep its correction; a request that took no step learned nothing,
        so the correction relaxes towards the profile (never sticky)."""
        self.correction = (cost.correction if measured_ms
                           else 1.0 + (cost.correction - 1.0) * (1 - EWMA_ALPHA))
        ratios = self.step_ratios.setdefault(batch, deque(maxlen=TAIL_WINDOW_STEPS))
        ratios.extend(m / cost.step_p50_ms for m in measured_ms)
