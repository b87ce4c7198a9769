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
FEATURENET_DIR = EXPORT_DIR / "featurenet"      # featurenet.onnx + weights: what calibration optimises
EVALNET_DIR = EXPORT_DIR / "evalnet"            # another seed and architecture: what judges (bench, gate)
CALIBRATION_REF_SEED = 4321                     # generator data seed of the calibration net's reference
EVAL_REF_SEED = 8765                            # ... and of the evaluation net's (other images)
REF_N = 2048


def user_cache_dir() -> Path:
    """Cache for quick auto-measured profiles (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "abcd-edge"
