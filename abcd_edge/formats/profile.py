"""The device profile format: what one denoiser step, one controller decision and finishing
an image cost on a device, as schema-versioned JSON, validated on load. Measuring it is
profiling/measure.py.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.io import write_json_atomic
from abcd_edge.formats.schema import from_dict

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
class ComponentProfile:
    """One pipeline component's call on this device (a text encoding, a UNet call, a decode)."""

    latency: LatencyStats
    flops: float | None = None        # per call (the manifest's per-sample FLOPs x the call's samples)
    energy_mj: float | None = None    # per call, where a power meter reads
    power_w: float | None = None


@dataclass
class PipelineProfile:
    """A latent pipeline artifact's components (docs/sd-pipeline-spec.md). ``components`` holds
    ``text_encoder`` (one text: tokenize + encode), ``unet_b1`` (one branch), ``unet_b2`` (both guidance
    branches in one batch-2 call) and ``unet_split`` (two batch-1 calls) -- the last two without an LCM's
    guidance embedding only -- ``vae_decoder`` and ``vae_decoder_tiny`` (when the artifact has it).
    ``finish`` is per decoder: the decode of the x0 latent + the uint8 conversion, what the hard rule and
    the guard reserve. The runtime steps guidance with ``guidance_mode``, the faster of batch2 and split
    ("none": an LCM UNet, one branch always). The profile's ``batches`` hold the step at
    ``default_guidance`` and the vae_decoder's finish, so pixel-artifact readers see a complete profile."""

    components: dict[str, ComponentProfile]
    finish: dict[str, LatencyStats]
    guidance_mode: str
    default_guidance: float
    lcm: bool = False


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
    pipeline: PipelineProfile | None = None   # a latent pipeline artifact's components; None for pixel artifacts

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
