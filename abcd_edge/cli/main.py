"""The `abcd-edge` command: thin click verbs over the library.

Every verb parses, calls one library function and prints; a UserError (bad
value, path or file) becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from abcd_edge import __version__, paths
from abcd_edge.cli.options import (artifact_option, at_least, check_threads, device_options, int_list,
                                   pixel_artifact_only, precision_option, session_options, threads_option)
from abcd_edge.errors import UserError

EXIT_BAD_INPUT = 2           # a UserError: one line on stderr, nothing written
EXIT_DEADLINE_MISSED = 3     # `run --strict`: a request missed its deadline (or energy budget); its answer is written
EXIT_INTERRUPTED = 130       # Ctrl-C (128 + SIGINT); `run` writes the answer so far first
SEED_MAX = 2**63 - 1         # seeds are 0..2**63-1 (numpy's generators take any non-negative int; reports stay int64)


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"abcd-edge: error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abcd-edge")
def main() -> None:
    """Anytime, budget-aware diffusion on edge devices.

    \b
    export    frozen diffusion model -> ONNX (+ TensorRT plan) + manifest
    profile   measure this device: step latency distribution, FLOP/s, power
    calibrate train the ABCD controller for an artifact and its profiles
    run       generate the best image that fits a latency or energy budget
    bundle    one folder for the device: artifact + its profiles + its controller
    bench     the benchmark grid: ABCD vs baselines, tables and plots
    bench-runtime    what the anytime loop achieves here (success, steps vs limit, overhead)
    bench-schedules  feature-FID of the learned schedule vs static ones at equal steps
    serve     an HTTP service: POST /generate, admitting only requests whose deadline can be met
    info      what this machine offers (providers, TensorRT, power meters)
    """


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info(as_json: bool) -> None:
    """What this machine offers (versions, ORT providers, TensorRT, power meters, CPU/GPU) and which model
    families `abcd-edge export` accepts."""
    from abcd_edge.device.hardware import format_info, machine_info
    from abcd_edge.formats.manifest import MODEL_FAMILIES, MODEL_FAMILIES_REFUSED

    facts = machine_info()
    if as_json:
        facts["model_families"] = [{"family": f, "example": e} for f, e in MODEL_FAMILIES]
        facts["model_families_refused"] = MODEL_FAMILIES_REFUSED
        click.echo(json.dumps(facts, indent=2))
        return
    click.echo(format_info(facts))
    click.echo("model families (abcd-edge export):")
    for family, example in MODEL_FAMILIES:
        click.echo(f"  - {family}\n      {example}")
    click.echo(f"  refused: {MODEL_FAMILIES_REFUSED}")


@main.command()
@click.option("--budget", required=True, help="Latency (150ms, 0.2s, 500us) or energy (2J, 500mJ) budget.")
@click.option("--quality", "rho", default=1.0, show_default=True, type=float,
              help="rho in [0,1]: 1 spends every step the budget allows; below, the controller plans the fewest "
                   "steps whose validated feature-FID is within (1 + 0.3 (1 - rho)) of the full plan's.")
@click.option("--sampler", default="default", show_default=True,
              help="default (the artifact's own: consistency for a consistency model, else ddim), ddim, dpmpp-2m, "
                   "euler, consistency, euler-ancestral, lcm, or auto (the calibrated sampler with the best "
                   "validated feature-FID at the steps the budget allows). Over a consistency model any sampler, "
                   "and lcm over any model, plans at most 8 steps.")
@click.option("--placement", "--schedule", "placement", default="auto", show_default=True,
              help="Where the steps go: auto (controller when calibrated, else uniform), controller, uniform, "
                   "karras, logsnr.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--batch", default=1, show_default=True, type=int, help="Images per request.")
@device_options
@precision_option
@session_options
@click.option("--best-effort", is_flag=True, help="Below the minimum achievable budget, answer anyway (late).")
@click.option("--max-steps", default=None, type=int, callback=at_least(1),
              help="Cap the planned steps (e.g. 6 for a Consistency-6 request); the budget may allow fewer.")
@click.option("--requests", default=1, show_default=True, type=int,
              help="Serve N requests on one warm session (seeds seed..seed+N-1) and report a summary.")
@click.option("--out", default="out/run.png", show_default=True, type=click.Path(),
              help="Output image; the suffix picks the format: .png, .jpg/.jpeg, .webp (where Pillow has WebP).")
@click.option("--report", default="out/run.json", show_default=True, type=click.Path(), help="Output JSON report.")
@click.option("--strict", is_flag=True,
              help=f"Exit {EXIT_DEADLINE_MISSED} when any request missed its deadline (the answer is still "
                   "written); without it a late answer exits 0.")
@click.option("--prompt", default=None,
              help="Text-to-image artifacts: the prompt (default \"\"); without --artifact, the shipped latent demo "
                   "(export/demo-latent-lcm, 128x128) answers it. Longer than the tokenizer's limit (77 tokens "
                   "for CLIP) it is truncated, with a note in the report.")
@click.option("--prompt-file", default=None, type=click.Path(),
              help="Read the prompt from a UTF-8 text file (surrounding whitespace stripped) instead of --prompt.")
@click.option("--negative-prompt", default=None,
              help="Text-to-image: the unconditional branch's prompt (default \"\"); unused at --guidance 1 and by "
                   "LCM models (one branch).")
@click.option("--guidance", default=None, type=float,
              help="Text-to-image: classifier-free guidance scale >= 1 (default: the artifact's, 7.5 for SD; an LCM's "
                   "own w). 1 runs one UNet branch per step.")
@click.option("--decoder", default=None, type=click.Choice(["vae", "tiny"]),
              help="Text-to-image: finish with the VAE decoder (default) or the tiny one (AutoencoderTiny), when "
                   "the artifact has it.")
@click.pass_context
def run(ctx, budget, rho, sampler, placement, seed, batch, artifact, profile, controller, backend, threads, power,
        precision, best_effort, max_steps, requests, out, report, strict, prompt, prompt_file, negative_prompt,
        guidance, decoder) -> None:
    """Generate the best image the device can make before the budget runs out.

    \b
    Exit codes: 0 answered; 2 bad input (one line, nothing written);
    3 with --strict, a request missed its deadline; 130 Ctrl-C: the last
    completed step's image and a report (exit_reason "interrupted") are
    written first, nothing when no step had finished.
    """
    from abcd_edge.core.budget import parse_budget
    from abcd_edge.core.images import image_format
    from abcd_edge.device.backends import check_precision
    from abcd_edge.io import check_output_file
    from abcd_edge.runtime.serve import serve_requests

    b = parse_budget(budget)
    if not 0.0 <= rho <= 1.0:
        raise UserError(f"--quality {rho} is outside [0, 1] (0 fastest, 1 best)")
    if batch < 1:
        raise UserError(f"--batch {batch} must be >= 1")
    if requests < 1:
        raise UserError(f"--requests {requests} must be >= 1")
    if not 0 <= seed <= SEED_MAX - (requests - 1):
        raise UserError(f"--seed {seed} is outside 0..2**63-1" + (f" (with --requests {requests}, seed + "
                        f"{requests - 1} must be too)" if 0 <= seed <= SEED_MAX else ""))
    threads = check_threads(backend, threads)
    check_output_file(out, "--out")
    image_format(out, "--out")
    check_output_file(report, "--report")
    if Path(out).absolute() == Path(report).absolute():
        raise UserError(f"--report {report!r} is the --out image's path; give the report its own file")
    check_precision(precision)
    if ((prompt is not None or prompt_file is not None) and paths.DEMO_LATENT_ARTIFACT_DIR.is_dir()
            and ctx.get_parameter_source("artifact") == click.core.ParameterSource.DEFAULT):
        artifact = str(paths.DEMO_LATENT_ARTIFACT_DIR)     # a prompt without --artifact: the text-to-image demo
    text = _text_request(artifact, prompt, prompt_file, negative_prompt, guidance, decoder)
    session = dict(artifact_dir=artifact, profile=profile, controller=controller, backend=backend, threads=threads,
                   power=power, precision=precision)
    res = serve_requests(b, requests=requests, out=Path(out), report=Path(report), session=session, rho=rho,
                         sampler=sampler, placement=placement, seed=seed, batch=batch, best_effort=best_effort,
                         **({"max_steps": max_steps} if max_steps is not None else {}), **text)
    if res.line:
        click.echo(res.line)
    if res.interrupted:
        click.echo(f"abcd-edge: {res.note}", err=True)
        ctx.exit(EXIT_INTERRUPTED)
    if strict and res.missed:
        click.echo(f"abcd-edge: {res.missed} of {requests} request(s) missed the budget {b} (--strict: exit "
                   f"{EXIT_DEADLINE_MISSED})", err=True)
        ctx.exit(EXIT_DEADLINE_MISSED)


def _text_request(artifact, prompt, prompt_file, negative_prompt, guidance, decoder) -> dict:
    """`run`'s text-to-image options, checked before any work: the generate() keywords they give (none for a
    pixel artifact, which refuses them in one line)."""
    import math

    from abcd_edge.formats.manifest import load_manifest

    given = {k: v for k, v in (("--prompt", prompt), ("--prompt-file", prompt_file),
                               ("--negative-prompt", negative_prompt), ("--guidance", guidance),
                               ("--decoder", decoder)) if v is not None}
    if prompt is not None and prompt_file is not None:
        raise UserError("give --prompt or --prompt-file, not both")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 1.0):
        raise UserError(f"--guidance {guidance} must be a number >= 1 (1: no classifier-free guidance)")
    if not given:
        return {}
    manifest = load_manifest(Path(artifact), verify_hashes=False)
    if manifest.pipeline is None:
        raise UserError(f"{', '.join(given)}: artifact {str(artifact)!r} is a pixel-space {manifest.model_kind} "
                        "model, which takes no prompt, guidance or decoder (only text-to-image pipeline artifacts do)")
    text_given = [k for k in given if k != "--decoder"]
    if text_given and "text_encoder" not in manifest.pipeline.get("components", {}):
        raise UserError(f"{', '.join(text_given)}: artifact {str(artifact)!r} is an unconditional latent pipeline "
                        "(no text encoder), which takes no prompt or guidance")
    if prompt_file is not None:
        from abcd_edge.io import read_utf8_text

        prompt = read_utf8_text(prompt_file, "--prompt-file").strip()
    for flag, text in (("--prompt", prompt), ("--negative-prompt", negative_prompt)):
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError:     # bytes the terminal's encoding could not decode (surrogate escapes)
            raise UserError(f"{flag} is not valid UTF-8 text; pass UTF-8 (or use --prompt-file)") from None
    out = dict(prompt=prompt, negative_prompt=negative_prompt, guidance=guidance, decoder=decoder)
    return {k: v for k, v in out.items() if v is not None}


@main.command()
@click.option("--model", default=None, help="demo, a local diffusers folder, or a Hugging Face id (online).")
@click.option("--controller", "controller_dir", default=None, type=click.Path(),
              help="A calibration folder: export its controller to controller.onnx in --out.")
@click.option("--out", required=True, type=click.Path(), help="Artifact folder to write.")
@click.option("--resolution", default=None, type=int, help="Sample resolution (default: the model's).")
@click.option("--batch", default="1,4", show_default=True, help="Batch range as a list, e.g. 1,4.")
@click.option("--fp16", is_flag=True, help="Also write denoiser.fp16.onnx with its drift measured.")
@click.option("--trt", is_flag=True, help="Also build denoiser.plan (a pipeline: <component>/model.plan per "
              "component) with TensorRT (where installed).")
@click.option("--opset", default=17, show_default=True, type=int)
@click.option("--bench", is_flag=True, help="Also print ORT vs torch step latency for the demo and a CIFAR-10-sized UNet.")
def export(model, controller_dir, out, resolution, batch, fp16, trt, opset, bench) -> None:
    """Export a frozen denoiser (and/or a calibrated controller) to deployable artifacts."""
    from abcd_edge.extras import CONTROLLER_MODULES, EXPORT_MODULES, require

    if model is None and controller_dir is None:
        raise UserError("export needs --model (demo, a diffusers folder or a hub id) and/or --controller DIR")
    require("export", "export", *(EXPORT_MODULES if model is not None or bench else CONTROLLER_MODULES))
    from abcd_edge.export import export_bench, export_model, format_bench

    if model is not None:
        batches = int_list(batch, "--batch")
        manifest = export_model(model, Path(out), resolution=resolution, batches=batches, fp16=fp16, trt=trt,
                                opset=opset, progress=sys.stderr.isatty())   # no bar left before a one-line error
        if manifest.pipeline is not None:    # one ONNX per component (abcd_edge/export/sd_pipeline.py)
            comps = manifest.pipeline["components"]
            plans = {k: c["trt"] for k, c in comps.items() if c.get("trt")}
            click.echo(f"exported {manifest.name} ({manifest.model_kind} pipeline) -> {out}: " + ", ".join(
                f"{k} {c['flops'] / 1e9:.3f} GFLOP" for k, c in comps.items())
                + f" per sample; parity max rel {manifest.parity['max_rel']:.2e}"
                + ("; TensorRT plans: " + ", ".join(f"{k}/{t['plan']} ({t['precision']})" for k, t in plans.items())
                   + f" for {next(iter(plans.values()))['gpu_name']}" if plans else ""))
        else:
            click.echo(f"exported {manifest.name} -> {out}: {manifest.flops_per_step / 1e9:.3f} GFLOP/step, "
                       f"parity max abs {manifest.parity['max_abs']:.2e}")
    if controller_dir is not None:
        from abcd_edge.calibrate import export_controller_onnx

        path, err = export_controller_onnx(Path(controller_dir), Path(out))
        click.echo(f"controller -> {path} (parity max abs {err:.2e})")
    if bench:
        click.echo(format_bench(export_bench()))


@main.command()
@device_options
@precision_option
@click.option("--batch", default="1", show_default=True, help="Batch sizes, e.g. 1,4.")
@click.option("--runs", default=300, show_default=True, type=int, help="Timed steps per batch (>= 200 for tails).")
@click.option("--out", default=None, type=click.Path(),
              help="Default: <device id>.json in the bundle's profiles/, else the checkout's profiles/, else the "
                   "user cache (~/.cache/abcd-edge) — all places `run` looks.")
@click.option("--force", is_flag=True,
              help="Replace a profile at --out even when it holds batches not measured now, or is of another "
                   "artifact or device (refused otherwise).")
def profile(artifact, backend, threads, power, precision, batch, runs, out, force) -> None:
    """Measure this device for an artifact and write a device profile (JSON)."""
    from abcd_edge.device.backends import check_precision
    from abcd_edge.device.hardware import device_id
    from abcd_edge.io import check_output_file
    from abcd_edge.profiling.measure import check_profile_target, measure_profile
    from abcd_edge.runtime.discover import default_profile_target

    # everything that can refuse is checked before minutes of measuring
    threads = check_threads(backend, threads)
    batches = int_list(batch, "--batch")
    if runs < 1:
        raise UserError(f"--runs {runs} must be at least 1 (>= 200 recommended for stable tails)")
    check_precision(precision)
    device = device_id(backend, threads, precision=precision)
    target = Path(out) if out else default_profile_target(artifact, device)
    label = "--out" if out else "the default --out"
    check_output_file(target, label)
    if not force:
        check_profile_target(target, artifact, device, batches, label)
    command = "abcd-edge profile " + " ".join(sys.argv[2:])
    prof = measure_profile(Path(artifact), backend=backend, threads=threads, batches=batches,
                           runs=runs, power=power, command=command, precision=precision)
    prof.save(target)
    if prof.pipeline is not None:
        for name, c in prof.pipeline.components.items():
            click.echo(f"{name}: p50 {c.latency.p50_ms:.3f} ms, p99 {c.latency.p99_ms:.3f} ms, cv {c.latency.cv:.3f}, "
                       f"{'n/a' if c.flops is None else f'{c.flops / 1e9:.3f}'} GFLOP/call, energy/call "
                       f"{'n/a' if c.energy_mj is None else f'{c.energy_mj:.2f} mJ'}")
        for name, st in prof.pipeline.finish.items():
            click.echo(f"finish ({name} + uint8): p50 {st.p50_ms:.3f} ms, p99 {st.p99_ms:.3f} ms")
        click.echo(f"guidance mode: {prof.pipeline.guidance_mode}")
    for bp in prof.batches:
        click.echo(f"batch {bp.batch}: step p50 {bp.step.p50_ms:.3f} ms, p99 {bp.step.p99_ms:.3f} ms, "
                   f"cv {bp.step.cv:.3f}, {bp.flops_per_s / 1e9:.1f} GFLOP/s, "
                   f"energy/step {'n/a' if bp.energy_per_step_mj is None else f'{bp.energy_per_step_mj:.2f} mJ'}")
    click.echo(f"controller decision p99 {prof.controller_decision.p99_ms * 1e3:.1f} us; meter {prof.power.meter}")
    for w in prof.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"profile -> {target}")


@main.command()
@artifact_option
@click.option("--profile", "profiles", multiple=True, type=click.Path(),
              help="Device profile(s) of this artifact (repeat). Default: the committed profiles for it.")
@click.option("--samplers", default="default", show_default=True,
              help="Comma list of ddim, dpmpp-2m, euler, consistency, euler-ancestral, lcm; default: consistency "
                   "for a consistency model, a pipeline's own scheduler's (ddim, lcm, ...), else "
                   "ddim,dpmpp-2m,euler.")
@click.option("--prompts", default=None, type=click.Path(),
              help="A text-to-image pipeline's calibration prompts, one per line (UTF-8): the search uses the odd "
                   "lines, the gate judges on the even ones (held out).")
@click.option("--guidance", default=None, type=float,
              help="A text-to-image pipeline's guidance scale to calibrate at (default: the artifact's; the "
                   "runtime uses the controller only for requests at this guidance).")
@click.option("--out", default=None, type=click.Path(), help="Default: calibration/<artifact name>")
@click.option("--iters", default=None, type=int, callback=at_least(1),
              help="Weight-generator fitting iterations (default 1500).")
@click.option("--cost-iters", default=None, type=int, callback=at_least(1),
              help="Cost-predictor fitting iterations (default 3000).")
@click.option("--search-noises", default=None, type=int, callback=at_least(2),
              help="Training noises the schedule search scores on (default 96; fewer: faster, noisier).")
@click.option("--gate-noises", default=None, type=int, callback=at_least(2),
              help="Held-out noises the gate judges on (default 256; fewer: wider CIs, fewer wins kept).")
@click.option("--steps", "search_steps", default=None,
              help="Step counts to search, fit and gate, e.g. 2,3,5,8 (default 2,3,4,5,6,8,10,13,16,20; "
                   "1,2,3,4,6,8 for a consistency model, whose plans stop at 8 steps).")
@click.option("--ays/--no-ays", default=False, show_default=True,
              help="Also retrain the AYS-like baseline the bench compares with (slow; without it the "
                   "folder's existing ays.json for this artifact is kept).")
@click.option("--calibration-net", default=None, type=click.Path(),
              help="Feature network folder whose statistics the search optimises (featurenet.onnx + reference); "
                   "default: the shipped one for the artifact's image size (export/featurenet, or "
                   "export/featurenet<side> where shipped).")
@click.option("--evaluation-net", default=None, type=click.Path(),
              help="Feature network folder that judges the gate: another network, never optimised against; "
                   "default: export/evalnet (export/evalnet<side> where shipped).")
@threads_option
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the search's training noises and of the generator's fit (the gate's held-out "
                   "noises are fixed).")
def calibrate(artifact, profiles, samplers, prompts, guidance, out, iters, cost_iters, search_noises, gate_noises,
              search_steps, ays, calibration_net, evaluation_net, threads, seed) -> None:
    """Train the ABCD controller for an artifact: search schedules against the feature statistics, fit the
    weight generator to them, gate it against every static schedule on held-out noises (evaluation
    network), and fit the cost predictor.

    A text-to-image pipeline artifact is calibrated on its decoded images with --prompts (one per noise, held-out
    prompts for the gate) at one guidance scale; its own scheduler's timesteps are among the static schedules
    the generator must beat."""
    import dataclasses

    from abcd_edge.extras import CALIBRATE_MODULES, require

    require("calibrate", "export", *CALIBRATE_MODULES, *(("diffusers",) if ays else ()))
    from abcd_edge.calibrate import CalibrationConfig, calibrate as run_calibration
    from abcd_edge.formats.manifest import load_manifest, manifest_hash

    manifest = load_manifest(Path(artifact))
    if not profiles:
        from abcd_edge.runtime.discover import profiles_for

        profiles = profiles_for(manifest_hash(Path(artifact)))
        if not profiles:
            raise UserError(f"no profile under {paths.PROFILES_DIR} matches artifact {artifact!r}; "
                            "measure one with `abcd-edge profile` or pass --profile")
    from abcd_edge.calibrate.state import CAPPED_STEPS, check_steps, default_samplers
    from abcd_edge.core.samplers import max_steps

    names = (default_samplers(manifest) if samplers == "default" else tuple(s for s in samplers.split(",") if s))
    config = CalibrationConfig(samplers=names, threads=threads, seed=seed, ays=ays, calibration_net=calibration_net,
                               evaluation_net=evaluation_net, prompts=prompts, guidance=guidance)
    cap = max_steps(names[0], manifest.prediction_type) if names else None
    if search_steps is None and cap is not None:   # plans stop at cap steps: search 1..cap
        config = dataclasses.replace(config, search_steps=tuple(n for n in CAPPED_STEPS if n <= cap))
    sizes = dict(wg_iters=iters, cost_iters=cost_iters, search_noises=search_noises, gate_noises=gate_noises)
    config = dataclasses.replace(config, **{k: v for k, v in sizes.items() if v is not None})
    if search_steps is not None:
        try:
            steps = tuple(sorted({int(v) for v in search_steps.split(",") if v.strip()}))
        except ValueError:
            steps = ()
        if not steps or steps[0] < 1:
            raise UserError(f"--steps {search_steps!r} must be a comma-separated list of step counts >= 1")
        config = dataclasses.replace(config, search_steps=steps)
    try:
        check_steps(config, manifest.prediction_type)
    except UserError as exc:
        raise UserError(f"--steps/--samplers: {exc}") from None
    target = Path(out) if out else paths.CALIBRATION_DIR / manifest.name
    report = run_calibration(Path(artifact), [Path(p) for p in profiles], target, config,
                             command="abcd-edge calibrate " + " ".join(sys.argv[2:]))
    click.echo(f"controller ({report['parameters']} parameters) -> {target} in {report['wall_minutes']} min")
    for sampler, rows in report["gate"].items():
        click.echo(f"  {sampler}: " + ", ".join(
            f"n={n} {row['ratio_to_best_static']:.2f}x{'' if row['decision'] == 'learned' else ' (static)'}"
            for n, row in rows.items()))


@main.command()
@artifact_option
@click.option("--profile", "profiles", multiple=True, type=click.Path(),
              help="Device profile(s) to carry (repeat). Default: every committed profile of this artifact.")
@click.option("--controller", default="auto", show_default=True, type=str,
              help="Calibration folder to carry: 'auto' (calibration/<artifact name>/ when it matches), a folder, "
                   "or 'none'.")
@click.option("--out", required=True, type=click.Path(), help="Bundle folder to write (replaced atomically).")
def bundle(artifact, profiles, controller, out) -> None:
    """One folder to copy to the device: the artifact with its profiles/ and controller/ inside.

    \b
    abcd-edge bundle --artifact export/demo --out bundles/demo
    scp -r bundles/demo jetson:     # then, on the device:
    abcd-edge profile --bundle demo --backend ort-cuda --batch 1,4 --out demo/profiles/jetson.json
    abcd-edge run --bundle demo --backend ort-cuda --budget 150ms
    """
    from abcd_edge.formats.bundle import make_bundle
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.runtime.discover import load_controller, profiles_for

    mhash = manifest_hash(artifact)
    if not profiles:
        profiles = profiles_for(mhash)
    notes: list[str] = []
    _, ctl_dir = load_controller(controller, load_manifest(artifact, verify_hashes=False).name, mhash, notes,
                                 Path(artifact))
    path = make_bundle(artifact, out, profiles=profiles, controller=ctl_dir)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"bundle -> {path}: artifact {mhash[:12]}, {len(profiles)} profile(s), "
               f"{'controller' if ctl_dir else 'no controller (rule-based plans)'}")


def _add_bench() -> None:
    """`abcd-edge bench`, `bench-runtime` and `bench-schedules` (abcd_edge/cli/bench.py); registered here."""
    from abcd_edge.cli.bench import register

    register(main)


def _add_serve() -> None:
    """`abcd-edge serve` (abcd_edge/cli/serve.py; fastapi and uvicorn are imported only when it runs)."""
    from abcd_edge.cli.serve import register

    register(main)


_add_bench()
_add_serve()

if __name__ == "__main__":
    main()
