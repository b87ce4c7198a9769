"""The benchmark: hardware tiers x budgets x samplers x quality targets x seeds, ABCD against baselines.

``abcd-edge bench --grid quick --out bench/quick`` runs a grid and writes, into ``--out``:

* ``results.csv``  one row per request (a batch of images): method, tier, budget, sampler, rho,
  seed, latency, steps, deadline_met, energy, teacher distance, cost-predictor error, ...
* ``summary.md``   a table per metric (methods as rows, best per column marked), the wins table,
  the issue's goals checked, the predictor error;
* PNG plots        success vs budget, feature-FID vs budget, latency histograms, utilisation;
* ``bench.json``   the exact configuration, the resolved tiers, the machine, tuned thresholds;
* ``features/``    feature-net features of every image (so summaries survive a resume);
* ``teacher/``     the many-step DDIM teachers (cached per request seed).

Methods (rules documented in bench/README.md):

``uniform``  time-uniform, K = most steps that fit B at the profile's p99 (``CostModel.steps_that_fit``)
``karras``   Karras (rho=7) sigmas, same K
``logsnr``   log-SNR-uniform sigmas, same K
``ays``      the AYS-like optimised static schedule of ``<controller>/ays.json`` for K (else unavailable)
``stepdrop`` uniform K, stopping once sigma falls below a threshold tuned per (tier, budget, sampler, rho)
``buco-mwg`` the controller's budget-conditioned density, K from the profile's p50 (no tail margin),
             no exit, no online correction, no guard
``abcd``     ``AnytimeRuntime.generate`` with the calibrated controller (rule-based when none: labelled)
``oracle``   per image, the best stopping step in hindsight (smallest teacher distance among the steps
             finished within B) along one time-uniform trajectory of K_p50 steps

Static methods run on the same clock as ABCD (wall clock on real tiers, ``ReplayClock`` on replay
tiers); a late image is a miss. Nothing here imports torch.
"""
from __future__ import annotations

import csv
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from abcd_edge import paths
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError
from abcd_edge.io import write_bytes_atomic, write_json_atomic

METHODS = ("uniform", "karras", "logsnr", "ays", "stepdrop", "buco-mwg", "abcd", "oracle")
BASELINES = tuple(m for m in METHODS if m not in ("abcd", "oracle"))
# Methods whose output does not depend on rho: measured once per (tier, budget, sampler, seed); rho column "all".
RHO_FREE = ("uniform", "karras", "logsnr", "ays", "oracle")
BENCH_SAMPLERS = ("ddim", "dpmpp-2m", "euler", "consistency")
TIER_KINDS = ("real", "busy", "replay")
ALL_RHO = "all"
RESULTS_CSV = "results.csv"
CSV_FIELDS = (
    "tier", "tier_kind", "simulated", "clock", "profile", "device_id", "method", "method_detail", "budget",
    "budget_ms", "sampler", "rho", "seed", "request", "request_seed", "batch", "status", "latency_ms",
    "utilisation", "deadline_met", "steps", "planned_steps", "exit_reason", "energy_mj", "teacher_mse",
    "teacher_psnr", "predicted_step_ms_mean", "measured_step_ms_mean", "cost_ape_sum", "cost_steps",
    "cost_covered", "correction", "note", "time_utc",
)
REF_SEED, REF_N = 4321, 2048
VALIDATION_SEED_BASE = 10_000_000      # stepdrop tuning noise: disjoint from every request seed
STEPDROP_DB_PER_RHO = 2.0              # allowed PSNR loss = 2 dB x (1 - rho)
BOOTSTRAP = 1000
BOOTSTRAP_FID = 200


# ============================================================================ grid spec

@dataclass
class GridSpec:
    name: str
    tiers: list[str]              # "[real:|busy:|replay:]profile.json"
    budgets: list[str]
    samplers: list[str]
    quality: list[float]
    methods: list[str]
    seeds: int
    samples: int                  # images per setting (tier, budget, sampler, rho, method), all seeds together
    batch: int
    teacher_steps: int = 200
    stepdrop_validation: int = 8  # images used to tune the stepdrop threshold
    artifact: str = str(paths.DEMO_ARTIFACT_DIR)
    controller: str = "auto"      # auto (calibration/<artifact>/), a folder, or none
    ref_seed: int = REF_SEED
    ref_n: int = REF_N
    warmup_requests: int = 2      # per tier and method, not recorded

    @property
    def requests_per_seed(self) -> int:
        return max(1, math.ceil(self.samples / (self.seeds * self.batch)))

    @property
    def samples_per_setting(self) -> int:
        return self.requests_per_seed * self.seeds * self.batch

    def request_seeds(self, seed: int) -> list[int]:
        return [seed * 1000 + r for r in range(self.requests_per_seed)]


GRIDS: dict[str, dict] = {
    # 2 real tiers x 2 budgets x 1 sampler x 2 rho x 4 seeds; 256 images per setting = 64 batch-4 requests
    "quick": dict(tiers=["@real"], budgets=["50ms", "150ms"], samplers=["ddim"], quality=[0.6, 0.9],
                  methods=list(METHODS), seeds=4, samples=256, batch=4, teacher_steps=200),
    # the seed's grid: 4 tiers x 3 budgets x 3 samplers x 2 rho x 10 seeds; 280 images per setting
    "full": dict(tiers=["@real", "@busy", "@replay"], budgets=["50ms", "150ms", "1s"],
                 samplers=["ddim", "dpmpp-2m", "euler"], quality=[0.6, 0.9], methods=list(METHODS),
                 seeds=10, samples=280, batch=4, teacher_steps=200),
}


