"""`abcd-edge serve`: the admission decision (fake clock), and the real service over HTTP on a tiny ONNX model.

The end-to-end tests start `abcd-edge serve` in a subprocess on 127.0.0.1 (its own GIL, like a
deployment) and fire real httpx clients at it from threads here.
"""
from __future__ import annotations

import base64
import io
import math
import random
import subprocess
import sys

import pytest
from click.testing import CliRunner

from abcd_edge.service.admission import AdmissionQueue, OverheadEstimate, Ticket

# What a 200 answer may take beyond its budget, measured by the client from just before sending to the
# whole answer read: the HTTP transport outside the server's clock (the client's request building and
# parsing, the socket both ways, uvicorn reading the request before the arrival stamp and writing the
# answer after the response is ready). Measured on this shared 2-core VM with 8 clients: 3-8 ms at the
# median, up to 25-40 ms under the bursts. The server itself is held to the budget from arrival: its
# `late` count and each answer's latency_ms.
TRANSPORT_MARGIN_MS = 30.0


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _queue(capacity=8, overhead_ms=None, t=100.0):
    clock = FakeClock(t)
    est = OverheadEstimate(clock=clock)
    if overhead_ms is not None:
        est.add(overhead_ms)
    return AdmissionQueue(capacity, est, clock=clock), clock


# ------------------------------------------------------------------------------------ admission, no HTTP
def test_admits_when_it_fits_and_refuses_with_the_predicted_wait():
    q, clock = _queue(overhead_ms=2.0)
    first = Ticket(arrival=clock.t, budget_ms=100.0, minimum_ms=5.0)
    d = q.offer(first)
    assert d.admitted and d.predicted_wait_ms == 0 and d.remaining_ms == pytest.approx(98.0)
    assert q.take() is first                                   # in progress, deadline t + 100 ms

    clock.t += 0.010                                           # 10 ms later
    # 104 ms from now: the worker may be busy 90 ms more, 14 - 2 ms overhead = 12 >= 5: admitted
    d = q.offer(Ticket(arrival=clock.t, budget_ms=104.0, minimum_ms=5.0))
    assert d.admitted and d.predicted_wait_ms == pytest.approx(90.0) and d.remaining_ms == pytest.approx(12.0)
    # the queued one's deadline (t + 114 ms) is now the bound: a 110 ms request waits 104 ms, 6 - 2 < 5: refused
    d = q.offer(Ticket(arrival=clock.t, budget_ms=110.0, minimum_ms=5.0))
    assert not d.admitted and d.reason == "deadline"
    assert d.predicted_wait_ms == pytest.approx(104.0) and d.remaining_ms == pytest.approx(4.0)
    assert d.retry_after_s == 1 and d.queue_length == 1
    # the same budget fits once the worker is known to be free earlier (the queued request done)
    assert q.take() is not None
    q.release(first)
    assert q.counts.accepted == 2 and q.counts.refused == 1 and q.counts.refused_by_reason == {"deadline": 1}


def test_below_minimum_overhead_and_queue_full():
    q, clock = _queue(capacity=1, overhead_ms=3.0)
    d = q.offer(Ticket(arrival=clock.t, budget_ms=4.0, minimum_ms=5.0))     # never: below the runtime's minimum
    assert not d.admitted and d.reason == "below minimum" and d.predicted_wait_ms == 0
    d = q.offer(Ticket(arrival=clock.t, budget_ms=7.0, minimum_ms=5.0))     # not with 3 ms of overhead now
    assert not d.admitted and d.reason == "deadline" and d.predicted_wait_ms == 0 and d.remaining_ms == 4.0
    assert q.offer(Ticket(arrival=clock.t, budget_ms=8.0, minimum_ms=5.0)).admitted      # 8 - 3 >= 5
    d = q.offer(Ticket(arrival=clock.t, budget_ms=1000.0, minimum_ms=5.0))
    assert not d.admitted and d.reason == "queue full"
    assert q.counts.refused_by_reason == {"below minimum": 1, "deadline": 1, "queue full": 1}
    assert q.counts.accepted == 1


