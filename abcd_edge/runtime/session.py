"""The anytime session: a warm denoiser with its profile, controller, meter and clock. numpy + onnxruntime only.

A request has a budget B. It is planned once (runtime/plan.py): the most steps
whose sum fits B (fewer where rho < 1 asks for less), placed as the controller's
gate validated. The one step loop (core/loop.py) runs it under the anytime rules
(runtime/anytime.py): the hard rule before each step, the guard during it, the
online correction and re-planning after the call. The image is the last x0
estimate, never a noisy x_t.

A latent pipeline artifact (text-to-image SD / LCM, docs/sd-pipeline-spec.md) runs the same loop: the
prompt is encoded inside the request clock (its profiled tail taken off the budget before planning), the
loop steps a GuidedDenoiser (device/pipeline.py: classifier-free guidance by the profile's faster
mode), and finishing is the decode of the last x0 latent, whose tail the hard rule and the guard reserve.

Collaborators are passed in; :meth:`AnytimeRuntime.open` finds or measures them
for the CLI::

    with AnytimeRuntime.open("export/demo", backend="ort-cpu", threads=2) as rt:
        images, report = rt.generate(parse_budget("150ms"))
"""
from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from abcd_edge.core.budget import Budget, parse_budget
from abcd_edge.core.images import check_image_channels, to_uint8
from abcd_edge.core.loop import LoopInterrupted, run_steps
from abcd_edge.core.noise import NoiseSchedule
from abcd_edge.core.samplers import diffusers_options, make_sampler, natural_sampler
from abcd_edge.device.clock import WallClock
from abcd_edge.device.power import NoneMeter
from abcd_edge.errors import UserError
from abcd_edge.formats.controller import cost_features
from abcd_edge.formats.manifest import Manifest
from abcd_edge.formats.profile import DeviceProfile
from abcd_edge.runtime.anytime import AnytimeRules
from abcd_edge.runtime.cost import CostModel, OnlineCorrection
from abcd_edge.runtime.plan import (RULE_MAX_STEPS, RequestPlan, auto_sampler, budget_in_ms, check_request, plan_request,
                                    resolve_sampler)
from abcd_edge.core.placement import DIFFUSERS_PLACEMENT
from abcd_edge.runtime.report import REPORT_SCHEMA_VERSION, RequestReport
from abcd_edge.runtime.text_request import PipelineRequest, check_text_request

COST_PREDICTOR_TOLERANCE = 0.10   # the predictor's step tail may differ this much from the profile's p99
WARMUP_CALLS = 5           # warm-up (see _warm_up): steady when the median of the last 5 calls
WARMUP_TOLERANCE = 1.25    # is within 1.25 x the profile's step p50,
WARMUP_MAX_S = 5.0         # or gives up (with a note) after 5 s per batch
WALL_CLOCK_NOTE = "monotonic, from the call to the image in hand; files are written after the clock stops"


class RequestInterrupted(KeyboardInterrupt):
    """Ctrl-C during a request's steps. ``images`` and ``report`` (exit_reason "interrupted") are the
    answer so far: the last completed step's x0; both None when no step finished."""

    def __init__(self, images: np.ndarray | None, report: RequestReport | None):
        super().__init__()
        self.images, self.report = images, report


