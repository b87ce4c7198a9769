"""Planning with a calibrated controller: the gate's placement, rho's exit rule and --sampler auto."""
from __future__ import annotations

import numpy as np

from abcd_edge.core.budget import parse_budget
from abcd_edge.formats.controller import Controller, Gate
from abcd_edge.runtime.plan import auto_sampler


class _GateOnly:
    def __init__(self, gate):
        self.gate = gate


def test_auto_sampler_takes_the_best_validated_fid_it_covers():
    gate = Gate(steps={"ddim": [2, 4, 8, 16], "euler": [2, 4, 8]},
                placements={"ddim": ["uniform"] * 4, "euler": ["uniform"] * 3},
                fid={"ddim": [40.0, 20.0, 10.0, 8.0], "euler": [30.0, 15.0, 12.0]})
    assert auto_sampler(_GateOnly(gate), lambda s: 4) == "euler"        # 15 < 20
    assert auto_sampler(_GateOnly(gate), lambda s: 8) == "ddim"         # 10 < 12
    assert auto_sampler(_GateOnly(gate), lambda s: 12) == "ddim"        # euler was not validated at 12 steps
    assert auto_sampler(None, lambda s: 4) == "ddim"


def test_exit_rule_plans_fewer_finished_steps_below_rho_1(calibrated, tiny_artifact, fixed_profile, step_clock):
    from abcd_edge.runtime.session import AnytimeRuntime

    out, _ = calibrated
    ctl = Controller.load(out)
    with AnytimeRuntime.open(tiny_artifact, profile=fixed_profile, controller=out, threads=1, power="none",
                             clock=step_clock(1.0)) as rt:
        reports = {rho: rt.generate(parse_budget("12ms"), rho=rho, seed=3)[1] for rho in (0.0, 0.5, 1.0)}
        auto = rt.generate(parse_budget("12ms"), sampler="auto")[1]
    full = reports[1.0]
    assert full.planned_steps == full.fit_steps >= 5
    for rho, rep in reports.items():
        assert rep.fit_steps == full.fit_steps and rep.deadline_met
        assert rep.planned_steps == ctl.gate.exit_steps("ddim", rep.fit_steps, rho)
        assert rep.exit_reason == "done" and rep.steps == rep.planned_steps      # a finished image, never cut
        assert rep.sigmas[-1] < rep.sigmas[0] and len(rep.sigmas) == rep.planned_steps
    assert reports[0.0].planned_steps <= reports[0.5].planned_steps <= full.planned_steps
    assert auto.sampler == "ddim"                                              # the only calibrated sampler
    assert np.isfinite(full.latency_ms)
