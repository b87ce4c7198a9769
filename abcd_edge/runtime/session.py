"""The anytime session: a warm denoiser with its profile, controller, meter and clock. numpy + onnxruntime only.

A request has a budget B. It is planned once (runtime/plan.py): the most steps
whose sum fits B (fewer where rho < 1 asks for less), placed as the controller's
gate validated. The one step loop (core/loop.py) runs it under the anytime rules
(runtime/anytime.py): the hard rule before each step, the guard during it, the
online correction and re-planning after the call. The image is the last x0
estimate, never a noisy x_t.

Collaborators are passed in; :meth:`AnytimeRuntime.open` finds or measures them
for the CLI::

    with AnytimeRuntime.open("export/demo", backend="ort-cpu", threads=2) as rt:
        images, report = rt.generate(parse_budget("150ms"))
"""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from abcd_edge.core.budget import Budget, parse_budget
from abcd_edge.core.images import check_image_channels, to_uint8
from abcd_edge.core.loop import LoopInterrupted, run_steps
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.samplers import make_sampler
from abcd_edge.device.clock import WallClock
from abcd_edge.device.power import NoneMeter
from abcd_edge.errors import UserError
from abcd_edge.formats.controller import cost_features
from abcd_edge.formats.manifest import Manifest
from abcd_edge.formats.profile import DeviceProfile
from abcd_edge.runtime.anytime import AnytimeRules
from abcd_edge.runtime.cost import CostModel, OnlineCorrection
from abcd_edge.runtime.plan import (RULE_MAX_STEPS, RequestPlan, auto_sampler, budget_in_ms, check_request, plan_request,
                                    resolve_sampler)
from abcd_edge.runtime.report import REPORT_SCHEMA_VERSION, RequestReport

COST_PREDICTOR_TOLERANCE = 0.10   # the predictor's step tail may differ this much from the profile's p99
WARMUP_CALLS = 5           # warm-up (see _warm_up): steady when the median of the last 5 calls
WARMUP_TOLERANCE = 1.25    # is within 1.25 x the profile's step p50,
WARMUP_MAX_S = 5.0         # or gives up (with a note) after 5 s per batch
WALL_CLOCK_NOTE = "monotonic, from the call to the image in hand; files are written after the clock stops"


class RequestInterrupted(KeyboardInterrupt):
    """Ctrl-C during a request's steps. ``images`` and ``report`` (exit_reason "interrupted") are the
    answer so far: the last completed step's x0; both None when no step finished."""

    def __init__(self, images: np.ndarray | None, report: RequestReport | None):
        super().__init__()
        self.images, self.report = images, report


