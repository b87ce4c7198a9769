"""The bench verbs, thin over abcd_edge.bench: `bench` (the grid), `bench-runtime`, `bench-schedules`.

``register(main)`` adds them to the `abcd-edge` group.
"""
from __future__ import annotations

from pathlib import Path

import click

from abcd_edge.bench.grid import BENCH_SAMPLERS, GRIDS, METHODS
from abcd_edge.cli.options import artifact_option, backend_option, int_list, pixel_artifact_only, threads_option


@click.command("bench")
@click.option("--grid", type=click.Choice(sorted(GRIDS)), default="quick", show_default=True,
              help="quick (<= 10 min on 2 cores) or full (4 tiers x 3 budgets x 3 samplers x 2 rho x 10 seeds).")
@click.option("--out", default=None, type=click.Path(), help="Output folder (default bench/<grid>).")
@click.option("--profiles", multiple=True,
              help="Tier profiles (repeatable, comma lists, globs); prefix replay: for a simulated tier, busy: for "
                   "a real one with one core kept busy. Default: the grid's (this machine's committed profiles).")
@click.option("--budgets", default=None, help="Latency budgets, e.g. 50ms,150ms,1s.")
@click.option("--samplers", default=None, help=f"Comma list of {', '.join(BENCH_SAMPLERS)}.")
@click.option("--quality", default=None, help="rho values, e.g. 0.6,0.9.")
@click.option("--methods", default=None, help=f"all, or a comma list of {', '.join(METHODS)}.")
@click.option("--seeds", default=None, type=int, help="Seeds per setting (bootstrap CIs are over seeds).")
@click.option("--samples", default=None, type=int, help="Images per setting, all seeds together (>= 256 for FID).")
@click.option("--batch", default=None, type=int, help="Images per request (the profile must have this batch).")
@click.option("--teacher-steps", default=None, type=int, help="Steps of the DDIM teacher (default 200).")
@click.option("--artifact", default=None, type=click.Path(), help="Artifact folder (default export/demo).")
@click.option("--controller", default=None, help="auto (calibration/<artifact>/), a folder, or none.")
@click.option("--prompts", default=None,
              help="A text-to-image pipeline artifact's prompts, one per line (UTF-8): request seed s asks for "
                   "line s mod the number of lines; every method answers the same prompt. Labelled sets "
                   "(easy=FILE,hard=FILE) split each block's requests between them and the summary compares them.")
@click.option("--max-steps", default=None, type=int,
              help="Cap every method's plan at this many steps (e.g. 6 for the seed's Consistency-6 row).")
@click.option("--guidance", default=None, type=float,
              help="A text-to-image pipeline's guidance scale for every method (default: the artifact's).")
@click.option("--evaluation-net", default=None, type=click.Path(),
              help="Feature network folder that scores the images (default export/evalnet).")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from <out>/results.csv, skipping finished blocks.")
@click.argument("extra_profiles", nargs=-1, type=click.Path())
def bench_command(grid, out, profiles, budgets, samplers, quality, methods, seeds, samples, batch, teacher_steps,
                  artifact, controller, prompts, max_steps, guidance, evaluation_net, resume, extra_profiles):
    """The benchmark grid: ABCD vs baselines -> results.csv, summary.md, plots, bench.json.

    A text-to-image pipeline artifact is benched at --batch 1 on real tiers, with --prompts: each method
    encodes the request's prompt inside its clock, steps the guided UNet and decodes its last latent.
    Extra arguments are more profiles (so an unquoted --profiles profiles/*.json works)."""
    from abcd_edge.bench.runner import bench_main

    profs = list(profiles) + list(extra_profiles)
    path = bench_main(grid=grid, out=out, profiles=profs or None, budgets=budgets, samplers=samplers,
                      quality=quality, methods=methods, seeds=seeds, samples=samples, resume=resume, batch=batch,
                      artifact=artifact, controller=controller, teacher_steps=teacher_steps, prompts=prompts,
                      guidance=guidance, evaluation_net=evaluation_net, max_steps=max_steps)
    click.echo(f"bench -> {path}/summary.md")


