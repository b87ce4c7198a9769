"""The HTTP face of the service: ``create_app(runtime)`` -> a FastAPI app (POST /generate, GET /health).

fastapi (and pydantic with it) is imported here only: the runtime and the CLI import without it.
The app owns one :class:`~abcd_edge.service.worker.Worker` (one thread, one FIFO) over the
runtime it is given; the caller opens and closes the runtime. At startup, before it answers
anything, the app runs ``warmup_requests`` requests of its own through the whole path (queue,
runtime, PNG, JSON, hand-back), twice: the first pass pays the one-off costs, the second
measures the overhead outside the runtime clock before the first admission decision. Each
gets WARMUP_STEPS steps' worth of budget plus the overhead measured so far; they are kept
out of the counts.
"""
from __future__ import annotations

import json
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from abcd_edge import __version__
from abcd_edge.core.budget import parse_budget
from abcd_edge.core.samplers import SAMPLER_NAMES
from abcd_edge.runtime.plan import PLACEMENTS, resolve_sampler
from abcd_edge.runtime.serve import rss_mb
from abcd_edge.service.admission import AdmissionQueue, Decision, OverheadEstimate
from abcd_edge.service.worker import GenerateParams, Outcome, Worker

ARRIVAL_KEY = "abcd_edge.arrival"   # the ASGI scope key the arrival stamp is kept under
WARMUP_REQUESTS = 10                # per pass, two passes
WARMUP_STEPS = 3                    # warm-up requests get a budget in which this many steps fit (+ overhead)


class GenerateRequest(BaseModel):
    """The body of POST /generate."""

    model_config = ConfigDict(extra="forbid")

    budget: str = Field(description="Latency budget counted from the request's arrival at the server: "
                                    "150ms, 0.15s, 500us.", examples=["150ms"])
    quality: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False,
                           description="rho in [0, 1]: 1 spends every step the budget allows.")
    seed: int = Field(0, ge=0, lt=2**63)
    sampler: Literal[(*SAMPLER_NAMES, "default", "auto")] = Field(
        "default", description="default: the artifact's natural sampler (consistency for a consistency model, "
                               "else ddim); auto: the calibrated one with the best validated quality.")
    placement: Literal[PLACEMENTS] = "auto"
    prompt: str | None = Field(None, max_length=4096, description="Text-to-image artifacts: the prompt "
                               "(truncated to the tokenizer's limit, noted in the report).")
    negative_prompt: str | None = Field(None, max_length=4096)
    guidance: float | None = Field(None, ge=1.0, allow_inf_nan=False,
                                   description="Classifier-free guidance scale (default: the artifact's).")
    decoder: Literal["vae", "tiny"] | None = None

    @field_validator("budget")
    @classmethod
    def _latency_budget(cls, value: str) -> str:
        budget = parse_budget(value)          # a UserError is a ValueError: pydantic answers 422 with its message
        if budget.kind != "latency":
            raise ValueError(f"energy budget {value!r} is not served over HTTP: a queued request's deadline "
                             "counts in time from its arrival; give a latency budget (150ms, 0.2s, 500us)")
        return value

    def params(self) -> GenerateParams:
        return GenerateParams(budget_ms=parse_budget(self.budget).ms, rho=self.quality, seed=self.seed,
                              sampler=self.sampler, placement=self.placement, prompt=self.prompt,
                              negative_prompt=self.negative_prompt, guidance=self.guidance, decoder=self.decoder)


class _StampArrival:
    """ASGI middleware: the arrival time of each HTTP request, taken before validation and routing."""

    def __init__(self, app, clock):
        self.app, self.clock = app, clock

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope[ARRIVAL_KEY] = self.clock()
        await self.app(scope, receive, send)


