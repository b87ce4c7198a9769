"""Where the steps go, searched against what the quality metric rewards.

The objective is distribution-level: the Frechet distance between the features of the
n-step images from a fixed set of *training* noises and the features of generator data
(reference statistics), in the calibration feature network. It is the quantity the
bench reports, measured on other noises and, for judging, in another network
(``calibrate.gate``); closeness to a many-step teacher is not what it rewards (issue 13:
the teacher-closest schedules are the blurriest).

The search is a coordinate descent over the free log-sigmas of a schedule (the first
step stays at sigma_max): each coordinate is moved by +-delta while that improves the
objective, with delta shrinking between passes. A schedule that differs from the best so
far only after step k re-runs only the steps after k: :class:`MemoDenoiser` returns the
denoiser's output for inputs it has already seen, so the one step loop recomputes
nothing it has computed before.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from abcd_edge.core.noise import NoiseSchedule

MIN_GAP = 0.05                     # smallest log-sigma gap between consecutive steps
DELTAS = (0.6, 0.3, 0.15, 0.075)   # coordinate moves in log-sigma, one pass each


def deltas_for(n: int) -> tuple[float, ...]:
    """The passes a search of n steps gets: a pass costs ~n^2 / 2 rollout steps, so longer schedules (which
    start from the previous step count's result, already close) get fewer, finer ones."""
    return DELTAS[:3] if n <= 6 else DELTAS[1:3] if n <= 10 else DELTAS[2:3]


class MemoDenoiser:
    """The denoiser with a memory: an input (sample bytes, timesteps) seen before returns the stored output."""

    def __init__(self, denoiser: Callable[..., np.ndarray], capacity: int = 96):
        self.denoiser, self.capacity = denoiser, capacity
        self._memo: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.calls = self.hits = 0

    def __call__(self, sample: np.ndarray, timestep: np.ndarray, **conditioning) -> np.ndarray:
        h = hashlib.blake2b(np.ascontiguousarray(sample).view(np.uint8), digest_size=16)
        h.update(np.ascontiguousarray(timestep, np.float64).tobytes())
        for k in sorted(conditioning):
            h.update(np.ascontiguousarray(conditioning[k]).view(np.uint8))
        key = h.digest()
        self.calls += 1
        if key in self._memo:
            self.hits += 1
            self._memo.move_to_end(key)
            return self._memo[key]
        out = self.denoiser(sample, timestep, **conditioning)
        self._memo[key] = out
        if len(self._memo) > self.capacity:
            self._memo.popitem(last=False)
        return out


@dataclass
class FeatureObjective:
    """Feature-FID of a schedule's images from fixed noises against reference statistics (lower is better)."""

    rollouts: Any                    # runtime.rollout.Rollouts (x0 and images as the runtime makes them)
    denoiser: Callable[..., np.ndarray]
    sampler: str
    noises: np.ndarray
    featurenet: Any                  # quality.FeatureNet (the calibration network)
    reference: Any                   # quality.ReferenceStats of that network
    evaluations: int = 0

    def __call__(self, sigmas: np.ndarray) -> float:
        self.evaluations += 1
        x0 = self.rollouts.x0(self.sampler, sigmas, self.noises, self.denoiser)
        return self.reference.fid_to_reference(self.rollouts.features(self.featurenet, x0))


@dataclass
class SearchResult:
    sigmas: np.ndarray
    score: float
    start_score: float
    evaluations: int
    history: list[float] = field(default_factory=list)   # best score after each accepted move

    def to_json(self) -> dict:
        return {"sigmas": [float(s) for s in self.sigmas], "score": round(self.score, 4),
                "start_score": round(self.start_score, 4), "evaluations": self.evaluations}


def feasible(log_sigmas: np.ndarray, log_lo: float, log_hi: float) -> bool:
    """First at log_hi, strictly decreasing by at least MIN_GAP, the last no lower than log_lo."""
    return (abs(log_sigmas[0] - log_hi) < 1e-9 and bool(np.all(np.diff(log_sigmas) <= -MIN_GAP))
            and log_sigmas[-1] >= log_lo - 1e-9)


def coordinate_search(objective: Callable[[np.ndarray], float], start: np.ndarray, log_lo: float, log_hi: float,
                      deltas: tuple[float, ...] = DELTAS, on_eval: Callable[[], None] | None = None,
                      start_score: float | None = None) -> SearchResult:
    """Coordinate descent on the free log-sigmas of ``start`` (its first sigma is sigma_max, kept).

    Coordinates are visited from the last step to the second (the cheap ones first: a change
    after step k re-runs only the steps after k); each moves by +-delta as long as that
    improves the objective, then the next; one pass per delta."""
    best = np.log(np.asarray(start, np.float64))
    best[0] = log_hi
    best_score = start_score = objective(np.exp(best)) if start_score is None else start_score
    evaluations, history = 1, [best_score]
    for delta in deltas:
        for k in range(len(best) - 1, 0, -1):
            for direction in (-1.0, 1.0):
                moved = False
                while True:
                    trial = best.copy()
                    trial[k] += direction * delta
                    if not feasible(trial, log_lo, log_hi):
                        break
                    score = objective(np.exp(trial))
                    evaluations += 1
                    if on_eval is not None:
                        on_eval()
                    if score >= best_score:
                        break
                    best, best_score, moved = trial, score, True
                    history.append(best_score)
                if moved:
                    break            # improved in this direction: the other one cannot also improve
    return SearchResult(np.exp(best), best_score, start_score, evaluations, history)


def starting_points(schedule: NoiseSchedule, n: int, previous: np.ndarray | None,
                    own: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Where a search for n steps may start: the time-uniform and log-SNR schedules (Karras' never scored
    best in our runs), a pipeline's ``own`` (its diffusers scheduler's), and the previous step count's result
    stretched to n steps (linear in log-sigma over the step index)."""
    from abcd_edge.core.placement import DIFFUSERS_PLACEMENT, logsnr_uniform_sigmas, time_uniform_sigmas

    starts = {"uniform": time_uniform_sigmas(schedule, n), "logsnr": logsnr_uniform_sigmas(schedule, n)}
    if own is not None:
        starts[DIFFUSERS_PLACEMENT] = own
    if previous is not None and len(previous) >= 2:
        logs = np.log(previous)
        starts["previous"] = np.exp(np.interp(np.linspace(0, len(logs) - 1, n), np.arange(len(logs)), logs))
    return starts


def search_schedules(state) -> dict[str, dict[str, dict]]:
    """Stage 1: per sampler and search step count, the schedule with the best objective on training noises.

    ``{sampler: {str(n): SearchResult.to_json() + {"start": name}}}``, checkpointed after each (sampler, n);
    each search starts from the best of :func:`starting_points`."""
    import json

    from abcd_edge.core.placement import DIFFUSERS_PLACEMENT
    from abcd_edge.io import atomic_path

    cfg = state.cfg
    f = state.ckpt_file("search.json")
    table: dict = json.loads(f.read_text()) if f.exists() else {}
    noises = np.random.default_rng(cfg.seed + 100).standard_normal(
        (cfg.search_noises, *state.shape)).astype(np.float32)
    denoiser = MemoDenoiser(state.denoiser("train", len(noises)))
    lo, hi = state.spec.log_sigma_min, float(np.log(state.schedule.sigma_max))
    todo = [(s, n) for s in cfg.samplers for n in cfg.steps_for(s)]
    bar = state.bar(len(todo), "search")
    for sampler in cfg.samplers:
        objective = FeatureObjective(state.rollouts, denoiser, sampler, noises, state.calibration_net,
                                     state.calibration_reference)
        previous = None
        for n in cfg.steps_for(sampler):
            done = table.get(sampler, {}).get(str(n))
            if done is None:
                own = (state.static_sigmas(DIFFUSERS_PLACEMENT, sampler, n)
                       if DIFFUSERS_PLACEMENT in state.static_kinds else None)
                starts = {k: v for k, v in starting_points(state.schedule, n, previous, own).items()
                          if feasible(np.log(v), lo, hi)}
                scores = {name: objective(sig) for name, sig in starts.items()}
                first = min(scores, key=scores.get)
                result = coordinate_search(objective, starts[first], lo, hi, deltas=deltas_for(n),
                                           on_eval=lambda: bar.set_postfix(sampler=sampler, n=n),
                                           start_score=scores[first])
                done = {**result.to_json(), "start": first, "start_scores": {k: round(v, 4) for k, v in scores.items()}}
                table.setdefault(sampler, {})[str(n)] = done
                with atomic_path(f) as p:
                    p.write_text(json.dumps(table))
            previous = np.asarray(done["sigmas"])
            bar.update(1)
    bar.close()
    return table
