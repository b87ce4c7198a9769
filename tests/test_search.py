"""The schedule search: the memo that makes re-runs of shared prefixes free, and the coordinate descent."""
from __future__ import annotations

import numpy as np
import pytest

from abcd_edge.calibrate.search import MIN_GAP, MemoDenoiser, coordinate_search, feasible


def test_memo_returns_what_the_denoiser_returned_and_counts_hits():
    calls = []

    def den(sample, t):
        calls.append(1)
        return sample * 2 + t[:, None, None, None]

    memo = MemoDenoiser(den, capacity=2)
    a = np.ones((2, 1, 2, 2), np.float32)
    t = np.array([5.0, 5.0], np.float32)
    first = memo(a, t)
    assert np.array_equal(memo(a.copy(), t.copy()), first) and len(calls) == 1 and memo.hits == 1
    assert not np.array_equal(memo(a, t + 1), first) and len(calls) == 2       # another timestep: computed
    memo(a + 1, t)                                                              # a third input evicts the oldest
    memo(a, t)
    assert len(calls) == 4


def test_coordinate_search_finds_a_known_optimum_and_respects_the_constraints():
    lo, hi = np.log(0.01), np.log(100.0)
    target = np.log([100.0, 3.0, 0.5, 0.05])
    evals = []

    def objective(sigmas):
        evals.append(1)
        return float(((np.log(sigmas) - target) ** 2).sum())

    start = np.exp(np.linspace(hi, np.log(0.02), 4))
    res = coordinate_search(objective, start, lo, hi, deltas=(0.8, 0.4, 0.2, 0.1, 0.05, 0.025))
    assert res.score < 0.01 * res.start_score and res.score <= min(res.history)
    assert np.allclose(np.log(res.sigmas), target, atol=0.03)
    assert res.sigmas[0] == pytest.approx(100.0) and feasible(np.log(res.sigmas), lo, hi)
    assert res.evaluations == len(evals)
    # an optimum outside the feasible set is approached, never crossed
    squeezed = np.log([100.0, 3.0, 2.9, 0.001])
    res = coordinate_search(lambda s: float(((np.log(s) - squeezed) ** 2).sum()), start, lo, hi)
    gaps = -np.diff(np.log(res.sigmas))
    assert np.all(gaps >= MIN_GAP - 1e-9) and np.log(res.sigmas[-1]) >= lo - 1e-9