def test_the_bar_is_the_runtime_now_when_busy_and_its_floor_when_idle():
    """A device running slower than its profile (minimum now 12 ms, the runtime's floor 5 ms, the profile's
    own 3 ms): requests queued behind others are held to the minimum now, but an idle worker takes one at the
    floor, so the runtime can step or relax its correction; only below the profile's own is it never."""
    q, clock = _queue(overhead_ms=1.0)
    slow = dict(minimum_ms=12.0, floor_ms=5.0, never_ms=3.0)
    d = q.offer(Ticket(arrival=clock.t, budget_ms=4.5, **slow))
    assert not d.admitted and d.reason == "deadline" and d.minimum_ms == 5.0     # idle, but 4.5 - 1 < 5: later
    d = q.offer(Ticket(arrival=clock.t, budget_ms=10.0, **slow))
    assert d.admitted and d.minimum_ms == 5.0                     # idle: the floor
    q.take()
    d = q.offer(Ticket(arrival=clock.t, budget_ms=20.0, **slow))
    assert not d.admitted and d.reason == "deadline" and d.minimum_ms == 12.0    # 20 - 10 - 1 < 12
    d = q.offer(Ticket(arrival=clock.t, budget_ms=2.0, **slow))
    assert not d.admitted and d.reason == "below minimum" and d.minimum_ms == 3.0


def test_runtime_budget_is_shortened_by_the_wait_and_the_overhead():
    q, clock = _queue(overhead_ms=2.5)
    t = Ticket(arrival=clock.t, budget_ms=150.0, minimum_ms=5.0)
    q.offer(t)
    clock.t += 0.040
    assert q.take() is t and t.taken == clock.t
    assert q.runtime_budget_ms(t) == pytest.approx(150.0 - 40.0 - 2.5)
    clock.t += 0.100
    q.release(t)
    q.answered(t, "completed", ready=clock.t, runtime_ms=95.0)   # 100 ms taken -> ready, 95 in the runtime
    assert q.counts.completed == 1 and q.counts.late == 0
    assert q.overhead.value() == pytest.approx(5.0)                # the new sample, now the quantile
    late = Ticket(arrival=clock.t, budget_ms=10.0, minimum_ms=1.0)
    q.offer(late)
    q.take()
    q.answered(late, "completed", ready=clock.t + 0.011)
    assert q.counts.late == 1


def test_overhead_estimate_is_a_high_quantile_of_a_recent_window():
    clock = FakeClock(0.0)
    est = OverheadEstimate(window=100, quantile=0.99, max_age_s=60.0, clock=clock)
    assert est.value() == 0.0
    for ms in range(1, 101):
        est.add(ms)
    assert est.value() >= 99
    for _ in range(100):          # the old spike leaves the window
        est.add(1.0)
    assert est.value() == 1.0 and len(est) == 100
    est.set_baseline()
    for _ in range(3):            # a machine-wide stall: every request now refused ...
        est.add(500.0)
    assert est.value() == 500.0
    clock.t += 61.0               # ... and none answered since: the stall ages out, the baseline is back
    assert est.value() == 1.0 and len(est) == 0


def _simulate(q: AdmissionQueue, clock: FakeClock, seed: int) -> list[tuple[Ticket, str, float]]:
    """A discrete-event run of one worker under bursty arrivals at mixed budgets, in the worst case: every
    admitted request uses all the runtime time it is given, plus exactly the estimated overhead.
    Returns (ticket, completed | dropped, end time) for every admitted request."""
    rng = random.Random(seed)
    arrivals, t = [], clock.t
    for _ in range(400):
        t += rng.expovariate(1 / 0.012)
        arrivals.append((t, rng.choice([8.0, 20.0, 50.0, 150.0, 400.0])))
    busy: dict = {}
    ends: list[tuple[Ticket, str, float]] = []

    def advance(limit: float) -> None:
        while True:
            if busy:
                if busy["end"] > limit:
                    return
                clock.t = busy["end"]
                q.release(busy["ticket"])
                q.answered(busy["ticket"], "completed", clock.t)
                ends.append((busy.pop("ticket"), "completed", busy.pop("end")))
            if not q._queue:
                return
            ticket = q.take()                        # at clock.t: when the worker is free, or at the arrival
            budget = q.runtime_budget_ms(ticket)
            if budget < ticket.minimum_ms:
                q.release(ticket)
                q.answered(ticket, "dropped", clock.t)
                ends.append((ticket, "dropped", clock.t))
                continue
            busy.update(ticket=ticket, end=clock.t + (budget + q.overhead.value()) / 1e3)

    for arrival, budget_ms in arrivals:
        advance(arrival)
        clock.t = arrival
        q.offer(Ticket(arrival=arrival, budget_ms=budget_ms, minimum_ms=4.0))
        advance(arrival)
    advance(float("inf"))
    assert q.counts.accepted + q.counts.refused == len(arrivals)
    return ends


