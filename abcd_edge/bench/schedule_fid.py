"""`abcd-edge bench-schedules`: feature-FID of the learned schedule vs the static ones at equal step counts.

Where the steps go, with how many fixed: the controller's density for one context against
time-uniform, Karras and log-SNR placements, every schedule from the same noises (the demo's
table: ``calibration/demo/schedule_fid.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from abcd_edge import paths
from abcd_edge.bench.grid import REF_N, REF_SEED

NOISE_SEED = 7
CHUNK = 128                # images per denoiser call
DEFAULT_OUT = paths.CALIBRATION_DIR / "demo" / "schedule_fid.json"


def schedule_fid_table(artifact: str | Path = paths.DEMO_ARTIFACT_DIR, calibration: str | Path | None = None,
                       samplers: Sequence[str] = ("ddim", "dpmpp-2m"), steps: Sequence[int] = (5, 10),
                       samples: int = 1024, threads: int = 2, budget_ms: float = 1000.0,
                       profile: str | Path | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Feature-FID of the learned schedule vs time-uniform, Karras and log-SNR at equal steps.

    The learned density is the controller's for the context (budget_ms, the profile's F, rho = 1);
    n is fixed here, so only the placement differs. Same noises for every schedule.
    """
    from abcd_edge.core.budget import context_vector
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.loop import sample
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS, make_sampler
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.controller import Controller
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.formats.profile import load_profile
    from abcd_edge.quality import FeatureNet, ReferenceStats

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    mh = manifest_hash(artifact)
    ctl = Controller.load(calibration or paths.CALIBRATION_DIR / manifest.name, mh)
    prof = load_profile(profile or paths.PROFILES_DIR / "cpu-2t.json", mh)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    den = open_denoiser(artifact, threads=threads)
    net = FeatureNet(threads=threads)
    ref = ReferenceStats.load_or_compute(REF_SEED, REF_N, net, resolution=manifest.resolution)
    noise = np.random.default_rng(NOISE_SEED).standard_normal(
        (samples, manifest.channels, manifest.resolution, manifest.resolution)).astype(np.float32)
    ctx = context_vector(budget_ms, prof.for_batch(1).flops_per_s, 1.0)
    table: dict = {}
    for sampler in samplers:
        for n in steps:
            candidates = {"learned": ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n, schedule.sigma_max),
                          "uniform": time_uniform_sigmas(schedule, n), "karras": karras_sigmas(schedule, n),
                          "logsnr": logsnr_uniform_sigmas(schedule, n)}
            row = {}
            for name, sig in candidates.items():
                images = np.concatenate([to_uint8(sample(den, make_sampler(sampler, schedule, sig),
                                                         noise[k:k + CHUNK])[0])
                                         for k in range(0, samples, CHUNK)])
                row[name] = round(ref.fid(net.features(images)), 3)
            best = min(v for k, v in row.items() if k != "learned")
            row["learned_vs_best_baseline"] = round(row["learned"] / best - 1, 4)
            table[f"{sampler}/n={n}"] = row
            if log:
                log(f"{sampler} n={n}: {row}")
    return {"samples": samples, "reference": f"generator seed {REF_SEED}, {REF_N} images",
            "context": {"budget_ms": budget_ms, "rho": 1.0}, "feature_fid": table}
