"""The one worker thread: it takes admitted requests from the queue, in order, and runs them on the warm runtime.

The HTTP handlers run on the event loop; each admitted request carries an asyncio
future, and the worker hands its outcome back with ``loop.call_soon_threadsafe``
(no executor, no polling). Numpy, Pillow and the runtime only: no HTTP here.
"""
from __future__ import annotations

import asyncio
import base64
import dataclasses
import threading
from dataclasses import dataclass
from typing import Callable

from abcd_edge.core.budget import Budget
from abcd_edge.core.images import image_grid, png_bytes
from abcd_edge.errors import UserError
from abcd_edge.runtime.plan import resolve_sampler
from abcd_edge.runtime.report import RequestReport
from abcd_edge.service.admission import AdmissionQueue, Decision, Ticket


@dataclass(frozen=True)
class GenerateParams:
    """One request's parameters, already validated (see app.py's schema)."""

    budget_ms: float
    rho: float = 1.0
    seed: int = 0
    sampler: str = "default"
    placement: str = "auto"
    prompt: str | None = None            # text-to-image artifacts (runtime.generate refuses them elsewhere: 422)
    negative_prompt: str | None = None
    guidance: float | None = None
    decoder: str | None = None


@dataclass
class Outcome:
    """How the worker ended a request: ``completed`` (report, PNG), ``dropped`` (503: its deadline could no
    longer be met when taken, or no step fit before it: a machine slower now than its profile) or
    ``failed`` (the runtime raised; ``status`` 422 for a UserError, else 500)."""

    kind: str
    report: RequestReport | None = None
    png: bytes = b""
    png_base64: str = ""
    runtime_budget_ms: float = 0.0
    status: int = 200
    message: str = ""


