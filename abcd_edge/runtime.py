"""The anytime loop: plan, step, exit, deadline guard, report. numpy + onnxruntime only.

A request has a budget B. The loop plans a schedule that fits B at the
profile's tail, runs the sampler step by step, and before each step checks the
hard rule  elapsed + predicted next step + finishing > B.  The prediction is the
profile's tail (or the calibrated cost predictor) times an online correction,
an EWMA of measured / predicted-median step time kept within and across
requests. A watchdog abandons a step still running when only the finishing time
is left, and the image is made from the last x0 estimate: the answer is never
late because of one slow step. The image is the sampler's x0 estimate, never a
noisy x_t.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from abcd_edge import paths
from abcd_edge.budget import Budget, context_vector
from abcd_edge.errors import UserError
from abcd_edge.profiler import DeviceProfile

REPORT_SCHEMA_VERSION = 1
EWMA_ALPHA = 0.3
GUARD_SLACK_MS = 1.0       # watchdog wake-up + unwinding an abandoned call (OS scheduling, measured ~0.1-0.5 ms)
ABANDON_FRACTION = 0.15    # ORT checks `terminate` between kernels: an abandon waits for the kernel in flight,
                           # up to this share of a step (seen: 2.4 ms on a 16 ms batch-4 step)
TAIL_WINDOW_STEPS = 256    # the observed step tail: 99th percentile of the last 256 steps' measured / p50,
TAIL_MIN_STEPS = 32        # once at least 32 were measured
COST_PREDICTOR_TOLERANCE = 0.25   # the predictor's step tail may differ this much from the profile's p99
WARMUP_CALLS = 5           # warm-up (see _warm_up): steady when the median of the last 5 calls
WARMUP_TOLERANCE = 1.25    # is within 1.25 x the profile's step p50,
WARMUP_MAX_S = 5.0         # or gives up (with a note) after 5 s per batch
RULE_MAX_STEPS = 200       # the rule-based plan never goes past the teacher's step count
SCHEDULES = ("auto", "controller", "uniform", "karras", "logsnr")


@dataclass
class RequestReport:
    schema_version: int
    budget: str
    budget_kind: str
    budget_ms: float | None
    budget_mj: float | None
    latency_ms: float
    deadline_met: bool
    steps: int
    planned_steps: int
    replans: int                # times the rest of the schedule was re-placed into fewer steps
    exit_reason: str            # budget | quality | guard | done | best-effort
    sampler: str
    schedule: str
    sigmas: list[float]
    rho: float
    seed: int
    batch: int
    predicted_step_ms: list[float]     # the tail the hard rule used (incl. sampler + decision time)
    predicted_median_step_ms: list[float]  # profile p50 x the online correction (denoiser only)
    measured_step_ms: list[float]
    correction: float
    energy_mj: float | None
    avg_power_w: float | None
    power_meter: str
    energy_source: str | None
    clock: str
    artifact: str
    manifest_hash: str
    profile: str
    profile_device: str
    controller: str | None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def summary_line(self) -> str:
        energy = (f"{self.energy_mj:.1f} mJ ({self.power_meter})" if self.energy_mj is not None
                  else "no power meter")
        limit = f"{self.budget_ms:.1f} ms" if self.budget_ms is not None else f"{self.budget_mj:.0f} mJ"
        met = "met" if self.deadline_met else "MISSED"
        return (f"{self.steps}/{self.planned_steps} steps ({self.sampler}, {self.schedule}), exit: {self.exit_reason}, "
                f"latency {self.latency_ms:.1f} ms vs budget {limit} ({met}), {energy}")


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
    correction: float = 1.0
    observed_tail_ratio: float = 0.0   # 99th percentile of recent measured / p50 steps (0: none yet)

    @property
    def guard_slack_ms(self) -> float:
        """Time kept free after the guard fires: wake-up, the kernel in flight, unwinding."""
        return GUARD_SLACK_MS + ABANDON_FRACTION * self.step_p50_ms * self.correction

    def next_step_ms(self) -> float:
        """The tail of the next step (denoiser + sampler + decision): what the hard rule adds."""
        tail = max(self.step_tail_ms * self.correction, self.step_p50_ms * self.observed_tail_ratio)
        return tail + self.sampler_tail_ms + self.decision_tail_ms

    def observe(self, measured_ms: float) -> None:
        ratio = measured_ms / self.step_p50_ms
        self.correction = (1 - EWMA_ALPHA) * self.correction + EWMA_ALPHA * ratio

    def steps_that_fit(self, available_ms: float) -> int:
        """The most steps whose tail each fits: K for static schedules (n x p99 + finishing <= B)."""
        return max(int((available_ms - self.finish_tail_ms - self.guard_slack_ms) // self.next_step_ms()), 0)

    def steps_expected_to_fit(self, available_ms: float, cap: int = 1000) -> int:
        """The most steps whose *sum* fits at the 99 % level: n mean + 2.33 sqrt(n) std + one tail + finishing.

        Step times are roughly independent, so n steps cost about n x mean with spread sqrt(n) x std,
        far less than n x p99. The anytime loop can plan this way because the hard rule, the
        re-planning and the guard still protect each step; a static schedule cannot.
        """
        mean = self.step_mean_ms * self.correction + self.sampler_tail_ms + self.decision_tail_ms
        std = self.step_std_ms * self.correction
        spare = available_ms - self.finish_tail_ms - self.guard_slack_ms - (self.next_step_ms() - mean)
        if cap * mean + 2.33 * math.sqrt(cap) * std <= spare:
            return cap
        # n mean + z sqrt(n) std <= spare is a quadratic in sqrt(n)
        root = (-2.33 * std + math.sqrt((2.33 * std) ** 2 + 4 * mean * max(spare, 0.0))) / (2 * mean)
        return max(min(int(root * root + 1e-9), cap), 0)


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


def profiles_for(manifest_hash: str, device: str | None = None, search: list[Path] | None = None) -> list[Path]:
    """Profiles in ``search`` (default: profiles/) measured for this artifact (and device kind, if given)."""
    found = []
    for folder in search or [paths.PROFILES_DIR]:
        for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if (isinstance(data, dict) and data.get("manifest_hash") == manifest_hash
                    and (device is None or data.get("device_id") == device)):
                found.append(path)
    return found


class AnytimeRuntime:
    """A warm session: the artifact's denoiser, its device profile, and the controller if calibrated.

    One instance serves requests one at a time (a lock guards it); use one
    instance per thread for parallel requests.
    """

    def __init__(self, artifact_dir: str | Path = paths.DEMO_ARTIFACT_DIR, profile: str | Path | None = None,
                 controller: str | Path | None = "auto", backend: str = "ort-cpu", threads: int | None = None,
                 power: str = "auto", clock=None, quick_profile_runs: int = 60):
        import threading

        from abcd_edge import hardware, telemetry
        from abcd_edge.backends import open_denoiser
        from abcd_edge.clock import WallClock
        from abcd_edge.manifest import load_manifest, manifest_hash
        from abcd_edge.profiler import load_profile, measure_profile
        from abcd_edge.schedules import NoiseSchedule

        self.artifact_dir = Path(artifact_dir)
        if not (self.artifact_dir / "manifest.json").is_file():
            raise UserError(f"artifact {str(self.artifact_dir)!r} has no manifest.json; "
                            "export one with `abcd-edge export --model demo --out export/demo`")
        self.manifest = load_manifest(self.artifact_dir)
        self.manifest_hash = manifest_hash(self.artifact_dir)
        self.schedule = NoiseSchedule.from_config(self.manifest.scheduler_config)
        self.backend, self.threads = backend, threads
        self.denoiser = open_denoiser(self.artifact_dir, backend=backend, threads=threads)
        self.notes: list[str] = []
        device = hardware.device_id(backend, threads)
        if profile is None:
            matches = profiles_for(self.manifest_hash, device, [paths.PROFILES_DIR, paths.user_cache_dir()])
            found = matches[0] if matches else None
            if found is None:
                cache = paths.user_cache_dir() / f"{device}-{self.manifest_hash[:12]}.json"
                print(f"abcd-edge: no profile for device {device} and this artifact; measuring a quick one "
                      f"({quick_profile_runs} steps) -> {cache}", file=sys.stderr)
                measured = measure_profile(self.artifact_dir, backend=backend, threads=threads,
                                           runs=quick_profile_runs, warmup=10, power=power, progress=False,
                                           command="(auto quick profile by abcd-edge run)")
                measured.save(cache)
                found = cache
            profile = found
        self.profile_path = Path(profile)
        self.profile: DeviceProfile = load_profile(self.profile_path, self.manifest_hash)
        simulated = clock is not None and getattr(clock, "simulated", False)
        if self.profile.device_id != device and not simulated:
            raise UserError(f"profile {str(self.profile_path)!r} was measured on device {self.profile.device_id!r}, "
                            f"this is {device!r}; a foreign profile is never used to keep deadlines on the wall clock "
                            "(profile this machine, or replay it on a simulated clock with `abcd-edge bench`)")
        self.controller = self._load_controller(controller)
        self._predicted_tails = self._cost_predictor_tails()
        self.meter = telemetry.open_meter(power if power != "auto" else self.profile.power.meter
                                          if self.profile.power.meter != "none" else "auto")
        self.clock = clock or WallClock()
        self.correction = 1.0
        self._step_ratios: dict[int, deque] = {}   # recent measured / p50 step times, per batch
        self._lock = threading.Lock()
        self._warm_up()

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

    def _load_controller(self, controller):
        from abcd_edge.controller import Controller

        if controller is None:
            return None
        if controller == "auto":
            folder = paths.CALIBRATION_DIR / self.manifest.name
            if not (folder / "controller.json").is_file():
                self.notes.append(f"no calibrated controller under {folder}; rule-based plan (uniform schedule, "
                                  "most steps that fit at the profile's p99)")
                return None
            try:
                return Controller.load(folder, self.manifest_hash)
            except UserError as exc:
                self.notes.append(f"calibrated controller not used: {exc}")
                return None
        return Controller.load(controller, self.manifest_hash)

    # ------------------------------------------------------------------------------------
    def cost_model(self, batch: int, sampler: str) -> CostModel:
        bp = self.profile.for_batch(batch)
        step_tail = bp.step.p99_ms
        finish_tail = bp.finish.p99_ms
        if self.uses_cost_predictor(batch):
            step_tail, finish_tail = self._predicted_tails
        return CostModel(step_p50_ms=bp.step.p50_ms, step_tail_ms=step_tail, finish_tail_ms=finish_tail,
                         sampler_tail_ms=bp.sampler_ms[sampler].p99_ms,
                         decision_tail_ms=self.profile.controller_decision.p99_ms if self.controller else 0.0,
                         step_mean_ms=bp.step.mean_ms, step_std_ms=bp.step.cv * bp.step.mean_ms,
                         correction=self.correction, observed_tail_ratio=self._observed_tail_ratio(batch))

    def _observed_tail_ratio(self, batch: int) -> float:
        ratios = self._step_ratios.get(batch)
        if ratios is None or len(ratios) < TAIL_MIN_STEPS:
            return 0.0
        return float(np.quantile(np.fromiter(ratios, float), 0.99))

    def uses_cost_predictor(self, batch: int) -> bool:
        return batch == 1 and self._predicted_tails is not None

    def _cost_predictor_tails(self) -> tuple[float, float] | None:
        """The controller's (step, finishing) tails for batch 1, where it may be trusted, else None (noted).

        Only inside what it was trained on (batch-1 profiles of its backends), and only
        while it agrees with this device's measured p99 within COST_PREDICTOR_TOLERANCE:
        the profile is a measurement of this very device, the predictor a model fitted
        on a few others; where they disagree the measurement wins.
        """
        from abcd_edge.controller import cost_features

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

    def minimum_ms(self, batch: int = 1, sampler: str = "ddim") -> float:
        """The smallest achievable response: one step + finishing at the profile's tail.

        Uses the profile (correction 1), not the running correction: a refused request takes no
        step, so a minimum that followed the correction could never come back down.
        """
        cm = self.cost_model(batch, sampler)
        cm.correction = 1.0
        return cm.next_step_ms() + cm.finish_tail_ms + cm.guard_slack_ms

    def placement(self, schedule: str, budget: Budget, rho: float, sampler: str, batch: int) -> Placement:
        """The step placement for a request: the controller's density, or a fixed rule."""
        from abcd_edge.samplers import SAMPLER_DESCRIPTORS
        from abcd_edge.schedules import log_sigma_at_mass

        if schedule == "auto":
            schedule = "controller" if self.controller is not None else "uniform"
        lo, hi = math.log(self.schedule.sigma_min), math.log(self.schedule.sigma_max)
        if schedule == "controller":
            if self.controller is None:
                raise UserError("--schedule controller needs a calibrated controller for this artifact "
                                "(run `make calibrate`)")
            density = self.controller.density(self.context(budget, rho, batch), SAMPLER_DESCRIPTORS[sampler])
            top = min(self.controller.spec.log_sigma_max, hi)
            return Placement("controller", lambda u: np.exp(log_sigma_at_mass(
                density, u, self.controller.spec.log_sigma_min, top)))
        if schedule == "uniform":          # time-uniform, trailing: t = T (1 - u) - 1
            steps = self.schedule.num_train_timesteps
            return Placement("uniform", lambda u: self.schedule.sigma_of_t(steps * (1 - u) - 1))
        if schedule == "logsnr":
            return Placement("logsnr", lambda u: np.exp(hi - u * (hi - lo)))
        rho_k = 7.0                         # Karras et al.'s ramp, at u (the last step above sigma_min)
        a, b = self.schedule.sigma_max ** (1 / rho_k), self.schedule.sigma_min ** (1 / rho_k)
        return Placement("karras", lambda u: (a + u * (b - a)) ** rho_k)

    def plan(self, budget: Budget, rho: float, sampler: str, batch: int, schedule: str
             ) -> tuple[Placement, np.ndarray, np.ndarray]:
        """(placement, sigmas, mass positions) of the steps that are expected to fit the budget."""
        cm = self.cost_model(batch, sampler)
        cap = RULE_MAX_STEPS if self.controller is None else self.schedule.num_train_timesteps
        n = max(cm.steps_expected_to_fit(self._budget_in_ms(budget, batch), cap=cap), 1)
        placement = self.placement(schedule, budget, rho, sampler, batch)
        sigmas, u = placement.plan(n)
        return placement, sigmas, u

    def context(self, budget: Budget, rho: float, batch: int) -> list[float]:
        return context_vector(self._budget_in_ms(budget, batch), self.profile.for_batch(batch).flops_per_s, rho)

    def _budget_in_ms(self, budget: Budget, batch: int) -> float:
        """Latency budgets are ms; an energy budget becomes the time its energy lasts at step power."""
        if budget.kind == "latency":
            return budget.ms
        bp = self.profile.for_batch(batch)
        if bp.energy_per_step_mj is None:
            raise UserError(f"energy budget {budget} needs energy per step, but profile "
                            f"{str(self.profile_path)!r} has none (power meter {self.profile.power.meter!r}); "
                            "profile on a machine with jtop, NVML or readable RAPL")
        return budget.mj / bp.energy_per_step_mj * bp.step.p50_ms

    # ------------------------------------------------------------------------------------
    def generate(self, budget: Budget, rho: float = 1.0, sampler: str = "ddim", seed: int = 0, batch: int = 1,
                 best_effort: bool = False, schedule: str = "auto", use_exit_policy: bool = True,
                 ) -> tuple[np.ndarray, RequestReport]:
        """One request: images uint8 [batch,H,W,3] made before the deadline, and its report."""
        from abcd_edge.controller import decision_features
        from abcd_edge.demo.data import to_uint8
        from abcd_edge.samplers import SAMPLER_DESCRIPTORS, SAMPLER_NAMES, make_sampler

        if sampler not in SAMPLER_NAMES:
            raise UserError(f"sampler {sampler!r} is unknown; accepted: {', '.join(SAMPLER_NAMES)}")
        if not 0.0 <= rho <= 1.0:
            raise UserError(f"quality {rho!r} is outside [0, 1]; 0 is fastest, 1 best")
        if batch < 1:
            raise UserError(f"batch {batch} must be >= 1")
        if schedule not in SCHEDULES:
            raise UserError(f"schedule {schedule!r} is unknown; accepted: {', '.join(SCHEDULES)}")
        with self._lock:
            limit_ms = self._budget_in_ms(budget, batch)
            minimum = self.minimum_ms(batch, sampler)
            if limit_ms < minimum and not best_effort:
                raise UserError(f"budget {budget} is below the smallest achievable response on this device "
                                f"({minimum:.2f} ms: one step + finishing at the profile's tail); "
                                "raise the budget or pass --best-effort")
            placement, sigmas, positions = self.plan(budget, rho, sampler, batch, schedule)
            planned_steps = len(sigmas)
            replans = 0
            rng = np.random.default_rng(seed)
            shape = (batch, self.manifest.channels, self.manifest.resolution, self.manifest.resolution)
            noise = rng.standard_normal(shape).astype(np.float32)
            smp = make_sampler(sampler, self.schedule, sigmas, self.manifest.prediction_type)
            ctx = self.context(budget, rho, batch) if self.controller is not None else None
            cm = self.cost_model(batch, sampler)
            predicted, predicted_median, measured = [], [], []
            x0 = np.zeros(shape, np.float32)     # the estimate before any step: the data mean
            reason = "done"

            self.meter.start()
            self.clock.start()
            x = smp.prepare(noise)
            n, i = len(smp), -1
            while i + 1 < n:           # n shrinks when the rest of the schedule is re-planned
                i += 1
                pred, pred_median = cm.next_step_ms(), cm.step_p50_ms * cm.correction
                if (self.clock.elapsed_ms() + pred + cm.finish_tail_ms + cm.guard_slack_ms > limit_ms
                        and not (best_effort and i == 0)):
                    reason = "budget"
                    break
                sample, t = smp.model_input(x, i)
                guard = None if best_effort and i == 0 else limit_ms - cm.finish_tail_ms - cm.guard_slack_ms
                out, step_ms = self.clock.run_step(lambda: self.denoiser(sample, t), self.denoiser.abandon, guard)
                if out is None:
                    reason = "guard"
                    break
                cm.observe(step_ms)
                remaining = n - (i + 1)
                if remaining > 0:     # behind the plan? re-plan the rest into the steps that still fit
                    fit = cm.steps_expected_to_fit(limit_ms - self.clock.elapsed_ms(), cap=remaining)
                    if 1 <= fit < remaining:
                        future, u = placement.replan(float(positions[i]), fit)
                        smp.replan(i, future)
                        positions = np.concatenate([positions[: i + 1], u])
                        n, replans = len(smp), replans + 1
                step_noise = rng.standard_normal(shape).astype(np.float32) if smp.stochastic else None
                x, new_x0 = smp.step(x, i, out, noise=step_noise)
                consult = self.controller is not None and use_exit_policy and rho < 1.0 and i < n - 1
                change = float(np.mean((new_x0 - x0) ** 2)) if consult else 0.0
                x0 = new_x0
                predicted.append(round(pred, 4))
                predicted_median.append(round(pred_median, 4))
                measured.append(round(step_ms, 4))
                # rho = 1 asks for every bit of quality the budget allows: the policy is not consulted
                if consult:
                    h = decision_features(float(smp.sigmas[i]), change, (i + 1) / n,
                                          self.clock.elapsed_ms() / limit_ms, ctx, SAMPLER_DESCRIPTORS[sampler])
                    if self.controller.p_stop(h) > self.controller.spec.threshold:
                        reason = "quality"
                        break
            self.clock.disarm()
            images = to_uint8(np.asarray(x0, np.float32))
            latency = self.clock.elapsed_ms()
            reading = self.meter.stop()
            # a request that took no step learned nothing: let the correction relax towards the profile
            self.correction = cm.correction if measured else 1.0 + (cm.correction - 1.0) * (1 - EWMA_ALPHA)
            ratios = self._step_ratios.setdefault(batch, deque(maxlen=TAIL_WINDOW_STEPS))
            ratios.extend(m / cm.step_p50_ms for m in measured)
            if best_effort and reason == "done" and limit_ms < minimum:
                reason = "best-effort"
        energy_source = None
        if reading.energy_mj is not None:
            energy_source = "meter"
        elif budget.kind == "energy":
            energy_source = "profile"
        report = RequestReport(
            schema_version=REPORT_SCHEMA_VERSION, budget=str(budget), budget_kind=budget.kind,
            budget_ms=budget.value if budget.kind == "latency" else None,
            budget_mj=budget.value if budget.kind == "energy" else None,
            latency_ms=round(latency, 4),
            deadline_met=bool(latency <= limit_ms) if budget.kind == "latency" else
            bool((reading.energy_mj if reading.energy_mj is not None else
                  len(measured) * self.profile.for_batch(batch).energy_per_step_mj) <= budget.mj),
            steps=len(measured), planned_steps=planned_steps, replans=replans, exit_reason=reason, sampler=sampler,
            schedule=placement.kind, sigmas=[round(float(s), 6) for s in smp.sigmas], rho=rho, seed=seed,
            batch=batch, predicted_step_ms=predicted,
            predicted_median_step_ms=predicted_median, measured_step_ms=measured,
            correction=round(cm.correction, 5),
            energy_mj=reading.energy_mj, avg_power_w=reading.avg_w, power_meter=reading.meter,
            energy_source=energy_source,
            clock=("simulated (profile replay)" if self.clock.simulated else
                   "monotonic, from the call to the image in hand; files are written after the clock stops"),
            artifact=str(self.artifact_dir), manifest_hash=self.manifest_hash, profile=str(self.profile_path),
            profile_device=self.profile.device_id,
            controller=str(paths.CALIBRATION_DIR / self.manifest.name) if self.controller is not None else None,
            notes=list(self.notes) + list(reading.warnings),
        )
        return images, report

    def close(self) -> None:
        self.clock.close()
        self.meter.close()


def image_grid(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 image, near-square grid."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    return grid


def save_png(images: np.ndarray, path: str | Path, scale: int = 4) -> None:
    """Write the images (a grid when several) as a PNG, upscaled for viewing, atomically."""
    import io

    from PIL import Image

    from abcd_edge.io import write_bytes_atomic

    img = Image.fromarray(image_grid(images))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