def _split(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        out.extend(p.strip() for p in str(item).split(",") if p.strip())
    return out


def parse_grid_args(grid: str | None = None, profiles: Any = None, budgets: Any = None, samplers: Any = None,
                    quality: Any = None, methods: Any = None, seeds: int | None = None, samples: int | None = None,
                    batch: int | None = None, artifact: str | None = None, controller: str | None = None,
                    teacher_steps: int | None = None) -> GridSpec:
    """A named grid (quick, full; default quick) with any of its axes overridden; validated.

    Lists are Python lists or comma-separated strings. ``profiles`` items are profile JSON paths
    or globs, optionally prefixed ``real:``, ``busy:`` (a real tier with one core kept busy) or
    ``replay:`` (simulated clock); unprefixed ones are real when measured on this machine,
    replayed otherwise. Raises UserError on anything unknown or empty.
    """
    name = grid or "quick"
    if name not in GRIDS:
        raise UserError(f"grid {name!r} is unknown; accepted: {', '.join(GRIDS)}")
    base = dict(GRIDS[name])
    if profiles is not None:
        base["tiers"] = _split(profiles)
        if not base["tiers"]:
            raise UserError("--profiles is empty: the grid has no tier")
    if budgets is not None:
        base["budgets"] = _split(budgets)
    if samplers is not None:
        base["samplers"] = _split(samplers)
    if quality is not None:
        try:
            base["quality"] = [float(q) for q in _split(quality)]
        except ValueError:
            raise UserError(f"--quality {quality!r} is not a comma-separated list of numbers in [0, 1]") from None
    if methods is not None:
        ms = _split(methods)
        base["methods"] = list(METHODS) if ms == ["all"] else ms
    for key, val in (("seeds", seeds), ("samples", samples), ("batch", batch), ("teacher_steps", teacher_steps)):
        if val is not None:
            base[key] = val
    spec = GridSpec(name=name if all(v is None for v in (profiles, budgets, samplers, quality, methods, seeds,
                                                         samples, batch, teacher_steps)) else f"{name}+custom",
                    artifact=str(artifact) if artifact else str(paths.DEMO_ARTIFACT_DIR),
                    controller=controller or "auto", **base)
    validate_spec(spec)
    return spec


def validate_spec(spec: GridSpec) -> None:
    for axis in ("tiers", "budgets", "samplers", "quality", "methods"):
        if not getattr(spec, axis):
            raise UserError(f"the grid is empty: no {axis} (give at least one)")
    bad = [m for m in spec.methods if m not in METHODS]
    if bad:
        raise UserError(f"method {bad[0]!r} is unknown; accepted: {', '.join(METHODS)} or all")
    if len(set(spec.methods)) != len(spec.methods):
        raise UserError(f"methods repeat: {','.join(spec.methods)}")
    bad = [s for s in spec.samplers if s not in BENCH_SAMPLERS]
    if bad:
        raise UserError(f"sampler {bad[0]!r} is unknown; accepted: {', '.join(BENCH_SAMPLERS)}")
    for b in spec.budgets:
        if parse_budget(b).kind != "latency":
            raise UserError(f"budget {b!r}: the bench takes latency budgets (ms, s, us), not energy")
    for q in spec.quality:
        if not 0.0 <= q <= 1.0 or not math.isfinite(q):
            raise UserError(f"quality {q!r} is outside [0, 1]; 0 is fastest, 1 best")
    for key in ("seeds", "samples", "batch", "teacher_steps"):
        v = getattr(spec, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"--{key.replace('_', '-')} {v!r} must be an integer >= 1")
    if spec.seeds > 999:
        raise UserError(f"--seeds {spec.seeds}: at most 999")
    if spec.requests_per_seed > 999:
        raise UserError(f"{spec.samples} samples over {spec.seeds} seeds at batch {spec.batch} is over 999 "
                        "requests per seed; use more seeds or a larger batch")
    for t in spec.tiers:
        kind, _, rest = t.partition(":") if ":" in t and t.split(":", 1)[0] in TIER_KINDS else ("", "", t)
        if not rest.strip():
            raise UserError(f"tier {t!r} names no profile")


# ============================================================================ tiers

@dataclass
class Tier:
    name: str
    kind: str                    # real | busy | replay
    profile_path: str
    device_id: str
    backend: str
    threads: int | None

    @property
    def simulated(self) -> bool:
        return self.kind == "replay"

    @property
    def label(self) -> str:
        return f"{self.name} (simulated)" if self.simulated else self.name


def _profile_facts(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "device_id" in data else None


def _this_device(backend: str, threads: int | None) -> str:
    from abcd_edge.device import hardware

    return hardware.device_id(backend, threads)


def resolve_tiers(specs: Sequence[str], manifest_hash: str, profiles_dir: Path = paths.PROFILES_DIR) -> list[Tier]:
    """Tier specs -> tiers. ``@real`` / ``@busy`` / ``@replay`` name the committed profiles of this artifact:
    all measured on this machine; the 2-thread (else first) of them with one core busy; every one measured
    elsewhere (when none, the 1-thread real one replayed, so the replay path is exercised and comparable)."""
    from abcd_edge.formats.profile import load_profile

    committed = []
    for p in sorted(Path(profiles_dir).glob("*.json")) if Path(profiles_dir).is_dir() else []:
        facts = _profile_facts(p)
        if facts and facts.get("manifest_hash") == manifest_hash:
            committed.append((p, facts))
    here = [(p, f) for p, f in committed
            if f["device_id"] == _this_device(f.get("backend", "ort-cpu"), f.get("threads"))]
    elsewhere = [(p, f) for p, f in committed if (p, f) not in here]
    hint = ("profile this machine for the artifact (`make profile`, or `abcd-edge profile --artifact ... "
            "--batch 1,4 --out profiles/<name>.json`)")
    out: list[tuple[str, Path]] = []
    for spec in specs:
        if spec == "@real":
            if not here:
                raise UserError(f"no committed profile under {str(profiles_dir)!r} was measured on this machine "
                                f"for artifact {manifest_hash[:12]}; {hint}")
            out += [("real", p) for p, _ in here]
        elif spec == "@busy":
            if not here:
                raise UserError(f"tier @busy needs a profile of this machine; {hint}")
            two = [p for p, f in here if f.get("threads") == 2]
            out.append(("busy", two[0] if two else here[0][0]))
        elif spec == "@replay":
            if elsewhere:
                out += [("replay", p) for p, _ in elsewhere]
            elif here:
                one = [p for p, f in here if f.get("threads") == 1]
                out.append(("replay", one[0] if one else here[-1][0]))
            else:
                raise UserError(f"tier @replay: no committed profile for artifact {manifest_hash[:12]}; {hint}")
        else:
            kind, sep, rest = spec.partition(":")
            if not sep or kind not in TIER_KINDS:
                kind, rest = "auto", spec
            matches = sorted(glob.glob(rest)) if any(c in rest for c in "*?[") else [rest]
            if not matches:
                raise UserError(f"profile glob {rest!r} matches no file")
            for m in matches:
                if not Path(m).is_file():
                    raise UserError(f"profile {m!r} does not exist; {hint}")
                out.append((kind, Path(m)))
    tiers: list[Tier] = []
    seen = set()
    for kind, path in out:
        prof = load_profile(path, manifest_hash)
        local = prof.device_id == _this_device(prof.backend, prof.threads)
        if kind == "auto":
            kind = "real" if local else "replay"
        if kind in ("real", "busy") and not local:
            raise UserError(f"profile {str(path)!r} was measured on {prof.device_id!r}, not on this machine "
                            f"({_this_device(prof.backend, prof.threads)!r}); a real tier needs this machine's "
                            f"profile — use replay:{path} for a simulated tier")
        stem = Path(path).stem
        name = {"real": stem, "busy": f"{stem}+busy", "replay": f"{stem}@replay"}[kind]
        if name in seen:
            continue
        seen.add(name)
        tiers.append(Tier(name=name, kind=kind, profile_path=str(path), device_id=prof.device_id,
                          backend=prof.backend, threads=prof.threads))
    if not tiers:
        raise UserError("the grid is empty: no tier")
    return tiers


@contextmanager
def busy_core(enabled: bool):
    """A spinning child process (one core kept busy) while the block runs; ended by its own pid."""
    if not enabled:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        yield proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ============================================================================ metrics (pure functions)

def success_rate(met: Sequence[bool]) -> float | None:
    met = list(met)
    return (sum(bool(m) for m in met) / len(met)) if met else None


def percentile_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return None
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def bootstrap_ci(groups: Sequence[Any], stat: Callable[[list[Any]], float | None], n_boot: int = BOOTSTRAP,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile CI of ``stat`` over resamples (with replacement) of ``groups`` (here: seeds)."""
    groups = list(groups)
    if not groups:
        return None
    if len(groups) == 1:
        v = stat(groups)
        return None if v is None else (v, v)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(groups), len(groups))
        v = stat([groups[i] for i in idx])
        if v is not None:
            vals.append(v)
    return percentile_ci(vals, level)


def pooled_success(groups: list[tuple[int, int]]) -> float | None:
    """groups: (met, total) per seed -> pooled share."""
    tot = sum(g[1] for g in groups)
    return sum(g[0] for g in groups) / tot if tot else None


def cost_predictor_error(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float | None, float | None]:
    """(MAPE of predicted vs measured step ms, share of steps whose measured time <= predicted)."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.size == 0 or p.size != m.size:
        return None, None
    ok = m > 0
    mape = float(np.mean(np.abs(p[ok] - m[ok]) / m[ok])) if ok.any() else None
    return mape, float(np.mean(m <= p))


def nearest_ays_n(available: Iterable[int], k: int) -> int | None:
    """The AYS schedule to use for K steps: K itself, else the largest n < K, else the smallest n."""
    ns = sorted(set(int(n) for n in available))
    if not ns:
        return None
    if k in ns:
        return k
    below = [n for n in ns if n < k]
    return below[-1] if below else ns[0]


def stepdrop_steps(psnr_by_step: np.ndarray, tolerance_db: float) -> int:
    """Fewest steps whose mean validation PSNR is within ``tolerance_db`` of running all K steps.

    ``psnr_by_step``: [K] mean PSNR vs the teacher after step 1..K."""
    p = np.asarray(psnr_by_step, np.float64)
    target = p[-1] - tolerance_db
    for k in range(len(p)):
        if p[k] >= target:
            return k + 1
    return len(p)


def oracle_pick(step_latency_ms: Sequence[float], mse_by_step: np.ndarray, budget_ms: float
                ) -> tuple[np.ndarray, bool]:
    """Per image, the step (0-based) with the smallest teacher MSE among those finished within B.

    ``step_latency_ms``: [K] latency had the request returned after step i; ``mse_by_step``: [K, N].
    Returns (chosen step per image [N], True when at least one step fit). With none fitting, step 0 (late)."""
    lat = np.asarray(step_latency_ms, np.float64)
    mse = np.asarray(mse_by_step, np.float64)
    fit = lat <= budget_ms
    if not fit.any():
        return np.zeros(mse.shape[1], int), False
    masked = np.where(fit[:, None], mse, np.inf)
    return masked.argmin(0), True


# ============================================================================ quality

_BLAS_SYMBOLS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                 "openblas_set_num_threads", "MKL_Set_Num_Threads")
_BLAS_GET = {"scipy_openblas_set_num_threads64_": "scipy_openblas_get_num_threads64_",
             "scipy_openblas_set_num_threads": "scipy_openblas_get_num_threads",
             "openblas_set_num_threads64_": "openblas_get_num_threads64_",
             "openblas_set_num_threads": "openblas_get_num_threads", "MKL_Set_Num_Threads": "MKL_Get_Max_Threads"}


@contextmanager
def blas_threads(n: int = 1):
    """Limit numpy's BLAS (OpenBLAS/MKL, found among the loaded libraries) to ``n`` threads in the block.

    On a machine shared with other work, OpenBLAS's spinning worker threads make a 128x128 eigh take
    ~0.4 s instead of ~2 ms; the bench's metrics (FID with bootstrap) are all small matrices."""
    import ctypes
    import re

    restore = []
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for lib in sorted(set(re.findall(r"/\S*(?:openblas|mkl_rt)\S*\.so\S*", maps))):
        try:
            h = ctypes.CDLL(lib)
        except OSError:
            continue
        for sym in _BLAS_SYMBOLS:
            if hasattr(h, sym) and hasattr(h, _BLAS_GET[sym]):
                before = int(getattr(h, _BLAS_GET[sym])())
                getattr(h, sym)(int(n))
                restore.append((getattr(h, sym), before))
                break
    try:
        yield
    finally:
        for fn, before in restore:
            fn(before)


class ReferenceFrechet:
    """Fréchet distance to fixed reference statistics, the reference's square root computed once.

    FID = |mu - mu_r|^2 + tr(S) + tr(S_r) - 2 tr((R S R)^1/2) with R = S_r^1/2, S the unbiased covariance of
    the features; (R S R) = A^T A with A = (X - mu) R / sqrt(N - 1), so the last trace is the sum of A's
    singular values: one small SVD per call. Equal to quality.frechet_distance."""

    def __init__(self, mu: np.ndarray, sigma: np.ndarray):
        from abcd_edge.quality import _sqrtm_psd

        self.mu = np.asarray(mu, np.float64)
        self.r = _sqrtm_psd(np.asarray(sigma, np.float64))
        self.tr = float(np.trace(sigma))

    def __call__(self, feats: np.ndarray) -> float:
        x = np.asarray(feats, np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need features [N >= 2, D], got {x.shape}")
        mu = x.mean(0)
        a = (x - mu) @ self.r / math.sqrt(len(x) - 1)
        sv = np.linalg.svd(a, compute_uv=False)
        tr_s = float(((x - mu) ** 2).sum() / (len(x) - 1))
        d = mu - self.mu
        return max(float(d @ d + tr_s + self.tr - 2.0 * sv.sum()), 0.0)


class Quality:
    """Feature extractor + reference statistics: ``features(uint8 NHWC)`` and ``fid(features)``."""

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], fid: Callable[[np.ndarray], float],
                 description: str):
        self.features, self.fid, self.description = features, fid, description

    @classmethod
    def default(cls, resolution: int, ref_seed: int = REF_SEED, ref_n: int = REF_N) -> tuple["Quality | None", str]:
        from abcd_edge.quality import FeatureNet, ReferenceStats

        try:
            net = FeatureNet()
        except UserError as exc:
            return None, f"feature-FID not measured: {exc}"
        if isinstance(net.height, int) and net.height != resolution:
            return None, (f"feature-FID not measured: the feature net takes {net.height}x{net.width} images, "
                          f"the artifact makes {resolution}x{resolution}")
        with blas_threads(1):
            ref = ReferenceStats.load_or_compute(ref_seed, ref_n, net, resolution=resolution)
            fid = ReferenceFrechet(ref.mu, ref.sigma)
        return cls(net.features, fid, f"feature-FID (export/featurenet sha256 {net.sha256[:12]}, "
                                          f"reference: generator data seed {ref_seed}, n={ref_n})"), ""


# ============================================================================ running

def _stable_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def _noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _to_model_space(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0


@dataclass
class RunResult:
    images: np.ndarray
    latency_ms: float
    deadline_met: bool
    steps: float
    planned_steps: int
    exit_reason: str
    predicted: list[float]
    measured: list[float]
    energy_mj: float | None = None
    correction: float | None = None
    note: str = ""


def run_static(rt, clock, sigmas: np.ndarray, sampler: str, seed: int, batch: int, budget_ms: float,
               stop_below: float | None = None, predicted_step_ms: float | None = None,
               keep_history: bool = False) -> tuple[RunResult, list[tuple[float, np.ndarray]]]:
    """A static schedule on ``clock``: no exit rule, no guard, no correction. Noise as the runtime draws it.

    ``stop_below``: stop before the first step whose sigma is below it (StepDrop; step 1 always runs).
    ``keep_history``: also return (elapsed ms after step i, x0 after step i) for every step (the oracle)."""
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.samplers import make_sampler

    shape = (batch, rt.manifest.channels, rt.manifest.resolution, rt.manifest.resolution)
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(shape).astype(np.float32)
    smp = make_sampler(sampler, rt.schedule, np.asarray(sigmas), rt.manifest.prediction_type)
    x0 = np.zeros(shape, np.float32)
    measured: list[float] = []
    history: list[tuple[float, np.ndarray]] = []
    rt.meter.start()
    clock.start()
    x = smp.prepare(noise)
    reason = "done"
    for i in range(len(smp)):
        if stop_below is not None and i > 0 and float(smp.sigmas[i]) < stop_below:
            reason = "stepdrop"
            break
        sample, t = smp.model_input(x, i)
        out, ms = clock.run_step(lambda: rt.denoiser(sample, t), rt.denoiser.abandon, None)
        step_noise = rng.standard_normal(shape).astype(np.float32) if smp.stochastic else None
        x, x0 = smp.step(x, i, out, noise=step_noise)
        measured.append(float(ms))
        if keep_history:
            history.append((clock.elapsed_ms(), np.asarray(x0, np.float32).copy()))
    images = to_uint8(np.asarray(x0, np.float32))
    latency = clock.elapsed_ms()
    reading = rt.meter.stop()
    energy = None if getattr(clock, "simulated", False) else reading.energy_mj
    pred = [float(predicted_step_ms)] * len(measured) if predicted_step_ms is not None else []
    return RunResult(images=images, latency_ms=latency, deadline_met=latency <= budget_ms, steps=len(measured),
                     planned_steps=len(smp), exit_reason=reason, predicted=pred, measured=measured,
                     energy_mj=energy), history


class TeacherCache:
    """Many-step time-uniform DDIM x0 per request seed, cached as ``<out>/teacher/<hash>_<steps>_<seed>.npy``."""

    def __init__(self, folder: Path, artifact_dir: Path, manifest_hash: str, steps: int, threads: int | None = None):
        self.folder, self.artifact_dir, self.hash, self.steps = Path(folder), Path(artifact_dir), manifest_hash, steps
        self.threads = threads
        self._denoiser = None
        self._mem: dict[tuple[int, int], np.ndarray] = {}

    def _path(self, seed: int, batch: int) -> Path:
        return self.folder / f"{self.hash[:12]}_{self.steps}_{batch}_{seed}.npy"

    def get(self, seeds: Sequence[int], batch: int, shape: tuple[int, ...], schedule, prediction_type: str,
            progress: Callable[[int], None] | None = None, chunk: int = 64) -> dict[int, np.ndarray]:
        """x0 [batch, C, H, W] per seed; computes the missing ones in chunks of up to ``chunk`` images."""
        from abcd_edge.device.backends import open_denoiser
        from abcd_edge.core.samplers import make_sampler
        from abcd_edge.core.placement import time_uniform_sigmas
        from abcd_edge.trajectory import sample

        out, missing = {}, []
        for s in seeds:
            key = (s, batch)
            if key in self._mem:
                out[s] = self._mem[key]
            elif self._path(s, batch).is_file():
                try:
                    out[s] = self._mem[key] = np.load(self._path(s, batch), allow_pickle=False)
                except (OSError, ValueError):
                    missing.append(s)
            else:
                missing.append(s)
        if missing:
            if self._denoiser is None:
                self._denoiser = open_denoiser(self.artifact_dir, threads=self.threads)
            sigmas = time_uniform_sigmas(schedule, self.steps)
            per = max(1, chunk // batch)
            for i in range(0, len(missing), per):
                group = missing[i:i + per]
                noise = np.concatenate([_noise(s, (batch, *shape)) for s in group])
                smp = make_sampler("ddim", schedule, sigmas, prediction_type)
                x0, _ = sample(self._denoiser, smp, noise)
                for j, s in enumerate(group):
                    t = np.asarray(x0[j * batch:(j + 1) * batch], np.float32)
                    self.folder.mkdir(parents=True, exist_ok=True)
                    with open(self._path(s, batch), "wb") as f:
                        np.save(f, t)
                    out[s] = self._mem[(s, batch)] = t
                if progress:
                    progress(len(group))
        return out


@dataclass
class TierSession:
    tier: Tier
    base: Any                     # AnytimeRuntime without a controller: cost model, denoiser for static methods
    abcd: Any                     # AnytimeRuntime with the controller ("auto"/folder) or rule-based
    controller: Any               # numpy Controller or None
    controller_dir: str | None
    ays: dict[str, dict[int, list[float]]] | None
    overhead_scale: float
    local_step_p50_ms: float | None
    batch: int = 1

    def clock_for(self, *key) -> Any:
        """A fresh clock for one (method, rho) stream: replay draws seeded by the key; wall clock shared."""
        from abcd_edge.device.clock import ReplayClock

        if not self.tier.simulated:
            return self.base.clock
        samples = self.base.profile.for_batch(self.batch).step.samples_ms
        return ReplayClock(samples, seed=_stable_seed(self.tier.name, *key), overhead_scale=self.overhead_scale)

    def close(self) -> None:
        self.base.close()
        self.abcd.close()


def _controller_dir(spec_controller: str, manifest_name: str) -> Path | None:
    if spec_controller in ("none", ""):
        return None
    if spec_controller == "auto":
        folder = paths.CALIBRATION_DIR / manifest_name
        return folder if (folder / "controller.json").is_file() else None
    return Path(spec_controller)


def load_ays(folder: Path | None, manifest_hash: str | None = None
             ) -> tuple[dict[str, dict[int, list[float]]] | None, str]:
    """``<folder>/ays.json`` -> ({sampler or "*": {n: sigmas}}, where it came from or why unavailable).

    Two layouts: ``{"<n>": [sigmas]}`` (any sampler), or calibration's
    ``{"manifest_hash": ..., "schedules": {"<sampler>": {"<n>": {"sigmas": [...], ...}}}}``."""
    if folder is None:
        return None, "unavailable: no calibration folder (no controller)"
    path = Path(folder) / "ays.json"
    if not path.is_file():
        return None, f"unavailable: {path} does not exist (AYS-like schedules are optimised by calibration)"
    try:
        raw = json.loads(path.read_text())
        if isinstance(raw, dict) and "schedules" in raw:
            if manifest_hash and raw.get("manifest_hash") not in (None, manifest_hash):
                return None, f"unavailable: {path} was optimised for another artifact"
            table = {str(smp): {int(n): [float(x) for x in (v["sigmas"] if isinstance(v, dict) else v)]
                                for n, v in per.items()} for smp, per in raw["schedules"].items()}
        else:
            table = {"*": {int(k): [float(x) for x in v] for k, v in raw.items()}}
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise UserError(f"{str(path)!r} is not an AYS schedule table ({type(exc).__name__}: {exc})") from None
    for smp, per in table.items():
        for n, sig in per.items():
            if len(sig) != n or any(a <= b for a, b in zip(sig, sig[1:])) or (sig and sig[-1] <= 0):
                raise UserError(f"{str(path)!r}: schedule {smp}/{n} must hold {n} positive, strictly decreasing "
                                "sigmas")
    table = {k: v for k, v in table.items() if v}
    return (table or None), (str(path) if table else f"unavailable: {path} is empty")


def ays_for(table: dict[str, dict[int, list[float]]] | None, sampler: str) -> dict[int, list[float]] | None:
    if not table:
        return None
    return table.get(sampler) or table.get("*")


def open_tier(tier: Tier, spec: GridSpec, batch: int) -> TierSession:
    from abcd_edge.device.clock import ReplayClock
    from abcd_edge.runtime.session import AnytimeRuntime

    threads = tier.threads if not tier.simulated else (os.cpu_count() or 1)
    clock_base = clock_abcd = None
    if tier.simulated:
        from abcd_edge.formats.profile import load_profile

        samples = load_profile(tier.profile_path).for_batch(batch).step.samples_ms
        clock_base, clock_abcd = ReplayClock(samples), ReplayClock(samples)
    base = AnytimeRuntime.open(spec.artifact, profile=tier.profile_path, controller=None, backend=tier.backend,
                          threads=threads, power="auto", clock=clock_base)
    base.profile.for_batch(batch)  # a UserError naming the missing batch, before any work
    cdir = _controller_dir(spec.controller, base.manifest.name)
    abcd = AnytimeRuntime.open(spec.artifact, profile=tier.profile_path, controller=str(cdir) if cdir else None,
                          backend=tier.backend, threads=threads, power="auto", clock=clock_abcd)
    # one ORT session for every method: methods are interleaved request by request, and a second session's
    # intra-op thread pool would go cold between its requests (measured: ~2x slower first steps at 2 threads)
    abcd.denoiser = base.denoiser
    ays, _ = load_ays(cdir, abcd.manifest_hash)
    # warm the sessions; on a replay tier also time this machine's step for the overhead scale
    shape = (batch, base.manifest.channels, base.manifest.resolution, base.manifest.resolution)
    x = _noise(0, shape)
    t = np.full(batch, 500.0, np.float32)
    for _ in range(5):
        base.denoiser(x, t)
    local = None
    scale = 1.0
    if tier.simulated:
        ts = []
        for _ in range(15):
            t0 = time.perf_counter()
            base.denoiser(x, t)
            ts.append((time.perf_counter() - t0) * 1e3)
        local = float(np.median(ts))
        scale = max(base.profile.for_batch(batch).step.p50_ms / local, 1e-3)
    sess = TierSession(tier=tier, base=base, abcd=abcd, controller=abcd.controller,
                       controller_dir=str(cdir) if (cdir and abcd.controller is not None) else None,
                       ays=ays, overhead_scale=scale, local_step_p50_ms=local, batch=batch)
    return sess


@dataclass
class Plan:
    method: str
    rho: float | None            # None: rho-free
    status: str                  # ok | unavailable | infeasible
    detail: str
    sigmas: np.ndarray | None = None
    stop_below: float | None = None
    predicted_step_ms: float | None = None
    k: int = 0


def budget_k(sess: TierSession, budget_ms: float, batch: int, sampler: str) -> tuple[int, int]:
    """(K at the profile's p99 as the runtime's rule plans it, K at the p50 with no tail margin)."""
    from abcd_edge.runtime.cost import GUARD_SLACK_MS
    from abcd_edge.runtime.plan import RULE_MAX_STEPS

    cm = sess.base.cost_model(batch, sampler)
    k99 = min(cm.steps_that_fit(budget_ms), RULE_MAX_STEPS)
    bp = sess.base.profile.for_batch(batch)
    per = bp.step.p50_ms + bp.sampler_ms[sampler].p50_ms
    k50 = int(max((budget_ms - bp.finish.p50_ms - GUARD_SLACK_MS) // per, 0))
    return k99, min(k50, RULE_MAX_STEPS)


def plan_methods(sess: TierSession, spec: GridSpec, budget_ms: float, sampler: str, batch: int,
                 stepdrop: dict[float, float] | None) -> list[Plan]:
    """The plan of each method (and rho where it matters) for one (tier, budget, sampler)."""
    from abcd_edge.core.budget import Budget
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
    from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas

    sched = sess.base.schedule
    cm = sess.base.cost_model(batch, sampler)
    k99, k50 = budget_k(sess, budget_ms, batch, sampler)
    p99 = cm.next_step_ms()
    bp = sess.base.profile.for_batch(batch)
    p50 = bp.step.p50_ms + bp.sampler_ms[sampler].p50_ms
    plans: list[Plan] = []
    for m in spec.methods:
        rhos: list[float | None] = [None] if m in RHO_FREE else list(spec.quality)
        for rho in rhos:
            if m in ("uniform", "karras", "logsnr"):
                fn = {"uniform": time_uniform_sigmas, "karras": karras_sigmas, "logsnr": logsnr_uniform_sigmas}[m]
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99)", np.asarray(fn(sched, k99)) if k99 else None,
                                  predicted_step_ms=p99, k=k99))
            elif m == "ays":
                table = ays_for(sess.ays, sampler)
                if table is None:
                    _, why = load_ays(Path(sess.controller_dir) if sess.controller_dir else None,
                                      sess.base.manifest_hash)
                    if sess.ays is not None:
                        why = f"unavailable: no AYS-like schedule for sampler {sampler}"
                    plans.append(Plan(m, rho, "unavailable", why))
                    continue
                n = nearest_ays_n(table, k99)
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99), ays n={n}", np.asarray(table[n]),
                                  predicted_step_ms=p99, k=n))
            elif m == "stepdrop":
                thr = (stepdrop or {}).get(rho)
                plans.append(Plan(m, rho, "ok", f"K={k99} (p99), stop below sigma {thr:.4g}" if thr else f"K={k99}",
                                  np.asarray(time_uniform_sigmas(sched, k99)) if k99 else None, stop_below=thr,
                                  predicted_step_ms=p99, k=k99))
            elif m == "buco-mwg":
                if sess.controller is None:
                    plans.append(Plan(m, rho, "unavailable", "unavailable: needs a calibrated controller "
                                      "(its budget-conditioned density); none under calibration/"))
                    continue
                ctx = sess.abcd.context(Budget("latency", budget_ms), rho, batch)
                sig = sess.controller.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], max(k50, 1),
                                                  sigma_max=sched.sigma_max)
                plans.append(Plan(m, rho, "ok", f"K={k50} (p50, no margin), controller density", sig,
                                  predicted_step_ms=p50, k=k50))
            elif m == "abcd":
                what = (f"controller {sess.controller_dir}" if sess.controller is not None
                        else "rule-based: no calibrated controller")
                plans.append(Plan(m, rho, "ok", what))
            elif m == "oracle":
                k = max(k50, 1)
                plans.append(Plan(m, rho, "ok", f"best step in hindsight on uniform K={k} (p50)",
                                  np.asarray(time_uniform_sigmas(sched, k)), k=k))
    return plans


