"""Calibration: train the ABCD controller for an artifact and its device profiles.

Stages (each checkpointed, so an interrupted run resumes):

1. teacher   — for fixed training/validation noises, each sampler's own 200-step result (ONNX Runtime);
2. weights   — the weight generator, LD3/AYS-style: the n-step result of the frozen denoiser
               (torch) is compared with the teacher and the loss is backpropagated through the
               sampler into the sigmas and so into the density; plus l1 * KL(w || anchor);
3. traces    — x0 at every step for many contexts (ONNX Runtime), with the learned schedules;
4. policy    — the exit policy on the traces with the joint loss (see ``policy_loss``);
5. cost      — the cost predictor on the profiles' raw step samples, pinball loss at q = 0.99;
6. write     — controller.safetensors + controller.json + controller.onnx + report.json + curves.png.

Q_t (the normalised quality of the current x0) is 1 - d_t / d_0, d_t the teacher MSE of x0 after
step t and d_0 after the first step, clipped to [0, 1]. The teacher term is weighted by rho: the
quality knob sets how much closeness to the teacher is worth against the step penalty.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from abcd_edge import paths
from abcd_edge.formats.controller import (SCHEMA_VERSION, Controller, ControllerMeta, ControllerSpec, cost_features,
                                  decision_features, torch_controller)
from abcd_edge.errors import UserError
from abcd_edge.io import atomic_dir, atomic_path, write_json_atomic

TEACHER_STEPS = 200
BUDGET_RANGE_MS = (20.0, 2000.0)
VALIDATION_STEPS = (3, 5, 10, 20)


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
class ProfileView:
    """What calibration needs of a device profile (batch 1)."""

    name: str
    backend: str
    flops_per_s: float
    step_p50_ms: float
    step_p99_ms: float
    finish_p50_ms: float
    finish_p99_ms: float
    sampler_p99_ms: dict
    step_samples_ms: np.ndarray
    finish_samples_ms: np.ndarray
    decision_p99_ms: float

    def steps_that_fit(self, budget_ms: float, sampler: str) -> int:
        from abcd_edge.runtime.cost import GUARD_SLACK_MS

        per = self.step_p99_ms + self.sampler_p99_ms[sampler] + self.decision_p99_ms
        return max(int((budget_ms - self.finish_p99_ms - GUARD_SLACK_MS) // per), 0)


def _profile_view(path: Path, manifest_hash: str) -> ProfileView:
    from abcd_edge.formats.profile import load_profile

    prof = load_profile(path, manifest_hash)
    bp = prof.for_batch(1)
    return ProfileView(name=path.stem, backend=prof.backend, flops_per_s=bp.flops_per_s,
                       step_p50_ms=bp.step.p50_ms, step_p99_ms=bp.step.p99_ms, finish_p50_ms=bp.finish.p50_ms,
                       finish_p99_ms=bp.finish.p99_ms,
                       sampler_p99_ms={k: v.p99_ms for k, v in bp.sampler_ms.items()},
                       step_samples_ms=np.asarray(bp.step.samples_ms), finish_samples_ms=np.asarray(bp.finish.samples_ms),
                       decision_p99_ms=prof.controller_decision.p99_ms)


def load_torch_unet(manifest):
    """The frozen denoiser in torch, from the manifest's source folder (calibration needs gradients)."""
    from diffusers import UNet2DModel

    src = Path(paths.DEMO_MODEL_DIR if manifest.source == "demo" else manifest.source)
    folder = src / "unet" if (src / "unet").is_dir() else src
    if not (folder / "config.json").is_file():
        raise UserError(f"the artifact's source model {str(src)!r} is not on this machine; calibration needs "
                        "the diffusers weights the artifact was exported from")
    return UNet2DModel.from_pretrained(folder, use_safetensors=True).eval().requires_grad_(False)