@click.command("bench-runtime")
@click.option("--out", default="bench/runtime", show_default=True, type=click.Path(),
              help="Output folder: runtime_bench.json and runtime_bench.md.")
@artifact_option
@click.option("--budgets", default="50ms,150ms,1s", show_default=True, help="Latency budgets, comma list.")
@click.option("--requests", default="1000,1000,300", show_default=True,
              help="Requests per budget (one number, or one per budget).")
@click.option("--sampler", default="ddim", show_default=True)
@click.option("--quality", "rho", default=1.0, show_default=True, type=float, help="rho in [0, 1].")
@threads_option
@backend_option
@click.option("--profile", default=None, type=click.Path(), help="Device profile (default: the committed one).")
@click.option("--loads", default="quiet,busy", show_default=True,
              help="quiet, busy (one CPU core kept busy) or both.")
def bench_runtime_command(out, artifact, budgets, requests, sampler, rho, threads, backend, profile, loads):
    """What the anytime loop achieves on this machine: success, steps vs the physical limit, loop overhead
    vs a bare loop, step-latency prediction; per budget, quiet and with one core busy."""
    pixel_artifact_only(artifact, "bench-runtime")
    from abcd_edge.bench.runtime_bench import run_runtime_bench

    command = ("abcd-edge bench-runtime " + " ".join(
        f"--{k} {v}" for k, v in (("out", out), ("artifact", artifact), ("budgets", budgets),
                                  ("requests", requests), ("sampler", sampler), ("quality", rho),
                                  ("threads", threads), ("backend", backend), ("profile", profile),
                                  ("loads", loads))))
    run_runtime_bench(Path(out), Path(artifact), budgets.split(","), int_list(requests, "--requests"),
                      sampler=sampler, rho=rho, threads=threads, backend=backend,
                      profile=Path(profile) if profile else None, loads=loads.split(","), command=command,
                      echo=lambda s: click.echo(s))


@click.command("bench-schedules")
@click.option("--out", default=None, type=click.Path(),
              help="Output JSON (default calibration/demo/schedule_fid.json).")
@artifact_option
@click.option("--controller", "calibration", default=None, type=click.Path(),
              help="Calibration folder (default calibration/<artifact name>/).")
@click.option("--profile", default=None, type=click.Path(),
              help="Device profile giving F in the context (default profiles/cpu-2t.json).")
@click.option("--samplers", default="ddim,dpmpp-2m", show_default=True)
@click.option("--steps", default="5,10", show_default=True, help="Step counts, comma list.")
@click.option("--samples", default=1024, show_default=True, type=int, help="Images per schedule.")
@click.option("--budget-ms", default=1000.0, show_default=True, type=float, help="B in the controller's context.")
@threads_option
def bench_schedules_command(out, artifact, calibration, profile, samplers, steps, samples, budget_ms, threads):
    """Feature-FID of the learned schedule vs time-uniform, Karras and log-SNR at equal steps."""
    pixel_artifact_only(artifact, "bench-schedules")
    from abcd_edge.bench.schedule_fid import DEFAULT_OUT, schedule_fid_table
    from abcd_edge.io import write_json_atomic

    table = schedule_fid_table(Path(artifact), Path(calibration) if calibration else None,
                               samplers=tuple(samplers.split(",")), steps=int_list(steps, "--steps"),
                               samples=samples, threads=threads, budget_ms=budget_ms,
                               profile=Path(profile) if profile else None,
                               log=lambda s: click.echo(s))
    target = Path(out) if out else DEFAULT_OUT
    write_json_atomic(target, table)
    click.echo(f"schedule feature-FID -> {target}")


def register(main: click.Group) -> None:
    """Add `bench`, `bench-runtime` and `bench-schedules` to the `abcd-edge` group."""
    for command in (bench_command, bench_runtime_command, bench_schedules_command):
        main.add_command(command)
