"""Serving requests from the CLI: one request, or N on a warm session with a summary."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from abcd_edge.core.budget import Budget
from abcd_edge.io import atomic_path
from abcd_edge.core.images import image_format, save_image
from abcd_edge.runtime.report import RequestReport
from abcd_edge.runtime.session import AnytimeRuntime, RequestInterrupted

WARMUP_REQUESTS = 20


@dataclass
class ServeSummary:
    requests: int
    success_rate: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    utilisation_mean: float | None   # latency / budget, or energy / budget; None when unmeasured
    steps_mean: float
    exit_reasons: dict
    rss_mb_after_warmup: float | None
    rss_mb_end: float | None
    rss_growth: float | None     # (end - after warm-up) / after warm-up
    machine_load_note: str
    interrupted: bool = False    # Ctrl-C stopped the run: these are the requests answered until then


def rss_mb() -> float | None:
    """Resident set size of this process (Linux /proc), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


class RunningStats:
    """What the summary needs from each request, in arrays sized once: memory stays flat over a soak."""

    def __init__(self, requests: int):
        self.latency_ms = np.full(requests, np.nan)
        self.used = np.full(requests, np.nan)      # share of the budget used: latency or energy
        self.met = np.zeros(requests, bool)
        self.steps = np.zeros(requests, np.int32)
        self.exit_reasons: dict[str, int] = {}
        self.count = 0

    def add(self, rep: RequestReport) -> None:
        k = self.count
        self.latency_ms[k], self.met[k], self.steps[k] = rep.latency_ms, rep.deadline_met, rep.steps
        if rep.budget_mj:
            self.used[k] = rep.energy_mj / rep.budget_mj if rep.energy_mj is not None else np.nan
        else:
            self.used[k] = rep.latency_ms / rep.budget_ms
        self.exit_reasons[rep.exit_reason] = self.exit_reasons.get(rep.exit_reason, 0) + 1
        self.count += 1

    def summary(self, rss_warm: float | None, rss_end: float | None, interrupted: bool = False) -> ServeSummary:
        n = self.count
        lat = self.latency_ms[:n]
        growth = (rss_end - rss_warm) / rss_warm if rss_warm and rss_end else None
        return ServeSummary(
            requests=n, success_rate=float(np.mean(self.met[:n])),
            latency_p50_ms=float(np.quantile(lat, 0.5)), latency_p99_ms=float(np.quantile(lat, 0.99)),
            latency_max_ms=float(lat.max()), utilisation_mean=_nanmean(self.used[:n]),
            steps_mean=float(np.mean(self.steps[:n])), exit_reasons=dict(self.exit_reasons),
            rss_mb_after_warmup=rss_warm, rss_mb_end=rss_end, rss_growth=growth,
            machine_load_note=f"os.getloadavg at end: {os.getloadavg()[0]:.2f}", interrupted=interrupted,
        )


def _nanmean(values: np.ndarray) -> float | None:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


@dataclass
class ServeResult:
    """What :func:`serve_requests` did: the summary line (None when nothing was written), how many answered
    requests missed their deadline (or energy budget), and whether Ctrl-C stopped it (``note`` says what
    was kept)."""

    line: str | None
    missed: int
    interrupted: bool = False
    note: str = ""


def serve_requests(budget: Budget, *, requests: int, out: Path, report: Path, session: dict,
                   **request) -> ServeResult:
    """Run the requests; write the last image and the report after the clocks stop.

    ``session`` is what :meth:`AnytimeRuntime.open` takes (artifact, profile, controller, backend,
    threads, power, precision); ``request`` what :meth:`AnytimeRuntime.generate` takes (rho, sampler,
    placement, seed, batch, best_effort): request k runs with seed + k.

    With several requests, each request's row is streamed into the report's temp
    file between requests (after its clock stopped), so nothing grows with N in
    memory; the report is renamed into place only when all requests are done.

    Ctrl-C keeps the anytime promise: a request interrupted after at least one step
    answers with its last completed step's x0 (exit_reason "interrupted"); the image and
    the report (with several requests: the rows and summary of those answered so far,
    ``"interrupted": true``) are written as usual and the result says ``interrupted``.
    Interrupted before any request had an answer, nothing is written.
    """
    image_format(out)          # an unknown suffix is refused before any work
    try:
        return _serve(budget, requests, out, report, session, request)
    except KeyboardInterrupt:
        return ServeResult(None, 0, interrupted=True,
                           note="interrupted before any step finished; nothing written")


def _serve(budget: Budget, requests: int, out: Path, report: Path, session: dict, request: dict) -> ServeResult:
    from tqdm import tqdm

    stats = RunningStats(requests)
    rss_warm = None
    images = rep = None
    interrupted = False
    request = dict(request)
    seed = request.pop("seed", 0)
    with AnytimeRuntime.open(**session) as rt:
        with atomic_path(report) as tmp, open(tmp, "w") as rows:
            rows.write('{"schema_version": 1, "requests": [\n')
            try:
                for k in tqdm(range(requests), desc="requests", unit="req", disable=requests < 50, file=sys.stderr):
                    try:
                        images, rep = rt.generate(budget, seed=seed + k, **request)
                    except RequestInterrupted as exc:
                        if exc.report is None:
                            raise
                        images, rep, interrupted = exc.images, exc.report, True
                    stats.add(rep)
                    rows.write((",\n" if stats.count > 1 else "") + json.dumps(rep.to_json()))
                    if interrupted:
                        break
                    if k + 1 == min(WARMUP_REQUESTS, requests):
                        rss_warm = rss_mb()
            except KeyboardInterrupt:
                if stats.count == 0:
                    raise                   # no answer yet: the temp report is removed, nothing written
                interrupted = True
            summary = stats.summary(rss_warm, rss_mb(), interrupted=interrupted)
            if requests == 1:
                rows.seek(0)
                rows.truncate()
                rows.write(json.dumps(rep.to_json(), indent=2) + "\n")
            else:
                rows.write('\n], "summary": ' + json.dumps(asdict(summary), indent=2) + "}\n")
    save_image(images, out)
    missed = int(stats.count - np.count_nonzero(stats.met[:stats.count]))
    note = ""
    if interrupted:
        note = (f"interrupted: the answer so far ({rep.steps} steps, exit_reason interrupted) -> {out}"
                if rep.exit_reason == "interrupted" else f"interrupted after {stats.count} answered requests")
        if requests > 1:
            note += f"; summary of {stats.count} requests -> {report}"
    if requests == 1:
        return ServeResult(rep.summary_line() + f"  -> {out}, {report}", missed, interrupted, note)
    return ServeResult(
        f"{summary.requests} requests: success {summary.success_rate:.2%}, latency p50 "
        f"{summary.latency_p50_ms:.1f} / p99 {summary.latency_p99_ms:.1f} / max {summary.latency_max_ms:.1f} ms "
        f"(budget {budget}), utilisation {_fmt(summary.utilisation_mean, '.2f')}, mean steps {summary.steps_mean:.1f}, "
        f"RSS growth {_fmt(summary.rss_growth, '+.1%')}  -> {report}", missed, interrupted, note)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