def tune_stepdrop(sess: TierSession, spec: GridSpec, teacher: TeacherCache, budget_ms: float, sampler: str,
                  batch: int) -> tuple[dict[float, float], dict]:
    """Per rho, the sigma threshold: the fewest steps of uniform-K whose mean PSNR vs the teacher on
    ``spec.stepdrop_validation`` validation images is within 2 dB x (1 - rho) of all K steps."""
    from abcd_edge.quality import teacher_distance
    from abcd_edge.core.samplers import make_sampler
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.trajectory import sample

    k99, _ = budget_k(sess, budget_ms, batch, sampler)
    if k99 < 1:
        return {}, {"K": k99}
    m = sess.base.manifest
    shape = (m.channels, m.resolution, m.resolution)
    nval = max(1, spec.stepdrop_validation)
    seeds = [VALIDATION_SEED_BASE + i for i in range(nval)]
    teach = teacher.get(seeds, 1, shape, sess.base.schedule, m.prediction_type)
    sigmas = np.asarray(time_uniform_sigmas(sess.base.schedule, k99))
    noise = np.concatenate([_noise(s, (1, *shape)) for s in seeds])
    smp = make_sampler(sampler, sess.base.schedule, sigmas, m.prediction_type)
    _, hist = sample(sess.base.denoiser, smp, noise, rng=np.random.default_rng(0), keep_x0=True)
    t = np.concatenate([teach[s] for s in seeds])
    psnr = np.array([float(np.mean(teacher_distance(h, t).psnr)) for h in hist])
    out, info = {}, {"K": k99, "validation_images": nval, "psnr_by_step": [round(float(p), 3) for p in psnr]}
    for rho in spec.quality:
        k = stepdrop_steps(psnr, STEPDROP_DB_PER_RHO * (1 - rho))
        # stop before step k (0-based): threshold halfway (in log) between sigma_{k-1} and sigma_k
        thr = float(np.sqrt(sigmas[k - 1] * sigmas[k])) if k < k99 else float(sigmas[-1]) * 0.5
        out[rho] = thr
        info[str(rho)] = {"steps": k, "threshold_sigma": thr, "tolerance_db": STEPDROP_DB_PER_RHO * (1 - rho)}
    return out, info


