"""Measuring a device profile: the denoiser's step latency distribution per batch, the samplers'
own arithmetic, finishing, PNG encoding, one controller decision, and power where a meter reads.

A latent pipeline artifact (docs/sd-pipeline-spec.md) is measured per component: the text encoding of
one prompt, the UNet at batch 1 (one branch) and, for classifier-free guidance, at batch 2 and as two
batch-1 calls (the faster is the profile's guidance mode), each decoder, and finishing (decode + uint8)
per decoder; FLOPs per call from the manifest, energy per call where a meter reads.
"""
from __future__ import annotations

import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from abcd_edge.errors import UserError
from abcd_edge.formats.profile import (CV_WARNING, SCHEMA_VERSION, BatchProfile, ComponentProfile, DeviceProfile,
                                       LatencyStats, PipelineProfile, PowerInfo)


def check_profile_target(target: str | Path, artifact_dir: str | Path, device: str, batches: tuple[int, ...],
                         label: str = "--out") -> None:
    """Refuse (one-line UserError) to replace a profile at ``target`` that this measurement would not
    supersede: one holding a batch not measured now, or of another artifact or device. Anything else
    there (no file, not a profile) is no measurement to lose. ``--force`` in the CLI skips this."""
    import json

    from abcd_edge.formats.manifest import manifest_hash

    try:
        data = json.loads(Path(target).read_text())
        held = sorted({int(b["batch"]) for b in data["batches"]})
        their_hash, their_device = data["manifest_hash"], data["device_id"]
    except (OSError, ValueError, UnicodeDecodeError, KeyError, TypeError):
        return
    why = []
    if not set(held) <= set(batches):
        why.append(f"batch {','.join(map(str, held))} (this run measures batch {','.join(map(str, batches))})")
    if their_hash != manifest_hash(artifact_dir):
        why.append(f"another artifact ({data.get('artifact')!r})")
    if their_device != device:
        why.append(f"another device ({their_device!r}; this is {device!r})")
    if why:
        raise UserError(f"{label} {str(target)!r} holds a profile of {' and of '.join(why)} that this run would "
                        "replace; pass --force to replace it, or give another --out path")


def _time_calls(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_profile(artifact_dir: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                    batches: tuple[int, ...] = (1,), runs: int = 300, warmup: int = 20, power: str = "auto",
                    command: str = "", progress: bool = True, precision: str = "fp32") -> DeviceProfile:
    """Measure a device profile for ``artifact_dir`` on ``backend`` (the real device, wall clock); at
    ``precision`` "fp16" of its denoiser.fp16.onnx, under a device id of its own (``...-fp16``)."""
    from tqdm import tqdm

    from abcd_edge.device import hardware, telemetry
    from abcd_edge.device.backends import open_denoiser
    from abcd_edge.formats.controller import Controller, cost_features
    from abcd_edge.core.images import png_bytes, to_uint8
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.core.noise import NoiseSchedule

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
    if manifest.pipeline is not None and tuple(batches) != (1,):
        raise UserError(f"--batch {','.join(map(str, batches))}: a pipeline artifact is profiled at batch 1 (one "
                        "image per request; its UNet is measured at batch 1 and 2 for guidance)")
    denoiser = open_denoiser(artifact_dir, backend=backend, threads=threads, precision=precision)
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
    pipeline_profile = None
    if manifest.pipeline is not None:
        bp, pipeline_profile = _measure_pipeline(artifact_dir, manifest, denoiser, meter, schedule, rng, runs, warmup,
                                                 backend, threads, warnings, precision)
        results.append(bp)
        bar.update(4)
        batches = ()
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
        sampler_ms = _sampler_stats(manifest, schedule, x, eps, rng, runs)
        bar.update(1)
        finish = LatencyStats.from_samples(_time_calls(lambda: to_uint8(eps), max(runs, 50), 5))
        img = to_uint8(eps)
        png = LatencyStats.from_samples(_time_calls(lambda: [png_bytes(im) for im in img], 50, 2))
        bar.update(2)
        results.append(BatchProfile(batch=b, step=step, flops_per_step=float(manifest.flops_per_step),
                                    flops_per_s=float(manifest.flops_per_step) * b / (step.p50_ms / 1e3),
                                    sampler_ms=sampler_ms, finish=finish, png=png,
                                    step_power_w=power_w, energy_per_step_mj=energy_per_step))

    # The controller's planning work (a cost prediction and a density), done once per request before
    # its clock starts; reported, not charged to steps. Its cost does not depend on the weights, so an
    # untrained controller of the shipped architecture is timed here.
    controller = Controller.random_init(seed=0)

    def decide():
        controller.predict_cost_ms(cost_features(5.0, 6.0, 0.1, 0.2, 1, backend, 1.0))
        controller.density([5.0, 20.0, 0.5], [0.0] * 6, 8)
    decision = LatencyStats.from_samples(_time_calls(decide, max(runs, 200), 20))
    bar.update(1)
    bar.close()
    meter.close()
    return DeviceProfile(
        schema_version=SCHEMA_VERSION,
        device_id=hardware.device_id(backend, threads, info, precision=precision),
        backend=backend, threads=threads, provider_options=getattr(denoiser, "provider_options", {}),
        host=socket.gethostname(), machine=info, artifact=manifest.name,
        manifest_hash=manifest_hash(artifact_dir), batches=results, controller_decision=decision,
        power=PowerInfo(meter=meter.name, interval_s=getattr(meter, "interval_s", None), idle_w=idle_w,
                        warnings=[w for w in warnings if "cv" not in w]),
        warnings=warnings, command=command,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), pipeline=pipeline_profile,
    )


