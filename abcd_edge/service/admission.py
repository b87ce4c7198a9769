"""Admission control: the FIFO of admitted requests and the decision to admit one. No HTTP here.

A request's deadline counts from its arrival at the server: arrival + budget. The
worker gives the runtime only what is left of the budget when it takes the request
(the deadline - now - the overhead outside the runtime clock), and the runtime's
hard rule and guard keep a request inside the limit it is given. So each request
the worker holds frees it by its own deadline at the latest (at once when it is
dropped, its deadline having passed): the worst case for when the worker is free
is the latest deadline among the request in progress and those queued ahead. This
is tighter than summing their budgets and still a bound: a queued request starts
after the ones before it, and the time it may use shrinks by as much.

A new request is admitted when, after that worst-case wait, what is left of its
budget minus the overhead is at least the smallest response the runtime would
start now: one step + finishing at the step tail it uses now (the profile's tail
x the online correction, or the tail observed lately, whichever is larger; never
below the profile's own, ``runtime.minimum_ms``). It then gets at least one step
and a finished image before its deadline, whatever the requests ahead of it do, as
long as the overhead and the step tail stay within what was measured (a scheduler
stalling the process for longer is what the ``late`` count records).
While the worker is idle the bar is the runtime's own ``minimum_ms`` (no
correction): a request then runs at once, and either steps or, taking none,
relaxes the correction (runtime/cost.py), so a transient slowdown cannot leave the
service refusing short budgets forever. A budget below the profile's minimum can
never be met on this device ("below minimum", the HTTP layer's 422); every other
refusal depends on the load (503, retry later).

The runtime's clock counts from when the worker takes the request (worker.py's
``SinceTaken``), so its planning is inside its budget. What is left, the overhead
(the report, encoding PNG and JSON, handing the result back to the event loop), is
measured per request as (response ready - taken) - the runtime's latency, and
:class:`OverheadEstimate` keeps a high quantile of the recent values.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

OVERHEAD_WINDOW = 256      # the overhead estimate is over the last 256 answered requests,
OVERHEAD_QUANTILE = 0.99   # at the 99 % level: one stall of the whole machine (seen: 144 ms) does not
                           # refuse every request while it is in the window, as their largest would
OVERHEAD_MAX_AGE_S = 60.0  # and over the last minute only (see OverheadEstimate)


@dataclass
class Ticket:
    """One request as the queue sees it. Times are ``time.perf_counter()`` seconds."""

    arrival: float
    budget_ms: float
    minimum_ms: float            # the smallest response the runtime would start now (see above)
    floor_ms: float = 0.0        # runtime.minimum_ms(batch, sampler): the profile's tail, or the one observed
                                 # lately if larger (no correction); <= minimum_ms
    never_ms: float = 0.0        # the profile's alone: a budget below it can never be met on this device
    payload: Any = None          # what the worker needs: the request's parameters, where to answer
    counted: bool = True         # False for the service's own warm-up requests (kept out of the counts)
    taken: float | None = None   # when the worker took it

    @property
    def deadline(self) -> float:
        return self.arrival + self.budget_ms / 1e3


@dataclass(frozen=True)
class Decision:
    """Why a request was admitted or refused, with the figures the refusal reports."""

    admitted: bool
    reason: str                  # admitted | deadline | queue full | below minimum | closed
    predicted_wait_ms: float     # worst case until the worker is free for this request
    remaining_ms: float          # what the runtime would get after that wait and the overhead
    minimum_ms: float            # the bar remaining_ms was held to (the profile's for "below minimum")
    overhead_ms: float
    queue_length: int            # requests queued ahead (not counting the one in progress)

    @property
    def retry_after_s(self) -> int:
        """Retry-After in whole seconds (HTTP's unit), at least 1."""
        return max(1, int(np.ceil(self.predicted_wait_ms / 1e3)))


@dataclass
class Counts:
    """What the service did; every counted request ends in exactly one of
    refused, dropped, completed or failed (accepted = dropped + completed + failed + in flight)."""

    accepted: int = 0            # admitted into the queue
    refused: int = 0             # refused at arrival (503; 422 for a budget below the runtime's minimum)
    refused_by_reason: dict[str, int] = field(default_factory=dict)
    dropped: int = 0             # admitted, answered 503 without an image: too little time left when taken,
                                 # or no step fit (the device slower now than its profile)
    completed: int = 0           # answered with an image
    late: int = 0                # of the completed: the answer was ready after arrival + budget
    failed: int = 0              # the runtime raised (500)

    def to_json(self) -> dict:
        return asdict(self)


class OverheadEstimate:
    """A running high quantile of the per-request overhead outside the runtime clock, in ms.

    Samples come only from answered requests, so a spike could otherwise hold the estimate up for as
    long as it makes every request refused; samples older than ``max_age_s`` are dropped, and with
    none left the estimate is the ``baseline`` (what the service measured at startup: ``set_baseline``).
    ``clock`` is the time source (seconds, monotonic); tests pass a fake one."""

    def __init__(self, window: int = OVERHEAD_WINDOW, quantile: float = OVERHEAD_QUANTILE,
                 max_age_s: float = OVERHEAD_MAX_AGE_S, clock: Callable[[], float] = time.perf_counter):
        self._samples: deque[tuple[float, float]] = deque(maxlen=window)     # (time, ms)
        self._quantile, self._max_age_s, self._clock = quantile, max_age_s, clock
        self._value = self.baseline = 0.0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        with self._lock:
            self._samples.append((self._clock(), max(float(ms), 0.0)))
            self._update()

    def value(self) -> float:
        with self._lock:
            if self._samples and self._clock() - self._samples[0][0] > self._max_age_s:
                self._update()
            return self._value

    def set_baseline(self) -> None:
        """Keep the current estimate as the one to fall back to when every sample has aged out."""
        self.baseline = self.value()

    def clear(self) -> None:
        with self._lock:
            self._samples.clear()
            self._value = self.baseline

    def _update(self) -> None:
        now = self._clock()
        while self._samples and now - self._samples[0][0] > self._max_age_s:
            self._samples.popleft()
        ms = np.fromiter((m for _, m in self._samples), float)
        self._value = float(np.quantile(ms, self._quantile, method="higher")) if ms.size else self.baseline

    def __len__(self) -> int:
        return len(self._samples)


class AdmissionQueue:
    """The FIFO between the HTTP handlers (``offer``) and the one worker (``take``/``release``).

    ``clock`` is the time source (seconds, monotonic); tests pass a fake one."""

    def __init__(self, capacity: int, overhead: OverheadEstimate | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        if capacity < 1:
            raise ValueError(f"queue capacity {capacity} must be >= 1")
        self.capacity = capacity
        self.overhead = overhead if overhead is not None else OverheadEstimate()
        self.clock = clock
        self.counts = Counts()
        self._queue: deque[Ticket] = deque()
        self._current: Ticket | None = None
        self._closed = False
        self._cond = threading.Condition()

    # ------------------------------------------------------------------------ the decision
    def worker_free_at(self, now: float) -> float:
        """The latest time the worker may still be busy with what it holds (see the module's docstring)."""
        with self._cond:
            return self._free_at(now)

    def _free_at(self, now: float) -> float:
        held = ([self._current] if self._current is not None else []) + list(self._queue)
        return max([now] + [t.deadline for t in held])

    def offer(self, ticket: Ticket, now: float | None = None) -> Decision:
        """Admit the ticket (append it to the queue) or refuse it; the decision says which and why."""
        with self._cond:
            now = self.clock() if now is None else now
            overhead = self.overhead.value()
            free = self._free_at(now)
            remaining = ticket.budget_ms - (free - ticket.arrival) * 1e3 - overhead
            idle = self._current is None and not self._queue
            floor = min(ticket.floor_ms or ticket.minimum_ms, ticket.minimum_ms)
            never = min(ticket.never_ms or floor, floor)
            bar = floor if idle else ticket.minimum_ms
            if self._closed:
                reason = "closed"
            elif ticket.budget_ms - (now - ticket.arrival) * 1e3 < never:
                reason, bar = "below minimum", never     # the runtime alone could not meet it, whatever the load
            elif len(self._queue) >= self.capacity:
                reason = "queue full"
            elif remaining < bar:
                reason = "deadline"
            else:
                reason = "admitted"
            decision = Decision(admitted=reason == "admitted", reason=reason,
                                predicted_wait_ms=(free - now) * 1e3, remaining_ms=remaining,
                                minimum_ms=bar, overhead_ms=overhead, queue_length=len(self._queue))
            if decision.admitted:
                self._queue.append(ticket)
                self._cond.notify()
            if ticket.counted:
                if decision.admitted:
                    self.counts.accepted += 1
                else:
                    self.counts.refused += 1
                    self.counts.refused_by_reason[reason] = self.counts.refused_by_reason.get(reason, 0) + 1
            return decision

    # ------------------------------------------------------------------------ the worker's side
    def take(self) -> Ticket | None:
        """Block until a ticket is queued and mark it in progress; None once closed and empty."""
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            ticket = self._queue.popleft()
            ticket.taken = self.clock()
            self._current = ticket
            return ticket

    def runtime_budget_ms(self, ticket: Ticket, now: float | None = None) -> float:
        """What the runtime may spend on the ticket: the time left to its deadline minus the overhead."""
        now = self.clock() if now is None else now
        return ticket.budget_ms - (now - ticket.arrival) * 1e3 - self.overhead.value()

    def release(self, ticket: Ticket) -> None:
        """The worker is done with the ticket (its result is handed over)."""
        with self._cond:
            if self._current is ticket:
                self._current = None

    def answered(self, ticket: Ticket, outcome: str, ready: float, runtime_ms: float | None = None) -> None:
        """Record how an admitted ticket ended: ``completed`` (then its lateness and, with ``runtime_ms``,
        its overhead: (ready - taken) - runtime_ms), ``dropped`` or ``failed``."""
        with self._cond:
            if outcome == "completed" and runtime_ms is not None and ticket.taken is not None:
                self.overhead.add((ready - ticket.taken) * 1e3 - runtime_ms)
            if not ticket.counted:
                return
            if outcome == "completed":
                self.counts.completed += 1
                self.counts.late += int(ready > ticket.deadline)
            elif outcome == "dropped":
                self.counts.dropped += 1
            elif outcome == "failed":
                self.counts.failed += 1
            else:
                raise ValueError(f"outcome {outcome!r} is not completed, dropped or failed")

    def close(self) -> None:
        """Refuse new tickets; ``take`` returns None once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------------------ what /health shows
    def snapshot(self) -> dict:
        with self._cond:
            return {"queue_length": len(self._queue), "in_progress": int(self._current is not None),
                    "capacity": self.capacity, "overhead_ms": round(self.overhead.value(), 3),
                    "overhead_samples": len(self.overhead), **self.counts.to_json()}
