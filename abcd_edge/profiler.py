"""The device profile: what one denoiser step, one controller decision and finishing
an image cost on this device, measured, saved as schema-versioned JSON, validated on load.
"""
from __future__ import annotations

import io
import json
import math
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.io import write_json_atomic
from abcd_edge.schema import from_dict

SCHEMA_VERSION = 1
CV_WARNING = 0.10


@dataclass
class LatencyStats:
    """A latency distribution in ms; ``samples_ms`` keeps the raw list so tails can be refitted."""

    n: int
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    cv: float
    samples_ms: list[float]

    @classmethod
    def from_samples(cls, samples_ms) -> "LatencyStats":
        s = np.asarray(samples_ms, np.float64)
        if s.size == 0:
            raise ValueError("no samples")
        mean = float(s.mean())
        q = np.quantile(s, [0.5, 0.9, 0.99])
        return cls(n=int(s.size), min_ms=float(s.min()), p50_ms=float(q[0]), p90_ms=float(q[1]),
                   p99_ms=float(q[2]), max_ms=float(s.max()), mean_ms=mean,
                   cv=float(s.std() / mean) if mean > 0 else 0.0,
                   samples_ms=[round(float(v), 5) for v in s])

    def quantile(self, q: float) -> float:
        return float(np.quantile(np.asarray(self.samples_ms), q))


@dataclass
class BatchProfile:
    batch: int
    step: LatencyStats
    flops_per_step: float            # per sample, from the manifest (2 x MACs)
    flops_per_s: float               # achieved: flops_per_step * batch / p50 step time
    sampler_ms: dict[str, LatencyStats]  # the sampler's own arithmetic per step, by sampler
    finish: LatencyStats             # x0 -> uint8 image array (inside the request clock)
    png: LatencyStats                # uint8 -> PNG bytes (after the clock stops)
    step_power_w: float | None = None
    energy_per_step_mj: float | None = None


@dataclass
class PowerInfo:
    meter: str
    interval_s: float | None
    idle_w: float | None
    warnings: list[str] = field(default_factory=list)


@dataclass
class DeviceProfile:
    schema_version: int
    device_id: str
    backend: str
    threads: int | None
    provider_options: dict
    host: str
    machine: dict              # cpu model, cores, gpu, jetson board/power mode, versions
    artifact: str
    manifest_hash: str
    batches: list[BatchProfile]
    controller_decision: LatencyStats
    power: PowerInfo
    warnings: list[str]
    command: str
    created_utc: str

    def for_batch(self, batch: int) -> BatchProfile:
        for b in self.batches:
            if b.batch == batch:
                return b
        known = ", ".join(str(b.batch) for b in self.batches)
        raise UserError(f"profile {self.device_id!r} has no batch {batch} (measured: {known}); "
                        f"profile it with --batch {batch}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str = "profile") -> "DeviceProfile":
        if not isinstance(data, dict):
            raise UserError(f"{source}: not a device profile (expected a JSON object)")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise UserError(f"{source}: schema_version {version!r} is not supported (this abcd-edge reads {SCHEMA_VERSION})")
        return from_dict(cls, data, source)

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())