def create_app(runtime, *, queue: int = 64, warmup_requests: int = WARMUP_REQUESTS,
               overhead: OverheadEstimate | None = None) -> FastAPI:
    """The app over an open :class:`~abcd_edge.runtime.session.AnytimeRuntime` (warm; not closed here).

    ``queue`` bounds the requests waiting behind the one in progress."""
    admission = AdmissionQueue(queue, overhead)
    worker = Worker(runtime, admission)
    clock = admission.clock

    async def respond(params: GenerateParams, arrival: float, want_png: bool, counted: bool = True) -> Response:
        decision, future = worker.submit(params, arrival, counted)
        if future is None:
            return _refusal(decision, params)
        ticket, outcome = await future
        if outcome.kind != "completed":
            admission.answered(ticket, outcome.kind, clock())
            return _failure(outcome, (ticket.taken - arrival) * 1e3)
        ready = clock()
        wait_ms, latency_ms = (ticket.taken - arrival) * 1e3, (ready - arrival) * 1e3
        rep = outcome.report
        if want_png:
            response = Response(outcome.png, media_type="image/png",
                                headers=_png_headers(params, outcome, wait_ms, latency_ms))
        else:
            body = {"report": rep.to_json(), "image_png_base64": outcome.png_base64,
                    "queue_wait_ms": round(wait_ms, 3), "latency_ms": round(latency_ms, 3),
                    "budget_ms": params.budget_ms, "runtime_budget_ms": round(outcome.runtime_budget_ms, 3),
                    "deadline_met": latency_ms <= params.budget_ms}
            response = Response(json.dumps(body).encode(), media_type="application/json")
        admission.answered(ticket, "completed", clock(), rep.latency_ms)    # the overhead includes building the body
        return response

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            natural = resolve_sampler("default", runtime.manifest.prediction_type)
            steps_ms = runtime.cost_model(1, natural).budget_for(WARMUP_STEPS)
            for k in range(2 * warmup_requests):
                if k == warmup_requests:       # the first pass pays one-off costs (imports, first encodes)
                    admission.overhead.clear()
                params = GenerateParams(budget_ms=steps_ms + admission.overhead.value(), seed=k)
                await respond(params, clock(), want_png=k % 2 == 1, counted=False)
            admission.overhead.set_baseline()
            yield
        finally:
            worker.stop()

    app = FastAPI(title="abcd-edge", version=__version__, lifespan=lifespan,
                  description="Anytime, budget-aware diffusion: the best image this device can make before the "
                              "deadline, counted from the request's arrival. Requests whose deadline cannot be "
                              "met behind the queue are refused at once (503 with the predicted wait).")
    app.add_middleware(_StampArrival, clock=clock)
    app.state.worker, app.state.admission = worker, admission

    @app.post("/generate", responses={
        200: {"description": "JSON (report, base64 PNG, queue wait, latency), or the PNG with Accept: image/png",
              "content": {"image/png": {}}},
        503: {"description": "refused: the deadline cannot be met behind the queue, or the queue is full"},
        422: {"description": "bad input, an energy budget, or a budget below the smallest achievable response"}})
    async def generate(body: GenerateRequest, request: Request) -> Response:
        """The best image this device can make before arrival + budget, or a refusal at once.

        Admitted only if the deadline can still be met after the worst-case wait behind the requests
        ahead; the runtime then gets what is left of the budget when the worker takes the request."""
        arrival = request.scope.get(ARRIVAL_KEY, clock())
        if body.placement == "controller" and runtime.controller is None:
            return JSONResponse({"detail": "placement 'controller' needs a calibrated controller; this service "
                                           "runs without one (accepted: auto, uniform, karras, logsnr)"},
                                status_code=422)
        if body.sampler not in worker.samplers:
            return JSONResponse({"detail": f"sampler {body.sampler!r} is not in this device's profile "
                                           f"(accepted: {', '.join(worker.samplers)})"}, status_code=422)
        return await respond(body.params(), arrival, "image/png" in request.headers.get("accept", ""))

    @app.get("/health")
    async def health() -> dict:
        """The model, the queue, the counts (accepted, refused, dropped, completed, late, failed), the measured
        overhead, the minimum response per sampler (now, and the profile's) and the server's RSS."""
        return {"status": "ok", "model": runtime.manifest.name, "artifact": runtime.artifact_dir,
                "backend": runtime.backend, "profile": runtime.profile_path,
                "profile_device": runtime.profile.device_id, "controller": runtime.controller_dir,
                "minimum_ms": {s: round(worker.minimum_ms(s), 3) for s in worker.samplers},
                "profile_minimum_ms": {s: round(worker.profile_minimum_ms(s), 3) for s in worker.samplers},
                "rss_mb": rss_mb(), **admission.snapshot()}

    return app


def _refusal(decision: Decision, params: GenerateParams) -> JSONResponse:
    budget = params.budget_ms
    if decision.reason == "below minimum":
        error = (f"budget {budget:g}ms is below the smallest response this device can make: "
                 f"{decision.minimum_ms:.2f} ms (one step + finishing at the profile's tail)")
    elif decision.reason == "queue full":
        error = f"the queue is full ({decision.queue_length} requests waiting)"
    elif decision.reason == "deadline":
        error = (f"budget {budget:g}ms cannot be met now: the requests ahead may keep the worker busy for "
                 f"{decision.predicted_wait_ms:.1f} ms, which with {decision.overhead_ms:.1f} ms of measured "
                 f"overhead outside the runtime leaves {decision.remaining_ms:.1f} ms, below the "
                 f"{decision.minimum_ms:.2f} ms of one step + finishing at the step tail the runtime uses now")
    else:
        error = "the service is shutting down"
    body = {"error": error, "reason": decision.reason, "budget_ms": budget,
            "predicted_wait_ms": round(decision.predicted_wait_ms, 3), "minimum_ms": round(decision.minimum_ms, 3),
            "overhead_ms": round(decision.overhead_ms, 3), "remaining_ms": round(decision.remaining_ms, 3),
            "queue_length": decision.queue_length}
    if decision.reason == "below minimum":       # waiting would not help: bad input for this device
        return JSONResponse(body, status_code=422)
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(decision.retry_after_s)})


def _failure(outcome: Outcome, wait_ms: float) -> JSONResponse:
    body = {"error": outcome.message, "reason": outcome.kind, "queue_wait_ms": round(wait_ms, 3)}
    if outcome.status == 503:
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
    return JSONResponse(body, status_code=outcome.status)


def _png_headers(params: GenerateParams, outcome: Outcome, wait_ms: float, latency_ms: float) -> dict[str, str]:
    rep = outcome.report
    return {"X-Budget-Ms": f"{params.budget_ms:g}", "X-Latency-Ms": f"{latency_ms:.3f}",
            "X-Queue-Wait-Ms": f"{wait_ms:.3f}", "X-Runtime-Latency-Ms": f"{rep.latency_ms:.3f}",
            "X-Deadline-Met": str(latency_ms <= params.budget_ms).lower(), "X-Steps": str(rep.steps),
            "X-Planned-Steps": str(rep.planned_steps), "X-Exit-Reason": rep.exit_reason,
            "X-Sampler": rep.sampler, "X-Seed": str(rep.seed)}
