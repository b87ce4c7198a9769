"""Where the embedded defaults live: the repository's export/, profiles/, calibration/ folders."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPORT_DIR = REPO_ROOT / "export"
PROFILES_DIR = REPO_ROOT / "profiles"
CALIBRATION_DIR = REPO_ROOT / "calibration"

DEMO_MODEL_DIR = EXPORT_DIR / "demo-model"      # diffusers folder: unet/ + scheduler/ (torch side)
DEMO_ARTIFACT_DIR = EXPORT_DIR / "demo"         # denoiser.onnx + manifest.json (torch-free side)
FEATURENET_DIR = EXPORT_DIR / "featurenet"      # featurenet.onnx + weights (quality metrics)


def user_cache_dir() -> Path:
    """Cache for quick auto-measured profiles (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "abcd-edge"