class Calibration:
    """One calibration run: holds the artifact, profiles, denoisers and data; stages write checkpoints."""

    def __init__(self, artifact: Path, profiles: list[Path], out: Path, config: CalibrationConfig,
                 progress: bool = True, unet=None):
        import torch

        from abcd_edge.device.backends import open_denoiser
        from abcd_edge.formats.manifest import load_manifest, manifest_hash
        from abcd_edge.core.samplers import SAMPLER_NAMES
        from abcd_edge.core.noise import NoiseSchedule

        if not config.samplers:
            raise UserError("--samplers is empty; give at least one of " + ", ".join(SAMPLER_NAMES))
        for s in config.samplers:
            if s not in SAMPLER_NAMES:
                raise UserError(f"sampler {s!r} is unknown; accepted: {', '.join(SAMPLER_NAMES)}")
        if not profiles:
            raise UserError("calibration needs at least one --profile (measured with `abcd-edge profile`)")
        self.artifact, self.out, self.cfg, self.progress = Path(artifact), Path(out), config, progress
        self.manifest = load_manifest(self.artifact)
        self.manifest_hash = manifest_hash(self.artifact)
        self.profiles = [_profile_view(Path(p), self.manifest_hash) for p in profiles]
        self.profile_paths = [str(p) for p in profiles]
        self.schedule = NoiseSchedule.from_config(self.manifest.scheduler_config)
        self.spec = ControllerSpec(log_sigma_min=math.log(self.schedule.sigma_min),
                                   log_sigma_max=math.log(self.schedule.sigma_max))
        torch.manual_seed(config.seed)
        torch.set_num_threads(config.threads)
        self.ort = open_denoiser(self.artifact, threads=config.threads)
        self.unet = unet if unet is not None else load_torch_unet(self.manifest)
        self.ckpt = self.out.parent / f".{self.out.name}.ckpt"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        self.rng = np.random.default_rng(config.seed)
        self.model = torch_controller(self.spec)
        self.curves: dict[str, list[float]] = {}
        self.shape = (self.manifest.channels, self.manifest.resolution, self.manifest.resolution)

    # ------------------------------------------------------------------------------- helpers
    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not self.progress)

    def _ckpt_file(self, name: str) -> Path:
        return self.ckpt / name

    def context(self, budget_ms: float, profile: ProfileView, rho: float) -> list[float]:
        return [math.log(budget_ms), math.log(profile.flops_per_s), rho]

    def sample_context(self) -> tuple[str, ProfileView, float, float, int]:
        """(sampler, profile, budget ms, rho, steps that fit) for a feasible random context."""
        while True:
            sampler = str(self.rng.choice(self.cfg.samplers))
            profile = self.profiles[int(self.rng.integers(len(self.profiles)))]
            budget = float(math.exp(self.rng.uniform(*map(math.log, BUDGET_RANGE_MS))))
            n = profile.steps_that_fit(budget, sampler)
            if n >= 1:
                return sampler, profile, budget, float(self.rng.uniform(0, 1)), n

    def run_ort(self, sampler_name: str, sigmas, noise: np.ndarray, keep_x0: bool = False):
        from abcd_edge.core.samplers import make_sampler
        from abcd_edge.trajectory import sample

        smp = make_sampler(sampler_name, self.schedule, np.asarray(sigmas), self.manifest.prediction_type)
        return sample(self.ort, smp, noise, keep_x0=keep_x0)

    # ------------------------------------------------------------------------------- stages
    def teacher(self) -> None:
        """Per sampler, its own 200-step time-uniform result from each noise.

        With x0 clipping (clip_sample) the samplers integrate slightly different dynamics (DDIM
        keeps the raw noise direction as diffusers does; the multistep and Euler updates use the
        clipped x0), so each is compared with its own converged result, not with DDIM's.
        """
        from abcd_edge.core.placement import time_uniform_sigmas

        f = self._ckpt_file("teacher.npz")
        if f.exists():
            z = np.load(f, allow_pickle=False)
            self.noise_train, self.noise_val = z["noise_train"], z["noise_val"]
            self.teachers_train = {s: z[f"train_{s}"] for s in self.cfg.samplers}
            self.teachers_val = {s: z[f"val_{s}"] for s in self.cfg.samplers}
            return
        rng = np.random.default_rng(self.cfg.seed + 100)
        self.noise_train = rng.standard_normal((self.cfg.train_noises, *self.shape)).astype(np.float32)
        self.noise_val = rng.standard_normal((self.cfg.val_noises, *self.shape)).astype(np.float32)
        sigmas = time_uniform_sigmas(self.schedule, TEACHER_STEPS)
        self.teachers_train = {s: self.run_ort(s, sigmas, self.noise_train)[0] for s in self.cfg.samplers}
        self.teachers_val = {s: self.run_ort(s, sigmas, self.noise_val)[0] for s in self.cfg.samplers}
        with atomic_path(f) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, noise_train=self.noise_train, noise_val=self.noise_val,
                     **{f"train_{s}": v for s, v in self.teachers_train.items()},
                     **{f"val_{s}": v for s, v in self.teachers_val.items()})

    def anchor(self) -> np.ndarray:
        from abcd_edge.core.placement import density_of_sigmas, time_uniform_sigmas

        return density_of_sigmas(time_uniform_sigmas(self.schedule, 100), self.spec.k_bins,
                                 self.spec.log_sigma_min, self.spec.log_sigma_max)

    def train_weights(self) -> None:
        import torch
        from safetensors.torch import load_file, save_file

        from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
        from abcd_edge.core.placement import sigmas_from_density

        state = self._ckpt_file("wg.json")
        done = json.loads(state.read_text())["iter"] if state.exists() else 0
        if done:
            self.model.load_state_dict(load_file(str(self._ckpt_file("model.safetensors"))))
            self.curves["wg_loss"] = json.loads(state.read_text())["losses"]
        losses = self.curves.setdefault("wg_loss", [])
        opt = torch.optim.Adam(self.model.wg.parameters(), lr=self.cfg.wg_lr)
        anchor = torch.as_tensor(self.anchor(), dtype=torch.float32)
        bar = self._bar(self.cfg.wg_iters, "weights")
        bar.update(done)
        for it in range(done, self.cfg.wg_iters):
            sampler, profile, budget, rho, n = self.sample_context()
            n = min(n, self.cfg.n_train_max)
            cz = torch.tensor([[*self.context(budget, profile, rho), *SAMPLER_DESCRIPTORS[sampler]]])
            density = self.model.normalised_density(cz)[0]
            sigmas = sigmas_from_density(density.double(), n, self.spec.log_sigma_min,
                                         self.spec.log_sigma_max, xp=torch)
            mse = self.rollout_mse(sampler, sigmas)
            w = density / density.sum()
            kl = (w * (w / anchor).log()).sum()
            loss = mse.log() + self.cfg.l1_kl * kl
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.wg.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
            if (it + 1) % 25 == 0 or it + 1 == self.cfg.wg_iters:
                with atomic_path(self._ckpt_file("model.safetensors")) as p:
                    save_file(self.model.state_dict(), str(p))
                with atomic_path(state) as p:
                    p.write_text(json.dumps({"iter": it + 1, "losses": losses}))
        bar.close()

    def rollout_mse(self, sampler: str, sigmas):
        """Teacher MSE of the n-step result from a random batch of training noises, differentiable in sigmas."""
        import torch

        from abcd_edge.core.samplers import make_sampler

        idx = torch.from_numpy(self.rng.choice(len(self.noise_train), self.cfg.wg_batch, replace=False))
        smp = make_sampler(sampler, self.schedule, sigmas, self.manifest.prediction_type)
        x = smp.prepare(torch.from_numpy(self.noise_train)[idx].double())
        for i in range(len(smp)):
            model_in, t = smp.model_input(x, i)
            x, x0 = smp.step(x, i, self.unet(model_in.float(), t.float()).sample.double(), noise=None)
        return ((x0 - torch.from_numpy(self.teachers_train[sampler])[idx].double()) ** 2).mean()

    def train_ays(self) -> dict:
        """AYS-like baseline: one static density per (sampler, n), optimised against the teacher,
        with no budget conditioning (the bench's ``ays`` method). Same rollout, same KL anchor."""
        import torch

        from abcd_edge.core.placement import sigmas_from_density

        f = self._ckpt_file("ays.json")
        table = json.loads(f.read_text()) if f.exists() else {}
        anchor = torch.as_tensor(self.anchor(), dtype=torch.float64)
        todo = [(s, n) for s in self.cfg.samplers for n in self.cfg.ays_steps if str(n) not in table.get(s, {})]
        bar = self._bar(len(todo) * self.cfg.ays_iters, "ays")
        for sampler, n in todo:
            logits = anchor.log().clone().requires_grad_(True)
            opt = torch.optim.Adam([logits], lr=0.05)
            for _ in range(self.cfg.ays_iters):
                density = logits.softmax(0)
                sigmas = sigmas_from_density(density, n, self.spec.log_sigma_min, self.spec.log_sigma_max, xp=torch)
                kl = (density * (density / anchor).log()).sum()
                loss = self.rollout_mse(sampler, sigmas).log() + self.cfg.l1_kl * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.update(1)
            density = logits.softmax(0).detach().numpy()
            sig = sigmas_from_density(density, n, self.spec.log_sigma_min, self.spec.log_sigma_max)
            table.setdefault(sampler, {})[str(n)] = {"density": density.tolist(), "sigmas": sig.tolist()}
            with atomic_path(f) as p:
                p.write_text(json.dumps(table))
        bar.close()
        return table

    def numpy_controller(self) -> Controller:
        return Controller(self.spec, self.model.numpy_weights())

    def traces(self) -> list[dict]:
        """x0 after every step for many contexts, with the learned schedule (ONNX Runtime)."""
        from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

        f = self._ckpt_file("traces.npz")
        if f.exists():
            z = np.load(f, allow_pickle=False)
            return json.loads(str(z["meta"]))
        ctl = self.numpy_controller()
        out = []
        bar = self._bar(self.cfg.trace_contexts, "traces")
        for _ in range(self.cfg.trace_contexts):
            sampler, profile, budget, rho, n_fit = self.sample_context()
            # plan beyond what fits now and then, so the budget term has something to teach
            n_plan = int(np.clip(round(n_fit * self.rng.uniform(0.8, 1.5)), 1, self.cfg.trace_max_steps))
            ctx = self.context(budget, profile, rho)
            sigmas = ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n_plan)
            idx = self.rng.choice(len(self.noise_train), self.cfg.trace_batch, replace=False)
            _, x0s = self.run_ort(sampler, sigmas, self.noise_train[idx], keep_x0=True)
            teacher = self.teachers_train[sampler][idx]
            d = np.stack([((x0 - teacher) ** 2).mean(axis=(1, 2, 3)) for x0 in x0s], 1)  # [B, n]
            prev = np.concatenate([np.zeros_like(x0s[0])[None], np.stack(x0s[:-1])])
            change = np.stack([((x0s[t] - prev[t]) ** 2).mean(axis=(1, 2, 3)) for t in range(len(x0s))], 1)
            per_step = profile.step_p50_ms + profile.sampler_p99_ms[sampler] + profile.decision_p99_ms
            elapsed = per_step * np.arange(1, n_plan + 1)
            out.append({"sampler": sampler, "budget": budget, "rho": rho, "context": ctx, "sigmas": list(map(float, sigmas)),
                        "d": d.tolist(), "change": change.tolist(), "elapsed": elapsed.tolist(),
                        "cost": (elapsed + profile.finish_p99_ms
                                 + (profile.step_p99_ms - profile.step_p50_ms)).tolist()})
            bar.update(1)
        bar.close()
        with atomic_path(f) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(out)))
        return out

    def policy_tensors(self, traces: list[dict]):
        """Per trace: features [B, n, POLICY_DIM] and the loss terms' inputs."""
        import torch

        from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

        rows = []
        for tr in traces:
            d = np.asarray(tr["d"])
            b, n = d.shape
            feats = np.zeros((b, n, len(decision_features(1, 0, 0, 0, tr["context"], SAMPLER_DESCRIPTORS[tr["sampler"]])[0])),
                             np.float32)
            for j in range(b):
                for t in range(n):
                    feats[j, t] = decision_features(tr["sigmas"][t], tr["change"][j][t], (t + 1) / n,
                                                    tr["elapsed"][t] / tr["budget"], tr["context"],
                                                    SAMPLER_DESCRIPTORS[tr["sampler"]])[0]
            quality = np.clip(1 - d / np.maximum(d[:, :1], 1e-12), 0, 1)
            rows.append(dict(feats=torch.from_numpy(feats), d=torch.from_numpy(d / np.maximum(d[:, :1], 1e-12)).float(),
                             q=torch.from_numpy(quality).float(), rho=tr["rho"],
                             over=torch.tensor([max(0.0, c - tr["budget"]) / tr["budget"] for c in tr["cost"]]),
                             steps=torch.arange(1, n + 1, dtype=torch.float32)))
        return rows

    def policy_loss(self, row: dict, temperature: float = 0.5, gumbel: bool = True):
        """The joint loss of DESIGN.md over one trace, survival-weighted by the stop probabilities.

        q_t = S_t p_t (S_t = prod_{s<t} (1 - p_s)), the last step forced to stop; per step:
        rho * d_t/d_0 + l2 * over_t^2 + l3 * max(0, rho - Q_t) + l4 * t / K_max.
        """
        import torch

        logits = self.model.policy_logit(row["feats"])[..., 0]          # [B, n]
        if gumbel:
            u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
            logits = logits + (u.log() - (-u).log1p())
        p = torch.sigmoid(logits / temperature)
        p = torch.cat([p[:, :-1], torch.ones_like(p[:, -1:])], 1)
        survive = torch.cumprod(torch.cat([torch.ones_like(p[:, :1]), 1 - p[:, :-1]], 1), 1)
        q = survive * p
        c = self.cfg
        per_step = (row["rho"] * row["d"] + c.l2_budget * row["over"] ** 2
                    + c.l3_quality * torch.clamp(row["rho"] - row["q"], min=0)
                    + c.l4_steps * row["steps"] / self.cfg.trace_max_steps)
        return (q * per_step).sum(1).mean()

    def train_policy(self, traces: list[dict]) -> None:
        import torch

        rows = self.policy_tensors(traces)
        opt = torch.optim.Adam(self.model.policy.parameters(), lr=3e-3)
        losses = self.curves.setdefault("policy_loss", [])
        bar = self._bar(self.cfg.policy_iters, "policy")
        for _ in range(self.cfg.policy_iters):
            batch = [rows[k] for k in self.rng.choice(len(rows), min(16, len(rows)), replace=False)]
            loss = sum(self.policy_loss(r) for r in batch) / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
        bar.close()

    def train_cost(self) -> None:
        import torch

        opt = torch.optim.Adam(self.model.cost.parameters(), lr=3e-3)
        losses = self.curves.setdefault("cost_loss", [])
        q = self.spec.quantile
        bar = self._bar(self.cfg.cost_iters, "cost")
        for _ in range(self.cfg.cost_iters):
            feats, targets = [], []
            for _ in range(32):
                p = self.profiles[int(self.rng.integers(len(self.profiles)))]
                corr = float(math.exp(self.rng.uniform(math.log(0.5), math.log(2.0))))
                feats.append(cost_features(p.step_p50_ms, p.step_p99_ms, p.finish_p50_ms, p.finish_p99_ms, 1,
                                           p.backend, corr)[0])
                targets.append([corr * float(self.rng.choice(p.step_samples_ms)),
                                float(self.rng.choice(p.finish_samples_ms))])
            pred = self.model.cost_log(torch.from_numpy(np.stack(feats))).exp()
            err = torch.tensor(targets, dtype=torch.float32) - pred
            loss = torch.maximum(q * err, (q - 1) * err).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.update(1)
        bar.close()

    # ------------------------------------------------------------------------------- evaluation
    def validate_schedules(self, ays: dict) -> dict:
        """Teacher MSE on validation noises: learned schedule vs uniform, Karras, log-SNR (and AYS-like) at equal n."""
        from abcd_edge.quality import teacher_distance
        from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
        from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas

        ctl = self.numpy_controller()
        prof = self.profiles[0]
        out: dict = {}
        for sampler in self.cfg.samplers:
            for n in VALIDATION_STEPS:
                per = prof.step_p99_ms + prof.sampler_p99_ms[sampler] + prof.decision_p99_ms
                budget = prof.finish_p99_ms + 1.0 + (n + 0.5) * per
                schedules = {"learned": ctl.plan_sigmas(self.context(budget, prof, 1.0), SAMPLER_DESCRIPTORS[sampler], n),
                             "uniform": time_uniform_sigmas(self.schedule, n), "karras": karras_sigmas(self.schedule, n),
                             "logsnr": logsnr_uniform_sigmas(self.schedule, n)}
                if str(n) in ays.get(sampler, {}):
                    schedules["ays"] = np.asarray(ays[sampler][str(n)]["sigmas"])
                row = {}
                for name, sig in schedules.items():
                    x0, _ = self.run_ort(sampler, sig, self.noise_val)
                    row[name] = round(float(teacher_distance(x0, self.teachers_val[sampler]).mse.mean()), 6)
                out[f"{sampler}/n={n}"] = row
        return out

    def exit_behaviour(self) -> dict:
        """Mean steps taken by the policy vs planned, per rho, on validation traces (1 s budget, profile 0)."""
        from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

        ctl = self.numpy_controller()
        prof = self.profiles[0]
        out = {}
        for rho in (0.3, 0.6, 0.9, 1.0):
            sampler = self.cfg.samplers[0]
            budget = 1000.0
            n = min(prof.steps_that_fit(budget, sampler), self.cfg.trace_max_steps)
            ctx = self.context(budget, prof, rho)
            sig = ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n)
            _, x0s = self.run_ort(sampler, sig, self.noise_val[:16], keep_x0=True)
            stops = []
            for j in range(len(x0s[0])):
                prev = np.zeros_like(x0s[0][j])
                stop = n
                for t in range(n - 1):
                    change = float(((x0s[t][j] - prev) ** 2).mean())
                    prev = x0s[t][j]
                    elapsed = (t + 1) * prof.step_p50_ms
                    h = decision_features(float(sig[t]), change, (t + 1) / n, elapsed / budget, ctx,
                                          SAMPLER_DESCRIPTORS[sampler])
                    if ctl.p_stop(h) > ctl.spec.threshold:
                        stop = t + 1
                        break
                stops.append(stop)
            d = [float(((x0s[s - 1][j] - self.teachers_val[sampler][j]) ** 2).mean()) for j, s in enumerate(stops)]
            out[str(rho)] = {"planned_steps": n, "mean_steps": float(np.mean(stops)), "teacher_mse": float(np.mean(d))}
        return out

    def cost_error(self) -> dict:
        """Cost predictor vs each profile's measured step samples (correction 1)."""
        ctl = self.numpy_controller()
        out = {}
        for p in self.profiles:
            pred, _ = ctl.predict_cost_ms(cost_features(p.step_p50_ms, p.step_p99_ms, p.finish_p50_ms,
                                                        p.finish_p99_ms, 1, p.backend, 1.0))
            s = p.step_samples_ms
            out[p.name] = {"predicted_tail_ms": pred, "measured_p99_ms": float(np.quantile(s, 0.99)),
                           "coverage": float(np.mean(s <= pred)),
                           "tail_error": float(pred / np.quantile(s, 0.99) - 1),
                           "within_5pct": bool(abs(pred / np.quantile(s, 0.99) - 1) <= 0.05),
                           "within_10pct": bool(abs(pred / np.quantile(s, 0.99) - 1) <= 0.10)}
        return out

    # ------------------------------------------------------------------------------- run
    def run(self) -> dict:
        t0 = time.monotonic()
        self.teacher()
        self.train_weights()
        traces = self.traces()
        self.train_policy(traces)
        self.train_cost()
        ays = self.train_ays()
        report = {
            "command": "", "artifact": str(self.artifact), "manifest_hash": self.manifest_hash,
            "profiles": self.profile_paths, "config": asdict(self.cfg),
            "parameters": self.spec.n_parameters(),
            "final_losses": {k: float(np.mean(v[-20:])) for k, v in self.curves.items()},
            "wg_curve": [round(v, 5) for v in self.curves.get("wg_loss", [])],
            "validation_teacher_mse": self.validate_schedules(ays),
            "exit_behaviour": self.exit_behaviour(),
            "cost_predictor": self.cost_error(),
        }
        report["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
        self.write(report, ays)
        return report

    def write(self, report: dict, ays: dict) -> None:
        from safetensors.numpy import save_file

        meta = ControllerMeta(schema_version=SCHEMA_VERSION, spec=asdict(self.spec),
                              manifest_hash=self.manifest_hash, artifact=self.manifest.name,
                              samplers=list(self.cfg.samplers), profiles=self.profile_paths,
                              cost_backends=sorted({p.backend for p in self.profiles}),
                              n_parameters=self.spec.n_parameters(),
                              created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        with atomic_dir(self.out) as tmp:
            save_file(self.model.numpy_weights(), str(tmp / "controller.safetensors"))
            (tmp / "controller.json").write_text(json.dumps(asdict(meta), indent=2) + "\n")
            onnx_path, err = export_controller_onnx_model(self.model, tmp)
            report["onnx_parity_max_abs"] = err
            write_json_atomic(tmp / "report.json", report)
            write_json_atomic(tmp / "ays.json", {"note": "AYS-like static schedules per (sampler, n), optimised "
                                                 "against the 200-step teacher, no budget conditioning",
                                                 "manifest_hash": self.manifest_hash, "schedules": ays})
            plot_curves(self, tmp / "curves.png")
        import shutil

        shutil.rmtree(self.ckpt, ignore_errors=True)


def export_controller_onnx_model(model, folder: Path) -> tuple[Path, float]:
    """controller.onnx from the torch module; parity vs the numpy twin on random inputs (<= 1e-5)."""
    import onnxruntime as ort
    import torch

    from abcd_edge.formats.controller import CONTEXT_DIM, COST_DIM, DESCRIPTOR_DIM, POLICY_DIM

    path = Path(folder) / "controller.onnx"
    g = torch.Generator().manual_seed(0)
    cz = torch.randn(4, CONTEXT_DIM + DESCRIPTOR_DIM, generator=g)
    h = torch.randn(4, POLICY_DIM, generator=g)
    f = torch.randn(4, COST_DIM, generator=g)
    with atomic_path(path) as tmp:
        torch.onnx.export(model, (cz, h, f), str(tmp), input_names=["cz", "h", "f"],
                          output_names=["density", "stop_logit", "log_cost"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "n"} for n in ("cz", "h", "f", "density", "stop_logit", "log_cost")})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {"cz": cz.numpy(), "h": h.numpy(), "f": f.numpy()})
    twin = Controller(model.spec, model.numpy_weights())
    numpy_out = [np.concatenate([twin.density(r[:CONTEXT_DIM], r[CONTEXT_DIM:])[None] for r in cz.numpy()]),
                 twin.policy(h.numpy()), twin.cost(f.numpy())]
    err = max(float(np.abs(a - b).max()) for a, b in zip(onnx_out, numpy_out))
    if err > 1e-5:
        raise RuntimeError(f"controller ONNX vs numpy twin differ by {err:.2e} (> 1e-5)")
    return path, err


