"""What every calibration stage reads: the run's configuration and a small state object.

:class:`CalibrationState` holds the artifact (manifest, noise schedule), its device
profiles, the controller spec and the torch module being trained, the ORT denoiser
(every rollout), the two feature networks (the calibration net the search optimises
and the evaluation net that judges) with their reference statistics, the run's one
random generator, the checkpoint folder and the training curves. Each stage
(``search``, ``weights``, ``gate``, ``cost``, optionally ``teacher`` + ``ays``, ``persist``)
is a module of functions over it; ``run.calibrate`` calls them in order.

The order of the random draws is part of the result: ``run`` calls the stages in a
fixed order and each takes what it needs from ``state.rng`` in turn.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abcd_edge import paths
from abcd_edge.core.budget import context_vector
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.errors import UserError
from abcd_edge.formats.controller import Controller, ControllerSpec
from abcd_edge.formats.manifest import Manifest, sha256_file
from abcd_edge.formats.profile import BatchProfile
from abcd_edge.runtime.cost import CostModel

BUDGET_RANGE_MS = (20.0, 2000.0)   # training contexts: budgets log-uniform in this range


SEARCH_STEPS = (2, 3, 4, 5, 6, 8, 10, 13, 16, 20)   # the first sampler's
OTHER_STEPS = (2, 3, 5, 8)                          # every other sampler's (the search costs n^2 rollout steps)
CAPPED_STEPS = (1, 2, 3, 4, 6, 8)                   # the first sampler's over a consistency model (plans stop at 8)
DEFAULT_SAMPLERS = ("ddim", "dpmpp-2m", "euler")


def default_samplers(manifest: Manifest) -> tuple[str, ...]:
    """``--samplers default``: the consistency sampler for a consistency model, a pipeline's own scheduler's
    sampler (what its runtime steps by default), else DDIM, DPM++(2M), Euler."""
    from abcd_edge.core.samplers import natural_sampler

    if manifest.prediction_type == "consistency" or manifest.pipeline is not None:
        return (natural_sampler(manifest.prediction_type, manifest.scheduler_config),)
    return DEFAULT_SAMPLERS


@dataclass
class CalibrationConfig:
    samplers: tuple[str, ...] = ("ddim", "dpmpp-2m", "euler")
    search_noises: int = 96        # training noises the search scores schedules on
    search_steps: tuple[int, ...] = SEARCH_STEPS   # the first sampler's step counts searched, fitted and gated
    other_steps: tuple[int, ...] = OTHER_STEPS     # ... and every other sampler's
    gate_noises: int = 256         # held-out noises the gate judges on (fixed seed)
    wg_iters: int = 1500
    wg_lr: float = 3e-3
    cost_iters: int = 3000
    ays: bool = False              # also (re)train the AYS-like baseline (a bench method; slow)
    train_noises: int = 64         # the AYS-like baseline's teacher noises
    wg_batch: int = 8              # ... and its batch
    ays_steps: tuple[int, ...] = (3, 5, 8, 12, 20)
    ays_iters: int = 15
    l1_kl: float = 0.05
    threads: int = 2
    seed: int = 0
    calibration_net: str | None = None   # what the search optimises (feature net folder; None: the shipped one for
    evaluation_net: str | None = None    # the artifact's image size) / what judges: never optimised against
    prompts: str | None = None     # a text-to-image pipeline's prompt file (every other line held out)
    guidance: float | None = None  # ... and its guidance scale (default: the artifact's)

    def steps_for(self, sampler: str) -> tuple[int, ...]:
        """The step counts searched, fitted and gated for ``sampler``."""
        return tuple(self.search_steps) if sampler == self.samplers[0] else tuple(self.other_steps)


def _checkpoint_folder(out: Path, identity: dict) -> Path:
    """``.<out>.ckpt`` beside ``out``, resumed only when it was made by the same configuration, artifact
    and profiles (``identity``); a checkpoint of other settings is discarded, with a note."""
    ckpt = out.parent / f".{out.name}.ckpt"
    stamp = ckpt / "identity.json"
    text = json.dumps(identity, sort_keys=True, default=str)
    if ckpt.is_dir() and (not stamp.is_file() or stamp.read_text() != text):
        print(f"abcd-edge calibrate: {ckpt} was made with other settings; starting over", file=sys.stderr)
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True, exist_ok=True)
    stamp.write_text(text)
    return ckpt


@dataclass
class CalibrationProfile:
    """One device profile as calibration uses it: its batch-1 measurements and decision tail."""

    name: str
    backend: str
    batch: BatchProfile
    encode_ms: float = 0.0    # a text-to-image pipeline's prompt encoding at its tail (inside every request)

    @classmethod
    def load(cls, path: Path, manifest_hash: str) -> "CalibrationProfile":
        from abcd_edge.formats.profile import load_profile

        prof = load_profile(path, manifest_hash)
        # a pipeline profile's batch 1 is the step at the default guidance and the VAE decode as finishing
        encode = prof.pipeline.components.get("text_encoder") if prof.pipeline is not None else None
        return cls(name=Path(path).stem, backend=prof.backend, batch=prof.for_batch(1),
                   encode_ms=encode.latency.p99_ms if encode is not None else 0.0)

    @property
    def flops_per_s(self) -> float:
        return self.batch.flops_per_s

    @property
    def step_samples_ms(self) -> np.ndarray:
        return np.asarray(self.batch.step.samples_ms)

    @property
    def finish_samples_ms(self) -> np.ndarray:
        return np.asarray(self.batch.finish.samples_ms)

    def cost_model(self, sampler: str) -> CostModel:
        """The runtime's cost model for this profile and sampler (correction 1, no observed tail; the
        controller decides nothing per step, so no decision time is charged)."""
        return CostModel.from_profile(self.batch, sampler)

    def budget_for(self, sampler: str, n: int) -> float:
        """The budget a request needs for n steps here: the steps and finishing (a pipeline: the decode) at
        the cost model's level, plus the prompt encoding."""
        return self.cost_model(sampler).budget_for(n) + self.encode_ms

    def steps_that_fit(self, budget_ms: float, sampler: str, cap: int | None = None) -> int:
        """How many steps a static plan fits in ``budget_ms``: the cost model's answer at the tail."""
        return self.cost_model(sampler).steps_that_fit(budget_ms, level="tail", cap=cap)

    def cost_features(self, correction: float = 1.0) -> np.ndarray:
        """The cost predictor's input for this profile (batch 1) at a correction."""
        from abcd_edge.formats.controller import cost_features

        b = self.batch
        return cost_features(b.step.p50_ms, b.step.p99_ms, b.finish.p50_ms, b.finish.p99_ms, 1, self.backend,
                             correction)