# ============================================================================ the grid loop

def _row(tier: Tier, sess: TierSession | None, method: str, detail: str, budget: str, budget_ms: float,
         sampler: str, rho: float | None, seed: int, request: int, request_seed: int, batch: int,
         status: str, res: RunResult | None = None, teacher_mse: float | None = None,
         teacher_psnr: float | None = None, note: str = "") -> dict:
    clock = "simulated (profile replay)" if tier.simulated else "wall (monotonic)"
    row = dict(tier=tier.name, tier_kind=tier.kind, simulated=tier.simulated, clock=clock,
               profile=tier.profile_path, device_id=tier.device_id, method=method, method_detail=detail,
               budget=budget, budget_ms=budget_ms, sampler=sampler, rho=ALL_RHO if rho is None else rho,
               seed=seed, request=request, request_seed=request_seed, batch=batch, status=status,
               latency_ms="", utilisation="", deadline_met=False, steps="", planned_steps="", exit_reason="",
               energy_mj="", teacher_mse="" if teacher_mse is None else round(teacher_mse, 7),
               teacher_psnr="" if teacher_psnr is None else round(teacher_psnr, 4), predicted_step_ms_mean="",
               measured_step_ms_mean="", cost_ape_sum="", cost_steps="", cost_covered="", correction="",
               note=note, time_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    if res is not None:
        row.update(latency_ms=round(res.latency_ms, 4), utilisation=float(f"{res.latency_ms / budget_ms:.6g}"),
                   deadline_met=bool(res.deadline_met), steps=round(float(res.steps), 4),
                   planned_steps=res.planned_steps, exit_reason=res.exit_reason,
                   energy_mj="" if res.energy_mj is None else res.energy_mj,
                   correction="" if res.correction is None else res.correction)
        if res.measured:
            row["measured_step_ms_mean"] = round(float(np.mean(res.measured)), 4)
        if res.predicted and len(res.predicted) == len(res.measured):
            p, mm = np.asarray(res.predicted), np.asarray(res.measured)
            row.update(predicted_step_ms_mean=round(float(p.mean()), 4),
                       cost_ape_sum=round(float(np.sum(np.abs(p - mm) / np.maximum(mm, 1e-9))), 6),
                       cost_steps=len(mm), cost_covered=int(np.sum(mm <= p)))
    return row


def _block_key(tier: str, budget: str, sampler: str, seed: int) -> str:
    return f"{tier}|{budget}|{sampler}|{seed}"


def _read_csv(path: Path) -> list[dict]:
    """The complete rows of results.csv; a last line cut short by a kill is dropped from the file too."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_bytes_atomic(path, text.encode())
    return list(csv.DictReader(text.splitlines(keepends=True)))


def _write_csv(path: Path, rows: list[dict]) -> None:
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS))
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    write_bytes_atomic(path, buf.getvalue().encode())


def _append_csv(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        f.flush()
        os.fsync(f.fileno())


def _config_key(spec: GridSpec, tiers: list[Tier], manifest_hash: str, controller_id: str) -> str:
    cfg = dict(asdict(spec), tiers=[asdict(t) for t in tiers], manifest_hash=manifest_hash, controller=controller_id)
    cfg.pop("name", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _controller_identity(spec: GridSpec, manifest_name: str) -> str:
    cdir = _controller_dir(spec.controller, manifest_name)
    if cdir is None:
        return "rule-based"
    h = hashlib.sha256()
    for f in ("controller.json", "controller.safetensors", "ays.json"):
        p = Path(cdir) / f
        if p.is_file():
            h.update(p.read_bytes())
    return f"{cdir}#{h.hexdigest()[:12]}"


def estimate_seconds(spec: GridSpec, tiers: list[Tier]) -> dict:
    """A rough wall-time estimate from the profiles: real tiers spend ~the budget per request, replay tiers
    the local compute of the steps they take; plus the teacher (teacher_steps per image at the batch p50)."""
    from abcd_edge.formats.profile import load_profile

    total_req = len(spec.samplers) * spec.seeds * spec.requests_per_seed
    n_rho_runs = sum(1 if m in RHO_FREE else len(spec.quality) for m in spec.methods)
    out, tot = {}, 0.0
    p50_local = None
    for t in tiers:
        bp = load_profile(t.profile_path).for_batch(spec.batch)
        if t.kind != "replay":
            p50_local = bp.step.p50_ms if p50_local is None else min(p50_local, bp.step.p50_ms)
    for t in tiers:
        bp = load_profile(t.profile_path).for_batch(spec.batch)
        s = 0.0
        for b in spec.budgets:
            ms = parse_budget(b).ms
            if t.kind == "replay":
                steps = ms / max(bp.step.p50_ms, 1e-6)
                ms = steps * (p50_local or bp.step.p50_ms)
            s += total_req * n_rho_runs * ms * 1.05 / 1e3
        out[t.name] = round(s, 1)
        tot += s
    teacher_images = spec.seeds * spec.requests_per_seed * spec.batch
    step_ms = p50_local or 10.0
    teacher_s = teacher_images / spec.batch * spec.teacher_steps * step_ms / 1e3 * 0.8
    out["teacher"] = round(teacher_s, 1)
    out["total"] = round(tot + teacher_s, 1)
    return out


def run_grid(spec: GridSpec, out: Path, resume: bool = True, quality: Quality | None | str = "auto",
             progress: bool = True, tiers: list[Tier] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) the grid into ``out``; write results.csv, features/, bench.json, summary.md, plots."""
    with blas_threads(1):
        return _run_grid(spec, out, resume, quality, progress, tiers, log)


def _run_grid(spec, out, resume, quality, progress, tiers, log) -> Path:
    from tqdm import tqdm

    from abcd_edge.device import hardware
    from abcd_edge.formats.manifest import load_manifest, manifest_hash

    log = log or (lambda s: print(f"abcd-edge bench: {s}", file=sys.stderr))
    validate_spec(spec)
    artifact = Path(spec.artifact)
    if not (artifact / "manifest.json").is_file():
        raise UserError(f"artifact {str(artifact)!r} has no manifest.json; export one with "
                        "`abcd-edge export --model demo --out export/demo`")
    manifest = load_manifest(artifact)
    mhash = manifest_hash(artifact)
    if not manifest.batch_min <= spec.batch <= manifest.batch_max:
        raise UserError(f"--batch {spec.batch} is outside the artifact's batch range "
                        f"{manifest.batch_min}..{manifest.batch_max}")
    if spec.controller not in ("auto", "none") and not Path(spec.controller).is_dir():
        raise UserError(f"controller folder {spec.controller!r} does not exist")
    tiers = tiers or resolve_tiers(spec.tiers, mhash)
    controller_id = _controller_identity(spec, manifest.name)
    if quality == "auto":
        quality, qnote = Quality.default(manifest.resolution, spec.ref_seed, spec.ref_n)
    else:
        qnote = "" if quality is not None else "feature-FID not measured (no quality backend given)"
    if qnote:
        log(qnote)
    key = _config_key(spec, tiers, mhash, controller_id + "|" + (quality.description if quality else qnote))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, meta_path = out / RESULTS_CSV, out / "bench.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    rows = _read_csv(csv_path) if resume else []
    if rows and (old_meta or {}).get("config_key") != key:
        raise UserError(f"{csv_path} was made by another configuration (grid, tiers, artifact, controller or "
                        "feature net differ); use another --out, or --no-resume to start over")

    # drop rows of blocks that did not finish (a crash mid-block), keep the rest
    req = spec.requests_per_seed
    done_blocks: set[str] = set()
    if rows:
        by_block: dict[str, list[dict]] = {}
        for r in rows:
            by_block.setdefault(_block_key(r["tier"], r["budget"], r["sampler"], int(r["seed"])), []).append(r)
        keep = []
        for bk, rs in by_block.items():
            if any(r["status"] == "block-end" for r in rs):
                done_blocks.add(bk)
                keep.extend(rs)
        if len(keep) != len(rows):
            _write_csv(csv_path, keep)
        rows = keep
    else:
        _write_csv(csv_path, [])
    feat_dir = out / "features"
    feat_dir.mkdir(exist_ok=True)
    kept = {_slug(_block_key(r["tier"], r["budget"], r["sampler"], int(r["seed"]))) for r in rows}
    for f in feat_dir.glob("*.npz"):          # features of blocks not in the CSV (a fresh start, a dropped block)
        if f.name.split("__")[0] not in kept:
            f.unlink()
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    est = estimate_seconds(spec, tiers)
    meta = dict(config_key=key, grid=asdict(spec), samples_per_setting=spec.samples_per_setting,
                requests_per_seed=req, tiers=[dict(asdict(t), simulated=t.simulated) for t in tiers],
                artifact=str(artifact), manifest_hash=mhash, controller=controller_id,
                quality=quality.description if quality else qnote, teacher=f"{spec.teacher_steps}-step "
                "time-uniform DDIM from the same noise", estimate_s=est,
                command=" ".join(sys.argv),
                started_utc=(old_meta or {}).get("started_utc") if rows else started,
                resumed_utc=started if rows else None,
                machine=hardware.machine_info(), stepdrop={}, tier_sessions={}, finished_utc=None)
    if rows and old_meta:
        meta["stepdrop"] = old_meta.get("stepdrop", {})
        meta["tier_sessions"] = old_meta.get("tier_sessions", {})
    write_json_atomic(meta_path, meta)

    blocks = [(t, b, s, seed) for t in tiers for b in spec.budgets for s in spec.samplers for seed in range(spec.seeds)]
    todo = [blk for blk in blocks if _block_key(blk[0].name, blk[1], blk[2], blk[3]) not in done_blocks]
    n_runs = sum(1 if m in RHO_FREE else len(spec.quality) for m in spec.methods)
    log(f"{len(blocks)} blocks ({len(blocks) - len(todo)} already done), {spec.samples_per_setting} images per "
        f"setting = {spec.seeds} seeds x {req} requests x batch {spec.batch}; estimate ~{est['total'] / 60:.1f} min")
    shape = (manifest.channels, manifest.resolution, manifest.resolution)
    teacher = TeacherCache(out / "teacher", artifact, mhash, spec.teacher_steps, threads=os.cpu_count())
    from abcd_edge.core.noise import NoiseSchedule

    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    if todo:   # every method's images are scored against the teacher (teacher PSNR); the oracle picks by it
        seeds_needed = sorted({rs for (_, _, _, seed) in todo for rs in spec.request_seeds(seed)})
        bar = tqdm(total=len(seeds_needed), desc=f"teacher ({spec.teacher_steps}-step DDIM)", unit="req",
                   disable=not progress, file=sys.stderr)
        teacher.get(seeds_needed, spec.batch, shape, schedule, manifest.prediction_type, progress=bar.update)
        bar.close()
    bar = tqdm(total=len(todo) * req * n_runs, desc="bench", unit="req", disable=not progress, file=sys.stderr)
    try:
        for tier in tiers:
            tier_todo = [blk for blk in todo if blk[0].name == tier.name]
            if not tier_todo:
                continue
            with busy_core(tier.kind == "busy"):
                sess = open_tier(tier, spec, spec.batch)
                if _controller_identity(spec, manifest.name) != controller_id:
                    sess.close()
                    raise UserError(f"the controller under {spec.controller!r} changed during the run "
                                    "(recalibrated?); rerun the bench with --no-resume once it is final")
                try:
                    meta["tier_sessions"][tier.name] = dict(
                        controller=sess.controller_dir or "rule-based", ays=load_ays(
                            Path(sess.controller_dir) if sess.controller_dir else None, sess.base.manifest_hash)[1],
                        overhead_scale=round(sess.overhead_scale, 4), local_step_p50_ms=sess.local_step_p50_ms,
                        minimum_ms={s: round(sess.base.minimum_ms(spec.batch, s), 3) for s in spec.samplers},
                        notes=list(sess.abcd.notes))
                    _run_tier(sess, spec, tier_todo, teacher, quality, feat_dir, csv_path, meta, bar, log)
                finally:
                    sess.close()
                write_json_atomic(meta_path, meta)
    finally:
        bar.close()
    meta["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(meta_path, meta)
    summarize(out, quality=quality if quality is not None else "auto", log=log)
    return out


def _run_tier(sess: TierSession, spec: GridSpec, todo, teacher: TeacherCache, quality: Quality | None,
              feat_dir: Path, csv_path: Path, meta: dict, bar, log) -> None:
    from abcd_edge.quality import teacher_distance

    tier, batch = sess.tier, spec.batch
    m = sess.base.manifest
    shape = (m.channels, m.resolution, m.resolution)
    warmed = False
    for (_, budget, sampler, seed) in todo:
        bms = parse_budget(budget).ms
        minimum = sess.base.minimum_ms(batch, sampler)
        bk = _block_key(tier.name, budget, sampler, seed)
        rows: list[dict] = []
        n_runs = sum(1 if mm in RHO_FREE else len(spec.quality) for mm in spec.methods)
        if bms < minimum:
            for mm in spec.methods:
                for rho in ([None] if mm in RHO_FREE else spec.quality):
                    rows.append(_row(tier, sess, mm, f"budget below the tier's minimum {minimum:.2f} ms "
                                     "(one step + finishing at the p99)", budget, bms, sampler, rho, seed, -1, -1,
                                     batch, "infeasible"))
            rows.append(_row(tier, sess, "-", "", budget, bms, sampler, None, seed, -1, -1, batch, "block-end"))
            _append_csv(csv_path, rows)
            bar.update(spec.requests_per_seed * n_runs)
            continue
        sd_key = f"{tier.name}|{budget}|{sampler}"
        stepdrop = None
        if "stepdrop" in spec.methods:
            if sd_key not in meta["stepdrop"]:
                thr, info = tune_stepdrop(sess, spec, teacher, bms, sampler, batch)
                meta["stepdrop"][sd_key] = info
            info = meta["stepdrop"][sd_key]
            stepdrop = {float(r): info[str(r)]["threshold_sigma"] for r in spec.quality if str(r) in info}
        plans = plan_methods(sess, spec, bms, sampler, batch, stepdrop)
        if not warmed:   # a couple of unrecorded requests per method so first-call effects stay out
            for p in plans:
                for w in range(spec.warmup_requests if p.status == "ok" else 0):
                    _execute(sess, p, spec, bms, budget, sampler, 10**6 + w, batch, sess.clock_for("warm", p.method),
                             None)
            warmed = True
        clocks = {(p.method, p.rho): sess.clock_for(budget, sampler, seed, p.method, p.rho) for p in plans}
        teach = teacher.get(spec.request_seeds(seed), batch, shape, sess.base.schedule, m.prediction_type)
        feats: dict[str, list[np.ndarray]] = {}
        ontime: dict[str, list[np.ndarray]] = {}
        order = list(range(len(plans)))
        for r, rs in enumerate(spec.request_seeds(seed)):
            rot = order[r % len(order):] + order[:r % len(order)]   # rotate so no method always runs first
            for j in rot:
                p = plans[j]
                pk = f"{p.method}|{ALL_RHO if p.rho is None else p.rho}"
                if p.status != "ok":
                    if r == 0:
                        rows.append(_row(tier, sess, p.method, p.detail, budget, bms, sampler, p.rho, seed, -1, -1,
                                         batch, p.status))
                    continue
                res = _execute(sess, p, spec, bms, budget, sampler, rs, batch, clocks[(p.method, p.rho)], teach[rs])
                bar.update(1)
                if res is None:   # the runtime refused the budget
                    rows.append(_row(tier, sess, p.method, p.detail, budget, bms, sampler, p.rho, seed, r, rs, batch,
                                     "refused", note="the runtime refused: budget below its minimum"))
                    continue
                td = teacher_distance(_to_model_space(res.images), teach[rs])
                rows.append(_row(tier, sess, p.method, p.detail, budget, bms, sampler, p.rho, seed, r, rs, batch,
                                 "ok", res, float(np.mean(td.mse)), float(np.mean(td.psnr)), res.note))
                if quality is not None:
                    feats.setdefault(pk, []).append(np.asarray(quality.features(res.images), np.float32))
                    ontime.setdefault(pk, []).append(np.full(len(res.images), bool(res.deadline_met)))
        for stale in feat_dir.glob(f"{_slug(bk)}__*.npz"):   # an earlier run's, e.g. a method now refused
            stale.unlink()
        if quality is not None:
            for pk, fs in feats.items():
                path = feat_dir / f"{_slug(bk)}__{_slug(pk)}.npz"
                with open(path, "wb") as f:
                    np.savez(f, features=np.concatenate(fs), on_time=np.concatenate(ontime[pk]))
        rows.append(_row(tier, sess, "-", "", budget, bms, sampler, None, seed, -1, -1, batch, "block-end"))
        _append_csv(csv_path, rows)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def _execute(sess: TierSession, p: Plan, spec: GridSpec, bms: float, budget: str, sampler: str, rs: int, batch: int,
             clock, teacher_x0: np.ndarray | None) -> RunResult | None:
    from abcd_edge.core.budget import Budget
    from abcd_edge.core.images import to_uint8
    from abcd_edge.quality import teacher_distance

    if p.method == "abcd":
        rt = sess.abcd
        rt.clock = clock if sess.tier.simulated else rt.clock
        try:
            images, rep = rt.generate(Budget("latency", bms), rho=float(p.rho), sampler=sampler, seed=rs, batch=batch)
        except UserError:
            return None
        return RunResult(images=images, latency_ms=rep.latency_ms, deadline_met=rep.deadline_met, steps=rep.steps,
                         planned_steps=rep.planned_steps, exit_reason=rep.exit_reason,
                         predicted=list(rep.predicted_step_ms), measured=list(rep.measured_step_ms),
                         energy_mj=None if sess.tier.simulated else rep.energy_mj, correction=rep.correction,
                         note=rep.schedule)
    if p.method == "oracle":
        res, hist = run_static(sess.base, clock, p.sigmas, sampler, rs, batch, bms, keep_history=True)
        # finishing: one x0 -> image conversion, timed on the same clock
        f0 = clock.elapsed_ms()
        to_uint8(hist[-1][1])
        finish = clock.elapsed_ms() - f0
        lat = [h[0] + finish for h in hist]
        if teacher_x0 is None:   # warm-up
            return res
        mse = np.stack([teacher_distance(h[1], teacher_x0).mse for h in hist])
        pick, fits = oracle_pick(lat, mse, bms)
        x0 = np.stack([hist[k][1][j] for j, k in enumerate(pick)])
        chosen = [lat[k] for k in pick]
        return RunResult(images=to_uint8(x0), latency_ms=float(max(chosen)), deadline_met=bool(fits),
                         steps=float(np.mean(pick + 1)), planned_steps=len(hist),
                         exit_reason="oracle" if fits else "oracle-none-fit", predicted=[], measured=res.measured,
                         note=f"chosen steps {','.join(str(int(k) + 1) for k in pick)}")
    res, _ = run_static(sess.base, clock, p.sigmas, sampler, rs, batch, bms, stop_below=p.stop_below,
                        predicted_step_ms=p.predicted_step_ms)
    return res


# ============================================================================ summary, tables, plots

def _f(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


@dataclass
class Cell:
    status: str
    n_requests: int = 0
    n_images: int = 0
    success: float | None = None
    success_ci: tuple | None = None
    fid: float | None = None
    fid_ci: tuple | None = None
    n_on_time: int = 0
    n_refused: int = 0
    util: float | None = None
    util_ci: tuple | None = None
    steps: float | None = None
    psnr: float | None = None
    energy: float | None = None
    detail: str = ""


def _fid_pool(fid_fn, parts: list[np.ndarray]) -> float | None:
    x = [p for p in parts if len(p)]
    if not x:
        return None
    feats = np.concatenate(x)
    if len(feats) < 2:
        return None
    return float(fid_fn(feats))


def compute_cells(out: Path, quality_fid: Callable | None = None) -> tuple[list[dict], dict]:
    """Per (tier, budget, sampler, rho, method): the metrics with bootstrap CIs over seeds."""
    rows = [r for r in _read_csv(Path(out) / RESULTS_CSV) if r["status"] != "block-end"]
    meta = json.loads((Path(out) / "bench.json").read_text())
    spec = meta["grid"]
    quality_list = [float(q) for q in spec["quality"]]
    feat_dir = Path(out) / "features"
    cells = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tier"], r["budget"], r["sampler"], r["method"], r["rho"]), []).append(r)
    tiers = {t["name"]: t for t in meta["tiers"]}
    for (tier, budget, sampler, method, rho), rs in groups.items():
        for q in (quality_list if rho == ALL_RHO else [float(rho)]):
            statuses = {r["status"] for r in rs}
            st = "ok" if "ok" in statuses or "refused" in statuses else sorted(statuses)[0]
            cell = Cell(status=st, detail=rs[0]["method_detail"])
            if st == "ok":
                served = [r for r in rs if r["status"] in ("ok", "refused")]
                by_seed: dict[int, list[dict]] = {}
                for r in served:
                    by_seed.setdefault(int(r["seed"]), []).append(r)
                seeds = sorted(by_seed)
                succ_groups = [(sum(r["deadline_met"] == "True" for r in by_seed[s]), len(by_seed[s])) for s in seeds]
                cell.n_requests = len(served)
                cell.n_refused = sum(r["status"] == "refused" for r in served)
                cell.n_images = sum(int(r["batch"]) for r in served)
                cell.success = pooled_success(succ_groups)
                cell.success_ci = bootstrap_ci(succ_groups, pooled_success, seed=1)
                ok = [r for r in served if r["status"] == "ok"]
                utils = [_f(r["utilisation"]) for r in ok]
                cell.util = float(np.mean(utils)) if utils else None
                util_groups = [[_f(r["utilisation"]) for r in by_seed[s] if r["status"] == "ok"] for s in seeds]
                cell.util_ci = bootstrap_ci(util_groups, lambda g: float(np.mean(sum(g, []))) if sum(g, []) else None,
                                            seed=2)
                cell.steps = float(np.mean([_f(r["steps"]) for r in ok])) if ok else None
                ps = [_f(r["teacher_psnr"]) for r in ok
                      if r["deadline_met"] == "True" and _f(r["teacher_psnr"]) is not None]
                cell.psnr = float(np.mean(ps)) if ps else None
                en = [_f(r["energy_mj"]) for r in ok if _f(r["energy_mj"]) is not None]
                cell.energy = float(np.mean(en)) if en else None
                if quality_fid is not None:
                    pk = f"{method}|{rho}"
                    per_seed = []
                    for s in seeds:
                        path = feat_dir / f"{_slug(_block_key(tier, budget, sampler, s))}__{_slug(pk)}.npz"
                        if path.is_file():
                            with np.load(path, allow_pickle=False) as z:
                                per_seed.append(z["features"][z["on_time"].astype(bool)])
                    if per_seed:
                        cell.n_on_time = int(sum(len(p) for p in per_seed))
                        cell.fid = _fid_pool(quality_fid, per_seed)
                        cell.fid_ci = bootstrap_ci(per_seed, lambda g: _fid_pool(quality_fid, g),
                                                   n_boot=BOOTSTRAP_FID, seed=3)
            cells.append(dict(tier=tier, simulated=tiers.get(tier, {}).get("simulated", False), budget=budget,
                              budget_ms=parse_budget(budget).ms, sampler=sampler, rho=q, method=method,
                              shared=rho == ALL_RHO, **asdict(cell)))
    return cells, meta


def predictor_errors(out: Path) -> list[dict]:
    """Per tier and method: MAPE of predicted vs measured step ms, and p99 coverage, over all steps."""
    acc: dict[tuple, list[float]] = {}
    for r in _read_csv(Path(out) / RESULTS_CSV):
        if r["status"] != "ok" or not r["cost_steps"]:
            continue
        a = acc.setdefault((r["tier"], r["method"]), [0.0, 0, 0])
        a[0] += float(r["cost_ape_sum"])
        a[1] += int(r["cost_steps"])
        a[2] += int(r["cost_covered"])
    return [dict(tier=t, method=m, steps=n, mape=s / n if n else None, coverage=c / n if n else None)
            for (t, m), (s, n, c) in sorted(acc.items())]


def wins_table(cells: list[dict]) -> list[dict]:
    """For each baseline: share of feasible settings where ABCD is not worse on success nor feature-FID and
    better on one (win), the reverse (loss), or neither (mixed / tie). Point estimates."""
    by_setting: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        if c["status"] == "ok":
            by_setting.setdefault((c["tier"], c["budget"], c["sampler"], c["rho"]), {})[c["method"]] = c
    out = []
    for b in [m for m in METHODS if m not in ("abcd",)]:
        n = w = lo = mixed = 0
        for _, ms in by_setting.items():
            a, x = ms.get("abcd"), ms.get(b)
            if not a or not x or a["success"] is None or x["success"] is None:
                continue
            fa = a["fid"] if a["fid"] is not None else math.inf
            fx = x["fid"] if x["fid"] is not None else math.inf
            if fa == math.inf and fx == math.inf:
                fa = fx = 0.0   # no quality measured: compare on success alone
            n += 1
            if a["success"] >= x["success"] and fa <= fx and (a["success"] > x["success"] or fa < fx):
                w += 1
            elif x["success"] >= a["success"] and fx <= fa and (x["success"] > a["success"] or fx < fa):
                lo += 1
            else:
                mixed += 1
        out.append(dict(baseline=b, settings=n, wins=w / n if n else None, losses=lo / n if n else None,
                        mixed=mixed / n if n else None))
    return out


def goals(cells: list[dict], meta: dict) -> dict:
    """The issue's goals: ABCD success >= 99.9 % on real tiers at budgets >= 3x p50 step; ABCD feature-FID <=
    0.9x the best baseline's (among baselines ABCD matches or beats on success) on >= 80 % of settings."""
    from abcd_edge.formats.profile import load_profile

    batch = meta["grid"]["batch"]
    p50 = {}
    for t in meta["tiers"]:
        try:
            p50[t["name"]] = load_profile(t["profile_path"]).for_batch(batch).step.p50_ms
        except UserError:
            p50[t["name"]] = None
    g1 = []
    for c in cells:
        if c["method"] == "abcd" and c["status"] == "ok" and not c["simulated"] and p50.get(c["tier"]) \
                and c["budget_ms"] >= 3 * p50[c["tier"]]:
            g1.append(dict(setting=f"{c['tier']} {c['budget']} {c['sampler']} rho={c['rho']}", success=c["success"],
                           met=c["success"] is not None and c["success"] >= 0.999))
    by_setting: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        if c["status"] == "ok":
            by_setting.setdefault((c["tier"], c["budget"], c["sampler"], c["rho"]), {})[c["method"]] = c
    g2 = []
    for k, ms in by_setting.items():
        a = ms.get("abcd")
        if not a or a["fid"] is None:
            continue
        cands = [ms[b] for b in BASELINES if b in ms and ms[b]["fid"] is not None and ms[b]["success"] is not None
                 and ms[b]["success"] <= a["success"]]
        best = min(cands, key=lambda c: c["fid"]) if cands else None
        g2.append(dict(setting=" ".join(map(str, k)), abcd_fid=a["fid"], best=best["method"] if best else None,
                       best_fid=best["fid"] if best else None,
                       met=bool(best and a["fid"] <= 0.9 * best["fid"])))
    share = sum(g["met"] for g in g2) / len(g2) if g2 else None
    return dict(success_goal=g1, success_goal_met=bool(g1) and all(g["met"] for g in g1),
                qub_goal=g2, qub_goal_share=share, qub_goal_met=share is not None and share >= 0.8)


def _fmt(v, pct=False, digits=2):
    if v is None:
        return "–"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def _fmt_ci(ci, pct=False, digits=2):
    if not ci:
        return ""
    return f" [{_fmt(ci[0], pct, digits)}, {_fmt(ci[1], pct, digits)}]"


def render_summary(cells: list[dict], meta: dict, preds: list[dict], wins: list[dict], gl: dict) -> str:
    spec = meta["grid"]
    L = [f"# abcd-edge bench — grid `{spec['name']}`", ""]
    L.append(f"Artifact `{meta['artifact']}` (manifest {meta['manifest_hash'][:12]}), controller: "
             f"`{meta['controller']}`. {meta['samples_per_setting']} images per setting = {spec['seeds']} seeds x "
             f"{meta['requests_per_seed']} requests x batch {spec['batch']}. Quality: {meta['quality']}. "
             f"Teacher: {meta['teacher']}.")
    mi = meta.get("machine", {})
    L.append(f"Machine: {mi.get('cpu_model')} ({mi.get('cpu_affinity')} usable cores), {mi.get('platform')}, "
             f"onnxruntime {mi.get('onnxruntime')}. Started {meta.get('started_utc')}, finished "
             f"{meta.get('finished_utc')}.")
    L.append("")
    L.append("| tier | kind | clock | profile | controller | AYS |")
    L.append("| --- | --- | --- | --- | --- | --- |")
    for t in meta["tiers"]:
        ts = meta.get("tier_sessions", {}).get(t["name"], {})
        clock = "simulated (profile replay)" if t["simulated"] else "wall"
        L.append(f"| {t['name']} | {t['kind']}{' (simulated)' if t['simulated'] else ''} | {clock} | "
                 f"`{t['profile_path']}` | {ts.get('controller', '?')} | {ts.get('ays', '?')} |")
    L.append("")
    L.append("Methods are rows; each column a setting (budget / sampler / rho). Cells: value [95 % bootstrap CI "
             "over seeds]. **Bold** = best among the non-oracle methods in the column. Rows marked `(all rho)` "
             "are static methods that ignore rho, measured once and shown under each rho. `oracle` is a "
             "hindsight reference, never bold.")
    L.append("")
    settings = sorted({(c["tier"], c["budget_ms"], c["budget"], c["sampler"], c["rho"]) for c in cells},
                      key=lambda k: (k[0], k[1], k[3], k[4]))
    tiers = list(dict.fromkeys(s[0] for s in settings))
    look = {(c["tier"], c["budget"], c["sampler"], c["rho"], c["method"]): c for c in cells}
    methods = [m for m in METHODS if any(c["method"] == m for c in cells)]
    metrics = [
        ("Success rate (requests within B)", "success", True, "max", "success_ci"),
        ("Feature-FID of on-time images (QUB) · success", "fid", False, "min", "fid_ci"),
        ("Latency utilisation (latency / B, all served requests)", "util", False, "min", "util_ci"),
        ("Mean denoiser steps", "steps", False, None, None),
        ("Teacher PSNR of on-time images (dB, vs the many-step DDIM)", "psnr", False, "max", None),
        ("Energy per request (mJ, where measured)", "energy", False, None, None),
    ]
    for title, key, pct, best, ci_key in metrics:
        L.append(f"## {title}")
        L.append("")
        if key == "energy" and all(c["energy"] is None for c in cells):
            L.append("Not measured: no usable power meter on this machine (and none on a replay tier).")
            L.append("")
            continue
        for tier in tiers:
            cols = [s for s in settings if s[0] == tier]
            sim = " (simulated)" if any(c["simulated"] for c in cells if c["tier"] == tier) else ""
            L.append(f"**{tier}{sim}**")
            L.append("")
            L.append("| method | " + " | ".join(f"{s[2]} / {s[3]} / {s[4]}" for s in cols) + " |")
            L.append("| --- |" + " --- |" * len(cols))
            bests = {}
            for s in cols:
                vals = [(look[(s[0], s[2], s[3], s[4], m)][key], m) for m in methods
                        if (s[0], s[2], s[3], s[4], m) in look and m != "oracle"
                        and look[(s[0], s[2], s[3], s[4], m)][key] is not None]
                if best and vals and len({round(v, 9) for v, _ in vals}) > 1:   # no bold when all tie
                    bv = max(v for v, _ in vals) if best == "max" else min(v for v, _ in vals)
                    bests[s] = bv
            for m in methods:
                cellstrs = []
                shared = False
                for s in cols:
                    c = look.get((s[0], s[2], s[3], s[4], m))
                    if c is None:
                        cellstrs.append("")
                        continue
                    shared = shared or c["shared"]
                    if c["status"] != "ok":
                        cellstrs.append(c["status"])
                        continue
                    v = c[key]
                    txt = _fmt(v, pct) + (_fmt_ci(c[ci_key], pct) if ci_key else "")
                    if v is not None and s in bests and m != "oracle" and abs(v - bests[s]) < 1e-12:
                        txt = f"**{txt}**"
                    if key == "fid":
                        txt += f" · {_fmt(c['success'], True)} (n={c['n_on_time']})"
                    if key == "success" and c.get("n_refused"):
                        txt += f" ({c['n_refused']} refused)"
                    cellstrs.append(txt)
                name = m + (" (all rho)" if shared else "") + (" (hindsight)" if m == "oracle" else "")
                L.append(f"| {name} | " + " | ".join(cellstrs) + " |")
            L.append("")
    unavailable = sorted({(c["method"], c["detail"]) for c in cells if c["status"] == "unavailable"})
    infeasible = sorted({(c["tier"], c["budget"], c["sampler"]) for c in cells if c["status"] == "infeasible"})
    if unavailable or infeasible:
        L.append("## Unavailable and infeasible")
        L.append("")
        for m, d in unavailable:
            L.append(f"- `{m}`: {d}")
        for t, b, s in infeasible:
            mins = meta.get("tier_sessions", {}).get(t, {}).get("minimum_ms", {})
            L.append(f"- {t} {b} {s}: infeasible, below the tier's minimum response "
                     f"({mins.get(s, '?')} ms = one step + finishing at the profile's p99, batch {spec['batch']})")
        L.append("")
    L.append("## Wins: ABCD vs each baseline")
    L.append("")
    L.append("Share of feasible settings where ABCD is not worse on success nor on feature-FID and better on "
             "one (win), the reverse (loss), or neither (mixed). Point estimates; see the CIs above.")
    L.append("")
    L.append("| baseline | settings | ABCD wins | ABCD loses | mixed / tie |")
    L.append("| --- | --- | --- | --- | --- |")
    for w in wins:
        L.append(f"| {w['baseline']} | {w['settings']} | {_fmt(w['wins'], True)} | {_fmt(w['losses'], True)} | "
                 f"{_fmt(w['mixed'], True)} |")
    L.append("")
    L.append("## The issue's goals")
    L.append("")
    if gl["success_goal"]:
        ok = sum(g["met"] for g in gl["success_goal"])
        L.append(f"- ABCD success >= 99.9 % on real tiers at budgets >= 3x the p50 step: "
                 f"{'MET' if gl['success_goal_met'] else 'NOT MET'} ({ok}/{len(gl['success_goal'])} settings; "
                 + ", ".join(f"{g['setting']}: {_fmt(g['success'], True)}" for g in gl["success_goal"]) + ")")
    else:
        L.append("- ABCD success >= 99.9 % on real tiers at budgets >= 3x the p50 step: no such setting in this grid")
    if gl["qub_goal_share"] is not None:
        L.append(f"- ABCD feature-FID <= 0.9x the best baseline's at equal or better success on >= 80 % of settings: "
                 f"{'MET' if gl['qub_goal_met'] else 'NOT MET'} ({_fmt(gl['qub_goal_share'], True)} of "
                 f"{len(gl['qub_goal'])} settings)")
        for g in gl["qub_goal"]:
            L.append(f"  - {g['setting']}: ABCD {_fmt(g['abcd_fid'])} vs {g['best'] or 'no baseline at <= its success'}"
                     f" {_fmt(g['best_fid'])} -> {'met' if g['met'] else 'not met'}")
    else:
        L.append("- ABCD feature-FID goal: not measurable (no feature-FID)")
    L.append("")
    L.append("## Cost-predictor error (per step: predicted vs measured denoiser ms)")
    L.append("")
    L.append("ABCD predicts the next step's tail (p99 x online correction + sampler + decision); the static "
             "baselines' planners assume the profile's p99 (uniform/karras/logsnr/ays/stepdrop) or p50 (buco-mwg). "
             "Coverage = share of steps that took no longer than predicted (a p99 predictor should cover ~99 %).")
    L.append("")
    L.append("| tier | method | steps | MAPE | coverage |")
    L.append("| --- | --- | --- | --- | --- |")
    for p in preds:
        L.append(f"| {p['tier']} | {p['method']} | {p['steps']} | {_fmt(p['mape'], True)} | "
                 f"{_fmt(p['coverage'], True)} |")
    L.append("")
    if meta.get("stepdrop"):
        L.append("## StepDrop thresholds (tuned on validation noise, disjoint from the request seeds)")
        L.append("")
        for k, info in meta["stepdrop"].items():
            parts = [f"rho {r}: {v['steps']}/{info['K']} steps (sigma < {v['threshold_sigma']:.4g} dropped)"
                     for r, v in info.items() if isinstance(v, dict)]
            L.append(f"- {k}: " + "; ".join(parts))
        L.append("")
    L.append("Plots: `success_vs_budget_*.png`, `fid_vs_budget_*.png`, `latency_hist_*.png`, `utilisation.png`.")
    text = "\n".join(L) + "\n"
    return text.replace(str(paths.REPO_ROOT) + os.sep, "")   # repository paths shown relative


def make_plots(out: Path, cells: list[dict]) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    out = Path(out)
    made = []
    ok = [c for c in cells if c["status"] == "ok"]
    tiers = list(dict.fromkeys(c["tier"] for c in cells))
    rhos = sorted({c["rho"] for c in cells})
    samplers = sorted({c["sampler"] for c in cells})
    sim = {c["tier"]: c["simulated"] for c in cells}
    methods = [m for m in METHODS if any(c["method"] == m for c in ok)]
    colors = {m: plt.cm.tab10(i) for i, m in enumerate(METHODS)}

    def title(t):
        return f"{t} (simulated)" if sim.get(t) else t

    for key, label, fname in (("success", "success rate", "success_vs_budget"),
                              ("fid", "feature-FID of on-time images", "fid_vs_budget")):
        for s in samplers:
            fig, axes = plt.subplots(len(tiers), len(rhos), figsize=(4.2 * len(rhos), 3.2 * len(tiers)),
                                     squeeze=False)
            for i, t in enumerate(tiers):
                for j, q in enumerate(rhos):
                    ax = axes[i][j]
                    for m in methods:
                        pts = sorted((c["budget_ms"], c[key]) for c in ok if c["tier"] == t and c["sampler"] == s
                                     and c["rho"] == q and c["method"] == m and c[key] is not None)
                        if pts:
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m, color=colors[m],
                                    linestyle="--" if m == "oracle" else "-")
                    ax.set_xscale("log")
                    ax.set_title(f"{title(t)}, rho={q}", fontsize=9)
                    ax.set_xlabel("budget (ms)")
                    ax.set_ylabel(label)
                    if key == "success":
                        ax.set_ylim(-0.02, 1.02)
            seen_labels: dict[str, Any] = {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    seen_labels.setdefault(lab, h)
            labels = [m for m in methods if m in seen_labels]
            handles = [seen_labels[m] for m in labels]
            if handles:
                fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
            fig.suptitle(f"{label} vs budget — sampler {s}", fontsize=10)
            fig.tight_layout(rect=(0, 0.06, 1, 0.97))
            path = out / f"{fname}_{s}.png"
            fig.savefig(path, dpi=90)
            plt.close(fig)
            made.append(path.name)
    rows = [r for r in _read_csv(out / RESULTS_CSV) if r["status"] == "ok"]
    for t in tiers:
        budgets = sorted({(float(r["budget_ms"]), r["budget"]) for r in rows if r["tier"] == t})
        if not budgets:
            continue
        fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.3), squeeze=False)
        for j, (bms, b) in enumerate(budgets):
            ax = axes[0][j]
            for m in methods:
                lat = [float(r["latency_ms"]) for r in rows if r["tier"] == t and r["budget"] == b and r["method"] == m]
                if lat:
                    ax.hist(lat, bins=30, histtype="step", label=m, color=colors[m])
            ax.axvline(bms, color="k", linestyle="--", linewidth=1)
            ax.set_title(f"{title(t)}, budget {b}", fontsize=9)
            ax.set_xlabel("latency (ms); dashed: budget")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"latency_hist_{_slug(t)}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        made.append(path.name)
    groups = sorted({(c["tier"], c["budget_ms"], c["budget"]) for c in ok})
    if groups:
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(methods)) / 3), 3.6))
        w = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            ys = []
            for g in groups:
                v = [c["util"] for c in ok if (c["tier"], c["budget_ms"], c["budget"]) == g and c["method"] == m
                     and c["util"] is not None]
                ys.append(float(np.mean(v)) if v else 0.0)
            ax.bar(np.arange(len(groups)) + i * w, ys, w, label=m, color=colors[m])
        ax.axhline(1.0, color="k", linestyle="--", linewidth=1)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - w / 2)
        ax.set_xticklabels([f"{title(g[0])}\n{g[2]}" for g in groups], fontsize=7)
        ax.set_ylabel("mean latency / budget")
        ax.legend(fontsize=7, ncol=4)
        fig.tight_layout()
        fig.savefig(out / "utilisation.png", dpi=90)
        plt.close(fig)
        made.append("utilisation.png")
    return made


