"""Clocks for the anytime loop: the wall clock with a deadline watchdog, and a replay clock.

The loop asks a clock two things: how much time has passed since the request
started, and to run one denoiser call that may be abandoned at a guard time.
``WallClock`` uses ``time.monotonic`` and a persistent watchdog thread that
calls ``denoiser.abandon()`` when the guard time passes. ``ReplayClock`` runs the
real denoiser but charges each call a latency drawn from a profile's measured
samples on a simulated clock: everything it times is labelled simulated.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Protocol

import numpy as np

from abcd_edge.device.backends import Abandoned


class Clock(Protocol):
    simulated: bool

    def start(self) -> None: ...

    def elapsed_ms(self) -> float: ...

    def run_step(self, call: Callable[[], np.ndarray], abandon: Callable[[], None],
                 guard_ms: float | None) -> tuple[np.ndarray | None, float]:
        """Run ``call``; return (result or None if abandoned at ``guard_ms`` elapsed, step ms)."""
        ...

    def disarm(self) -> None:
        """The request's loop is over: nothing may be abandoned any more."""
        ...


class Watchdog:
    """One background thread that fires ``abandon`` when an armed deadline passes."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._abandon: Callable[[], None] | None = None
        self._fired = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="abcd-watchdog", daemon=True)
        self._thread.start()

    def arm(self, deadline: float, abandon: Callable[[], None]) -> None:
        with self._cond:
            self._deadline, self._abandon, self._fired = deadline, abandon, False
            self._cond.notify()

    def disarm(self) -> bool:
        """Disarm; True when the watchdog fired during the armed period."""
        with self._cond:
            fired = self._fired
            self._deadline, self._abandon = None, None
            return fired

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=1.0)

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(timeout=remaining)
                    continue
                self._fired = True
                abandon, self._deadline = self._abandon, None
                if abandon is not None:
                    abandon()


class WallClock:
    simulated = False

    def __init__(self) -> None:
        self._t0 = time.monotonic()
        self._watchdog = Watchdog()
        self._armed: float | None = None

    def start(self) -> None:
        self.disarm()
        self._t0 = time.monotonic()

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self._t0) * 1e3

    def disarm(self) -> None:
        """Stop guarding: the request's loop is over."""
        if self._armed is not None:
            self._watchdog.disarm()
            self._armed = None

    def run_step(self, call, abandon, guard_ms):
        # The watchdog stays armed between steps (abandoning nothing when no call is in flight) and is
        # re-armed only when the guard time changes. The runtime's guard time keeps the guard slack,
        # which follows the running correction, so in practice most steps re-arm it: one condition
        # notify, no new thread.
        if guard_ms != self._armed:
            self.disarm()
            if guard_ms is not None:
                self._watchdog.arm(self._t0 + guard_ms / 1e3, abandon)
                self._armed = guard_ms
        t0 = time.monotonic()
        try:
            result = call()
        except Abandoned:
            result = None
        return result, (time.monotonic() - t0) * 1e3

    def close(self) -> None:
        self.disarm()
        self._watchdog.close()


class ReplayClock:
    """Simulated time: each denoiser call costs a draw from ``step_samples_ms``.

    Work outside denoiser calls (sampler arithmetic, decisions, finishing) is
    charged at its real measured time, scaled by ``overhead_scale`` (the ratio of
    the replayed device's step time to this machine's, so a slower device's
    overhead is not understated).
    """

    simulated = True

    def __init__(self, step_samples_ms, seed: int = 0, overhead_scale: float = 1.0) -> None:
        self._samples = np.asarray(step_samples_ms, np.float64)
        self._rng = np.random.default_rng(seed)
        self._overhead_scale = overhead_scale
        self._charged = 0.0
        self._real_t0 = time.perf_counter()
        self._real_in_steps = 0.0

    def start(self) -> None:
        self._charged = 0.0
        self._real_in_steps = 0.0
        self._real_t0 = time.perf_counter()

    def elapsed_ms(self) -> float:
        outside = (time.perf_counter() - self._real_t0) * 1e3 - self._real_in_steps
        return self._charged + outside * self._overhead_scale

    def run_step(self, call, abandon, guard_ms):
        draw = float(self._rng.choice(self._samples))
        before = self.elapsed_ms()
        t0 = time.perf_counter()
        result = call()
        self._real_in_steps += (time.perf_counter() - t0) * 1e3
        if guard_ms is not None and before + draw > guard_ms:
            self._charged += max(guard_ms - before, 0.0)
            return None, max(guard_ms - before, 0.0)
        self._charged += draw
        return result, draw

    def disarm(self) -> None:
        pass

    def close(self) -> None:
        pass
