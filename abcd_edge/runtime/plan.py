"""A request, planned once: budget -> limit in ms -> context -> cost model -> steps -> placement -> sigmas.

With a calibrated controller, rho < 1 takes the fewest steps whose validated quality is what
rho asks (``Gate.exit_steps``): the request stops early by *planning* fewer steps, so what it
returns is always a finished image, never a mid-trajectory x0. The placement for the planned
n is the one the controller's gate validated for it (its generator's, or the best static).
The anytime loop reads a :class:`RequestPlan`; nothing in it is recomputed per step.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import numpy as np

from abcd_edge.core.budget import Budget, context_vector
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import (DIFFUSERS_PLACEMENT, STATIC_PLACEMENTS, Placement, TimestepPlacement,
                                      density_placement, static_placement)
from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS, SAMPLER_NAMES, max_steps, natural_sampler
from abcd_edge.errors import UserError
from abcd_edge.formats.profile import BatchProfile
from abcd_edge.runtime.cost import CostModel

PLACEMENTS = ("auto", "controller", *STATIC_PLACEMENTS, DIFFUSERS_PLACEMENT)   # diffusers: its scheduler's timesteps
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
    fit_steps: int = 0              # the steps that fit the budget, before rho's exit rule
    reserved_ms: float = 0.0        # taken off the limit before fitting steps (a pipeline's prompt encoding)

    @property
    def below_minimum(self) -> bool:
        return self.limit_ms < self.minimum_ms


def check_request(rho: float, sampler: str, batch: int, placement: str, max_steps_cap: int | None = None) -> None:
    """Refuse a bad request argument with one line naming it and what is accepted."""
    if max_steps_cap is not None and (isinstance(max_steps_cap, bool) or not isinstance(max_steps_cap, numbers.Integral)
                                      or max_steps_cap < 1):
        raise UserError(f"max steps {max_steps_cap!r} must be an integer >= 1")
    if sampler not in SAMPLER_NAMES and sampler not in ("auto", "default"):
        raise UserError(f"sampler {sampler!r} is unknown; accepted: {', '.join(SAMPLER_NAMES)}, auto, default")
    if not (isinstance(rho, numbers.Real) and 0.0 <= rho <= 1.0):
        raise UserError(f"quality {rho!r} is outside [0, 1]; 0 is fastest, 1 best")
    if not isinstance(batch, numbers.Integral) or batch < 1:
        raise UserError(f"batch {batch} must be an integer >= 1")
    if placement not in PLACEMENTS:
        raise UserError(f"placement (--schedule) {placement!r} is unknown; accepted: {', '.join(PLACEMENTS)}")


def resolve_sampler(sampler: str, prediction_type: str) -> str:
    """``--sampler default`` is the artifact's natural sampler (consistency for a consistency model, else
    DDIM); any other name is kept."""
    return natural_sampler(prediction_type) if sampler == "default" else sampler


def auto_sampler(controller, steps_for: Callable[[str], int], fallback: str = "ddim") -> str:
    """``--sampler auto``: the calibrated sampler with the best validated feature-FID at the steps it would
    plan (``steps_for(sampler)``), among those whose gate covers that many steps; ``fallback`` (the artifact's
    natural sampler) without a gate."""
    gate = controller.gate if controller is not None else None
    if gate is None:
        return fallback
    scores = {}
    for name in gate.fid:
        n = max(steps_for(name), 1)
        if n <= gate.steps[name][-1]:
            scores[name] = gate.expected_fid(name, n)
    return min(scores, key=scores.get) if scores else next(iter(gate.fid))


def budget_in_ms(budget: Budget, bp: BatchProfile, profile_name: str, meter: str) -> float:
    """Latency budgets are ms; an energy budget becomes the time its energy lasts at step power."""
    if budget.kind == "latency":
        return budget.ms
    if bp.energy_per_step_mj is None:
        raise UserError(f"energy budget {budget} needs energy per step, but profile {profile_name!r} has none "
                        f"(power meter {meter!r}); profile on a machine with jtop, NVML or readable RAPL")
    return budget.mj / bp.energy_per_step_mj * bp.step.p50_ms


def choose_placement(kind: str, schedule: NoiseSchedule, controller, context: list[float] | None,
                     sampler: str, n: int, scheduler_config: dict | None = None,
                     fallback: str = "uniform") -> Placement:
    """The step placement for n steps: with "auto", what the controller's gate validated for (sampler, n)
    (its generator, or the best static rule; ``fallback`` without a controller or a gate for (sampler, n):
    uniform, or a pipeline's own diffusers timesteps); "controller" forces the generator; a static kind is
    that fixed rule."""
    if kind == "auto":
        gate = controller.gate if controller is not None else None
        validated = gate.placement(sampler, n) if gate is not None else None
        kind = "controller" if validated == "learned" else (validated or fallback)
    if kind == DIFFUSERS_PLACEMENT:
        return TimestepPlacement(schedule, scheduler_config or {}, sampler)
    if kind != "controller":
        return static_placement(kind, schedule)
    if controller is None:
        raise UserError("--placement controller needs a calibrated controller for this artifact (run `make calibrate`)")
    density = controller.density(context, SAMPLER_DESCRIPTORS[sampler], n)
    top = min(controller.spec.log_sigma_max, math.log(schedule.sigma_max))
    return density_placement(density, controller.spec.log_sigma_min, top)


def plan_request(budget: Budget, limit: float, *, rho: float, sampler: str, batch: int, seed: int,
                 best_effort: bool, placement: str, bp: BatchProfile, cost: CostModel, minimum_ms: float,
                 schedule: NoiseSchedule, controller, use_exit_rule: bool = True,
                 prediction_type: str = "epsilon", reserved_ms: float = 0.0,
                 scheduler_config: dict | None = None, fallback_placement: str = "uniform",
                 max_steps_cap: int | None = None) -> RequestPlan:
    """Plan a request (its arguments already passed :func:`check_request`, ``limit`` is the budget in ms):
    the most steps whose *sum* fits the limit, fewer where rho < 1 asks for less (the controller's
    validated exit rule), placed as the controller's gate says or by a rule. The steps are capped at
    RULE_MAX_STEPS (rule-based) or the train timesteps (controller), and at what the sampler and model can
    use (``core.samplers.max_steps``: 8 over a consistency model, whatever the sampler). ``reserved_ms`` (a
    pipeline's prompt encoding at its tail, which runs inside the request clock) is taken off the limit
    before the steps are fitted; the hard rule and the guard still work on the whole limit, since the clock
    counts the encoding. ``scheduler_config`` is what the "diffusers" placement reads; ``fallback_placement``
    is "auto"'s choice where the controller validated nothing (see choose_placement); ``max_steps_cap`` a
    caller's cap on the steps (``--max-steps``)."""
    context = context_vector(limit, bp.flops_per_s, rho) if controller is not None else None
    cap = RULE_MAX_STEPS if controller is None else schedule.num_train_timesteps
    cap = min(cap, max_steps(sampler, prediction_type) or cap, max_steps_cap or cap)
    fit = max(cost.steps_that_fit(limit - reserved_ms, level="sum", cap=cap), 1)
    gate = controller.gate if controller is not None else None
    n = gate.exit_steps(sampler, fit, rho) if gate is not None and use_exit_rule else fit
    place = choose_placement(placement, schedule, controller, context, sampler, n, scheduler_config,
                             fallback=fallback_placement)
    sigmas, positions = place.plan(n)
    return RequestPlan(budget=budget, limit_ms=limit, minimum_ms=minimum_ms, rho=rho, sampler=sampler, batch=batch,
                       seed=seed, best_effort=best_effort, context=context, cost=cost, placement=place,
                       sigmas=sigmas, positions=positions, fit_steps=fit, reserved_ms=reserved_ms)
