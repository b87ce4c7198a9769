"""Clients for the service's soak and tests: start `abcd-edge serve` in a subprocess, fire closed-loop clients.

httpx is imported lazily (it is in the ``dev`` extra, not needed to serve). Each answer
keeps only what the checks need (not the image), so memory stays flat over a long soak.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


@dataclass
class Answer:
    """One request as a client saw it; times are ``time.perf_counter()`` seconds in the client."""

    client: int
    budget: str
    budget_ms: float
    status: int
    sent: float
    received: float
    latency_ms: float | None = None          # the server's: arrival -> response ready (200 only)
    queue_wait_ms: float | None = None
    steps: int | None = None
    predicted_wait_ms: float | None = None   # 503 only
    minimum_ms: float | None = None
    reason: str | None = None
    retry_after: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def elapsed_ms(self) -> float:
        """From just before the request was sent to the whole answer read, measured by the client."""
        return (self.received - self.sent) * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, timeout_s: float = 120.0, log=None) -> subprocess.Popen:
    """`python -m abcd_edge.cli.main serve --port PORT ARGS` on 127.0.0.1; returns once /health answers
    (the app answers only after its warm-up). Raises RuntimeError with the server's output if it exits."""
    import httpx

    cmd = [sys.executable, "-m", "abcd_edge.cli.main", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise RuntimeError(f"server exited with {proc.returncode}: {out}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        proc_wait(proc, 0.2)
    stop_server(proc)
    raise RuntimeError(f"server did not answer /health within {timeout_s} s")


def proc_wait(proc: subprocess.Popen, seconds: float) -> None:
    """Wait for the process up to ``seconds`` (a poll interval while the server starts)."""
    try:
        proc.wait(seconds)
    except subprocess.TimeoutExpired:
        pass


def stop_server(proc: subprocess.Popen) -> str:
    """Stop the server this module started (SIGTERM, then SIGKILL) and return its output."""
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out or ""


def post_generate(client, url: str, k: int, budget: str, budget_ms: float, seed: int = 0, **body) -> Answer:
    """One POST /generate, timed by the client from just before sending to the whole answer read."""
    sent = time.perf_counter()
    r = client.post(f"{url}/generate", json={"budget": budget, "seed": seed, **body})
    content = r.content
    received = time.perf_counter()
    a = Answer(client=k, budget=budget, budget_ms=budget_ms, status=r.status_code, sent=sent, received=received,
               retry_after=r.headers.get("retry-after"))
    data = r.json() if r.headers.get("content-type", "").startswith("application/json") and content else {}
    if r.status_code == 200:
        a.latency_ms, a.queue_wait_ms = data["latency_ms"], data["queue_wait_ms"]
        a.steps = data["report"]["steps"]
        a.extra = {"runtime_latency_ms": data["report"]["latency_ms"], "runtime_budget_ms": data["runtime_budget_ms"],
                   "deadline_met": data["deadline_met"], "exit_reason": data["report"]["exit_reason"]}
    else:
        a.predicted_wait_ms, a.minimum_ms, a.reason = (data.get("predicted_wait_ms"), data.get("minimum_ms"),
                                                       data.get("reason"))
        a.extra = data          # the refusal's figures (overhead_ms, remaining_ms, ...) or the 422's detail
    return a


def run_clients(url: str, clients: int, requests_per_client: int, budget_for: Callable[[int, int], str],
                backoff: bool = True, seed0: int = 0, timeout_s: float = 30.0) -> list[Answer]:
    """``clients`` threads, each with its own keep-alive connection, sending ``requests_per_client``
    requests back to back (closed loop) at ``budget_for(client, i)``. With ``backoff`` a refused
    client waits the server's predicted_wait_ms before its next request (the server's advice, finer
    than Retry-After's whole seconds); without, it sends again at once."""
    import httpx

    from abcd_edge.core.budget import parse_budget

    answers: list[list[Answer]] = [[] for _ in range(clients)]
    start = threading.Barrier(clients)
    errors: list[BaseException] = []

    def loop(k: int) -> None:
        try:
            with httpx.Client(timeout=timeout_s) as client:
                client.get(f"{url}/health")          # open the connection before the clock matters
                start.wait()
                for i in range(requests_per_client):
                    budget = budget_for(k, i)
                    a = post_generate(client, url, k, budget, parse_budget(budget).ms,
                                      seed=seed0 + k * requests_per_client + i)
                    answers[k].append(a)
                    if backoff and a.status == 503 and a.predicted_wait_ms:
                        threading.Event().wait(a.predicted_wait_ms / 1e3)
        except BaseException as exc:            # re-raised in the caller's thread
            errors.append(exc)
            start.abort()

    threads = [threading.Thread(target=loop, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [a for per_client in answers for a in per_client]
