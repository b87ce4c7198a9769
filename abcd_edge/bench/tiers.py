"""Hardware tiers: a device profile plus a clock (real, busy or replayed), and the warm session of one tier.

``@real`` / ``@busy`` / ``@replay`` name the committed profiles of the artifact; a tier spec may also be a
profile path or glob, prefixed ``real:``, ``busy:`` or ``replay:``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from abcd_edge import paths
from abcd_edge.bench.ays import AysTable, load_ays
from abcd_edge.bench.grid import TIER_KINDS, GridSpec
from abcd_edge.bench.teacher import request_noise
from abcd_edge.bench.text import BenchText
from abcd_edge.errors import UserError


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
            matches = sorted(glob(rest)) if any(c in rest for c in "*?[") else [rest]
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
        tiers.append(Tier(name=name, kind=kind, profile_path=paths.portable(path), device_id=prof.device_id,
                          backend=prof.backend, threads=prof.threads))
    if not tiers:
        raise UserError("the grid is empty: no tier")
    return tiers


def stable_seed(*parts: Any) -> int:
    """A seed from a key, the same in every process (the replay clock of one stream)."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:4], "little")


def controller_dir(spec_controller: str, manifest_name: str) -> Path | None:
    """The controller folder a grid names: none, auto (calibration/<artifact>/ when calibrated) or a folder."""
    if spec_controller in ("none", ""):
        return None
    if spec_controller == "auto":
        folder = paths.CALIBRATION_DIR / manifest_name
        return folder if (folder / "controller.json").is_file() else None
    return Path(spec_controller)


@dataclass
class TierSession:
    tier: Tier
    base: Any                     # AnytimeRuntime without a controller: cost model, denoiser for static methods
    abcd: Any                     # AnytimeRuntime with the controller ("auto"/folder) or rule-based
    controller: Any               # numpy Controller or None
    controller_dir: str | None
    ays: AysTable | None
    overhead_scale: float
    local_step_p50_ms: float | None
    batch: int = 1
    text: BenchText = BenchText(None, None)   # a text-to-image pipeline's prompt per request seed, guidance
    max_steps: int | None = None  # the grid's cap on every method's steps
    rollouts: Any = None          # runtime.rollout.Rollouts over the base session (StepDrop tuning, the oracle)

    @property
    def branches(self) -> int | None:
        """The UNet branches a request runs (None: a pixel artifact's; a pipeline's at the grid's guidance)."""
        pl = self.base.pipeline
        if pl is None:
            return None
        return pl.branches(self.text.guidance if self.text.guidance is not None else pl.default_guidance)

    def cost_model(self, sampler: str):
        """The base session's cost model (correction 1) for this tier's requests (a pipeline: its UNet mode)."""
        return self.base.cost_model(self.batch, sampler, correction=1.0, branches=self.branches)

    def minimum_ms(self, sampler: str) -> float:
        """The smallest achievable response (a pipeline: encode + one step + decode at the tails)."""
        return self.base.minimum_ms(self.batch, sampler, branches=self.branches)

    def step_budget_ms(self, budget_ms: float) -> float:
        """What a static plan fits its steps and finishing into: the budget less a pipeline's prompt encoding
        at its tail (encoded inside every request's clock)."""
        return budget_ms - self.base.encode_tail_ms(1 if self.text.prompts is not None else 0)

    def request(self, seed: int):
        """The checked text side of request seed ``seed`` (runtime.text_request.PipelineRequest; None: pixel)."""
        return self.base.pipeline_request(**self.text.request(seed))

    def forget_prompt(self, seed: int) -> None:
        """Drop request seed ``seed``'s prompt from both runtimes' caches: every method encodes it itself."""
        prompt = self.text.prompt_for(seed)
        if prompt is None:
            return
        for rt in (self.base, self.abcd):
            rt.pipeline.encoder.forget(prompt)

    def clock_for(self, *key) -> Any:
        """A fresh clock for one (method, rho) stream: replay draws seeded by the key; wall clock shared."""
        from abcd_edge.device.clock import ReplayClock

        if not self.tier.simulated:
            return self.base.clock
        samples = self.base.profile.for_batch(self.batch).step.samples_ms
        return ReplayClock(samples, seed=stable_seed(self.tier.name, *key), overhead_scale=self.overhead_scale)

    def close(self) -> None:
        self.base.close()
        self.abcd.close()

    def __enter__(self) -> "TierSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_tier(tier: Tier, spec: GridSpec, batch: int, text: BenchText | None = None) -> TierSession:
    """Both runtimes of a tier over ONE denoiser session, warm; on a replay tier also this machine's step
    time, for the replay clock's overhead scale. ``text``: a text-to-image pipeline's prompts and guidance."""
    from abcd_edge.runtime.rollout import Rollouts

    from abcd_edge.device.clock import ReplayClock
    from abcd_edge.runtime.session import AnytimeRuntime

    threads = tier.threads if not tier.simulated else (os.cpu_count() or 1)
    clock_base = clock_abcd = None
    profile = paths.from_portable(tier.profile_path)
    if tier.simulated:
        from abcd_edge.formats.profile import load_profile

        samples = load_profile(profile).for_batch(batch).step.samples_ms
        clock_base, clock_abcd = ReplayClock(samples), ReplayClock(samples)
    base = AnytimeRuntime.open(spec.artifact, profile=profile, controller=None, backend=tier.backend,
                               threads=threads, power="auto", clock=clock_base)
    try:
        base.profile.for_batch(batch)  # a UserError naming the missing batch, before any work
        cdir = controller_dir(spec.controller, base.manifest.name)
        # one ORT session for every method: methods are interleaved request by request, and a second session's
        # intra-op thread pool would go cold between its requests (measured: ~2x slower first steps at 2 threads)
        abcd = AnytimeRuntime.open(spec.artifact, profile=profile, controller=str(cdir) if cdir else None,
                                   backend=tier.backend, threads=threads, power="auto", clock=clock_abcd,
                                   denoiser=base.denoiser)
    except BaseException:
        base.close()
        raise
    ays, _ = load_ays(cdir, abcd.manifest_hash)
    text = text or BenchText(None, None)
    local, scale = None, 1.0
    if base.pipeline is None:   # (a pipeline's components were warmed one by one when opened; no replay tier)
        local, scale = _warm_denoiser(base, tier, batch)
    return TierSession(tier=tier, base=base, abcd=abcd, controller=abcd.controller,
                       controller_dir=str(cdir) if (cdir and abcd.controller is not None) else None,
                       ays=ays, overhead_scale=scale, local_step_p50_ms=local, batch=batch, text=text,
                       max_steps=spec.max_steps,
                       rollouts=Rollouts(base.manifest, base.schedule, base.denoiser, base.pipeline, text.guidance))


def _warm_denoiser(base, tier: Tier, batch: int) -> tuple[float | None, float]:
    """Warm the session; on a replay tier also time this machine's step: (its p50 ms, the overhead scale)."""
    shape = (batch, base.manifest.channels, base.manifest.resolution, base.manifest.resolution)
    x = request_noise(0, shape)
    t = np.full(batch, 500.0, np.float32)
    for _ in range(5):
        base.denoiser(x, t)
    if not tier.simulated:
        return None, 1.0
    ts = []
    for _ in range(15):
        t0 = time.perf_counter()
        base.denoiser(x, t)
        ts.append((time.perf_counter() - t0) * 1e3)
    local = float(np.median(ts))
    return local, max(base.profile.for_batch(batch).step.p50_ms / local, 1e-3)
