"""The one step loop (core/loop.py) and the one cost model (runtime/cost.py), on small numpy stand-ins."""
from __future__ import annotations

import numpy as np
import pytest

from abcd_edge.core.loop import LoopResult, NoHooks, StopBelow, run_steps, sample
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.placement import time_uniform_sigmas
from abcd_edge.core.samplers import make_sampler
from abcd_edge.formats.profile import BatchProfile, LatencyStats
from abcd_edge.runtime.cost import GUARD_SLACK_MS, CostModel

SCHEDULE = NoiseSchedule.from_config(dict(num_train_timesteps=1000, beta_schedule="linear"))


class LinearDenoiser:
    """eps = 0.1 * sample + 0.01 * t / 1000 (+ class label): cheap, deterministic, records its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, sample, t, **cond):
        self.calls.append((sample.copy(), t.copy(), dict(cond)))
        extra = cond.get("class_labels", np.zeros(len(sample)))[:, None, None, None]
        return (0.1 * sample + 0.01 * t[:, None, None, None] / 1000 + 0.001 * extra).astype(np.float32)


def manual_loop(denoiser, smp, noise, rng):
    """What every caller used to write: the reference the loop must equal bit for bit."""
    x = smp.prepare(noise)
    x0 = np.zeros_like(noise)
    for i in range(len(smp)):
        s, t = smp.model_input(x, i)
        out = denoiser(s, t)
        step_noise = rng.standard_normal(noise.shape).astype(np.float32) if smp.stochastic else None
        x, x0 = smp.step(x, i, out, noise=step_noise)
    return x0


@pytest.mark.parametrize("name", ["ddim", "dpmpp-2m", "euler", "consistency"])
def test_loop_equals_the_hand_written_loop(name):
    noise = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    sig = time_uniform_sigmas(SCHEDULE, 7)
    want = manual_loop(LinearDenoiser(), make_sampler(name, SCHEDULE, sig), noise, np.random.default_rng(5))
    res = run_steps(LinearDenoiser(), make_sampler(name, SCHEDULE, sig), noise, rng=np.random.default_rng(5))
    assert isinstance(res, LoopResult) and res.reason == "done" and res.steps == 7
    assert res.x0.dtype == np.float32 and np.array_equal(res.x0, want)


def test_history_conditioning_and_stop_below():
    noise = np.random.default_rng(1).standard_normal((2, 3, 4, 4)).astype(np.float32)
    sig = time_uniform_sigmas(SCHEDULE, 6)
    den = LinearDenoiser()
    labels = np.array([0, 3])
    final, history = sample(den, make_sampler("ddim", SCHEDULE, sig), noise, keep_x0=True,
                            conditioning={"class_labels": labels})
    assert len(history) == 6 and np.array_equal(history[-1], final)
    assert all(np.array_equal(c["class_labels"], labels) for _, _, c in den.calls)       # passed to every call
    unconditioned, plain = sample(LinearDenoiser(), make_sampler("ddim", SCHEDULE, sig), noise, keep_x0=True)
    assert not np.array_equal(final, unconditioned)
    # StepDrop: stop before the first step (after the first) whose sigma is below the threshold
    thr = float(np.sqrt(sig[2] * sig[3]))
    res = run_steps(LinearDenoiser(), make_sampler("ddim", SCHEDULE, sig), noise, hooks=StopBelow(thr))
    assert res.reason == "stepdrop" and res.steps == 3 and np.array_equal(res.x0, plain[2])


def test_hooks_stop_guard_and_replan():
    noise = np.zeros((1, 3, 4, 4), np.float32)
    sig = time_uniform_sigmas(SCHEDULE, 10)

    class Rules(NoHooks):
        def __init__(self):
            self.seen = []

        def after_call(self, i, smp, ms):
            self.seen.append(len(smp))
            if i == 1:                     # re-plan the 8 remaining steps into 2
                smp.replan(i, np.asarray(smp.sigmas[[4, 8]]))

        def after_step(self, i, smp, x0_prev, x0):
            return None

    rules = Rules()
    res = run_steps(LinearDenoiser(), make_sampler("ddim", SCHEDULE, sig), noise, hooks=rules)
    assert res.reason == "done" and res.steps == 4 and rules.seen == [10, 10, 4, 4]

    class Stop(NoHooks):
        def after_step(self, i, smp, x0_prev, x0):
            return "quality" if i == 2 else None

    res = run_steps(LinearDenoiser(), make_sampler("ddim", SCHEDULE, sig), noise, hooks=Stop())
    assert res.reason == "quality" and res.steps == 3

    class Abandoning:                       # a clock whose guard fires on the second call
        simulated = True

        def __init__(self):
            self.k = 0

        def run_step(self, call, abandon, guard_ms):
            self.k += 1
            return (None, 5.0) if self.k == 2 else (call(), 1.0)

    res = run_steps(LinearDenoiser(), make_sampler("ddim", SCHEDULE, sig), noise, clock=Abandoning())
    assert res.reason == "guard" and res.step_ms == [1.0]


def _batch_profile(step, finish, sampler_ms=0.01):
    return BatchProfile(batch=1, step=LatencyStats.from_samples(step), flops_per_step=1e9, flops_per_s=1e12,
                        sampler_ms={"ddim": LatencyStats.from_samples([sampler_ms] * 10)},
                        finish=LatencyStats.from_samples(finish), png=LatencyStats.from_samples([0.1]))


def test_cost_model_answers_every_steps_that_fit_question():
    bp = _batch_profile([1.0 + 0.2 * k / 99 for k in range(100)], [0.1] * 50)
    cm = CostModel.from_profile(bp, "ddim", decision_tail_ms=0.01)
    p99 = bp.step.p99_ms + 0.01 + 0.01
    slack = GUARD_SLACK_MS + 0.15 * bp.step.p50_ms
    # tail: n x p99 + finishing + slack <= B (a static schedule's K)
    assert cm.steps_that_fit(100.0) == int((100.0 - 0.1 - slack) // p99)
    assert cm.steps_that_fit(100.0, cap=5) == 5 and cm.steps_that_fit(0.5) == 0
    # median: no margin, the p50s (BuCo-MWG's frozen surrogate)
    assert cm.steps_that_fit(100.0, level="median") == int((100.0 - 0.1 - GUARD_SLACK_MS) // (bp.step.p50_ms + 0.01))
    # sum: more steps than the tail plan, fewer than the physical limit, and the sum still fits at 99 %
    n_sum = cm.steps_that_fit(100.0, level="sum")
    assert cm.steps_that_fit(100.0) < n_sum <= cm.physical_limit(100.0)
    mean, std = cm.step_mean_ms + 0.02, cm.step_std_ms
    assert n_sum * mean + 2.33 * np.sqrt(n_sum) * std + (cm.next_step_ms() - mean) + 0.1 + slack <= 100.0
    assert cm.physical_limit(100.0) == int((100.0 - 0.1) // bp.step.p50_ms)
    assert cm.physical_limit(100.0, step_ms=2.0) == 49
    # the online correction scales the step tail; the hard rule and the guard follow it
    slow = CostModel.from_profile(bp, "ddim", correction=2.0)
    assert slow.steps_that_fit(100.0) < cm.steps_that_fit(100.0)
    assert cm.may_start(0.0, cm.minimum_ms()) and not cm.may_start(0.01, cm.minimum_ms())
    assert cm.guard_ms(100.0) == pytest.approx(100.0 - 0.1 - slack)
    with pytest.raises(ValueError, match="level"):
        cm.steps_that_fit(100.0, level="p90")
