"""The methods: each one's plan for a (tier, budget, sampler, rho), and one request executed by it.

Static methods (uniform, karras, logsnr, ays, stepdrop, buco-mwg, oracle) run the one step loop
(``core.loop.run_steps``) on the tier's clock with no exit rule, no guard and no correction; StepDrop
stops through ``StopBelow``, the oracle keeps every x0 through the loop's callback. ``abcd`` is
``AnytimeRuntime.generate``. Every method draws its noise as the runtime does: the request seed's
initial noise, then (stochastic samplers) per-step noise from the same generator. Over a text-to-image
pipeline every method encodes the request's prompt inside its clock, steps the guided UNet as the runtime
does and decodes its last x0 latent as its finishing (the session's request parts).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from abcd_edge.bench.ays import ays_for, load_ays, nearest_ays_n
from abcd_edge.bench.grid import GridSpec
from abcd_edge.bench.teacher import TeacherCache, request_noise
from abcd_edge.bench.tiers import TierSession
from abcd_edge.errors import UserError

VALIDATION_SEED_BASE = 10_000_000      # stepdrop tuning noise: disjoint from every request seed
STEPDROP_DB_PER_RHO = 2.0              # allowed PSNR loss = 2 dB x (1 - rho)


@dataclass
class Plan:
    method: str
    rho: float | None            # None: rho-free
    status: str                  # ok | unavailable | infeasible
    detail: str
    sigmas: np.ndarray | None = None
    stop_below: float | None = None
    predicted_step_ms: float | None = None
    k: int = 0


@dataclass
class RunResult:
    images: np.ndarray
    latency_ms: float
    deadline_met: bool
    steps: float
    planned_steps: int
    exit_reason: str
    predicted: list[float]
    measured: list[float]
    energy_mj: float | None = None
    correction: float | None = None
    note: str = ""


# ------------------------------------------------------------------------------------ rules

def budget_k(sess: TierSession, budget_ms: float, batch: int, sampler: str) -> tuple[int, int]:
    """(K at the profile's p99 as the runtime's rule plans it, K at the p50 with no tail margin), both capped
    at the rule-based plan's maximum."""
    from abcd_edge.runtime.plan import RULE_MAX_STEPS

    cm = sess.cost_model(sampler)
    limit = sess.step_budget_ms(budget_ms)
    cap = min(RULE_MAX_STEPS, sess.max_steps or RULE_MAX_STEPS)
    return (cm.steps_that_fit(limit, level="tail", cap=cap), cm.steps_that_fit(limit, level="median", cap=cap))


def stepdrop_steps(psnr_by_step: np.ndarray, tolerance_db: float) -> int:
    """Fewest steps whose mean validation PSNR is within ``tolerance_db`` of running all K steps.

    ``psnr_by_step``: [K] mean PSNR vs the teacher after step 1..K."""
    p = np.asarray(psnr_by_step, np.float64)
    target = p[-1] - tolerance_db
    for k in range(len(p)):
        if p[k] >= target:
            return k + 1
    return len(p)


def oracle_pick(step_latency_ms: Sequence[float], mse_by_step: np.ndarray, budget_ms: float
                ) -> tuple[np.ndarray, bool]:
    """Per image, the step (0-based) with the smallest teacher MSE among those finished within B.

    ``step_latency_ms``: [K] latency had the request returned after step i; ``mse_by_step``: [K, N].
    Returns (chosen step per image [N], True when at least one step fit). With none fitting, step 0 (late)."""
    lat = np.asarray(step_latency_ms, np.float64)
    mse = np.asarray(mse_by_step, np.float64)
    fit = lat <= budget_ms
    if not fit.any():
        return np.zeros(mse.shape[1], int), False
    masked = np.where(fit[:, None], mse, np.inf)
    return masked.argmin(0), True