def summarize(out: Path, quality: Quality | None | str = "auto", log: Callable[[str], None] | None = None) -> Path:
    """(Re)compute summary.md and the plots from results.csv + features/ + bench.json."""
    with blas_threads(1):
        return _summarize(Path(out), quality, log)


def _summarize(out: Path, quality, log) -> Path:
    meta = json.loads((out / "bench.json").read_text())
    fid = None
    feat_files = list((out / "features").glob("*.npz")) if (out / "features").is_dir() else []
    if feat_files:
        if quality == "auto":
            from abcd_edge.formats.manifest import load_manifest

            res = load_manifest(Path(meta["artifact"]), verify_hashes=False).resolution
            q, _ = Quality.default(res, meta["grid"]["ref_seed"], meta["grid"]["ref_n"])
            if q is not None and q.description != meta.get("quality"):
                raise UserError(f"{out}/features were computed with another feature net ({meta.get('quality')}); "
                                f"now: {q.description}. Rerun the bench with --no-resume")
            fid = q.fid if q else None
        elif quality is not None:
            fid = quality.fid
    cells, meta = compute_cells(out, fid)
    preds = predictor_errors(out)
    wins = wins_table(cells)
    gl = goals(cells, meta)
    plots = make_plots(out, cells)
    write_bytes_atomic(out / "summary.md", render_summary(cells, meta, preds, wins, gl).encode())
    write_json_atomic(out / "summary.json", dict(cells=cells, predictor=preds, wins=wins, goals=gl, plots=plots))
    if log:
        log(f"summary -> {out / 'summary.md'}")
    return out / "summary.md"