def load_profile(path: str | Path, manifest_hash: str | None = None) -> DeviceProfile:
    """Load and validate a profile; refuse one measured for another artifact."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"profile {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"profile {str(path)!r} is not valid JSON ({exc})") from None
    profile = DeviceProfile.from_json(data, source=str(path))
    if manifest_hash is not None and profile.manifest_hash != manifest_hash:
        raise UserError(f"profile {str(path)!r} was measured for another artifact "
                        f"(manifest {profile.manifest_hash[:12]}, this artifact {manifest_hash[:12]}); "
                        "profile this artifact with `abcd-edge profile`")
    return profile


def _time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def measure_profile(artifact_dir: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                    batches: tuple[int, ...] = (1,), runs: int = 300, warmup: int = 20, power: str = "auto",
                    command: str = "", progress: bool = True) -> DeviceProfile:
    """Measure a device profile for ``artifact_dir`` on ``backend`` (the real device, wall clock)."""
    from tqdm import tqdm

    from abcd_edge import hardware, telemetry
    from abcd_edge.backends import open_denoiser
    from abcd_edge.controller import Controller, cost_features, decision_features
    from abcd_edge.demo.data import to_uint8
    from abcd_edge.manifest import load_manifest, manifest_hash
    from abcd_edge.samplers import SAMPLER_NAMES, make_sampler
    from abcd_edge.schedules import NoiseSchedule, time_uniform_sigmas

    if runs < 1:
        raise UserError(f"--runs {runs} must be at least 1 (>= 200 recommended for stable tails)")
    if any(b < 1 for b in batches):
        raise UserError(f"--batch {','.join(map(str, batches))}: batch sizes must be >= 1")
    artifact_dir = Path(artifact_dir)
    manifest = load_manifest(artifact_dir)
    for b in batches:
        if not manifest.batch_min <= b <= manifest.batch_max:
            raise UserError(f"--batch {b} is outside the artifact's batch range "
                            f"{manifest.batch_min}..{manifest.batch_max}")
    denoiser = open_denoiser(artifact_dir, backend=backend, threads=threads)
    meter = telemetry.open_meter(power)
    info = hardware.machine_info()
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    rng = np.random.default_rng(0)
    shape = (manifest.channels, manifest.resolution, manifest.resolution)
    stages = len(batches) * 4 + 2
    bar = tqdm(total=stages, desc="profile", unit="stage", disable=not progress, file=sys.stderr)

    idle_w = None
    if meter.name != "none":
        meter.start()
        time.sleep(1.0)
        idle = meter.stop()
        idle_w = idle.avg_w
    bar.update(1)

    results = []
    warnings: list[str] = []
    for b in batches:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        ts = [np.full(b, t, np.float32) for t in np.linspace(999, 1, 17)]
        k = iter(range(10**9))
        meter.start()
        step_ms = _time_calls(lambda: denoiser(x, ts[next(k) % len(ts)]), runs, warmup)
        reading = meter.stop()
        bar.update(1)
        step = LatencyStats.from_samples(step_ms)
        if step.cv > CV_WARNING:
            warnings.append(f"batch {b}: step latency cv {step.cv:.2f} > {CV_WARNING:.2f}; pin clocks "
                            "(jetson_clocks / performance governor) or use fewer threads for stable deadlines")
        energy_per_step = power_w = None
        if reading.energy_mj is not None:
            power_w = reading.avg_w
            energy_per_step = reading.energy_mj / (runs + warmup) if reading.duration_s > 0 else None
        warnings.extend(w for w in reading.warnings if w not in warnings)   # a meter's note once, not per batch

        eps = rng.standard_normal((b, *shape)).astype(np.float32)
        sigmas = time_uniform_sigmas(schedule, 20)
        sampler_ms = {}
        for name in SAMPLER_NAMES:
            sampler = make_sampler(name, schedule, sigmas, manifest.prediction_type)
            state = sampler.prepare(x)
            noise = rng.standard_normal(x.shape).astype(np.float32)
            i_iter = iter(range(10**9))

            def one_step():
                i = next(i_iter) % (len(sampler) - 1)
                sampler.model_input(state, i)
                sampler.step(state, i, eps, noise=noise)
            sampler_ms[name] = LatencyStats.from_samples(_time_calls(one_step, max(runs, 50), 5))
        bar.update(1)
        finish = LatencyStats.from_samples(_time_calls(lambda: to_uint8(eps), max(runs, 50), 5))
        img = to_uint8(eps)
        png = LatencyStats.from_samples(_time_calls(lambda: [_png_bytes(im) for im in img], 50, 2))
        bar.update(2)
        results.append(BatchProfile(batch=b, step=step, flops_per_step=float(manifest.flops_per_step),
                                    flops_per_s=float(manifest.flops_per_step) * b / (step.p50_ms / 1e3),
                                    sampler_ms=sampler_ms, finish=finish, png=png,
                                    step_power_w=power_w, energy_per_step_mj=energy_per_step))

    # One per-step decision = cost prediction + exit policy; its cost does not depend on the
    # weights, so an untrained controller of the shipped architecture is timed here.
    controller = Controller.random_init(seed=0)

    def decide():
        controller.predict_cost_ms(cost_features(5.0, 6.0, 0.1, 0.2, 1, backend, 1.0))
        controller.p_stop(decision_features(1.0, 0.01, 0.5, 0.5, [5.0, 20.0, 0.5], [0.0] * 6))
    decision = LatencyStats.from_samples(_time_calls(decide, max(runs, 200), 20))
    bar.update(1)
    bar.close()
    meter.close()
    return DeviceProfile(
        schema_version=SCHEMA_VERSION,
        device_id=hardware.device_id(backend, threads, info),
        backend=backend, threads=threads, provider_options=getattr(denoiser, "provider_options", {}),
        host=socket.gethostname(), machine=info, artifact=manifest.name,
        manifest_hash=manifest_hash(artifact_dir), batches=results, controller_decision=decision,
        power=PowerInfo(meter=meter.name, interval_s=getattr(meter, "interval_s", None), idle_w=idle_w,
                        warnings=[w for w in warnings if "cv" not in w]),
        warnings=warnings, command=command,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