@dataclass
class TeacherData:
    """Fixed training noises and, per sampler, its many-step result from each (the AYS-like baseline's)."""

    noise_train: np.ndarray
    train: dict[str, np.ndarray]


def load_torch_unet(manifest: Manifest):
    """The frozen denoiser in torch, from the manifest's source folder (calibration needs gradients)."""
    from diffusers import UNet2DModel

    src = Path(paths.DEMO_MODEL_DIR if manifest.source == "demo" else manifest.source)
    folder = src / "unet" if (src / "unet").is_dir() else src
    if not (folder / "config.json").is_file():
        raise UserError(f"the artifact's source model {str(src)!r} is not on this machine; calibration needs "
                        "the diffusers weights the artifact was exported from")
    return UNet2DModel.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)


def check_inputs(config: CalibrationConfig, profiles: list[Path]) -> None:
    """Refuse an empty or unknown sampler list and a missing profile, before anything is loaded."""
    from abcd_edge.core.samplers import SAMPLER_NAMES

    if not config.samplers:
        raise UserError("--samplers is empty; give at least one of " + ", ".join(SAMPLER_NAMES))
    for s in config.samplers:
        if s not in SAMPLER_NAMES:
            raise UserError(f"sampler {s!r} is unknown; accepted: {', '.join(SAMPLER_NAMES)}")
    if not profiles:
        raise UserError("calibration needs at least one --profile (measured with `abcd-edge profile`)")


def check_prompts(artifact: Path, manifest: Manifest, prompts, guidance: float | None) -> None:
    """Prompts (and guidance) for a text-to-image pipeline, and only there, before anything is opened."""
    comps = (manifest.pipeline or {}).get("components", {})
    given = [f for f, v in (("--prompts", prompts), ("--guidance", guidance)) if v is not None]
    if manifest.pipeline is None and given:
        raise UserError(f"{', '.join(given)}: artifact {str(artifact)!r} is a pixel-space {manifest.model_kind} "
                        "model, which takes no prompts or guidance (only text-to-image pipeline artifacts do)")
    if manifest.pipeline is not None and "text_encoder" not in comps and given:
        raise UserError(f"{', '.join(given)}: artifact {str(artifact)!r} is an unconditional latent pipeline "
                        "(no text encoder), which takes no prompts or guidance")
    if "text_encoder" in comps and prompts is None:
        raise UserError(f"artifact {str(artifact)!r} is a text-to-image pipeline: calibration needs --prompts FILE "
                        "(one prompt per line; every other line is held out for the gate)")