def export_controller_onnx(calibration_dir: Path, out: Path) -> tuple[Path, float]:
    """`abcd-edge export --controller DIR --out OUT`: load the numpy weights into the torch module and export."""
    import torch

    ctl = Controller.load(calibration_dir)
    model = torch_controller(ctl.spec)
    model.load_numpy_weights(ctl.weights)
    with torch.no_grad():
        return export_controller_onnx_model(model, out)


def plot_curves(cal: Calibration, path: Path) -> None:
    """Learned densities for three budgets (per sampler) and the training losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS

    ctl = cal.numpy_controller()
    prof = cal.profiles[0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    edges = np.linspace(cal.spec.log_sigma_min, cal.spec.log_sigma_max, cal.spec.k_bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    for sampler in cal.cfg.samplers:
        for budget, style in ((50.0, ":"), (150.0, "--"), (1000.0, "-")):
            d = ctl.density(cal.context(budget, prof, 1.0), SAMPLER_DESCRIPTORS[sampler])
            axes[0].plot(centres, d / d.sum(), style, label=f"{sampler} {budget:g} ms")
    anchor = cal.anchor()
    axes[0].plot(centres, anchor / anchor.sum(), "k", lw=2, alpha=0.4, label="anchor (uniform-t)")
    axes[0].set(xlabel="log sigma", ylabel="importance density", title=f"learned densities ({prof.name})")
    axes[0].legend(fontsize=6)
    for k, v in cal.curves.items():
        axes[1].plot(np.convolve(v, np.ones(10) / 10, mode="valid"), label=k)
    axes[1].set(xlabel="iteration", ylabel="loss (10-iter mean)", title="training losses")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def calibrate(artifact: Path, profiles: list[Path], out: Path, config: CalibrationConfig | None = None,
              progress: bool = True, command: str = "", unet=None) -> dict:
    import os

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--out {str(out)!r} cannot be created ({exc.strerror})") from None
    if not os.access(out.parent, os.W_OK):
        raise UserError(f"--out {str(out)!r}: {str(out.parent)!r} is not writable")
    cal = Calibration(artifact, profiles, out, config or CalibrationConfig(), progress=progress, unet=unet)
    report = cal.run()
    report["command"] = command
    write_json_atomic(out / "report.json", report)
    return report



def schedule_fid_table(artifact: Path = paths.DEMO_ARTIFACT_DIR, calibration: Path | None = None,
                       samplers=("ddim", "dpmpp-2m"), steps=(5, 10), samples: int = 1024, threads: int = 2,
                       budget_ms: float = 1000.0, profile: Path | None = None) -> dict:
    """Feature-FID of the learned schedule vs time-uniform, Karras and log-SNR at equal steps.

    The learned density is the controller's for the context (budget_ms, the profile's F, rho = 1);
    n is fixed here, so only the placement differs. Same noises for every schedule.
    """
    from abcd_edge.device.backends import OrtDenoiser
    from abcd_edge.core.images import to_uint8
    from abcd_edge.demo.evaluate import REFERENCE_SEED
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.formats.profile import load_profile
    from abcd_edge.quality import FeatureNet, ReferenceStats
    from abcd_edge.core.samplers import SAMPLER_DESCRIPTORS
    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import karras_sigmas, logsnr_uniform_sigmas, time_uniform_sigmas

    manifest = load_manifest(artifact)
    mh = manifest_hash(artifact)
    ctl = Controller.load(calibration or paths.CALIBRATION_DIR / manifest.name, mh)
    prof = load_profile(profile or paths.PROFILES_DIR / "cpu-2t.json", mh)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    den = OrtDenoiser(Path(artifact) / "denoiser.onnx", threads=threads)
    net = FeatureNet(threads=threads)
    ref = ReferenceStats.load_or_compute(REFERENCE_SEED, 2048, net)
    noise = np.random.default_rng(7).standard_normal((samples, manifest.channels, manifest.resolution,
                                                      manifest.resolution)).astype(np.float32)
    ctx = [math.log(budget_ms), math.log(prof.for_batch(1).flops_per_s), 1.0]
    table: dict = {}
    for sampler in samplers:
        for n in steps:
            candidates = {"learned": ctl.plan_sigmas(ctx, SAMPLER_DESCRIPTORS[sampler], n, schedule.sigma_max),
                          "uniform": time_uniform_sigmas(schedule, n), "karras": karras_sigmas(schedule, n),
                          "logsnr": logsnr_uniform_sigmas(schedule, n)}
            row = {}
            for name, sig in candidates.items():
                from abcd_edge.core.samplers import make_sampler
                from abcd_edge.trajectory import sample

                images = np.concatenate([to_uint8(sample(den, make_sampler(sampler, schedule, sig), noise[k:k + 128])[0])
                                         for k in range(0, samples, 128)])
                row[name] = round(ref.fid(net.features(images)), 3)
            best = min(v for k, v in row.items() if k != "learned")
            row["learned_vs_best_baseline"] = round(row["learned"] / best - 1, 4)
            table[f"{sampler}/n={n}"] = row
            print(f"{sampler} n={n}: {row}", flush=True)
    return {"samples": samples, "reference": f"generator seed {REFERENCE_SEED}, 2048 images",
            "context": {"budget_ms": budget_ms, "rho": 1.0}, "feature_fid": table}


if __name__ == "__main__":
    import sys

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else paths.CALIBRATION_DIR / "demo" / "schedule_fid.json"
    write_json_atomic(out, schedule_fid_table())
