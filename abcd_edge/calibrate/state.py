"""What every calibration stage reads: the run's configuration and a small state object.

:class:`CalibrationState` holds the artifact (manifest, noise schedule), its device
profiles, the controller spec and the torch module being trained, the ORT denoiser
(fast, for fixed-schedule runs) and the torch UNet (for gradients), the run's one
random generator, the checkpoint folder, the training curves and, once the teacher
stage has run, the noises and teacher results (:class:`TeacherData`). Each stage
(``teacher``, ``weights``, ``traces``, ``policy``, ``cost``, ``ays``, ``evaluate``,
``persist``) is a module of functions over it; ``run.calibrate`` calls them in order.

The order of the random draws is part of the result: ``run`` calls the stages in a
fixed order and each takes what it needs from ``state.rng`` in turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abcd_edge import paths
from abcd_edge.core.budget import context_vector
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.errors import UserError
from abcd_edge.formats.controller import Controller, ControllerSpec
from abcd_edge.formats.manifest import Manifest
from abcd_edge.formats.profile import BatchProfile
from abcd_edge.runtime.cost import CostModel

BUDGET_RANGE_MS = (20.0, 2000.0)   # training contexts: budgets log-uniform in this range


@dataclass
class CalibrationConfig:
    samplers: tuple[str, ...] = ("ddim", "dpmpp-2m", "euler")
    train_noises: int = 64
    val_noises: int = 64
    wg_iters: int = 300
    wg_batch: int = 8
    wg_lr: float = 3e-3
    n_train_max: int = 12          # steps backpropagated through (larger budgets reuse n = 12 contexts)
    trace_contexts: int = 120
    trace_batch: int = 8
    trace_max_steps: int = 40
    policy_iters: int = 600
    cost_iters: int = 800
    ays_steps: tuple[int, ...] = (3, 5, 8, 12, 20)
    ays_iters: int = 15
    l1_kl: float = 0.05
    l2_budget: float = 4.0
    l3_quality: float = 2.0
    l4_steps: float = 0.3
    threads: int = 2
    seed: int = 0


@dataclass
class CalibrationProfile:
    """One device profile as calibration uses it: its batch-1 measurements and decision tail."""

    name: str
    backend: str
    batch: BatchProfile
    decision_p99_ms: float

    @classmethod
    def load(cls, path: Path, manifest_hash: str) -> "CalibrationProfile":
        from abcd_edge.formats.profile import load_profile

        prof = load_profile(path, manifest_hash)
        return cls(name=Path(path).stem, backend=prof.backend, batch=prof.for_batch(1),
                   decision_p99_ms=prof.controller_decision.p99_ms)

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
        """The runtime's cost model for this profile and sampler (correction 1, no observed tail)."""
        return CostModel.from_profile(self.batch, sampler, decision_tail_ms=self.decision_p99_ms)

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
    """Fixed training / validation noises and, per sampler, its many-step result from each."""

    noise_train: np.ndarray
    noise_val: np.ndarray
    train: dict[str, np.ndarray]
    val: dict[str, np.ndarray]


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
    ort: Any                       # the ONNX Runtime denoiser
    unet: Any                      # the frozen torch UNet
    ckpt: Path                     # checkpoint folder (removed once the controller is written)
    rng: np.random.Generator
    model: Any                     # the torch controller being trained
    curves: dict[str, list[float]] = field(default_factory=dict)
    data: TeacherData | None = None

    @classmethod
    def open(cls, artifact: Path, profiles: list[Path], out: Path, config: CalibrationConfig,
             progress: bool = True, unet=None) -> "CalibrationState":
        """Check the inputs, load the artifact, its profiles and both denoisers; seed torch and numpy."""
        import torch

        from abcd_edge.calibrate.torch_model import torch_controller
        from abcd_edge.device.backends import open_denoiser
        from abcd_edge.formats.manifest import load_manifest, manifest_hash

        check_inputs(config, profiles)
        artifact, out = Path(artifact), Path(out)
        manifest = load_manifest(artifact)
        mh = manifest_hash(artifact)
        loaded = [CalibrationProfile.load(Path(p), mh) for p in profiles]
        schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        spec = ControllerSpec(log_sigma_min=math.log(schedule.sigma_min), log_sigma_max=math.log(schedule.sigma_max))
        # the order below fixes torch's random stream (the controller's initial weights come last)
        torch.manual_seed(config.seed)
        torch.set_num_threads(config.threads)
        ort = open_denoiser(artifact, threads=config.threads)
        unet = unet if unet is not None else load_torch_unet(manifest)
        ckpt = out.parent / f".{out.name}.ckpt"
        ckpt.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(config.seed)
        return cls(artifact=artifact, out=out, cfg=config, progress=progress, manifest=manifest, manifest_hash=mh,
                   profiles=loaded, profile_paths=[str(p) for p in profiles], schedule=schedule, spec=spec,
                   ort=ort, unet=unet, ckpt=ckpt, rng=rng, model=torch_controller(spec))

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

    def sample_context(self) -> tuple[str, CalibrationProfile, float, float, int]:
        """(sampler, profile, budget ms, rho, steps that fit) for a feasible random context."""
        while True:
            sampler = str(self.rng.choice(self.cfg.samplers))
            profile = self.profiles[int(self.rng.integers(len(self.profiles)))]
            budget = float(math.exp(self.rng.uniform(*map(math.log, BUDGET_RANGE_MS))))
            n = profile.steps_that_fit(budget, sampler)
            if n >= 1:
                return sampler, profile, budget, float(self.rng.uniform(0, 1)), n

    def run_ort(self, sampler_name: str, sigmas, noise: np.ndarray,
                keep_x0: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every step of a fixed schedule through ONNX Runtime (the one loop): (x0, x0 after each step if asked)."""
        from abcd_edge.core.loop import sample
        from abcd_edge.core.samplers import make_sampler

        smp = make_sampler(sampler_name, self.schedule, np.asarray(sigmas), self.manifest.prediction_type)
        x0, history = sample(self.ort, smp, noise, keep_x0=keep_x0)
        return np.asarray(x0, np.float32), [np.asarray(h, np.float32) for h in history]

    def anchor(self) -> np.ndarray:
        """The KL anchor of the weight generator: the density of 100 time-uniform steps."""
        from abcd_edge.core.placement import density_of_sigmas, time_uniform_sigmas

        return density_of_sigmas(time_uniform_sigmas(self.schedule, 100), self.spec.k_bins,
                                 self.spec.log_sigma_min, self.spec.log_sigma_max)

    def numpy_controller(self) -> Controller:
        return Controller(self.spec, self.model.numpy_weights())
