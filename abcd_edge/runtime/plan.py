"""A request, planned once: budget -> limit in ms -> context -> cost model -> placement -> sigmas.

The anytime loop reads a :class:`RequestPlan`; nothing in it is recomputed per step.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from abcd_edge.core.budget import Budget, context_vector
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import STATIC_PLACEMENTS, Placement, density_placement, static_placement
from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS, SAMPLER_NAMES
from abcd_edge.errors import UserError
from abcd_edge.formats.profile import BatchProfile
from abcd_edge.runtime.cost import CostModel

PLACEMENTS = ("auto", "controller", *STATIC_PLACEMENTS)
RULE_MAX_STEPS = 200       # the rule-based plan never goes past the teacher's step count


@dataclass
class RequestPlan:
    """Everything one request needs before its clock starts."""

    budget: Budget
    limit_ms: float                 # the budget as time (an energy budget: how long it lasts at step power)
    minimum_ms: float               # the smallest achievable response (profile tail, correction 1)
    rho: float
    sampler: str
    batch: int
    seed: int
    best_effort: bool
    context: list[float] | None     # the controller's c = [log B, log F, rho]; None without a controller
    cost: CostModel                 # this request's copy: the loop updates its correction
    placement: Placement
    sigmas: np.ndarray
    positions: np.ndarray           # mass position u of each planned step

    @property
    def below_minimum(self) -> bool:
        return self.limit_ms < self.minimum_ms


def check_request(rho: float, sampler: str, batch: int, placement: str) -> None:
    """Refuse a bad request argument with one line naming it and what is accepted."""
    if sampler not in SAMPLER_NAMES:
        raise UserError(f"sampler {sampler!r} is unknown; accepted: {', '.join(SAMPLER_NAMES)}")
    if not (isinstance(rho, numbers.Real) and 0.0 <= rho <= 1.0):
        raise UserError(f"quality {rho!r} is outside [0, 1]; 0 is fastest, 1 best")
    if not isinstance(batch, numbers.Integral) or batch < 1:
        raise UserError(f"batch {batch} must be an integer >= 1")
    if placement not in PLACEMENTS:
        raise UserError(f"placement (--schedule) {placement!r} is unknown; accepted: {', '.join(PLACEMENTS)}")


def budget_in_ms(budget: Budget, bp: BatchProfile, profile_name: str, meter: str) -> float:
    """Latency budgets are ms; an energy budget becomes the time its energy lasts at step power."""
    if budget.kind == "latency":
        return budget.ms
    if bp.energy_per_step_mj is None:
        raise UserError(f"energy budget {budget} needs energy per step, but profile {profile_name!r} has none "
                        f"(power meter {meter!r}); profile on a machine with jtop, NVML or readable RAPL")
    return budget.mj / bp.energy_per_step_mj * bp.step.p50_ms


def choose_placement(kind: str, schedule: NoiseSchedule, controller, context: list[float] | None,
                     sampler: str) -> Placement:
    """The step placement for a request: the controller's density ("auto" when calibrated), or a fixed rule."""
    if kind == "auto":
        kind = "controller" if controller is not None else "uniform"
    if kind != "controller":
        return static_placement(kind, schedule)
    if controller is None:
        raise UserError("--schedule controller needs a calibrated controller for this artifact (run `make calibrate`)")
    density = controller.density(context, SAMPLER_DESCRIPTORS[sampler])
    top = min(controller.spec.log_sigma_max, math.log(schedule.sigma_max))
    return density_placement(density, controller.spec.log_sigma_min, top)


def plan_request(budget: Budget, limit: float, *, rho: float, sampler: str, batch: int, seed: int,
                 best_effort: bool, placement: str, bp: BatchProfile, cost: CostModel, minimum_ms: float,
                 schedule: NoiseSchedule, controller) -> RequestPlan:
    """Plan a request (its arguments already passed :func:`check_request`, ``limit`` is the budget in ms):
    the most steps whose *sum* fits the limit, placed by the controller or a rule."""
    context = context_vector(limit, bp.flops_per_s, rho) if controller is not None else None
    cap = RULE_MAX_STEPS if controller is None else schedule.num_train_timesteps
    n = max(cost.steps_that_fit(limit, level="sum", cap=cap), 1)
    place = choose_placement(placement, schedule, controller, context, sampler)
    sigmas, positions = place.plan(n)
    return RequestPlan(budget=budget, limit_ms=limit, minimum_ms=minimum_ms, rho=rho, sampler=sampler, batch=batch,
                       seed=seed, best_effort=best_effort, context=context, cost=cost, placement=place,
                       sigmas=sigmas, positions=positions)
