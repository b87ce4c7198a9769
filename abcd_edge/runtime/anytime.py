"""The anytime rules, as hooks of the one step loop (core/loop.py).

* before a step: the hard rule  elapsed + next step's tail + finishing > B  -> stop ("budget");
* during it: the guard abandons a call still running when only finishing is left ("guard");
* after the call: its time corrects the cost model; when behind the plan, the rest of the
  schedule is re-placed into the steps that still fit (re-planning), so the last step still
  goes to low noise and the image comes out finished.

What rho asks for is decided once, at planning (``runtime.plan``): there is no per-step exit.
"""
from __future__ import annotations

import numpy as np

from abcd_edge.core.loop import NoHooks
from abcd_edge.core.samplers import Sampler
from abcd_edge.runtime.plan import RequestPlan


class AnytimeRules(NoHooks):
    """The hooks one request runs under; they also keep what the report needs of each step."""

    def __init__(self, plan: RequestPlan, clock):
        self.plan, self.clock = plan, clock
        self.cost = plan.cost
        self.positions = plan.positions
        self.replans = 0
        self.predicted: list[float] = []          # the tail the hard rule used, per completed step
        self.predicted_median: list[float] = []   # p50 x correction, per completed step
        self._pending = (0.0, 0.0)

    def _exempt(self, i: int) -> bool:
        """--best-effort: the first step always runs, unguarded."""
        return self.plan.best_effort and i == 0

    def before_step(self, i: int, sampler: Sampler) -> str | None:
        tail = self.cost.next_step_ms()
        self._pending = (tail, self.cost.step_p50_ms * self.cost.correction)
        if not self._exempt(i) and not self.cost.may_start(self.clock.elapsed_ms(), self.plan.limit_ms, tail):
            return "budget"
        return None

    def guard_ms(self, i: int) -> float | None:
        return None if self._exempt(i) else self.cost.guard_ms(self.plan.limit_ms)

    def after_call(self, i: int, sampler: Sampler, ms: float) -> None:
        self.cost.observe(ms)
        remaining = len(sampler) - (i + 1)
        if remaining > 0:     # behind the plan? re-plan the rest into the steps that still fit
            fit = self.cost.steps_that_fit(self.plan.limit_ms - self.clock.elapsed_ms(), level="sum", cap=remaining)
            if 1 <= fit < remaining:
                future, u = self.plan.placement.replan(float(self.positions[i]), fit)
                sampler.replan(i, future)
                self.positions = np.concatenate([self.positions[: i + 1], u])
                self.replans += 1
        self.predicted.append(round(self._pending[0], 4))
        self.predicted_median.append(round(self._pending[1], 4))
