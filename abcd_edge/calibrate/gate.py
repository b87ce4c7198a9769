"""Stage 3, the gate: the generator's schedules against every static one, judged on what calibration never saw.

Held-out noises (a fixed seed, whatever the calibration seed), the *evaluation* feature
network (another seed and architecture than the calibration network the search
optimised) and its own reference images. Per sampler and step count: feature-FID and KID
of the generator's placement, the searched schedule it was fitted to, and each static
placement; a paired bootstrap over the held-out images gives the CI of the generator's
FID minus the best static one's. The generator is kept for that step count only where
the whole CI is below zero; otherwise the controller carries the best static placement.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from abcd_edge.calibrate.state import CalibrationState
from abcd_edge.formats.controller import Gate
from abcd_edge.io import atomic_path

HELDOUT_SEED = 97_531
RESAMPLES = 200


def schedules_for(state: CalibrationState, sampler: str, n: int) -> dict[str, np.ndarray]:
    """The generator's placement for n steps (the context of the first profile at the budget n steps need)
    and every static placement (``state.static_kinds``)."""
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    prof = state.profiles[0]
    ctx = state.context(prof.budget_for(sampler, n), prof, 1.0)
    out = {"learned": state.numpy_controller().plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n,
                                                           state.schedule.sigma_max)}
    for kind in state.static_kinds:
        out[kind] = state.static_sigmas(kind, sampler, n)
    return out


def paired_ci(reference, feats_a: np.ndarray, feats_b: np.ndarray, rng: np.random.Generator) -> list[float]:
    """95 % bootstrap CI of FID(a) - FID(b), resampling the same held-out images for both."""
    diffs = []
    for _ in range(RESAMPLES):
        idx = rng.integers(0, len(feats_a), len(feats_a))
        diffs.append(reference.fid_to_reference(feats_a[idx]) - reference.fid_to_reference(feats_b[idx]))
    return [float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))]


def static_cache_path(state: CalibrationState, sampler: str, sigmas: np.ndarray) -> Path:
    """Where the held-out features of one static schedule are cached (content-addressed)."""
    import hashlib

    from abcd_edge.paths import user_cache_dir

    key = hashlib.sha256(json.dumps([state.manifest_hash, state.evaluation_net.sha256, sampler, HELDOUT_SEED,
                                     state.cfg.gate_noises, [round(float(s), 9) for s in sigmas],
                                     state.conditions]).encode())
    return user_cache_dir() / "gate" / f"{key.hexdigest()[:32]}.npy"


def features_of(state: CalibrationState, sampler: str, sigmas: np.ndarray, noises: np.ndarray,
                cached: bool) -> np.ndarray:
    """Evaluation-net features of the images a schedule makes from the held-out noises (from the cache
    when ``cached`` and there)."""
    path = static_cache_path(state, sampler, sigmas) if cached else None
    if path is not None and path.is_file():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            pass
    feats = state.rollouts.features(state.evaluation_net, state.x0(sampler, sigmas, noises, "heldout"))
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.save(fh, feats)
        except OSError:
            pass                     # a cache that cannot be written is only slower
    return feats


def judge(state: CalibrationState, sampler: str, schedules: dict[str, np.ndarray], noises: np.ndarray) -> dict:
    """feature-FID and KID in the evaluation network for each schedule's images from ``noises``."""
    from abcd_edge.quality import feature_kid

    ref = state.evaluation_reference
    row = {}
    for name, sig in schedules.items():
        feats = features_of(state, sampler, sig, noises, cached=name in state.static_kinds)
        row[name] = {"fid": ref.fid_to_reference(feats), "kid": feature_kid(feats, ref.features).mean,
                     "sigmas": [float(s) for s in sig], "_feats": feats}
    return row


def run_gate(state: CalibrationState, searched: dict) -> tuple[Gate, dict]:
    """(the Gate the controller carries, the gate table for report.json), checkpointed per (sampler, n)."""
    cfg = state.cfg
    f = state.ckpt_file("gate.json")
    table: dict = json.loads(f.read_text()) if f.exists() else {}
    noises = held_out_noises(state)
    bar = state.bar(sum(len(cfg.steps_for(s)) for s in cfg.samplers), "gate")
    for sampler in cfg.samplers:
        for n in cfg.steps_for(sampler):
            if str(n) not in table.get(sampler, {}):
                scheds = schedules_for(state, sampler, n)
                scheds["searched"] = np.asarray(searched[sampler][str(n)]["sigmas"])
                row = judge(state, sampler, scheds, noises)
                best = min(state.static_kinds, key=lambda k: row[k]["fid"])
                ci = paired_ci(state.evaluation_reference, row["learned"]["_feats"], row[best]["_feats"],
                               np.random.default_rng(HELDOUT_SEED + n))
                decision = "learned" if ci[1] < 0 else best
                table.setdefault(sampler, {})[str(n)] = {
                    "best_static": best, "decision": decision, "fid_minus_best_static_ci95": ci,
                    "ratio_to_best_static": row["learned"]["fid"] / row[best]["fid"],
                    **{k: {kk: vv for kk, vv in v.items() if kk != "_feats"} for k, v in row.items()}}
                with atomic_path(f) as p:
                    p.write_text(json.dumps(table))
            bar.update(1)
    bar.close()
    steps = {s: list(cfg.steps_for(s)) for s in cfg.samplers}
    gate = Gate(steps=steps,
                placements={s: [table[s][str(n)]["decision"] for n in steps[s]] for s in cfg.samplers},
                fid={s: [round(table[s][str(n)][table[s][str(n)]["decision"]]["fid"], 4) for n in steps[s]]
                     for s in cfg.samplers})
    return gate, table


def held_out_noises(state: CalibrationState) -> np.ndarray:
    return np.random.default_rng(HELDOUT_SEED).standard_normal(
        (state.cfg.gate_noises, *state.shape)).astype(np.float32)


def exit_behaviour(state: CalibrationState, gate: Gate, table: dict, fit_steps=(8, 13, 20),
                   rhos=(0.3, 0.5, 0.8, 1.0)) -> dict:
    """What rho's exit rule does on held-out noises (first sampler): steps taken and feature-FID kept
    against rho = 1, for plans of ``fit_steps`` steps (the gate table's figures where it has them)."""
    sampler = state.cfg.samplers[0]
    noises = held_out_noises(state)
    measured: dict[int, float] = {int(n): row[row["decision"]]["fid"] for n, row in table[sampler].items()}

    def fid_at(n: int) -> float:
        if n not in measured:
            kind = gate.placement(sampler, n)
            sig = (schedules_for(state, sampler, n)["learned"] if kind == "learned"
                   else state.static_sigmas(kind, sampler, n))
            measured[n] = judge(state, sampler, {kind: sig}, noises)[kind]["fid"]
        return measured[n]

    out = {}
    for fit in fit_steps:
        full = fid_at(fit)
        for rho in rhos:
            n = gate.exit_steps(sampler, fit, rho)
            out[f"fit={fit}/rho={rho}"] = {"steps": n, "steps_ratio": n / fit, "fid": fid_at(n),
                                           "fid_ratio": fid_at(n) / full}
    return out