def plan_methods(sess: TierSession, spec: GridSpec, budget_ms: float, sampler: str, batch: int,
                 stepdrop: dict[float, float] | None) -> list[Plan]:
    """The plan of each method (and rho where it matters) for one (tier, budget, sampler)."""
    from abcd_edge.core.budget import context_vector
    from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    sched = sess.base.schedule
    cm = sess.cost_model(sampler)
    k99, k50 = budget_k(sess, budget_ms, batch, sampler)
    p99 = cm.next_step_ms()
    p50 = cm.median_step_ms
    plans: list[Plan] = []
    for m in spec.methods:
        for rho in spec.rhos(m):
            if m in ("uniform", "karras", "logsnr"):
                fn = {"uniform": time_uniform_sigmas, "karras": karras_sigmas, "logsnr": logsnr_uniform_sigmas}[m]
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99)", np.asarray(fn(sched, k99)) if k99 else None,
                                  predicted_step_ms=p99, k=k99))
            elif m == "ays":
                table = ays_for(sess.ays, sampler)
                if table is None:
                    _, why = load_ays(Path(sess.controller_dir) if sess.controller_dir else None,
                                      sess.base.manifest_hash)
                    if sess.ays is not None:
                        why = f"unavailable: no AYS-like schedule for sampler {sampler}"
                    plans.append(Plan(m, rho, "unavailable", why))
                    continue
                n = nearest_ays_n(table, k99)
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99), ays n={n}", np.asarray(table[n]),
                                  predicted_step_ms=p99, k=n))
            elif m == "stepdrop":
                thr = (stepdrop or {}).get(rho)
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99), stop below sigma {thr:.4g}" if thr else f"K={k99}",
                                  np.asarray(time_uniform_sigmas(sched, k99)) if k99 else None, stop_below=thr,
                                  predicted_step_ms=p99, k=k99))
            elif m == "buco-mwg":
                if sess.controller is None:
                    plans.append(Plan(m, rho, "unavailable", "unavailable: needs a calibrated controller "
                                      "(its budget-conditioned density); none under calibration/"))
                    continue
                ctx = context_vector(budget_ms, sess.abcd.profile.for_batch(batch).flops_per_s, rho)
                sig = sess.controller.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], max(k50, 1),
                                                  sigma_max=sched.sigma_max)
                plans.append(Plan(m, rho, "ok", f"K={k50} (p50, no margin), controller density", sig,
                                  predicted_step_ms=p50, k=k50))
            elif m == "abcd":
                what = (f"controller {sess.controller_dir}" if sess.controller is not None
                        else "rule-based: no calibrated controller")
                plans.append(Plan(m, rho, "ok", what))
            elif m == "oracle":
                k = max(k50, 1)
                plans.append(Plan(m, rho, "ok", f"best step in hindsight on uniform K={k} (p50)",
                                  np.asarray(time_uniform_sigmas(sched, k)), k=k))
    return plans


def tune_stepdrop(sess: TierSession, spec: GridSpec, teacher: TeacherCache, budget_ms: float, sampler: str,
                  batch: int) -> tuple[dict[float, float], dict]:
    """Per rho, the sigma threshold: the fewest steps of uniform-K whose mean PSNR vs the teacher on
    ``spec.stepdrop_validation`` validation images is within 2 dB x (1 - rho) of all K steps."""
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.quality import teacher_distance

    k99, _ = budget_k(sess, budget_ms, batch, sampler)
    if k99 < 1:
        return {}, {"K": k99}
    m = sess.base.manifest
    shape = (m.channels, m.resolution, m.resolution)
    nval = max(1, spec.stepdrop_validation)
    seeds = [VALIDATION_SEED_BASE + i for i in range(nval)]
    teach = teacher.get(seeds, 1, shape)
    sigmas = np.asarray(time_uniform_sigmas(sess.base.schedule, k99))
    noise = np.concatenate([request_noise(s, (1, *shape)) for s in seeds])
    ro = sess.rollouts
    _, hist = ro.x0(sampler, sigmas, noise, ro.denoiser(sess.text.prompts_for(seeds)), keep_x0=True,
                    rng=np.random.default_rng(0))
    t = np.concatenate([teach[s] for s in seeds])
    psnr = np.array([float(np.mean(teacher_distance(ro.image_space(h), t).psnr)) for h in hist])
    out, info = {}, {"K": k99, "validation_images": nval, "psnr_by_step": [round(float(p), 3) for p in psnr]}
    for rho in spec.quality:
        k = stepdrop_steps(psnr, STEPDROP_DB_PER_RHO * (1 - rho))
        # stop before step k (0-based): threshold halfway (in log) between sigma_{k-1} and sigma_k
        thr = float(np.sqrt(sigmas[k - 1] * sigmas[k])) if k < k99 else float(sigmas[-1]) * 0.5
        out[rho] = thr
        info[str(rho)] = {"steps": k, "threshold_sigma": thr, "tolerance_db": STEPDROP_DB_PER_RHO * (1 - rho)}
    return out, info


# ------------------------------------------------------------------------------------ running

