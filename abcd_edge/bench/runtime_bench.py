"""`make bench-runtime`: what the anytime loop achieves on this machine, measured in one run.

For each budget: N requests on one warm session (wall clock), quiet and with one
CPU core kept busy by another process. Reports the success rate, steps executed
vs the physical limit floor((B - finish) / median step measured in that row; the
profile's p50 gives `profile_limit_steps`), the loop's overhead vs a
bare ONNX Runtime loop doing the same steps right after the request (paired, so
drifts in the machine's pace cancel), and how well the step-latency
prediction (p50 x online correction) matched each measured step.

    python -m abcd_edge.bench.runtime_bench --out bench/runtime --requests 1000
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from abcd_edge import paths
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError
from abcd_edge.io import write_bytes_atomic, write_json_atomic


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_core(enabled: bool):
    """Keep one CPU core busy with a spinning process while the block runs."""
    if not enabled:
        yield
        return
    proc = mp.get_context("spawn").Process(target=_spin, daemon=True)
    proc.start()
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.join()


OVERHEAD_PAIRS = 100       # requests each followed at once by a bare loop of the same steps


def bare_loop_ms(rt, rep, sampler: str) -> float:
    """The same steps as request ``rep`` (its noise, its final sigmas), run as a bare ORT loop."""
    from abcd_edge.core.samplers import make_sampler

    shape = (1, rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
    noise = np.random.default_rng(rep.seed).standard_normal(shape).astype(np.float32)
    smp = make_sampler(sampler, rt.schedule, np.asarray(rep.sigmas), rt.manifest.prediction_type)
    t0 = time.perf_counter()
    x = smp.prepare(noise)
    for i in range(rep.steps):
        sample, t = smp.model_input(x, i)
        x, x0 = smp.step(x, i, rt.denoiser(sample, t))
    return (time.perf_counter() - t0) * 1e3


def run_budget(rt, budget_text: str, requests: int, sampler: str, rho: float) -> dict:
    from tqdm import tqdm

    budget = parse_budget(budget_text)
    reports, overheads = [], []
    for k in tqdm(range(requests), desc=f"{budget_text}", unit="req", leave=False):
        rep = rt.generate(budget, rho=rho, sampler=sampler, seed=k)[1]
        reports.append(rep)
        if k < OVERHEAD_PAIRS and rep.steps:   # paired right away: the machine's pace drifts over minutes
            overheads.append(rep.latency_ms / bare_loop_ms(rt, rep, sampler) - 1)
    bp = rt.profile.for_batch(1)
    profile_limit = math.floor((budget.ms - bp.finish.p50_ms) / bp.step.p50_ms)
    measured = np.concatenate([r.measured_step_ms for r in reports if r.steps])
    limit = math.floor((budget.ms - bp.finish.p50_ms) / float(np.median(measured)))
    predicted = np.concatenate([r.predicted_median_step_ms for r in reports if r.steps])
    tails = np.concatenate([r.predicted_step_ms for r in reports if r.steps])
    err = predicted / measured - 1
    lat = np.array([r.latency_ms for r in reports])
    reasons: dict[str, int] = {}
    for r in reports:
        reasons[r.exit_reason] = reasons.get(r.exit_reason, 0) + 1
    return {
        "budget": budget_text, "requests": requests,
        "success_rate": float(np.mean([r.deadline_met for r in reports])),
        "latency_p50_ms": float(np.quantile(lat, 0.5)), "latency_p99_ms": float(np.quantile(lat, 0.99)),
        "latency_max_ms": float(lat.max()), "utilisation_mean": float(np.mean(lat / budget.ms)),
        "steps_mean": float(np.mean([r.steps for r in reports])), "profile_limit_steps": profile_limit,
        "physical_limit_steps": limit, "steps_vs_limit": float(np.mean([r.steps for r in reports]) / max(limit, 1)),
        "exit_reasons": reasons, "schedule": reports[0].schedule,
        "prediction_within_5pct": float(np.mean(np.abs(err) <= 0.05)),
        "prediction_within_10pct": float(np.mean(np.abs(err) <= 0.10)),
        "tail_coverage": float(np.mean(measured <= tails)),
        "loop_overhead_median": float(np.median(overheads)) if overheads else None,
        "budget_over_p50_step": budget.ms / bp.step.p50_ms,
    }


def main() -> None:
    from abcd_edge.device.hardware import machine_info
    from abcd_edge.runtime.session import AnytimeRuntime

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench/runtime"))
    ap.add_argument("--artifact", type=Path, default=paths.DEMO_ARTIFACT_DIR)
    ap.add_argument("--budgets", default="50ms,150ms,1s")
    ap.add_argument("--requests", default="1000,1000,300",
                    help="requests per budget (one number, or one per budget)")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--quality", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="ort-cpu", help="ort-cpu, ort-cuda, ort-trt or trt")
    ap.add_argument("--profile", type=Path, default=None, help="device profile (default: the committed one)")
    ap.add_argument("--loads", default="quiet,busy", help="quiet, busy (one CPU core kept busy) or both")
    a = ap.parse_args()
    loads = a.loads.split(",")
    if not loads or set(loads) - {"quiet", "busy"}:
        ap.error(f"--loads {a.loads!r}: accepted are quiet, busy or quiet,busy")
    budgets = a.budgets.split(",")
    counts = [int(v) for v in a.requests.split(",")]
    counts = counts * len(budgets) if len(counts) == 1 else counts
    rows = []
    for busy in (load == "busy" for load in loads):
        rt = AnytimeRuntime.open(a.artifact, profile=a.profile, backend=a.backend, threads=a.threads, power="auto")
        try:
            with busy_core(busy):
                for b, n in zip(budgets, counts):
                    try:
                        row = run_budget(rt, b, n, a.sampler, a.quality)
                    except UserError as exc:        # a budget below this device's minimum: a row that says so
                        row = {"budget": b, "requests": n, "refused": str(exc)}
                    row["load"] = "one core busy" if busy else "quiet"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            rt.close()
    result = {"command": "python -m abcd_edge.bench.runtime_bench " + " ".join(
        f"--{k} {v}" for k, v in vars(a).items()), "machine": machine_info(), "rows": rows}
    write_json_atomic(a.out / "runtime_bench.json", result)
    lines = ["| load | budget | requests | success | p99 latency ms | utilisation | steps / physical limit | "
             "loop overhead | pred. within 5% / 10% | tail coverage | exits |", "|" + "---|" * 11]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['load']} | {r['budget']} | {r['requests']} | refused: {r['refused']} |" + " |" * 7)
            continue
        lines.append(f"| {r['load']} | {r['budget']} | {r['requests']} | {r['success_rate']:.2%} | "
                     f"{r['latency_p99_ms']:.1f} | {r['utilisation_mean']:.2f} | {r['steps_mean']:.1f} / "
                     f"{r['physical_limit_steps']} = {r['steps_vs_limit']:.2f} | {'n/a' if r['loop_overhead_median'] is None else format(r['loop_overhead_median'], '+.1%')} | "
                     f"{r['prediction_within_5pct']:.0%} / {r['prediction_within_10pct']:.0%} | "
                     f"{r['tail_coverage']:.1%} | {r['exit_reasons']} |")
    write_bytes_atomic(a.out / "runtime_bench.md", ("\n".join(lines) + "\n").encode())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