def _sampler_stats(manifest, schedule, x: np.ndarray, eps: np.ndarray, rng: np.random.Generator,
                   runs: int) -> dict[str, LatencyStats]:
    """Each sampler's own arithmetic per step (model_input + step) on samples shaped like ``x``."""
    from abcd_edge.core.placement import time_uniform_sigmas
    from abcd_edge.core.samplers import SAMPLER_NAMES, make_sampler

    sigmas = time_uniform_sigmas(schedule, min(20, schedule.num_train_timesteps))
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
    return sampler_ms


COMPONENT_MAX_RUNS = 100    # text encodings and decodes timed per component (a real VAE decode takes seconds)


def _measure_pipeline(artifact_dir: Path, manifest, unet, meter, schedule, rng: np.random.Generator, runs: int,
                      warmup: int, backend: str, threads: int | None,
                      warnings: list[str], precision: str = "fp32") -> tuple[BatchProfile, PipelineProfile]:
    """A pipeline artifact's components (see the module docstring): the batch-1 profile the planner reads
    (step at the default guidance, finishing = the VAE decode) and the per-component record."""
    from abcd_edge.core.images import png_bytes, to_uint8
    from abcd_edge.device.pipeline import open_pipeline

    pl = open_pipeline(artifact_dir, manifest, unet, backend=backend, threads=threads, precision=precision)
    warnings.extend(manifest.check_pipeline_precision(precision, str(artifact_dir)))
    spec = manifest.pipeline["components"]
    shape = (1, manifest.channels, manifest.resolution, manifest.resolution)
    x = rng.standard_normal(shape).astype(np.float32)
    ts = [np.full(1, t, np.float32) for t in np.linspace(schedule.num_train_timesteps - 1, 1, 17)]
    comp_runs, comp_warmup = max(1, min(runs, COMPONENT_MAX_RUNS)), max(1, min(warmup, 10))

    def measure(fn, n, w, flops) -> ComponentProfile:
        meter.start()
        samples = _time_calls(fn, n, w)
        reading = meter.stop()
        for note in reading.warnings:
            if note not in warnings:
                warnings.append(note)
        energy = reading.energy_mj / (n + w) if reading.energy_mj is not None and reading.duration_s > 0 else None
        return ComponentProfile(latency=LatencyStats.from_samples(samples), flops=flops, energy_mj=energy,
                                power_w=reading.avg_w if energy is not None else None)

    components: dict[str, ComponentProfile] = {}
    cond = uncond = None
    if pl.text:
        prompt = "a photograph of an astronaut riding a horse on the moon"
        model = pl.encoder.model
        components["text_encoder"] = measure(
            lambda: model.run({model.input_names[0]: pl.encoder.tokenize(prompt).ids}), comp_runs, comp_warmup,
            float(spec["text_encoder"]["flops"]))
        cond, uncond = pl.encoder.embed(prompt)[0], pl.encoder.embed("")[0]
    unet_flops = float(spec["unet"]["flops"])
    modes = [("unet_b1", "single", 1)]
    if pl.text and not pl.lcm:
        modes += [("unet_b2", "batch2", 2), ("unet_split", "split", 2)]
    for name, mode, branches in modes:
        den = pl.denoiser(cond, uncond, pl.default_guidance if branches == 2 else 1.0, mode)
        k = iter(range(10**9))
        components[name] = measure(lambda: den(x, ts[next(k) % len(ts)]), runs, warmup, unet_flops * branches)
    guidance_mode = "none"
    if "unet_b2" in components:
        b2, split = components["unet_b2"].latency.p50_ms, components["unet_split"].latency.p50_ms
        guidance_mode = "batch2" if b2 <= split else "split"
    finish: dict[str, LatencyStats] = {}
    image = None
    for name, model in pl.decoders.items():
        components[name] = measure(lambda: model.run({model.input_names[0]: x}), comp_runs, comp_warmup,
                                   float(spec[name]["flops"]))
        finish[name] = LatencyStats.from_samples(_time_calls(
            lambda: to_uint8(model.run({model.input_names[0]: x})), comp_runs, 2))
        if image is None:
            image = to_uint8(model.run({model.input_names[0]: x}))
    for name, c in components.items():
        if c.latency.cv > CV_WARNING:
            warnings.append(f"{name}: latency cv {c.latency.cv:.2f} > {CV_WARNING:.2f}; pin clocks "
                            "(jetson_clocks / performance governor) or use fewer threads for stable deadlines")
    branches = pl.branches(pl.default_guidance) if pl.text else 1
    step = components["unet_b1" if branches == 1 else {"batch2": "unet_b2", "split": "unet_split"}[guidance_mode]]
    eps = rng.standard_normal(shape).astype(np.float32)
    bp = BatchProfile(batch=1, step=step.latency, flops_per_step=unet_flops * branches,
                      flops_per_s=unet_flops * branches / (step.latency.p50_ms / 1e3),
                      sampler_ms=_sampler_stats(manifest, schedule, x, eps, rng, runs),
                      finish=finish["vae_decoder"],
                      png=LatencyStats.from_samples(_time_calls(lambda: png_bytes(image[0]), 50, 2)),
                      step_power_w=step.power_w, energy_per_step_mj=step.energy_mj)
    return bp, PipelineProfile(components=components, finish=finish, guidance_mode=guidance_mode,
                               default_guidance=pl.default_guidance, lcm=pl.lcm)
