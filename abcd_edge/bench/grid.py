"""The grid a bench runs: tiers x budgets x samplers x quality targets (rho) x seeds, and its methods.

A :class:`GridSpec` is a named grid (``GRIDS``) with any axis overridden, validated by
:func:`validate_spec`; :func:`parse_grid_args` is what the CLI calls.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from abcd_edge import paths
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError

METHODS = ("uniform", "karras", "logsnr", "ays", "stepdrop", "buco-mwg", "abcd", "oracle")
BASELINES = tuple(m for m in METHODS if m not in ("abcd", "oracle"))
# fixed-rule schedules (stepdrop: a fixed schedule cut at a fixed sigma); BuCo-MWG is budget-conditioned
STATIC_METHODS = ("uniform", "karras", "logsnr", "ays", "stepdrop")
# Methods whose output does not depend on rho: measured once per (tier, budget, sampler, seed); rho column "all".
RHO_FREE = ("uniform", "karras", "logsnr", "ays", "oracle")
BENCH_SAMPLERS = ("ddim", "dpmpp-2m", "euler", "consistency", "euler-ancestral", "lcm")
TIER_KINDS = ("real", "busy", "replay")
ALL_RHO = "all"
REF_SEED, REF_N = paths.EVAL_REF_SEED, paths.REF_N   # feature-FID reference: generator data (evaluation net's)


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
    evaluation_net: str | None = None  # the feature net that scores (None: the shipped one for the image size;
                                       # its path and sha are in the quality description, so in the config key)
    prompts: str | None = None    # a text-to-image pipeline's prompt file(s) (bench/text.py: "FILE" or
                                  # "label=FILE,label=FILE", e.g. easy=...,hard=...)
    guidance: float | None = None  # ... and the guidance every method runs at (default: the artifact's)
    max_steps: int | None = None  # every method's plan capped at this many steps (e.g. 6: "Consistency-6")

    def key_fields(self) -> dict:
        """What of the spec the results depend on (a pixel grid's key is what it was before prompts existed)."""
        out = asdict(self)
        for where in ("name", "artifact", "evaluation_net"):
            out.pop(where)
        for optional in ("prompts", "guidance", "max_steps"):
            if out[optional] is None:
                out.pop(optional)
        return out

    @property
    def requests_per_seed(self) -> int:
        return max(1, math.ceil(self.samples / (self.seeds * self.batch)))

    @property
    def samples_per_setting(self) -> int:
        return self.requests_per_seed * self.seeds * self.batch

    def request_seeds(self, seed: int) -> list[int]:
        return [seed * 1000 + r for r in range(self.requests_per_seed)]

    def rhos(self, method: str) -> list[float | None]:
        """The rho values a method runs at: [None] (measured once, rho "all") for rho-free methods."""
        return [None] if method in RHO_FREE else list(self.quality)

    @property
    def runs_per_request(self) -> int:
        """How many (method, rho) streams each request seed is run through."""
        return sum(len(self.rhos(m)) for m in self.methods)


GRIDS: dict[str, dict] = {
    # 2 real tiers x 2 budgets x 1 sampler x 2 rho x 4 seeds; 256 images per setting = 64 batch-4 requests
    "quick": dict(tiers=["@real"], budgets=["200ms", "600ms"], samplers=["ddim"], quality=[0.6, 0.9, 1.0],
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
                    teacher_steps: int | None = None, prompts: str | None = None, guidance: float | None = None,
                    evaluation_net: str | None = None, max_steps: int | None = None) -> GridSpec:
    """A named grid (quick, full; default quick) with any of its axes overridden; validated.

    Lists are Python lists or comma-separated strings. ``profiles`` items are profile JSON paths
    or globs, optionally prefixed ``real:``, ``busy:`` (a real tier with one core kept busy) or
    ``replay:`` (simulated clock); unprefixed ones are real when measured on this machine,
    replayed otherwise. ``prompts`` (a file, one per line) and ``guidance`` are a text-to-image pipeline
    artifact's. Raises UserError on anything unknown or empty.
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
                    controller=controller or "auto", prompts=None if prompts is None else str(prompts),
                    guidance=guidance, evaluation_net=None if evaluation_net is None else str(evaluation_net),
                    max_steps=max_steps, **base)
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
    if spec.max_steps is not None and (isinstance(spec.max_steps, bool) or not isinstance(spec.max_steps, int)
                                       or spec.max_steps < 1):
        raise UserError(f"--max-steps {spec.max_steps!r} must be an integer >= 1")
    if spec.seeds > 999:
        raise UserError(f"--seeds {spec.seeds}: at most 999")
    if spec.requests_per_seed > 999:
        raise UserError(f"{spec.samples} samples over {spec.seeds} seeds at batch {spec.batch} is over 999 "
                        "requests per seed; use more seeds or a larger batch")
    for t in spec.tiers:
        kind, _, rest = t.partition(":") if ":" in t and t.split(":", 1)[0] in TIER_KINDS else ("", "", t)
        if not rest.strip():
            raise UserError(f"tier {t!r} names no profile")
