"""A deployable bundle: one folder holding what the runtime needs for one model.

A bundle *is* an artifact folder (``manifest.json`` + the ONNX files it lists) with two more
sub-folders, so every verb that takes ``--artifact`` takes a bundle, and ``--bundle`` is its other name::

    <bundle>/manifest.json, denoiser.onnx      the artifact (content-addressed: formats/manifest.py)
    <bundle>/profiles/*.json                  device profiles measured for this artifact
    <bundle>/controller/controller.json, controller.safetensors [, controller.onnx, gate.md]

Export and calibrate on a workstation, ``abcd-edge bundle`` the results, copy the folder to the
device, ``abcd-edge run --bundle <folder>``. The device still needs a profile of its own kind
(a foreign profile is never used on the wall clock: ``abcd-edge profile --bundle <folder>`` writes
one into the bundle). A TensorRT plan is device-specific and is not bundled: build it on the device.

The wheel ships the demo as a bundle (``abcd_edge/embedded/demo``, made by setup.py with
:func:`make_bundle`), so a runtime-only install runs with no checkout. Stdlib only: setup.py
imports this module at build time, before numpy exists.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable

from abcd_edge.errors import UserError
from abcd_edge.formats.manifest import MANIFEST_NAME, load_manifest, manifest_hash

PROFILES = "profiles"
CONTROLLER = "controller"
CONTROLLER_FILES = ("controller.json", "controller.safetensors")        # what Controller.load reads
CONTROLLER_EXTRAS = ("controller.onnx", "gate.md")                       # carried when present


def profiles_dir(artifact_dir: str | Path) -> Path:
    return Path(artifact_dir) / PROFILES


def controller_dir(artifact_dir: str | Path) -> Path | None:
    """The bundle's controller folder, or None when the artifact carries none."""
    folder = Path(artifact_dir) / CONTROLLER
    return folder if (folder / CONTROLLER_FILES[0]).is_file() else None


def _tied_hash(path: Path) -> str | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"{str(path)!r} is not a readable JSON file") from None
    return data.get("manifest_hash") if isinstance(data, dict) else None


def make_bundle(artifact_dir: str | Path, out: str | Path, profiles: Iterable[str | Path] = (),
                controller: str | Path | None = None) -> Path:
    """Copy an artifact, its profiles and its controller into one bundle folder at ``out`` (atomic).

    Every profile and the controller must have been made for this artifact (their
    ``manifest_hash``); the artifact's files are checked against their sha256 first.
    """
    from abcd_edge.io import atomic_dir

    artifact_dir, out = Path(artifact_dir), Path(out)
    manifest = load_manifest(artifact_dir)
    mhash = manifest_hash(artifact_dir)
    profiles = [Path(p) for p in profiles]
    for p in profiles:
        if not p.is_file():
            raise UserError(f"profile {str(p)!r} does not exist")
        if _tied_hash(p) != mhash:
            raise UserError(f"profile {str(p)!r} was measured for another artifact than {str(artifact_dir)!r}")
    if controller is not None:
        controller = Path(controller)
        missing = [f for f in CONTROLLER_FILES if not (controller / f).is_file()]
        if missing:
            raise UserError(f"controller folder {str(controller)!r} lacks {', '.join(missing)}")
        if _tied_hash(controller / CONTROLLER_FILES[0]) != mhash:
            raise UserError(f"controller {str(controller)!r} was calibrated for another artifact than "
                            f"{str(artifact_dir)!r}")
    if out.resolve() == artifact_dir.resolve():
        raise UserError(f"--out {str(out)!r} is the artifact itself; name a new folder")
    with atomic_dir(out) as tmp:
        for name in (MANIFEST_NAME, *manifest.files):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)     # a pipeline's "<component>/<file>"
            shutil.copy2(artifact_dir / name, tmp / name)
        (tmp / PROFILES).mkdir()       # even empty: `abcd-edge profile --bundle` on the device writes here
        for p in profiles:
            shutil.copy2(p, tmp / PROFILES / p.name)
        if controller is not None:
            (tmp / CONTROLLER).mkdir()
            for name in CONTROLLER_FILES + CONTROLLER_EXTRAS:
                if (controller / name).is_file():
                    shutil.copy2(controller / name, tmp / CONTROLLER / name)
    return out