def run_static(rt, clock, sigmas: np.ndarray, sampler: str, seed: int, batch: int, budget_ms: float,
               stop_below: float | None = None, predicted_step_ms: float | None = None,
               keep_history: bool = False, req=None) -> tuple[RunResult, list[tuple[float, np.ndarray]]]:
    """A static schedule on ``clock``: no exit rule, no guard, no correction. Noise as the runtime draws it.

    ``stop_below``: stop before the first step whose sigma is below it (StepDrop; step 1 always runs).
    ``keep_history``: also return (elapsed ms after step i, x0 after step i) for every step (the oracle).
    ``req``: a pipeline request's text side (``AnytimeRuntime.pipeline_request``): encoded inside the clock,
    the guided UNet stepped as the runtime steps it, the x0 latent decoded as finishing."""
    from abcd_edge.core.loop import StopBelow, run_steps

    shape = (batch, rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    smp = rt.request_sampler(sampler, sigmas, req)
    history: list[tuple[float, np.ndarray]] = []

    def keep(i: int, x0: np.ndarray) -> None:
        history.append((clock.elapsed_ms(), np.asarray(x0, np.float32).copy()))

    rt.meter.start()
    clock.start()
    denoiser = rt.request_denoiser(req, clock, {})
    result = run_steps(denoiser, smp, noise, rng=rng, clock=clock,
                       hooks=StopBelow(stop_below) if stop_below is not None else None,
                       callback=keep if keep_history else None)
    images = rt.finish_images(result.x0, req, clock, {})
    latency = clock.elapsed_ms()
    reading = rt.meter.stop()
    energy = None if getattr(clock, "simulated", False) else reading.energy_mj
    measured = [float(ms) for ms in result.step_ms]
    pred = [float(predicted_step_ms)] * len(measured) if predicted_step_ms is not None else []
    return RunResult(images=images, latency_ms=latency, deadline_met=latency <= budget_ms, steps=len(measured),
                     planned_steps=len(smp), exit_reason=result.reason, predicted=pred, measured=measured,
                     energy_mj=energy), history


def execute(sess: TierSession, p: Plan, budget_ms: float, sampler: str, seed: int, batch: int, clock,
            teacher_x0: np.ndarray | None) -> RunResult | None:
    """One request of plan ``p`` (request seed ``seed``) on ``clock``; None when the runtime refuses the budget.

    ``teacher_x0`` is what the oracle picks against (None: a warm-up request)."""
    from abcd_edge.core.budget import Budget
    from abcd_edge.core.images import to_uint8
    from abcd_edge.quality import teacher_distance

    sess.forget_prompt(seed)
    if p.method == "abcd":
        rt = sess.abcd
        try:
            images, rep = rt.generate(Budget("latency", budget_ms), rho=float(p.rho), sampler=sampler, seed=seed,
                                      batch=batch, clock=clock if sess.tier.simulated else None,
                                      max_steps=sess.max_steps, **sess.text.request(seed))
        except UserError:
            return None
        return RunResult(images=images, latency_ms=rep.latency_ms, deadline_met=rep.deadline_met, steps=rep.steps,
                         planned_steps=rep.planned_steps, exit_reason=rep.exit_reason,
                         predicted=list(rep.predicted_step_ms), measured=list(rep.measured_step_ms),
                         energy_mj=None if sess.tier.simulated else rep.energy_mj, correction=rep.correction,
                         note=rep.schedule)
    req = sess.request(seed)
    if p.method == "oracle":
        res, hist = run_static(sess.base, clock, p.sigmas, sampler, seed, batch, budget_ms, keep_history=True,
                               req=req)
        # finishing: one x0 -> image conversion (a pipeline: the decode), timed on the same clock
        f0 = clock.elapsed_ms()
        sess.base.finish_images(hist[-1][1], req, clock, {})
        finish = clock.elapsed_ms() - f0
        lat = [h[0] + finish for h in hist]
        if teacher_x0 is None:   # warm-up
            return res
        shown = [sess.rollouts.image_space(h[1]) for h in hist]     # what the teacher is compared with
        mse = np.stack([teacher_distance(x, teacher_x0).mse for x in shown])
        pick, fits = oracle_pick(lat, mse, budget_ms)
        x = np.stack([shown[k][j] for j, k in enumerate(pick)])
        chosen = [lat[k] for k in pick]
        return RunResult(images=to_uint8(x), latency_ms=float(max(chosen)), deadline_met=bool(fits),
                         steps=float(np.mean(pick + 1)), planned_steps=len(hist),
                         exit_reason="oracle" if fits else "oracle-none-fit", predicted=[], measured=res.measured,
                         note=f"chosen steps {','.join(str(int(k) + 1) for k in pick)}")
    res, _ = run_static(sess.base, clock, p.sigmas, sampler, seed, batch, budget_ms, stop_below=p.stop_below,
                        predicted_step_ms=p.predicted_step_ms, req=req)
    return res
