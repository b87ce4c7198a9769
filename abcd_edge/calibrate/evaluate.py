"""The evaluations written to report.json: learned vs static schedules, the exit policy's behaviour and the
cost predictor's error. Validation noises only; nothing here trains or draws from ``state.rng``."""
from __future__ import annotations

import numpy as np

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.calibrate.traces import step_distances

VALIDATION_STEPS = (3, 5, 10, 20)
EXIT_BUDGET_MS = 1000.0
EXIT_RHOS = (0.3, 0.6, 0.9, 1.0)
EXIT_IMAGES = 16


def validate_schedules(state: CalibrationState, ays: dict) -> dict:
    """Teacher MSE on validation noises: learned schedule vs uniform, Karras, log-SNR (and AYS-like) at equal n."""
    from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
    from abcd_edge.quality import teacher_distance

    ctl = state.numpy_controller()
    prof = state.profiles[0]
    data = state.teachers
    out: dict = {}
    for sampler in state.cfg.samplers:
        cost = prof.cost_model(sampler)
        for n in VALIDATION_STEPS:
            ctx = state.context(cost.budget_for(n), prof, 1.0)
            schedules = {"learned": ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n),
                         "uniform": time_uniform_sigmas(state.schedule, n), "karras": karras_sigmas(state.schedule, n),
                         "logsnr": logsnr_uniform_sigmas(state.schedule, n)}
            if str(n) in ays.get(sampler, {}):
                schedules["ays"] = np.asarray(ays[sampler][str(n)]["sigmas"])
            row = {}
            for name, sig in schedules.items():
                x0, _ = state.run_ort(sampler, sig, data.noise_val)
                row[name] = round(float(teacher_distance(x0, data.val[sampler]).mse.mean()), 6)
            out[f"{sampler}/n={n}"] = row
    return out


def exit_behaviour(state: CalibrationState) -> dict:
    """Mean steps taken by the policy vs planned, per rho, on validation traces (1 s budget, profile 0,
    the first sampler): the policy sees each step's features as the runtime would (steps at the p50)."""
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
    from abcd_edge.formats.controller import decision_features

    ctl = state.numpy_controller()
    prof = state.profiles[0]
    data = state.teachers
    sampler, budget = state.cfg.samplers[0], EXIT_BUDGET_MS
    descriptor = SAMPLER_DESCRIPTORS[sampler]
    n = prof.steps_that_fit(budget, sampler, cap=state.cfg.trace_max_steps)
    out = {}
    for rho in EXIT_RHOS:
        ctx = state.context(budget, prof, rho)
        sig = ctl.plan_sigmas(ctx, descriptor, n)
        _, x0s = state.run_ort(sampler, sig, data.noise_val[:EXIT_IMAGES], keep_x0=True)
        d, change = step_distances(x0s, data.val[sampler][:EXIT_IMAGES])
        stops = []
        for j in range(len(x0s[0])):
            stop = n
            for t in range(n - 1):
                elapsed = (t + 1) * prof.batch.step.p50_ms
                h = decision_features(float(sig[t]), float(change[j, t]), (t + 1) / n, elapsed / budget, ctx,
                                      descriptor)
                if ctl.p_stop(h) > ctl.spec.threshold:
                    stop = t + 1
                    break
            stops.append(stop)
        out[str(rho)] = {"planned_steps": n, "mean_steps": float(np.mean(stops)),
                         "teacher_mse": float(np.mean([d[j, s - 1] for j, s in enumerate(stops)]))}
    return out


def cost_error(state: CalibrationState) -> dict:
    """Cost predictor vs each profile's measured step samples (correction 1)."""
    ctl = state.numpy_controller()
    out = {}
    for p in state.profiles:
        pred, _ = ctl.predict_cost_ms(p.cost_features(1.0))
        s = p.step_samples_ms
        p99 = np.quantile(s, 0.99)
        out[p.name] = {"predicted_tail_ms": pred, "measured_p99_ms": float(p99),
                       "coverage": float(np.mean(s <= pred)),
                       "tail_error": float(pred / p99 - 1),
                       "within_5pct": bool(abs(pred / p99 - 1) <= 0.05),
                       "within_10pct": bool(abs(pred / p99 - 1) <= 0.10)}
    return out