class AnytimeRuntime:
    """A warm session over one artifact's denoiser. One request at a time (a lock guards it);
    use one instance per thread for parallel requests. A context manager: ``close()`` on exit."""

    def __init__(self, denoiser, manifest: Manifest, profile: DeviceProfile, *, controller=None, meter=None,
                 clock=None, online: OnlineCorrection | None = None, manifest_hash: str = "",
                 artifact_dir: str | Path = "", profile_path: str | Path = "", controller_dir: str | Path | None = None,
                 notes: list[str] | None = None, warm_up: bool = True, pipeline=None):
        if getattr(manifest, "pipeline", None) is None:
            check_image_channels(manifest.channels, f"artifact {str(artifact_dir or manifest.name)!r}")
        else:
            if pipeline is None:
                raise UserError(f"artifact {str(artifact_dir or manifest.name)!r} is a latent pipeline: its session "
                                "needs the prompt encoder and decoder too (open it with AnytimeRuntime.open)")
            check_image_channels(int(manifest.pipeline["image"]["channels"]),
                                 f"artifact {str(artifact_dir or manifest.name)!r}'s decoder")
            if profile.pipeline is None:
                raise UserError(f"profile {str(profile_path) or profile.device_id!r} has no per-component figures "
                                "for this pipeline artifact; profile it again with `abcd-edge profile`")
        self.pipeline = pipeline
        self.denoiser, self.manifest, self.profile = denoiser, manifest, profile
        self.schedule = NoiseSchedule.from_config(manifest.scheduler_config)
        self.controller = controller
        self.meter = meter if meter is not None else NoneMeter()
        self.clock = clock if clock is not None else WallClock()
        self.online = online if online is not None else OnlineCorrection()
        self.manifest_hash = manifest_hash
        self.artifact_dir, self.profile_path = str(artifact_dir), str(profile_path)     # as given ("" unknown)
        self.controller_dir = None if controller_dir is None else str(controller_dir)
        self.backend = getattr(denoiser, "backend", profile.backend)
        self.notes: list[str] = list(notes or [])
        self._predicted_tails = self._cost_predictor_tails()
        self._lock = threading.Lock()
        if warm_up:
            self._warm_up()

    @classmethod
    def open(cls, artifact_dir: str | Path | None = None, profile: str | Path | None = None,
             controller: str | Path | None = "auto", backend: str = "ort-cpu", threads: int | None = None,
             power: str = "auto", clock=None, quick_profile_runs: int = 60, denoiser=None,
             precision: str = "fp32") -> "AnytimeRuntime":
        """Find or measure what a session needs (see runtime/discover.py) and open it warm."""
        from abcd_edge.runtime.discover import discover

        parts = discover(artifact_dir, profile=profile, controller=controller, backend=backend, threads=threads,
                         power=power, simulated=getattr(clock, "simulated", False),
                         quick_profile_runs=quick_profile_runs, denoiser=denoiser, precision=precision)
        return cls(parts.denoiser, parts.manifest, parts.profile, controller=parts.controller, meter=parts.meter,
                   clock=clock, manifest_hash=parts.manifest_hash, artifact_dir=parts.artifact_dir,
                   profile_path=parts.profile_path, controller_dir=parts.controller_dir, notes=parts.notes,
                   pipeline=parts.pipeline)

    def __enter__(self) -> "AnytimeRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.clock.close()
        self.meter.close()

    # ------------------------------------------------------------------------------------ setup
    def _warm_up(self) -> None:
        """Run every profiled batch through the denoiser until it steps at the profile's pace.

        A fresh session's first calls are slow: on the GPU, cuDNN searches its
        convolution algorithms, the memory arena grows and the clocks ramp up
        from idle (measured on an H200: 0.7-0.9 s for the first call against
        2.4-2.9 ms warm). The guard cannot cut a GPU call short, and a call it abandons
        may leave the search unfinished, so this has to happen here, outside any
        deadline: calls continue until the median of the last WARMUP_CALLS is
        within WARMUP_TOLERANCE of the profile's p50, or has stopped improving on
        the calls before (a machine busier than when it was profiled), or
        WARMUP_MAX_S has passed.
        On a simulated clock (a replayed profile of another device) the pace is
        not comparable, so WARMUP_CALLS calls are all.
        """
        shape = (self.manifest.channels, self.manifest.resolution, self.manifest.resolution)
        if self.pipeline is not None:
            self._warm_up_pipeline(shape)
            return
        for bp in self.profile.batches:
            sample = np.zeros((bp.batch, *shape), np.float32)
            timestep = np.full(bp.batch, self.schedule.num_train_timesteps // 2, np.float32)
            self._warm(lambda: self.denoiser(sample, timestep), bp.step.p50_ms, f"batch {bp.batch}")

    def _warm(self, call, p50_ms: float, label: str) -> None:
        """Call until steady (see :meth:`_warm_up`), and note how it went."""
        simulated = getattr(self.clock, "simulated", False)
        times: list[float] = []
        t_end = time.perf_counter() + WARMUP_MAX_S
        while True:
            t0 = time.perf_counter()
            call()
            times.append((time.perf_counter() - t0) * 1e3)
            recent = float(np.median(times[-WARMUP_CALLS:]))
            steady = len(times) >= WARMUP_CALLS and (
                simulated or recent <= WARMUP_TOLERANCE * p50_ms
                # slower than the profile (a busy machine) but no longer getting faster: as warm as it gets
                or (len(times) >= 4 * WARMUP_CALLS
                    and recent >= 0.95 * float(np.median(times[-4 * WARMUP_CALLS:-WARMUP_CALLS]))))
            if steady or time.perf_counter() > t_end:
                break
        self.notes.append(f"warm-up {label}: {len(times)} calls in {sum(times):.0f} ms, first "
                          f"{times[0]:.1f} ms, last {times[-1]:.1f} ms (profile p50 {p50_ms:.2f} ms)"
                          + ("" if steady else "; still getting faster: the first requests may run slow"))

    def _warm_up_pipeline(self, shape: tuple[int, ...]) -> None:
        """A pipeline's components each until steady: the UNet in each mode a request may use, the text
        encoder, the decoders. The default negative prompt "" is encoded (and cached) here."""
        pl, pp = self.pipeline, self.profile.pipeline
        sample = np.zeros((1, *shape), np.float32)
        timestep = np.full(1, self.schedule.num_train_timesteps // 2, np.float32)
        emb = pl.dummy_embedding(1)
        for branches in ((1,) if pl.lcm or not pl.text else (1, 2)):
            mode = "single" if branches == 1 else pp.guidance_mode
            den = pl.denoiser(emb, emb, pl.default_guidance if branches == 2 else 1.0, mode)
            comp = {"single": "unet_b1", "batch2": "unet_b2", "split": "unet_split"}[mode]
            self._warm(lambda: den(sample, timestep), pp.components[comp].latency.p50_ms, f"unet {mode}")
        if pl.text:
            ids = pl.encoder.tokenize("a warm-up prompt").ids
            model = pl.encoder.model
            self._warm(lambda: model.run({model.input_names[0]: ids}),
                       pp.components["text_encoder"].latency.p50_ms, "text encoder")
            if not pl.lcm:
                pl.encoder.embed("")          # the default negative prompt, cached
        for name in pl.decoders:
            if name in pp.components:
                self._warm(lambda: pl.decoders[name].run({pl.decoders[name].input_names[0]: sample}),
                           pp.components[name].latency.p50_ms, name)

    def _cost_predictor_tails(self) -> tuple[float, float] | None:
        """The controller's (step, finishing) tails for batch 1, where it may be trusted, else None (noted).

        Only inside what it was trained on (batch-1 profiles of its backends), and only
        while it agrees with this device's measured p99 within COST_PREDICTOR_TOLERANCE:
        the profile is a measurement of this very device, the predictor a model fitted
        on a few others; where they disagree the measurement wins.
        """
        if self.controller is None:
            return None
        if self.backend not in self.controller.meta.cost_backends:
            self.notes.append(f"cost predictor calibrated on {', '.join(self.controller.meta.cost_backends) or 'no'} "
                              f"backend(s), not {self.backend}: step and finishing tails come from the profile")
            return None
        bp = self.profile.for_batch(1)
        tails = self.controller.predict_cost_ms(cost_features(bp.step.p50_ms, bp.step.p99_ms, bp.finish.p50_ms,
                                                              bp.finish.p99_ms, 1, self.backend, 1.0))
        if abs(tails[0] / bp.step.p99_ms - 1) > COST_PREDICTOR_TOLERANCE:
            self.notes.append(f"cost predictor's step tail {tails[0]:.2f} ms disagrees with the profile's measured "
                              f"p99 {bp.step.p99_ms:.2f} ms by more than {COST_PREDICTOR_TOLERANCE:.0%}: "
                              "the profile's tails are used")
            return None
        return tails

    # ------------------------------------------------------------------------------------ planning
    def uses_cost_predictor(self, batch: int) -> bool:
        return batch == 1 and self._predicted_tails is not None

    def batch_profile(self, batch: int, branches: int | None = None, decoder: str | None = None):
        """The profile of one batch as this request runs it. A pixel artifact: the profile's. A pipeline:
        the step of the UNet mode it runs (``branches`` 1: one branch; 2: the profile's faster guided mode;
        None: the default guidance's) and the finishing of its decoder ("vae" unless "tiny")."""
        bp = self.profile.for_batch(batch)
        if self.pipeline is None:
            return bp
        pl, pp = self.pipeline, self.profile.pipeline
        branches = branches if branches is not None else pl.branches(pl.default_guidance)
        comp = "unet_b1" if branches == 1 else {"batch2": "unet_b2", "split": "unet_split"}[pp.guidance_mode]
        dec = pl.decoder_component(decoder or "vae")
        if comp not in pp.components or dec not in pp.finish:
            raise UserError(f"profile {self.profile_path or self.profile.device_id!r} has no figures for "
                            f"{comp if comp not in pp.components else dec}; profile this artifact again")
        c = pp.components[comp]
        flops = float(self.manifest.flops_per_step) * branches
        return dataclasses.replace(bp, step=c.latency, finish=pp.finish[dec], flops_per_step=flops,
                                   flops_per_s=flops * batch / (c.latency.p50_ms / 1e3),
                                   step_power_w=c.power_w, energy_per_step_mj=c.energy_mj)

    def cost_model(self, batch: int, sampler: str, correction: float | None = None, branches: int | None = None,
                   decoder: str | None = None) -> CostModel:
        """The cost model of this session for (batch, sampler), at the running correction unless one is given
        (a pipeline: for the UNet mode of ``branches`` and the finishing of ``decoder``, see batch_profile)."""
        return CostModel.from_profile(
            self.batch_profile(batch, branches, decoder), sampler,
            tails=self._predicted_tails if self.uses_cost_predictor(batch) and self.pipeline is None else None,
            correction=self.online.correction if correction is None else correction,
            observed_tail_ratio=self.online.observed_tail_ratio(batch))

    def encode_tail_ms(self, texts: int = 1) -> float:
        """A pipeline's prompt encoding of ``texts`` texts at the profile's tail (0 without a text encoder)."""
        if self.pipeline is None or not self.pipeline.text:
            return 0.0
        return texts * self.profile.pipeline.components["text_encoder"].latency.p99_ms

    def minimum_ms(self, batch: int = 1, sampler: str = "ddim", branches: int | None = None,
                   decoder: str | None = None) -> float:
        """The smallest achievable response: one step + finishing at the profile's tail (a text-to-image
        pipeline: + one prompt encoding; finishing is the decode).

        Uses the profile (correction 1), not the running correction: a refused request takes no
        step, so a minimum that followed the correction could never come back down.
        """
        return (self.cost_model(batch, sampler, correction=1.0, branches=branches, decoder=decoder).minimum_ms()
                + self.encode_tail_ms(1))

    def pipeline_request(self, prompt: str | None = None, negative_prompt: str | None = None,
                         guidance: float | None = None, decoder: str | None = None) -> PipelineRequest | None:
        """Check a request's text-side arguments: None for a pixel artifact (which refuses them)."""
        mode = self.profile.pipeline.guidance_mode if self.profile.pipeline is not None else "single"
        return check_text_request(self.pipeline, mode, self.manifest, str(self.artifact_dir or self.manifest.name),
                                  prompt, negative_prompt, guidance, decoder)

    def _controller_for(self, req: PipelineRequest | None):
        """The controller that plans this request: a pipeline's only at the guidance it was calibrated and
        validated under (``ControllerMeta.conditions``); another guidance plans without it (noted)."""
        c = self.controller
        if c is None or req is None:
            return c
        calibrated = (c.meta.conditions if c.meta is not None else {}).get("guidance")
        if calibrated is None or req.guidance is None or abs(float(calibrated) - req.guidance) > 1e-9:
            req.notes.append(f"the controller was calibrated at guidance {calibrated}; guidance {req.guidance} "
                             "is planned without it (the model's own timesteps)")
            return None
        return c

    def _texts_to_encode(self, req: PipelineRequest | None) -> int:
        """Text-encoder calls the request will make (texts not in the encoder's cache)."""
        if req is None or not self.pipeline.text:
            return 0
        texts = {req.prompt} | ({"" if req.negative_prompt is None else req.negative_prompt}
                                if req.branches == 2 else set())
        return sum(not self.pipeline.encoder.cached(t) for t in texts)

    def plan(self, budget: Budget | str, rho: float = 1.0, sampler: str = "default", seed: int = 0, batch: int = 1,
             best_effort: bool = False, placement: str = "auto", use_exit_rule: bool = True,
             prompt: str | None = None, negative_prompt: str | None = None, guidance: float | None = None,
             decoder: str | None = None, max_steps: int | None = None) -> RequestPlan:
        """Plan one request (refusing a budget below the minimum unless ``best_effort``). ``sampler``
        "default" is the artifact's natural one (consistency for a consistency model, lcm for an LCM
        pipeline, else DDIM). ``budget`` is a Budget or its text ("150ms", "2J"). The prompt arguments are
        a text-to-image pipeline's (refused for a pixel artifact). ``max_steps`` caps the plan (e.g. 6 for a
        "Consistency-6" request); the budget may still allow fewer."""
        req = self.pipeline_request(prompt, negative_prompt, guidance, decoder)
        return self._plan(req, budget, rho, sampler, seed, batch, best_effort, placement, use_exit_rule, max_steps)

    def _plan(self, req: PipelineRequest | None, budget: Budget | str, rho: float, sampler: str, seed: int,
              batch: int, best_effort: bool, placement: str, use_exit_rule: bool,
              max_steps: int | None = None) -> RequestPlan:
        budget = parse_budget(budget) if isinstance(budget, str) else budget
        check_request(rho, sampler, batch, placement, max_steps)
        if self.pipeline is not None and batch != 1:
            raise UserError(f"batch {batch}: a pipeline artifact answers one image per request (batch 1); its "
                            "UNet already runs at batch 2 for classifier-free guidance")
        branches, decoder = (req.branches, req.decoder) if req is not None else (None, None)
        bp = self.batch_profile(batch, branches, decoder)
        limit = budget_in_ms(budget, bp, self.profile_path, self.profile.power.meter)
        prediction = self.manifest.prediction_type
        if sampler == "default" and self.pipeline is not None:   # the sampler of the model's own scheduler
            sampler = natural_sampler(prediction, self.manifest.scheduler_config)
        sampler = resolve_sampler(sampler, prediction)
        controller = self._controller_for(req)
        fallback = "uniform" if self.pipeline is None else DIFFUSERS_PLACEMENT   # the model's own timesteps
        if sampler == "auto":
            sampler = auto_sampler(controller, lambda s: self.cost_model(batch, s, branches=branches,
                                                                              decoder=decoder).steps_that_fit(
                limit, level="sum", cap=RULE_MAX_STEPS), fallback=resolve_sampler("default", prediction))
        cost = self.cost_model(batch, sampler, branches=branches, decoder=decoder)
        reserved = self.encode_tail_ms(self._texts_to_encode(req))
        # as minimum_ms(), from the same model; a pipeline adds the encoding this request makes
        minimum = dataclasses.replace(cost, correction=1.0).minimum_ms() + reserved
        if limit < minimum and not best_effort:
            what = "one step + finishing" if self.pipeline is None else (
                ("prompt encoding + " if reserved else "") + "one step + decode")
            raise UserError(f"budget {budget} is below the smallest achievable response on this device "
                            f"({minimum:.2f} ms: {what} at the profile's tail); "
                            "raise the budget or pass --best-effort")
        return plan_request(budget, limit, rho=rho, sampler=sampler, batch=batch, seed=seed,
                            best_effort=best_effort, placement=placement, bp=bp, cost=cost, minimum_ms=minimum,
                            schedule=self.schedule, controller=controller, use_exit_rule=use_exit_rule,
                            prediction_type=prediction, reserved_ms=reserved,
                            scheduler_config=self.manifest.scheduler_config, fallback_placement=fallback,
                            max_steps_cap=max_steps)

    # ------------------------------------------------------------------------------------ serving
    def generate(self, budget: Budget | str, rho: float = 1.0, sampler: str = "default", seed: int = 0, batch: int = 1,
                 best_effort: bool = False, placement: str = "auto", use_exit_rule: bool = True,
                 clock=None, prompt: str | None = None, negative_prompt: str | None = None,
                 guidance: float | None = None, decoder: str | None = None,
                 max_steps: int | None = None) -> tuple[np.ndarray, RequestReport]:
        """One request: images uint8 [batch,H,W,3] made before the deadline, and its report.

        ``clock`` runs this request on another clock than the session's (the bench's
        per-stream replay clocks). Ctrl-C during the steps raises :class:`RequestInterrupted`
        carrying the last completed step's images and a report with exit_reason "interrupted"
        (both None when no step finished).

        A text-to-image pipeline artifact takes ``prompt`` (default ""), ``negative_prompt`` (default "",
        unused by one-branch requests), ``guidance`` (>= 1; default the artifact's, 7.5 for SD; 1 runs one
        branch) and ``decoder`` ("vae" or "tiny"); a pixel artifact refuses them in one line. The prompt is
        encoded inside the request clock, the loop steps the guided UNet over latents, and the image is the
        decode of the last x0 latent (also inside the clock)."""
        clock = clock if clock is not None else self.clock
        with self._lock:
            req = self.pipeline_request(prompt, negative_prompt, guidance, decoder)
            plan = self._plan(req, budget, rho, sampler, seed, batch, best_effort, placement, use_exit_rule,
                              max_steps)
            rng = np.random.default_rng(seed)
            shape = (batch, self.manifest.channels, self.manifest.resolution, self.manifest.resolution)
            noise = rng.standard_normal(shape).astype(np.float32)
            smp = self.request_sampler(plan.sampler, plan.sigmas, req)
            rules = AnytimeRules(plan, clock)
            text: dict = {}

            self.meter.start()
            clock.start()
            denoiser = self.request_denoiser(req, clock, text)
            try:
                result = run_steps(denoiser, smp, noise, rng=rng, clock=clock, hooks=rules)
                interrupted = False
            except LoopInterrupted as exc:        # Ctrl-C: the last completed step's x0 is still an answer
                result, interrupted = exc.result, True
                n = result.steps
                rules.predicted, rules.predicted_median = rules.predicted[:n], rules.predicted_median[:n]
            clock.disarm()
            images = self.finish_images(result.x0, req, clock, text)
            latency = clock.elapsed_ms()
            reading = self.meter.stop()
            measured = [round(ms, 4) for ms in result.step_ms]
            self.online.update(batch, plan.cost, result.step_ms)
        reason = "best-effort" if best_effort and result.reason == "done" and plan.below_minimum else result.reason
        report = self._report(plan, smp, rules, reason, measured, latency, reading, clock)
        if req is not None:
            self._pipeline_report(report, req, plan, text)
        if interrupted:
            raise RequestInterrupted(images if result.steps else None, report if result.steps else None)
        return images, report

    # ----------------------------------------------------------------- one request's parts (also the bench's)
    def request_sampler(self, name: str, sigmas, req: PipelineRequest | None):
        """Sampler ``name`` over ``sigmas``; a pipeline steps as its diffusers scheduler does (start scale,
        DDIM's final alpha, LCM's scaling: ``core.samplers.diffusers_options``)."""
        options = diffusers_options(name, self.manifest.scheduler_config, self.schedule) if req is not None else {}
        return make_sampler(name, self.schedule, np.asarray(sigmas), self.manifest.prediction_type, **options)

    def request_denoiser(self, req: PipelineRequest | None, clock, timings: dict):
        """The step function of one request, started on ``clock``: a pixel artifact's denoiser, or a
        pipeline's UNet guided by the request's prompt, encoded now (inside the clock; ``timings`` gets
        ``encode_ms`` and the encoding ``enc``)."""
        if req is None:
            return self.denoiser
        enc = None
        if self.pipeline.text:
            t0 = clock.elapsed_ms()
            enc = self.pipeline.encoder.encode(req.prompt, req.negative_prompt, uncond=req.branches == 2)
            timings["encode_ms"] = clock.elapsed_ms() - t0
        timings["enc"] = enc
        return self.pipeline.denoiser(enc.cond if enc else None, enc.uncond if enc else None,
                                      req.guidance or 1.0, req.mode)

    def finish_images(self, x0, req: PipelineRequest | None, clock, timings: dict) -> np.ndarray:
        """Finishing, on ``clock``: x0 -> uint8 images; a pipeline decodes the x0 latent first (``timings`` gets
        ``decode_ms``). A completed DDIM run under set_alpha_to_one=False is diffusers' final state."""
        if req is None:
            return to_uint8(np.asarray(x0, np.float32))
        t0 = clock.elapsed_ms()
        images = to_uint8(self.pipeline.decode(np.asarray(x0, np.float32), req.decoder))
        timings["decode_ms"] = clock.elapsed_ms() - t0
        return images

    def _report(self, plan: RequestPlan, smp, rules: AnytimeRules, reason: str, measured: list[float],
                latency: float, reading, clock) -> RequestReport:
        budget = plan.budget
        if budget.kind == "latency":
            met = latency <= plan.limit_ms
        else:
            spent = (reading.energy_mj if reading.energy_mj is not None
                     else len(measured) * self.profile.for_batch(plan.batch).energy_per_step_mj)
            met = spent <= budget.mj
        energy_source = "meter" if reading.energy_mj is not None else ("profile" if budget.kind == "energy" else None)
        return RequestReport(
            schema_version=REPORT_SCHEMA_VERSION, budget=str(budget), budget_kind=budget.kind,
            budget_ms=budget.value if budget.kind == "latency" else None,
            budget_mj=budget.value if budget.kind == "energy" else None,
            latency_ms=round(latency, 4), deadline_met=bool(met), steps=len(measured),
            planned_steps=len(plan.sigmas), fit_steps=plan.fit_steps, replans=rules.replans, exit_reason=reason,
            sampler=plan.sampler,
            schedule=plan.placement.kind, sigmas=[round(float(s), 6) for s in smp.sigmas], rho=plan.rho,
            seed=plan.seed, batch=plan.batch, predicted_step_ms=rules.predicted,
            predicted_median_step_ms=rules.predicted_median, measured_step_ms=measured,
            correction=round(plan.cost.correction, 5), energy_mj=reading.energy_mj, avg_power_w=reading.avg_w,
            power_meter=reading.meter, energy_source=energy_source,
            clock="simulated (profile replay)" if clock.simulated else WALL_CLOCK_NOTE,
            artifact=self.artifact_dir, manifest_hash=self.manifest_hash, profile=self.profile_path,
            profile_device=self.profile.device_id,
            # the controller that planned this request (a pipeline's sits out at another guidance)
            controller=(self.controller_dir or "(passed in)") if plan.context is not None else None,
            notes=list(self.notes) + list(reading.warnings),
        )

    def _pipeline_report(self, report: RequestReport, req: PipelineRequest, plan: RequestPlan, text: dict) -> None:
        """A pipeline request's own report fields: prompt, guidance, encode and decode times, truncation."""
        enc = text.get("enc")
        report.prompt, report.negative_prompt = req.prompt, req.negative_prompt
        report.guidance, report.guidance_mode = req.guidance, req.mode
        report.decoder = req.decoder
        report.encode_ms = round(text["encode_ms"], 4) if "encode_ms" in text else None
        report.reserved_encode_ms = round(plan.reserved_ms, 4)
        report.decode_ms = round(text["decode_ms"], 4)
        report.notes.extend(req.notes)
        if enc is not None:
            report.prompt_tokens, report.prompt_truncated = enc.prompt_tokens, enc.truncated
            limit = self.pipeline.encoder.max_length
            if enc.truncated:
                report.notes.append(f"prompt truncated: {enc.prompt_tokens} tokens (with BOS/EOS) is more than the "
                                    f"tokenizer's limit {limit}; the last {enc.prompt_tokens - limit} were dropped")
            if enc.negative_truncated:
                report.notes.append(f"negative prompt truncated to the tokenizer's limit {limit} tokens")
            if enc.encoded_texts == 0:
                report.notes.append("prompt embeddings cached from an earlier request: no text encoding ran")