@pytest.mark.parametrize("seed", range(4))
def test_no_admitted_request_is_dropped_or_late_in_a_worst_case_simulation(seed):
    """The runtime budget (deadline - now - overhead) keeps every request on time by construction; what the
    admission decision adds is that every admitted request still gets at least its minimum when the worker
    takes it, so none is dropped, while bursts are refused."""
    q, clock = _queue(capacity=6, overhead_ms=1.5)
    ends = _simulate(q, clock, seed)
    assert all(end <= ticket.deadline + 1e-9 for ticket, _, end in ends)
    assert q.counts.dropped == 0 and q.counts.late == 0
    assert q.counts.completed == q.counts.accepted > 50 and q.counts.refused > 10


def test_the_simulation_fails_a_queue_that_ignores_the_requests_ahead():
    """The check above can fail: predicting the worker free at once admits requests that are dropped later."""
    q, clock = _queue(capacity=6, overhead_ms=1.5)
    q._free_at = lambda now: now
    _simulate(q, clock, 0)
    assert q.counts.dropped > 10


# ------------------------------------------------------------------------------------ the CLI without the extra
def test_service_imports_neither_fastapi_nor_torch_until_it_serves():
    code = ("import sys, abcd_edge.cli.main, abcd_edge.service.admission, abcd_edge.service.worker, "
            "abcd_edge.runtime.session; print(sorted(m for m in ('fastapi', 'uvicorn', 'torch', 'httpx') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_extra_is_one_line_exit_2(missing, monkeypatch):
    from abcd_edge.cli.main import main

    monkeypatch.setitem(sys.modules, missing, None)            # `import <missing>` raises ImportError
    res = CliRunner().invoke(main, ["serve", "--port", "8001"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("abcd-edge: error:") and missing in lines[0]
    assert "pip install 'abcd-edge[serve]'" in lines[0]


@pytest.mark.parametrize("args,needle", [(["--queue", "0"], "--queue 0"), (["--port", "70000"], "--port 70000"),
                                       (["--port", "0"], "--port 0")])
def test_serve_bad_options(args, needle):
    from abcd_edge.cli.main import main

    res = CliRunner().invoke(main, ["serve", *args])
    assert res.exit_code == 2 and needle in res.output and len(res.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------ the real service
@pytest.fixture(scope="module")
def server(tiny_artifact, tiny_profile):
    """`abcd-edge serve` on the tiny artifact (its measured profile, 1 thread, no controller)."""
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from abcd_edge.service.loadgen import free_port, start_server, stop_server

    port = free_port()
    proc = start_server(["--artifact", str(tiny_artifact), "--profile", str(tiny_profile), "--controller", "none",
                         "--threads", "1", "--power", "none", "--queue", "64"], port)
    url = f"http://127.0.0.1:{port}"
    try:
        yield url, httpx
    finally:
        out = stop_server(proc)
        assert "Traceback" not in out, out


def test_openapi_health_and_bad_input(server):
    url, httpx = server
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    assert "post" in paths["/generate"] and "get" in paths["/health"]
    health = httpx.get(f"{url}/health").json()
    assert health["model"] == "tiny" and health["backend"] == "ort-cpu" and health["queue_length"] == 0
    assert health["overhead_samples"] > 0 and health["overhead_ms"] > 0         # measured at startup
    valid = {"budget": "150ms"}
    for body, needle in [({"budget": "150"}, "'150'"), ({"budget": "-5ms"}, "'-5ms'"), ({"budget": "2J"}, "energy"),
                         ({**valid, "quality": 2}, "quality"), ({**valid, "quality": "NaN"}, "quality"),
                         ({"budget": "150ms", "sampler": "foo"}, "sampler"), ({}, "budget"),
                         ({"budget": "150ms", "placement": "controller"}, "controller"),
                         ({"budget": "150ms", "seed": -1}, "seed"), ({"budget": "150ms", "steps": 3}, "steps")]:
        r = httpx.post(f"{url}/generate", json=body)
        assert r.status_code == 422, (body, r.text)
        assert needle in r.text, (body, r.text)
    r = httpx.post(f"{url}/generate", json={"budget": "1us"})          # below one step + finishing here
    assert r.status_code == 422 and r.json()["reason"] == "below minimum"
    assert r.json()["minimum_ms"] == pytest.approx(health["profile_minimum_ms"]["default"], abs=1e-3)
    assert "Retry-After" not in r.headers                                 # waiting would not help


def test_png_and_json_answers(server):
    from PIL import Image

    url, httpx = server
    r = httpx.post(f"{url}/generate", json={"budget": "300ms", "seed": 5}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (8, 8) and img.mode == "RGB"
    assert int(r.headers["x-steps"]) >= 1 and float(r.headers["x-latency-ms"]) <= 300
    assert r.headers["x-deadline-met"] == "true" and r.headers["x-seed"] == "5"
    assert r.headers["x-sampler"] == "ddim"                               # "default": DDIM for an epsilon model

    r = httpx.post(f"{url}/generate", json={"budget": "0.3s", "seed": 5, "sampler": "dpmpp-2m", "quality": 0.5})
    data = r.json()
    assert r.status_code == 200 and data["deadline_met"] and data["latency_ms"] <= 300
    rep = data["report"]
    assert rep["sampler"] == "dpmpp-2m" and rep["steps"] >= 1 and rep["rho"] == 0.5
    assert rep["budget_ms"] == pytest.approx(data["runtime_budget_ms"], abs=1e-2) and rep["budget_ms"] < 300
    img = Image.open(io.BytesIO(base64.b64decode(data["image_png_base64"])))
    assert img.size == (8, 8)


def test_prompts_are_served_for_a_text_to_image_artifact(server, tiny_sd_artifact):
    """A prompt to a pixel artifact is bad input (422); a text-to-image artifact answers it."""
    from abcd_edge.service.loadgen import free_port, start_server, stop_server

    url, httpx = server
    r = httpx.post(f"{url}/generate", json={"budget": "300ms", "prompt": "a red circle"})
    assert r.status_code == 422 and "prompt" in r.text, r.text
    port = free_port()
    proc = start_server(["--artifact", str(tiny_sd_artifact), "--controller", "none", "--threads", "1", "--power",
                         "none"], port)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/generate", timeout=30,
                       json={"budget": "2s", "prompt": "a red circle", "negative_prompt": "blue", "guidance": 5.0})
        assert r.status_code == 200, r.text
        rep = r.json()["report"]
        assert rep["prompt"] == "a red circle" and rep["steps"] >= 1 and r.json()["deadline_met"]
        r = httpx.post(f"http://127.0.0.1:{port}/generate", json={"budget": "2s", "prompt": "x", "guidance": 0.5})
        assert r.status_code == 422 and "guidance" in r.text
    finally:
        out = stop_server(proc)
        assert "Traceback" not in out, out


def test_concurrent_clients_on_time_or_refused(server):
    """8 clients, 5 requests each at mixed budgets, released together (a refused client waits the predicted
    wait before its next request): some requests must be refused, each refusal's figures must justify it,
    and every answered request must be on time from its arrival (server) and from its sending (client,
    + the transport margin)."""
    from abcd_edge.service.loadgen import run_clients

    url, httpx = server
    before = httpx.get(f"{url}/health").json()
    budgets = ["40ms", "60ms", "100ms", "150ms"]
    answers = run_clients(url, clients=8, requests_per_client=5, budget_for=lambda k, i: budgets[(k + i) % 4],
                          seed0=100)
    after = httpx.get(f"{url}/health").json()
    ok = [a for a in answers if a.status == 200]
    busy = [a for a in answers if a.status == 503]
    assert len(ok) + len(busy) == len(answers) == 40, [(a.status, a.extra) for a in answers if a.status != 200]
    assert ok and busy, "the burst should both fit some requests and refuse others"
    for a in ok:
        assert a.elapsed_ms <= a.budget_ms + TRANSPORT_MARGIN_MS, a
        assert a.steps >= 1 and a.queue_wait_ms >= 0
    # The server's own clock, from arrival, no margin, but for at most 2 answers: at the jump from the quiet
    # requests before to this burst, the work outside the runtime (hand-back to the event loop, PNG, JSON)
    # can take longer than the 99th percentile of the last 256 requests on this CPU-starved shared 2-core
    # VM (seen: 0 or 1 answer of 40, 3-12 ms late).
    late = [a for a in ok if a.latency_ms > a.budget_ms]
    assert len(late) <= 2, late
    for a in busy:
        assert a.reason in ("deadline", "queue full", "dropped") and a.retry_after is not None, a
        if a.reason == "deadline":      # what is left after the predicted wait and the overhead is too little
            x = a.extra
            assert x["remaining_ms"] < x["minimum_ms"] and x["predicted_wait_ms"] >= 0, x
            assert x["remaining_ms"] <= a.budget_ms - x["predicted_wait_ms"] - x["overhead_ms"] + 1e-2, x
    delta = {k: after[k] - before[k] for k in ("accepted", "refused", "completed", "dropped", "late", "failed")}
    refused_here = sum(a.reason != "dropped" for a in busy)
    assert delta["refused"] == refused_here and delta["completed"] == len(ok)
    assert delta["accepted"] == len(ok) + delta["dropped"] and delta["late"] == len(late) and delta["failed"] == 0
    assert delta["accepted"] + delta["refused"] == len(answers)
    assert after["queue_length"] == 0 and after["in_progress"] == 0


@pytest.mark.slow
def test_soak_2000_requests_flat_memory_never_late(server):
    """2,000 requests at 50ms from 2 clients (a refused one waits the predicted wait), after 200 of warm-up:
    the server's RSS grows < 5 %, (almost) no answer is late, every request gets a 200 or a 503 and the
    counts add up."""
    from abcd_edge.service.loadgen import run_clients

    url, httpx = server
    run_clients(url, clients=2, requests_per_client=100, budget_for=lambda k, i: "50ms", seed0=10_000)
    before = httpx.get(f"{url}/health").json()
    answers = run_clients(url, clients=2, requests_per_client=1000, budget_for=lambda k, i: "50ms", seed0=20_000)
    after = httpx.get(f"{url}/health").json()
    ok = [a for a in answers if a.status == 200]
    assert len(answers) == 2000, len(answers)
    assert all(a.status in (200, 503) for a in answers), [a.extra for a in answers if a.status not in (200, 503)]
    assert len(ok) >= 400, (len(ok), after)
    # Late: answered after arrival + budget, by the server's clock. None in quiet conditions; with the
    # load average at 4-6 from other jobs on this shared 2-core VM, 0-2 per ~1,400 answers were seen: the
    # scheduler delaying the runtime's guard, or the work after the image (PNG, hand-back to the event loop)
    # beyond the 99th percentile of the last 256. Allowed: 0.2 % of the answers.
    # The server counts an answer late when it is ready, its body built; the latency_ms inside the body is
    # taken just before that: every answer late by the body's figure is late by the server's count too.
    late = [(a.latency_ms, a.queue_wait_ms, a.extra) for a in ok if a.latency_ms > a.budget_ms]
    server_late = after["late"] - before["late"]
    assert len(late) <= server_late <= math.ceil(0.002 * len(ok)), (late, server_late, after["overhead_ms"])
    delta = {k: after[k] - before[k] for k in ("accepted", "refused", "completed", "dropped", "failed")}
    assert delta["completed"] == len(ok) and delta["failed"] == 0
    assert delta["accepted"] + delta["refused"] == 2000 and delta["accepted"] == len(ok) + delta["dropped"]
    growth = (after["rss_mb"] - before["rss_mb"]) / before["rss_mb"]
    assert growth < 0.05, (before["rss_mb"], after["rss_mb"])