@dataclass
class _Pending:
    params: GenerateParams
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class Worker:
    """One warm runtime, one thread, one FIFO: requests run one at a time, in arrival order."""

    def __init__(self, runtime, queue: AdmissionQueue):
        self.runtime, self.queue = runtime, queue
        self._thread: threading.Thread | None = None
        self._floors, self._minimums = self._measure_minimums()
        self._never = self._profile_minimums()

    def _measure_minimums(self) -> tuple[dict[str, float], dict[str, float]]:
        """Per sampler at batch 1: the profile's minimum (``runtime.minimum_ms``) and the smallest response
        the runtime would start now (its cost model at the running correction and observed tail, never
        below the profile's); "default" the artifact's natural sampler's, "auto" the largest of each, as
        the choice is made only at planning.
        Refreshed by the worker after each request, so the event loop reads finished dicts and never the
        runtime's state while a request runs."""
        floors = {s: self.runtime.minimum_ms(1, s) for s in self.runtime.profile.for_batch(1).sampler_ms}
        now = {s: max(floors[s], self.runtime.cost_model(1, s).minimum_ms()) for s in floors}
        natural = resolve_sampler("default", self.runtime.manifest.prediction_type)
        if natural in floors:
            floors["default"], now["default"] = floors[natural], now[natural]
        return {**floors, "auto": max(floors.values())}, {**now, "auto": max(now.values())}

    def _profile_minimums(self) -> dict[str, float]:
        """Per sampler: one step + finishing at the profile's own tails, nothing observed since."""
        never = {s: dataclasses.replace(self.runtime.cost_model(1, s, correction=1.0), observed_tail_ratio=0.0)
                 .minimum_ms() for s in self._floors if s not in ("default", "auto")}
        natural = resolve_sampler("default", self.runtime.manifest.prediction_type)
        return {**never, "default": never.get(natural, max(never.values())), "auto": max(never.values())}

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers this device's profile has timings for, "default" and "auto"."""
        return tuple(self._minimums)

    def minimum_ms(self, sampler: str) -> float:
        """The smallest response the runtime would start now for the sampler, as of the last request."""
        return self._minimums[sampler]

    def floor_ms(self, sampler: str) -> float:
        """``runtime.minimum_ms``: one step + finishing at the profile's tail or the tail observed lately."""
        return self._floors[sampler]

    def profile_minimum_ms(self, sampler: str) -> float:
        """One step + finishing at the profile's own tail: a budget below it can never be met here."""
        return self._never[sampler]

    def submit(self, params: GenerateParams, arrival: float,
               counted: bool = True) -> tuple[Decision, asyncio.Future | None]:
        """Offer a request (from the event loop); the future resolves to its :class:`Outcome` when admitted."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        ticket = Ticket(arrival=arrival, budget_ms=params.budget_ms, minimum_ms=self.minimum_ms(params.sampler),
                        floor_ms=self.floor_ms(params.sampler), never_ms=self.profile_minimum_ms(params.sampler),
                        payload=_Pending(params, loop, future), counted=counted)
        decision = self.queue.offer(ticket)
        return decision, (future if decision.admitted else None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="abcd-edge-service-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, finish the queued ones, and join the thread."""
        self.queue.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while (ticket := self.queue.take()) is not None:
            pending: _Pending = ticket.payload
            outcome = self._execute(ticket, pending.params)
            self.queue.release(ticket)
            pending.loop.call_soon_threadsafe(_resolve, pending.future, (ticket, outcome))
            self._floors, self._minimums = self._measure_minimums()     # after the hand-back: off its clock

    def _execute(self, ticket: Ticket, p: GenerateParams) -> Outcome:
        budget_ms = self.queue.runtime_budget_ms(ticket)
        minimum = self.floor_ms(p.sampler)       # below it the runtime refuses the budget
        if budget_ms < minimum:
            return Outcome("dropped", runtime_budget_ms=budget_ms, status=503,
                           message=f"the deadline can no longer be met: {budget_ms:.2f} ms left for the runtime "
                                   f"after the wait, below the minimum {minimum:.2f} ms")
        try:
            images, report = self.runtime.generate(Budget("latency", budget_ms), rho=p.rho, sampler=p.sampler,
                                                   seed=p.seed, placement=p.placement, prompt=p.prompt,
                                                   negative_prompt=p.negative_prompt, guidance=p.guidance,
                                                   decoder=p.decoder,
                                                   clock=SinceTaken(self.runtime.clock, ticket.taken, self.queue.clock))
            if report.steps == 0:       # the hard rule or the guard left no step: there is no image to send
                return Outcome("dropped", report=report, runtime_budget_ms=budget_ms, status=503,
                               message=f"no denoising step fit in the {budget_ms:.2f} ms left before the deadline "
                                       f"(exit: {report.exit_reason}; steps run {report.correction:.2f}x "
                                       "the profile's time)")
            png = png_bytes(image_grid(images))
            return Outcome("completed", report=report, png=png, png_base64=base64.b64encode(png).decode("ascii"),
                           runtime_budget_ms=budget_ms)
        except UserError as exc:
            return Outcome("failed", runtime_budget_ms=budget_ms, status=422, message=str(exc))
        except Exception as exc:     # the service keeps serving; the request is answered 500 with the reason
            return Outcome("failed", runtime_budget_ms=budget_ms, status=500, message=f"{type(exc).__name__}: {exc}")


class SinceTaken:
    """The session's clock, counting from when the worker took the request rather than from the runtime's
    own start: the planning before that start (and anything else before it) is then inside the budget the
    runtime's hard rule and guard hold to, not in the overhead the queue has to estimate. Only the clock
    protocol the runtime uses (start, elapsed_ms, run_step, disarm) is delegated."""

    def __init__(self, base, taken: float, now: Callable[[], float]):
        self.base, self.taken, self.now = base, taken, now
        self.simulated = getattr(base, "simulated", False)
        self.offset_ms = 0.0

    def start(self) -> None:
        self.base.start()
        self.offset_ms = (self.now() - self.taken) * 1e3

    def elapsed_ms(self) -> float:
        return self.base.elapsed_ms() + self.offset_ms

    def run_step(self, call, abandon, guard_ms):
        return self.base.run_step(call, abandon, None if guard_ms is None else guard_ms - self.offset_ms)

    def disarm(self) -> None:
        self.base.disarm()

    def close(self) -> None:          # the session's clock is the session's to close
        pass


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():      # the handler may have been cancelled (client gone)
        future.set_result(value)

