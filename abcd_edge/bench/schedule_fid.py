"""`abcd-edge bench-schedules`: feature-FID of ABCD's placement vs the static ones at equal step counts.

Where the steps go, with how many fixed: what the controller plans for n steps ("abcd": the
generator where its gate kept it, else the static placement it carries), the generator's own
placement ("generator") and the time-uniform, Karras and log-SNR placements, every schedule
from the same noises — a seed neither the search nor the gate used — judged by the evaluation
network (the demo's table: ``calibration/demo/schedule_fid.json``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from abcd_edge import paths
from abcd_edge.bench.grid import REF_N, REF_SEED

NOISE_SEED = 2_718_281
CHUNK = 128                # images per denoiser call
DEFAULT_OUT = paths.CALIBRATION_DIR / "demo" / "schedule_fid.json"


def schedule_fid_table(artifact: str | Path = paths.DEMO_ARTIFACT_DIR, calibration: str | Path | None = None,
                       samplers: Sequence[str] = ("ddim", "dpmpp-2m"), steps: Sequence[int] = (5, 10),
                       samples: int = 1024, threads: int = 2, budget_ms: float = 1000.0,
                       profile: str | Path | None = None, log: Callable[[str], None] | None = print) -> dict:
    """Feature-FID (and KID) of ABCD's placement and the generator's vs time-uniform, Karras and log-SNR
    at equal steps, with a 95 % bootstrap CI for each. The generator's density is the controller's for
    the context (budget_ms, the profile's F, rho = 1); n is fixed here, so only the placement differs."""
    from abcd_edge.core.budget import context_vector
    from abcd_edge.core.images import to_uint8
    from abcd_edge.core.loop import sample
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import static_placement
    from abcd_edge.runtime.plan import choose_placement
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS, make_sampler
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.controller import Controller
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.formats.profile import load_profile
    from abcd_edge.quality import FeatureNet, ReferenceStats, feature_kid

    artifact = Path(artifact)
    manifest = load_manifest(artifact)
    mh = manifest_hash(artifact)
    ctl = Controller.load(calibration or paths.CALIBRATION_DIR / manifest.name, mh)
    prof = load_profile(profile or paths.PROFILES_DIR / "cpu-2t.json", mh)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    den = open_denoiser(artifact, threads=threads)
    net = FeatureNet(paths.EVALNET_DIR, threads=threads)
    ref = ReferenceStats.load_or_compute(REF_SEED, REF_N, net, cache_dir=paths.EVALNET_DIR,
                                         resolution=manifest.resolution)
    noise = np.random.default_rng(NOISE_SEED).standard_normal(
        (samples, manifest.channels, manifest.resolution, manifest.resolution)).astype(np.float32)
    ctx = context_vector(budget_ms, prof.for_batch(1).flops_per_s, 1.0)
    table: dict = {}
    for sampler in samplers:
        for n in steps:
            candidates = {"abcd": choose_placement("auto", schedule, ctl, ctx, sampler, n).plan(n)[0],
                          "generator": ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n, schedule.sigma_max),
                          **{k: static_placement(k, schedule).plan(n)[0] for k in ("uniform", "karras", "logsnr")}}
            row: dict = {}
            rng = np.random.default_rng(n)
            boot = rng.integers(0, samples, (200, samples))
            done: dict[bytes, dict] = {}          # abcd is often the generator's placement: run it once
            for name, sig in candidates.items():
                key = np.asarray(sig, np.float64).tobytes()
                if key in done:
                    row[name] = done[key]
                    continue
                images = np.concatenate([to_uint8(sample(den, make_sampler(sampler, schedule, sig),
                                                         noise[k:k + CHUNK])[0])
                                         for k in range(0, samples, CHUNK)])
                feats = net.features(images)
                fids = [ref.fid_to_reference(feats[idx]) for idx in boot]
                row[name] = {"fid": round(ref.fid_to_reference(feats), 3),
                             "ci95": [round(float(np.quantile(fids, q)), 3) for q in (0.025, 0.975)],
                             "kid": round(feature_kid(feats, ref.features).mean, 6)}
                done[key] = row[name]
            best = min(("uniform", "karras", "logsnr"), key=lambda k: row[k]["fid"])
            row["best_static"] = best
            row["abcd_vs_best_static"] = round(row["abcd"]["fid"] / row[best]["fid"], 4)
            table[f"{sampler}/n={n}"] = row
            if log:
                log(f"{sampler} n={n}: {row}")
    return {"samples": samples, "noise_seed": NOISE_SEED, "feature_net": f"export/evalnet sha256 {net.sha256[:12]}",
            "reference": f"generator seed {REF_SEED}, {REF_N} images",
            "context": {"budget_ms": budget_ms, "rho": 1.0}, "feature_fid": table}
