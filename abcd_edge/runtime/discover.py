"""Finding what a session needs for the CLI: artifact, denoiser, profile (or a quick measurement), controller, meter.

The session itself (runtime/session.py) takes these as arguments; this module
is the one place that looks them up on disk, so callers that already hold them
(the bench, tests) pass them in instead.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from abcd_edge import paths
from abcd_edge.errors import UserError
from abcd_edge.formats import bundle


@dataclass
class SessionParts:
    artifact_dir: Path
    manifest: object
    manifest_hash: str
    denoiser: object
    profile: object
    profile_path: Path
    controller: object | None
    controller_dir: Path | None
    meter: object
    notes: list[str] = field(default_factory=list)
    pipeline: object | None = None     # a latent pipeline artifact's prompt encoder + decoders (conditioning.py)


def profiles_for(manifest_hash: str, device: str | None = None, search: list[Path] | None = None) -> list[Path]:
    """Profiles in ``search`` (default: profiles/) measured for this artifact (and device kind, if given)."""
    found = []
    for folder in search or [paths.PROFILES_DIR]:
        for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError, UnicodeDecodeError):
                continue
            if (isinstance(data, dict) and data.get("manifest_hash") == manifest_hash
                    and (device is None or data.get("device_id") == device)):
                found.append(path)
    return found


def default_profile_target(artifact_dir: str | Path, device: str) -> Path:
    """Where `abcd-edge profile` writes without --out, somewhere discovery looks: a bundle's profiles/; the
    checkout's profiles/; else (the wheel's embedded demo, an artifact outside a checkout) the user cache."""
    artifact_dir = Path(artifact_dir)
    if bundle.profiles_dir(artifact_dir).is_dir() and paths.EMBEDDED_DIR not in artifact_dir.resolve().parents:
        return bundle.profiles_dir(artifact_dir) / f"{device}.json"
    if paths.PROFILES_DIR.is_dir():
        return paths.PROFILES_DIR / f"{device}.json"
    return paths.user_cache_dir() / f"{device}.json"


def find_or_measure_profile(artifact_dir: Path, manifest_hash: str, device: str, backend: str,
                            threads: int | None, power: str, quick_runs: int, precision: str = "fp32") -> Path:
    """A committed or cached profile of this artifact on this device kind, else a quick one measured now."""
    matches = profiles_for(manifest_hash, device, [bundle.profiles_dir(artifact_dir), paths.PROFILES_DIR,
                                                   paths.user_cache_dir()])
    if matches:
        return matches[0]
    from abcd_edge.profiling.measure import measure_profile

    cache = paths.user_cache_dir() / f"{device}-{manifest_hash[:12]}.json"
    print(f"abcd-edge: no profile for device {device} and this artifact; measuring a quick one "
          f"({quick_runs} steps) -> {cache}", file=sys.stderr)
    measured = measure_profile(artifact_dir, backend=backend, threads=threads, runs=quick_runs, warmup=10,
                               power=power, progress=False, command="(auto quick profile by abcd-edge run)",
                               precision=precision)
    measured.save(cache)
    return cache


def load_controller(controller: str | Path | None, manifest_name: str, manifest_hash: str,
                    notes: list[str], artifact_dir: Path | None = None) -> tuple[object | None, Path | None]:
    """(controller, its folder): None for 'none'; 'auto' = the bundle's controller/ (when the artifact is a
    bundle) else calibration/<artifact name>/, when it is usable (noted when not); a folder given explicitly
    must load."""
    from abcd_edge.formats.controller import Controller

    if controller is None or controller == "none":
        return None, None
    if controller == "auto":
        folder = (artifact_dir is not None and bundle.controller_dir(artifact_dir)) or (
            paths.CALIBRATION_DIR / manifest_name)
        if not (folder / "controller.json").is_file():
            notes.append(f"no calibrated controller under {folder}; rule-based plan (uniform schedule, "
                         "most steps that fit at the profile's p99)")
            return None, None
        try:
            return Controller.load(folder, manifest_hash), folder
        except UserError as exc:
            notes.append(f"calibrated controller not used: {exc}")
            return None, None
    return Controller.load(controller, manifest_hash), Path(controller)


def discover(artifact_dir: str | Path | None, profile: str | Path | None = None,
             controller: str | Path | None = "auto", backend: str = "ort-cpu", threads: int | None = None,
             power: str = "auto", simulated: bool = False, quick_profile_runs: int = 60,
             denoiser=None, precision: str = "fp32") -> SessionParts:
    """Load the artifact, open its denoiser (unless one is given; a pipeline artifact: its UNet, with its prompt
    encoder and decoders), find its profile, controller and meter."""
    from abcd_edge.device import hardware, telemetry
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.formats.profile import load_profile

    artifact_dir = Path(artifact_dir if artifact_dir is not None else paths.DEMO_ARTIFACT_DIR)
    if not (artifact_dir / "manifest.json").is_file():
        raise UserError(f"artifact {str(artifact_dir)!r} has no manifest.json; "
                        "export one with `abcd-edge export --model demo --out export/demo`")
    manifest = load_manifest(artifact_dir)
    mhash = manifest_hash(artifact_dir)
    if denoiser is None:
        denoiser = open_denoiser(artifact_dir, backend=backend, threads=threads, precision=precision)
    pipeline = None
    if getattr(manifest, "pipeline", None) is not None:
        from abcd_edge.device.pipeline import open_pipeline

        pipeline = open_pipeline(artifact_dir, manifest, denoiser, backend=backend, threads=threads,
                                 precision=precision)
    device = hardware.device_id(backend, threads, precision=precision)
    profile_path = Path(profile) if profile is not None else find_or_measure_profile(
        artifact_dir, mhash, device, backend, threads, power, quick_profile_runs, precision)
    prof = load_profile(profile_path, mhash)
    if prof.device_id != device and not simulated:
        raise UserError(f"profile {str(profile_path)!r} was measured on device {prof.device_id!r}, "
                        f"this is {device!r}; a foreign profile is never used to keep deadlines on the wall clock "
                        "(profile this machine, or replay it on a simulated clock with `abcd-edge bench`)")
    notes: list[str] = []
    ctl, ctl_dir = load_controller(controller, manifest.name, mhash, notes, artifact_dir)
    if pipeline is not None:    # a pipeline's rule-based plan steps its scheduler's own timesteps (session.plan)
        notes = [n.replace("uniform schedule", "the diffusers scheduler's own timesteps") for n in notes]
    meter = telemetry.open_meter(power if power != "auto" else prof.power.meter
                                 if prof.power.meter != "none" else "auto")
    return SessionParts(artifact_dir=artifact_dir, manifest=manifest, manifest_hash=mhash, denoiser=denoiser,
                        profile=prof, profile_path=profile_path, controller=ctl, controller_dir=ctl_dir, meter=meter,
                        notes=notes, pipeline=pipeline)