def check_steps(config: CalibrationConfig, prediction_type: str) -> None:
    """Refuse step counts below 1, or above what the runtime plans for a sampler over this model
    (``core.samplers.max_steps``: 8 over a consistency model, whatever the sampler)."""
    from abcd_edge.core.samplers import max_steps

    for s in config.samplers:
        steps = config.steps_for(s)
        cap = max_steps(s, prediction_type)
        if not steps or min(steps) < 1 or (cap is not None and max(steps) > cap):
            model = "a consistency model" if prediction_type == "consistency" else f"a {prediction_type} model"
            raise UserError(f"step counts {','.join(map(str, steps))} for sampler {s!r} over {model}: accepted: "
                            f"1 to {cap or 'any'} steps" + (f" (its plans stop at {cap}), e.g. "
                            f"{','.join(map(str, CAPPED_STEPS))}" if cap else ""))


@dataclass
class CalibrationState:
    """One calibration run's inputs and everything its stages share (see the module docstring)."""

    artifact: Path
    out: Path
    cfg: CalibrationConfig
    progress: bool
    manifest: Manifest
    manifest_hash: str
    profiles: list[CalibrationProfile]
    profile_paths: list[str]
    schedule: NoiseSchedule
    spec: ControllerSpec
    rollouts: Any                  # runtime.rollout.Rollouts: noise -> x0 -> images as the runtime makes them
    prompts: Any                   # runtime.rollout.PromptSets of a text-to-image pipeline, else None
    unet: Any                      # the frozen torch UNet (the AYS-like baseline only; else None)
    calibration_net: Any           # quality.FeatureNet the search optimises in ...
    calibration_reference: Any     # ... against these reference statistics
    evaluation_net: Any            # the network that judges (gate), never optimised against ...
    evaluation_reference: Any      # ... with its own reference images
    ckpt: Path                     # checkpoint folder (removed once the controller is written)
    rng: np.random.Generator
    model: Any                     # the torch controller being trained
    curves: dict[str, list[float]] = field(default_factory=dict)
    data: TeacherData | None = None

    @classmethod
    def open(cls, artifact: Path, profiles: list[Path], out: Path, config: CalibrationConfig,
             progress: bool = True, unet=None) -> "CalibrationState":
        """Check the inputs, load the artifact, its profiles, the denoiser(s) and both feature networks;
        seed torch and numpy."""
        import torch

        from abcd_edge.runtime.rollout import PromptSets, Rollouts
        from abcd_edge.calibrate.torch_model import torch_controller
        from abcd_edge.formats.manifest import load_manifest, manifest_hash
        from abcd_edge.quality import FeatureNet, ReferenceStats

        check_inputs(config, profiles)
        artifact, out = Path(artifact), Path(out)
        manifest = load_manifest(artifact)
        check_steps(config, manifest.prediction_type)
        if config.ays and manifest.pipeline is not None:
            raise UserError("--ays: the AYS-like baseline trains through the torch pixel-space UNet; a latent "
                            "pipeline artifact is calibrated without it")
        prompts = PromptSets.from_file(config.prompts) if config.prompts is not None else None
        check_prompts(artifact, manifest, prompts, config.guidance)
        mh = manifest_hash(artifact)
        loaded = [CalibrationProfile.load(Path(p), mh) for p in profiles]
        schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        spec = ControllerSpec(log_sigma_min=math.log(schedule.sigma_min), log_sigma_max=math.log(schedule.sigma_max))
        # the order below fixes torch's random stream (the controller's initial weights come last)
        torch.manual_seed(config.seed)
        torch.set_num_threads(config.threads)
        rollouts = Rollouts.open(artifact, manifest, schedule, config.threads, config.guidance)
        side = rollouts.image_resolution
        config = dataclasses.replace(   # the nets by the image size, recorded as the folders used
            config, calibration_net=str(config.calibration_net or paths.feature_net_dir("calibration", side)),
            evaluation_net=str(config.evaluation_net or paths.feature_net_dir("evaluation", side)))
        if config.ays and unet is None:
            unet = load_torch_unet(manifest)
        cal_net = FeatureNet(config.calibration_net, threads=config.threads)
        eval_net = FeatureNet(config.evaluation_net, threads=config.threads)
        ckpt = _checkpoint_folder(out, dict(asdict(config), manifest_hash=mh, profiles=[
            sha256_file(p) for p in profiles], prompts=sha256_file(config.prompts) if prompts else None))
        rng = np.random.default_rng(config.seed)
        return cls(artifact=artifact, out=out, cfg=config, progress=progress, manifest=manifest, manifest_hash=mh,
                   profiles=loaded, profile_paths=[str(p) for p in profiles], schedule=schedule, spec=spec,
                   rollouts=rollouts, prompts=prompts, unet=unet,
                   calibration_net=cal_net,
                   calibration_reference=ReferenceStats.load_or_compute(
                       paths.CALIBRATION_REF_SEED, paths.REF_N, cal_net, cache_dir=config.calibration_net,
                       resolution=rollouts.image_resolution),
                   evaluation_net=eval_net,
                   evaluation_reference=ReferenceStats.load_or_compute(
                       paths.EVAL_REF_SEED, paths.REF_N, eval_net, cache_dir=config.evaluation_net,
                       resolution=rollouts.image_resolution),
                   ckpt=ckpt, rng=rng, model=torch_controller(spec))

    # ------------------------------------------------------------------------------- helpers
    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.manifest.channels, self.manifest.resolution, self.manifest.resolution)

    @property
    def teachers(self) -> TeacherData:
        if self.data is None:
            raise RuntimeError("the teacher stage has not run yet")
        return self.data

    @staticmethod
    def optimiser_step(opt, loss, losses: list[float] | None, bar, clip: tuple[Any, float] | None = None) -> None:
        """One optimiser step on ``loss`` (gradients of ``clip[0]`` clipped to norm ``clip[1]`` first), its value
        recorded in ``losses`` and the progress bar advanced."""
        import torch

        opt.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(*clip)
        opt.step()
        if losses is not None:
            losses.append(loss.item())
        bar.update(1)

    def bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress)

    def ckpt_file(self, name: str) -> Path:
        return self.ckpt / name

    def context(self, budget_ms: float, profile: CalibrationProfile, rho: float) -> list[float]:
        """c = [log B, log F, rho]."""
        return context_vector(budget_ms, profile.flops_per_s, rho)

    def denoiser(self, split: str, n: int):
        """The step function over ``n`` noise rows of ``split`` ("train": the search's; "heldout": the
        gate's), a text-to-image pipeline's rows guided by that split's prompts."""
        return self.rollouts.denoiser(self.prompts.rows(split, n) if self.prompts is not None else None)

    def x0(self, sampler_name: str, sigmas, noises: np.ndarray, split: str) -> np.ndarray:
        """The x0 after every step of a fixed schedule (the one loop) from the ``split`` noises."""
        return self.rollouts.x0(sampler_name, sigmas, noises, self.denoiser(split, len(noises)))

    @property
    def conditions(self) -> dict:
        """What the controller's placements were calibrated under (``ControllerMeta.conditions``)."""
        return self.rollouts.conditions(self.prompts.source if self.prompts is not None else None)

    @property
    def static_kinds(self) -> tuple[str, ...]:
        """The static placements the generator competes with: the fixed rules, and for a pipeline the
        timesteps of its own diffusers scheduler (what the runtime steps without a controller)."""
        from abcd_edge.core.placement import DIFFUSERS_PLACEMENT, STATIC_PLACEMENTS

        return STATIC_PLACEMENTS + ((DIFFUSERS_PLACEMENT,) if self.manifest.pipeline is not None else ())

    def static_sigmas(self, kind: str, sampler: str, n: int) -> np.ndarray:
        """The sigmas of static placement ``kind`` for n steps of ``sampler``."""
        from abcd_edge.core.placement import DIFFUSERS_PLACEMENT, TimestepPlacement, static_placement

        if kind == DIFFUSERS_PLACEMENT:
            return TimestepPlacement(self.schedule, self.manifest.scheduler_config, sampler).plan(n)[0]
        return static_placement(kind, self.schedule).plan(n)[0]

    def anchor(self) -> np.ndarray:
        """The KL anchor of the weight generator: the density of 100 time-uniform steps (every train timestep
        of a model with fewer)."""
        from abcd_edge.core.placement import density_of_sigmas, time_uniform_sigmas

        n = min(100, self.schedule.num_train_timesteps)
        return density_of_sigmas(time_uniform_sigmas(self.schedule, n), self.spec.k_bins,
                                 self.spec.log_sigma_min, self.spec.log_sigma_max)

    def numpy_controller(self) -> Controller:
        return Controller(self.spec, self.model.numpy_weights())