# ============================================================================ entry points

def bench_main(grid: str | None = None, out: str | Path | None = None, profiles: Any = None, budgets: Any = None,
               samplers: Any = None, quality: Any = None, methods: Any = None, seeds: int | None = None,
               samples: int | None = None, resume: bool = True, batch: int | None = None,
               artifact: str | None = None, controller: str | None = None, teacher_steps: int | None = None,
               progress: bool = True) -> Path:
    """Parse the grid, run it (resuming from ``out``/results.csv), write the outputs; return ``out``."""
    spec = parse_grid_args(grid, profiles, budgets, samplers, quality, methods, seeds, samples, batch, artifact,
                           controller, teacher_steps)
    out = Path(out) if out else Path("bench") / (grid or "quick")
    return run_grid(spec, out, resume=resume, progress=progress)


def _make_click_command():
    import click

    @click.command("bench")
    @click.option("--grid", type=click.Choice(sorted(GRIDS)), default="quick", show_default=True,
                  help="quick (<= 10 min on 2 cores) or full (4 tiers x 3 budgets x 3 samplers x 2 rho x 10 seeds).")
    @click.option("--out", default=None, type=click.Path(), help="Output folder (default bench/<grid>).")
    @click.option("--profiles", multiple=True,
                  help="Tier profiles (repeatable, comma lists, globs); prefix replay: for a simulated tier, busy: for "
                       "a real one with one core kept busy. Default: the grid's (this machine's committed profiles).")
    @click.option("--budgets", default=None, help="Latency budgets, e.g. 50ms,150ms,1s.")
    @click.option("--samplers", default=None, help=f"Comma list of {', '.join(BENCH_SAMPLERS)}.")
    @click.option("--quality", default=None, help="rho values, e.g. 0.6,0.9.")
    @click.option("--methods", default=None, help=f"all, or a comma list of {', '.join(METHODS)}.")
    @click.option("--seeds", default=None, type=int, help="Seeds per setting (bootstrap CIs are over seeds).")
    @click.option("--samples", default=None, type=int, help="Images per setting, all seeds together (>= 256 for FID).")
    @click.option("--batch", default=None, type=int, help="Images per request (the profile must have this batch).")
    @click.option("--teacher-steps", default=None, type=int, help="Steps of the DDIM teacher (default 200).")
    @click.option("--artifact", default=None, type=click.Path(), help="Artifact folder (default export/demo).")
    @click.option("--controller", default=None, help="auto (calibration/<artifact>/), a folder, or none.")
    @click.option("--resume/--no-resume", default=True, show_default=True,
                  help="Continue from <out>/results.csv, skipping finished blocks.")
    @click.argument("extra_profiles", nargs=-1, type=click.Path())
    def bench_command(grid, out, profiles, budgets, samplers, quality, methods, seeds, samples, batch, teacher_steps,
                      artifact, controller, resume, extra_profiles):
        """The benchmark grid: ABCD vs baselines -> results.csv, summary.md, plots, bench.json.

        Extra arguments are more profiles (so an unquoted --profiles profiles/*.json works)."""
        profs = list(profiles) + list(extra_profiles)
        path = bench_main(grid=grid, out=out, profiles=profs or None, budgets=budgets, samplers=samplers,
                          quality=quality, methods=methods, seeds=seeds, samples=samples, resume=resume, batch=batch,
                          artifact=artifact, controller=controller, teacher_steps=teacher_steps)
        click.echo(f"bench -> {path}/summary.md")

    return bench_command


bench_command = _make_click_command()
