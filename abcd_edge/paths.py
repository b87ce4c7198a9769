"""Where the embedded defaults live: the repository's export/, profiles/, calibration/ folders in a checkout;
in an installed wheel, the demo bundle under abcd_edge/embedded/ (formats/bundle.py)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EXPORT_DIR = REPO_ROOT / "export"
PROFILES_DIR = REPO_ROOT / "profiles"
CALIBRATION_DIR = REPO_ROOT / "calibration"

DEMO_MODEL_DIR = EXPORT_DIR / "demo-model"      # diffusers folder: unet/ + scheduler/ (torch side)
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"   # in a wheel: the demo bundle (setup.py makes it)
DEMO_ARTIFACT_DIR = (EXPORT_DIR / "demo"        # denoiser.onnx + manifest.json (torch-free side) in a checkout,
                     if (EXPORT_DIR / "demo" / "manifest.json").is_file()
                     else EMBEDDED_DIR / "demo")  # else the bundle the wheel ships (+ profiles/, controller/)
DEMO_LATENT_ARTIFACT_DIR = EXPORT_DIR / "demo-latent-lcm"   # the prompt demo (`run --prompt` without --artifact):
                                                # the latent demo's consistency twin, exported (issue 16)
FEATURENET_DIR = EXPORT_DIR / "featurenet"      # featurenet.onnx + weights: what calibration optimises
EVALNET_DIR = EXPORT_DIR / "evalnet"            # another seed and architecture: what judges (bench, gate)
CALIBRATION_REF_SEED = 4321                     # generator data seed of the calibration net's reference
EVAL_REF_SEED = 8765                            # ... and of the evaluation net's (other images)
REF_N = 2048


def feature_net_dir(role: str, side: int) -> Path:
    """The shipped feature net of ``role`` ("calibration" | "evaluation") for images of ``side`` pixels: the one
    trained at that size where it is shipped (``export/featurenet128``, ``export/evalnet128``), else the
    32 x 32 one (images are then fitted to it by an integer factor, ``core.images.fit_images``)."""
    base = FEATURENET_DIR if role == "calibration" else EVALNET_DIR
    own = base.parent / f"{base.name}{side}"
    return own if (own / "featurenet.onnx").is_file() else base


def portable(path: str | os.PathLike) -> str:
    """A path as results meant for committing record it: relative to the repository when inside it, so a
    bench made in one clone resumes in another."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def from_portable(path: str | os.PathLike) -> Path:
    """The inverse of :func:`portable`: a relative path that exists under the repository is that file."""
    p = Path(path)
    return REPO_ROOT / p if not p.is_absolute() and (REPO_ROOT / p).exists() else p


def user_cache_dir() -> Path:
    """Cache for quick auto-measured profiles (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "abcd-edge"