class AnytimeRuntime:
    """A warm session over one artifact's denoiser. One request at a time (a lock guards it);
    use one instance per thread for parallel requests. A context manager: ``close()`` on exit."""

    def __init__(self, denoiser, manifest: Manifest, profile: DeviceProfile, *, controller=None, meter=None,
                 clock=None, online: OnlineCorrection | None = None, manifest_hash: str = "",
                 artifact_dir: str | Path = "", profile_path: str | Path = "", controller_dir: str | Path | None = None,
                 notes: list[str] | None = None, warm_up: bool = True):
        check_image_channels(manifest.channels, f"artifact {str(artifact_dir or manifest.name)!r}")
        self.denoiser, self.manifest, self.profile = denoiser, manifest, profile
        self.schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        self.controller = controller
        self.meter = meter if meter is not None else NoneMeter()
        self.clock = clock if clock is not None else WallClock()
        self.online = online if online is not None else OnlineCorrection()
        self.manifest_hash = manifest_hash
        self.artifact_dir, self.profile_path = str(artifact_dir), str(profile_path)     # as given ("" unknown)
        self.controller_dir = None if controller_dir is None else str(controller_dir)
        self.backend = getattr(denoiser, "backend", profile.backend)
        self.notes: list[str] = list(notes or [])
        self._predicted_tails = self._cost_predictor_tails()
        self._lock = threading.Lock()
        if warm_up:
            self._warm_up()

    @classmethod
    def open(cls, artifact_dir: str | Path | None = None, profile: str | Path | None = None,
             controller: str | Path | None = "auto", backend: str = "ort-cpu", threads: int | None = None,
             power: str = "auto", clock=None, quick_profile_runs: int = 60, denoiser=None,
             precision: str = "fp32") -> "AnytimeRuntime":
        """Find or measure what a session needs (see runtime/discover.py) and open it warm."""
        from abcd_edge.runtime.discover import discover

        parts = discover(artifact_dir, profile=profile, controller=controller, backend=backend, threads=threads,
                         power=power, simulated=getattr(clock, "simulated", False),
                         quick_profile_runs=quick_profile_runs, denoiser=denoiser, precision=precision)
        return cls(parts.denoiser, parts.manifest, parts.profile, controller=parts.controller, meter=parts.meter,
                   clock=clock, manifest_hash=parts.manifest_hash, artifact_dir=parts.artifact_dir,
                   profile_path=parts.profile_path, controller_dir=parts.controller_dir, notes=parts.notes)

    def __enter__(self) -> "AnytimeRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.clock.close()
        self.meter.close()

    # ------------------------------------------------------------------------------------ setup
    def _warm_up(self) -> None:
        """Run every profiled batch through the denoiser until it steps at the profile's pace.

        A fresh session's first calls are slow: on the GPU, cuDNN searches its
        convolution algorithms, the memory arena grows and the clocks ramp up
        from idle (measured on an H200: 0.7-0.9 s for the first call against
        2.4-2.9 ms warm). The guard cannot cut a GPU call short, and a call it abandons
        may leave the search unfinished, so this has to happen here, outside any
        deadline: calls continue until the median of the last WARMUP_CALLS is
        within WARMUP_TOLERANCE of the profile's p50, or has stopped improving on
        the calls before (a machine busier than when it was profiled), or
        WARMUP_MAX_S has passed.
        On a simulated clock (a replayed profile of another device) the pace is
        not comparable, so WARMUP_CALLS calls are all.
        """
        simulated = getattr(self.clock, "simulated", False)
        shape = (self.manifest.channels, self.manifest.resolution, self.manifest.resolution)
        for bp in self.profile.batches:
            sample = np.zeros((bp.batch, *shape), np.float32)
            timestep = np.full(bp.batch, self.schedule.num_train_timesteps // 2, np.float32)
            times: list[float] = []
            t_end = time.perf_counter() + WARMUP_MAX_S
            while True:
                t0 = time.perf_counter()
                self.denoiser(sample, timestep)
                times.append((time.perf_counter() - t0) * 1e3)
                recent = float(np.median(times[-WARMUP_CALLS:]))
                steady = len(times) >= WARMUP_CALLS and (
                    simulated or recent <= WARMUP_TOLERANCE * bp.step.p50_ms
                    # slower than the profile (a busy machine) but no longer getting faster: as warm as it gets
                    or (len(times) >= 4 * WARMUP_CALLS
                        and recent >= 0.95 * float(np.median(times[-4 * WARMUP_CALLS:-WARMUP_CALLS]))))
                if steady or time.perf_counter() > t_end:
                    break
            self.notes.append(f"warm-up batch {bp.batch}: {len(times)} calls in {sum(times):.0f} ms, first "
                              f"{times[0]:.1f} ms, last {times[-1]:.1f} ms (profile p50 {bp.step.p50_ms:.2f} ms)"
                              + ("" if steady else "; still getting faster: the first requests may run slow"))

    def _cost_predictor_tails(self) -> tuple[float, float] | None:
        """The controller's (step, finishing) tails for batch 1, where it may be trusted, else None (noted).

        Only inside what it was trained on (batch-1 profiles of its backends), and only
        while it agrees with this device's measured p99 within COST_PREDICTOR_TOLERANCE:
        the profile is a measurement of this very device, the predictor a model fitted
        on a few others; where they disagree the measurement wins.
        """
        if self.controller is None:
            return None
        if self.backend not in self.controller.meta.cost_backends:
            self.notes.append(f"cost predictor calibrated on {', '.join(self.controller.meta.cost_backends) or 'no'} "
                              f"backend(s), not {self.backend}: step and finishing tails come from the profile")
            return None
        bp = self.profile.for_batch(1)
        tails = self.controller.predict_cost_ms(cost_features(bp.step.p50_ms, bp.step.p99_ms, bp.finish.p50_ms,
                                                              bp.finish.p99_ms, 1, self.backend, 1.0))
        if abs(tails[0] / bp.step.p99_ms - 1) > COST_PREDICTOR_TOLERANCE:
            self.notes.append(f"cost predictor's step tail {tails[0]:.2f} ms disagrees with the profile's measured "
                              f"p99 {bp.step.p99_ms:.2f} ms by more than {COST_PREDICTOR_TOLERANCE:.0%}: "
                              "the profile's tails are used")
            return None
        return tails

    # ------------------------------------------------------------------------------------ planning
    def uses_cost_predictor(self, batch: int) -> bool:
        return batch == 1 and self._predicted_tails is not None

    def cost_model(self, batch: int, sampler: str, correction: float | None = None) -> CostModel:
        """The cost model of this session for (batch, sampler), at the running correction unless one is given."""
        return CostModel.from_profile(
            self.profile.for_batch(batch), sampler,
            tails=self._predicted_tails if self.uses_cost_predictor(batch) else None,
            correction=self.online.correction if correction is None else correction,
            observed_tail_ratio=self.online.observed_tail_ratio(batch))

    def minimum_ms(self, batch: int = 1, sampler: str = "ddim") -> float:
        """The smallest achievable response: one step + finishing at the profile's tail.

        Uses the profile (correction 1), not the running correction: a refused request takes no
        step, so a minimum that followed the correction could never come back down.
        """
        return self.cost_model(batch, sampler, correction=1.0).minimum_ms()

    def plan(self, budget: Budget | str, rho: float = 1.0, sampler: str = "default", seed: int = 0, batch: int = 1,
             best_effort: bool = False, placement: str = "auto", use_exit_rule: bool = True) -> RequestPlan:
        """Plan one request (refusing a budget below the minimum unless ``best_effort``). ``sampler``
        "default" is the artifact's natural one (consistency for a consistency model, else DDIM). ``budget``
        is a Budget or its text ("150ms", "2J")."""
        budget = parse_budget(budget) if isinstance(budget, str) else budget
        check_request(rho, sampler, batch, placement)
        bp = self.profile.for_batch(batch)
        limit = budget_in_ms(budget, bp, self.profile_path, self.profile.power.meter)
        prediction = self.manifest.prediction_type
        sampler = resolve_sampler(sampler, prediction)
        if sampler == "auto":
            sampler = auto_sampler(self.controller, lambda s: self.cost_model(batch, s).steps_that_fit(
                limit, level="sum", cap=RULE_MAX_STEPS), fallback=resolve_sampler("default", prediction))
        cost = self.cost_model(batch, sampler)
        minimum = dataclasses.replace(cost, correction=1.0).minimum_ms()   # as minimum_ms(), from the same model
        if limit < minimum and not best_effort:
            raise UserError(f"budget {budget} is below the smallest achievable response on this device "
                            f"({minimum:.2f} ms: one step + finishing at the profile's tail); "
                            "raise the budget or pass --best-effort")
        return plan_request(budget, limit, rho=rho, sampler=sampler, batch=batch, seed=seed,
                            best_effort=best_effort, placement=placement, bp=bp, cost=cost, minimum_ms=minimum,
                            schedule=self.schedule, controller=self.controller, use_exit_rule=use_exit_rule,
                            prediction_type=prediction)

    # ------------------------------------------------------------------------------------ serving
    def generate(self, budget: Budget | str, rho: float = 1.0, sampler: str = "default", seed: int = 0, batch: int = 1,
                 best_effort: bool = False, placement: str = "auto", use_exit_rule: bool = True,
                 clock=None) -> tuple[np.ndarray, RequestReport]:
        """One request: images uint8 [batch,H,W,3] made before the deadline, and its report.

        ``clock`` runs this request on another clock than the session's (the bench's
        per-stream replay clocks). Ctrl-C during the steps raises :class:`RequestInterrupted`
        carrying the last completed step's images and a report with exit_reason "interrupted"
        (both None when no step finished)."""
        clock = clock if clock is not None else self.clock
        with self._lock:
            plan = self.plan(budget, rho, sampler, seed, batch, best_effort, placement, use_exit_rule)
            rng = np.random.default_rng(seed)
            shape = (batch, self.manifest.channels, self.manifest.resolution, self.manifest.resolution)
            noise = rng.standard_normal(shape).astype(np.float32)
            smp = make_sampler(plan.sampler, self.schedule, plan.sigmas, self.manifest.prediction_type)
            rules = AnytimeRules(plan, clock)

            self.meter.start()
            clock.start()
            try:
                result = run_steps(self.denoiser, smp, noise, rng=rng, clock=clock, hooks=rules)
                interrupted = False
            except LoopInterrupted as exc:        # Ctrl-C: the last completed step's x0 is still an answer
                result, interrupted = exc.result, True
                n = result.steps
                rules.predicted, rules.predicted_median = rules.predicted[:n], rules.predicted_median[:n]
            clock.disarm()
            images = to_uint8(np.asarray(result.x0, np.float32))
            latency = clock.elapsed_ms()
            reading = self.meter.stop()
            measured = [round(ms, 4) for ms in result.step_ms]
            self.online.update(batch, plan.cost, result.step_ms)
        reason = "best-effort" if best_effort and result.reason == "done" and plan.below_minimum else result.reason
        report = self._report(plan, smp, rules, reason, measured, latency, reading, clock)
        if interrupted:
            raise RequestInterrupted(images if result.steps else None, report if result.steps else None)
        return images, report

    def _report(self, plan: RequestPlan, smp, rules: AnytimeRules, reason: str, measured: list[float],
                latency: float, reading, clock) -> RequestReport:
        budget = plan.budget
        if budget.kind == "latency":
            met = latency <= plan.limit_ms
        else:
            spent = (reading.energy_mj if reading.energy_mj is not None
                     else len(measured) * self.profile.for_batch(plan.batch).energy_per_step_mj)
            met = spent <= budget.mj
        energy_source = "meter" if reading.energy_mj is not None else ("profile" if budget.kind == "energy" else None)
        return RequestReport(
            schema_version=REPORT_SCHEMA_VERSION, budget=str(budget), budget_kind=budget.kind,
            budget_ms=budget.value if budget.kind == "latency" else None,
            budget_mj=budget.value if budget.kind == "energy" else None,
            latency_ms=round(latency, 4), deadline_met=bool(met), steps=len(measured),
            planned_steps=len(plan.sigmas), fit_steps=plan.fit_steps, replans=rules.replans, exit_reason=reason,
            sampler=plan.sampler,
            schedule=plan.placement.kind, sigmas=[round(float(s), 6) for s in smp.sigmas], rho=plan.rho,
            seed=plan.seed, batch=plan.batch, predicted_step_ms=rules.predicted,
            predicted_median_step_ms=rules.predicted_median, measured_step_ms=measured,
            correction=round(plan.cost.correction, 5), energy_mj=reading.energy_mj, avg_power_w=reading.avg_w,
            power_meter=reading.meter, energy_source=energy_source,
            clock="simulated (profile replay)" if clock.simulated else WALL_CLOCK_NOTE,
            artifact=self.artifact_dir, manifest_hash=self.manifest_hash, profile=self.profile_path,
            profile_device=self.profile.device_id,
            controller=(self.controller_dir or "(passed in)") if self.controller is not None else None,
            notes=list(self.notes) + list(reading.warnings),
        )
