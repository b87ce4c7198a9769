"""The runtime bench (`abcd-edge bench-runtime`, `make bench-runtime`): what the anytime loop achieves on
this machine, measured in one run.

For each budget: N requests on one warm session (wall clock), quiet and with one
CPU core kept busy by another process. Reports the success rate, steps executed
vs the physical limit floor((B - finish) / median step measured in that row; the
profile's p50 gives `profile_limit_steps`), the loop's overhead vs a
bare loop doing the same steps right after the request (paired, so drifts in the
machine's pace cancel; since the reshaping the bare loop is the one step loop with
no-op hooks and a perf_counter clock, a few microseconds per step more than the
hand-written loop it replaced, so the overhead reads that much lower), and how well the step-latency
prediction (p50 x online correction) matched each measured step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from abcd_edge.bench.load import busy_core
from abcd_edge.core.budget import parse_budget
from abcd_edge.core.loop import NoHooks
from abcd_edge.errors import UserError
from abcd_edge.io import write_bytes_atomic, write_json_atomic

OVERHEAD_PAIRS = 100       # requests each followed at once by a bare loop of the same steps
LOADS = ("quiet", "busy")
BUSY_SETTLE_S = 0.5        # the spinning process runs this long before the first request


class _StopAfter(NoHooks):
    """Run the first ``steps`` steps of the schedule, no more: the steps a request took."""

    def __init__(self, steps: int):
        self.steps = steps

    def before_step(self, i, sampler):
        return "done" if i >= self.steps else None


def bare_loop_ms(rt, rep, sampler: str) -> float:
    """The same steps as request ``rep`` (its noise, its final sigmas), run as a bare loop: the one step loop
    with no rule, no guard, no correction and no finishing."""
    from abcd_edge.core.loop import run_steps
    from abcd_edge.core.samplers import make_sampler

    shape = (1, rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
    rng = np.random.default_rng(rep.seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    smp = make_sampler(sampler, rt.schedule, np.asarray(rep.sigmas), rt.manifest.prediction_type)
    t0 = time.perf_counter()
    run_steps(rt.denoiser, smp, noise, rng=rng, hooks=_StopAfter(rep.steps))
    return (time.perf_counter() - t0) * 1e3


def run_budget(rt, budget_text: str, requests: int, sampler: str, rho: float, progress: bool = True) -> dict:
    """``requests`` requests at one budget on the warm session ``rt``: one row of the table."""
    from tqdm import tqdm

    budget = parse_budget(budget_text)
    reports, overheads = [], []
    for k in tqdm(range(requests), desc=f"{budget_text}", unit="req", leave=False, disable=not progress):
        rep = rt.generate(budget, rho=rho, sampler=sampler, seed=k)[1]
        reports.append(rep)
        if k < OVERHEAD_PAIRS and rep.steps:   # paired right away: the machine's pace drifts over minutes
            overheads.append(rep.latency_ms / bare_loop_ms(rt, rep, sampler) - 1)
    cost = rt.cost_model(1, sampler)
    profile_limit = cost.physical_limit(budget.ms)
    measured = np.concatenate([r.measured_step_ms for r in reports if r.steps])
    limit = cost.physical_limit(budget.ms, step_ms=float(np.median(measured)))
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
        "budget_over_p50_step": budget.ms / cost.step_p50_ms,
    }


def render_table(rows: list[dict]) -> str:
    """runtime_bench.md: one line per (load, budget)."""
    lines = ["| load | budget | requests | success | p99 latency ms | utilisation | steps / physical limit | "
             "loop overhead | pred. within 5% / 10% | tail coverage | exits |", "|" + "---|" * 11]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['load']} | {r['budget']} | {r['requests']} | refused: {r['refused']} |" + " |" * 7)
            continue
        overhead = "n/a" if r["loop_overhead_median"] is None else format(r["loop_overhead_median"], "+.1%")
        lines.append(f"| {r['load']} | {r['budget']} | {r['requests']} | {r['success_rate']:.2%} | "
                     f"{r['latency_p99_ms']:.1f} | {r['utilisation_mean']:.2f} | {r['steps_mean']:.1f} / "
                     f"{r['physical_limit_steps']} = {r['steps_vs_limit']:.2f} | {overhead} | "
                     f"{r['prediction_within_5pct']:.0%} / {r['prediction_within_10pct']:.0%} | "
                     f"{r['tail_coverage']:.1%} | {r['exit_reasons']} |")
    return "\n".join(lines) + "\n"


def run_runtime_bench(out: str | Path, artifact: str | Path, budgets: Sequence[str], requests: Sequence[int],
                      sampler: str = "ddim", rho: float = 1.0, threads: int = 2, backend: str = "ort-cpu",
                      profile: str | Path | None = None, loads: Sequence[str] = LOADS, command: str = "",
                      echo: Callable[[str], None] = print, progress: bool = True) -> dict:
    """Every budget under every load; writes ``<out>/runtime_bench.json`` and ``<out>/runtime_bench.md``.

    ``requests``: one count for every budget, or one per budget. Returns what the JSON holds."""
    from abcd_edge.device.hardware import machine_info
    from abcd_edge.runtime.session import AnytimeRuntime

    loads = list(loads)
    if not loads or set(loads) - set(LOADS):
        raise UserError(f"--loads {','.join(loads)!r}: accepted are quiet, busy or quiet,busy")
    budgets = list(budgets)
    counts = list(requests) * len(budgets) if len(requests) == 1 else list(requests)
    rows = []
    for busy in (load == "busy" for load in loads):
        with AnytimeRuntime.open(artifact, profile=profile, backend=backend, threads=threads, power="auto") as rt:
            with busy_core(busy, settle_s=BUSY_SETTLE_S):
                for b, n in zip(budgets, counts):
                    try:
                        row = run_budget(rt, b, n, sampler, rho, progress=progress)
                    except UserError as exc:        # a budget below this device's minimum: a row that says so
                        row = {"budget": b, "requests": n, "refused": str(exc)}
                    row["load"] = "one core busy" if busy else "quiet"
                    rows.append(row)
                    echo(json.dumps(row))
    result = {"command": command, "machine": machine_info(), "rows": rows}
    out = Path(out)
    write_json_atomic(out / "runtime_bench.json", result)
    table = render_table(rows)
    write_bytes_atomic(out / "runtime_bench.md", table.encode())
    echo(table.rstrip("\n"))
    return result
