"""Serving requests from the CLI: one request, or N on a warm session with a summary."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from abcd_edge.budget import Budget
from abcd_edge.io import write_json_atomic
from abcd_edge.runtime import AnytimeRuntime, RequestReport, save_png

WARMUP_REQUESTS = 20


@dataclass
class ServeSummary:
    requests: int
    success_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    utilisation_mean: float      # latency / budget
    steps_mean: float
    exit_reasons: dict
    rss_mb_after_warmup: float | None
    rss_mb_end: float | None
    rss_growth: float | None     # (end - after warm-up) / after warm-up
    machine_load_note: str


def rss_mb() -> float | None:
    """Resident set size of this process (Linux /proc), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def summarise(reports: list[RequestReport], rss_warm: float | None, rss_end: float | None) -> ServeSummary:
    lat = np.array([r.latency_ms for r in reports])
    budget_ms = np.array([r.budget_ms or np.nan for r in reports])
    reasons: dict[str, int] = {}
    for r in reports:
        reasons[r.exit_reason] = reasons.get(r.exit_reason, 0) + 1
    growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
    return ServeSummary(
        requests=len(reports), success_rate=float(np.mean([r.deadline_met for r in reports])),
        latency_p50_ms=float(np.quantile(lat, 0.5)), latency_p99_ms=float(np.quantile(lat, 0.99)),
        latency_max_ms=float(lat.max()), utilisation_mean=float(np.nanmean(lat / budget_ms)),
        steps_mean=float(np.mean([r.steps for r in reports])), exit_reasons=reasons,
        rss_mb_after_warmup=rss_warm, rss_mb_end=rss_end, rss_growth=growth,
        machine_load_note=f"os.getloadavg at end: {os.getloadavg()[0]:.2f}",
    )


def serve(budget: Budget, rho: float, sampler: str, schedule: str, seed: int, batch: int, artifact: str,
          profile: str | None, controller: str | None, backend: str, threads: int, power: str,
          best_effort: bool, requests: int, out: Path, report: Path) -> str:
    """Run the requests; write the last image and the report after the clocks stop; return a summary line."""
    from tqdm import tqdm

    rt = AnytimeRuntime(artifact, profile=profile, controller=controller, backend=backend, threads=threads,
                        power=power)
    try:
        reports: list[RequestReport] = []
        rss_warm = None
        images = None
        for k in tqdm(range(requests), desc="requests", unit="req", disable=requests < 50, file=sys.stderr):
            images, rep = rt.generate(budget, rho=rho, sampler=sampler, seed=seed + k, batch=batch,
                                      best_effort=best_effort, schedule=schedule)
            reports.append(rep)
            if k + 1 == min(WARMUP_REQUESTS, requests):
                rss_warm = rss_mb()
    finally:
        rt.close()
    save_png(images, out)
    if requests == 1:
        write_json_atomic(report, reports[0].to_json())
        return reports[0].summary_line() + f"  -> {out}, {report}"
    summary = summarise(reports, rss_warm, rss_mb())
    write_json_atomic(report, {"schema_version": 1, "summary": asdict(summary),
                               "requests": [r.to_json() for r in reports]})
    return (f"{summary.requests} requests: success {summary.success_rate:.2%}, latency p50 "
            f"{summary.latency_p50_ms:.1f} / p99 {summary.latency_p99_ms:.1f} / max {summary.latency_max_ms:.1f} ms "
            f"(budget {budget}), utilisation {summary.utilisation_mean:.2f}, mean steps {summary.steps_mean:.1f}, "
            f"RSS growth {summary.rss_growth if summary.rss_growth is not None else float('nan'):+.1%}  -> {report}")
