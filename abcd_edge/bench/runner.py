"""Running a grid: block by block (tier, budget, sampler, seed), resumable from results.csv.

``run_grid`` validates the grid, resolves its tiers, fills the teacher cache, then per tier opens one
session (both runtimes on one denoiser) and runs every block not yet finished: each request seed
through every (method, rho) stream, methods interleaved and rotated. A block's rows are appended
together with its ``block-end`` row, so a kill loses at most the block in progress.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from abcd_edge import paths
from abcd_edge.bench.ays import load_ays
from abcd_edge.bench.grid import GridSpec, parse_grid_args, validate_spec
from abcd_edge.bench.load import busy_core
from abcd_edge.bench.methods import execute, plan_methods, tune_stepdrop
from abcd_edge.bench.metrics import Quality
from abcd_edge.bench.store import (EXAMPLES_DIR, FEATURES_DIR, example_name, RESULTS_CSV, append_csv, block_key, make_row, prune_features,
                                   read_csv, row_block_key, save_block_features, stream_key, write_csv)
from abcd_edge.bench.summary import summarize
from abcd_edge.bench.teacher import TeacherCache
from abcd_edge.bench.text import BenchText, parse_prompt_sets
from abcd_edge.bench.tiers import Tier, TierSession, controller_dir, open_tier, resolve_tiers
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError
from abcd_edge.formats.manifest import sha256_file
from abcd_edge.io import write_json_atomic
from abcd_edge.runtime.rollout import Rollouts


def _config_key(spec: GridSpec, tiers: list[Tier], manifest_hash: str, controller_id: str) -> str:
    """What the results depend on, by content (the artifact's hash, each tier's profile bytes, the controller's
    bytes), never by where the files lie: the same configuration resumes in any clone."""
    tier_ids = [dict(asdict(t), profile_path=sha256_file(paths.from_portable(t.profile_path))) for t in tiers]
    cfg = dict(spec.key_fields(), tiers=tier_ids, manifest_hash=manifest_hash, controller=controller_id)
    if spec.prompts is not None:     # the prompts by content, not by where the file lies
        cfg["prompts"] = [[label, sha256_file(path)] for label, path in parse_prompt_sets(spec.prompts)]
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _controller_identity(spec: GridSpec, manifest_name: str) -> str:
    cdir = controller_dir(spec.controller, manifest_name)
    if cdir is None:
        return "rule-based"
    h = hashlib.sha256()
    for f in ("controller.json", "controller.safetensors", "ays.json"):
        p = Path(cdir) / f
        if p.is_file():
            h.update(p.read_bytes())
    return f"{paths.portable(cdir)}#{h.hexdigest()[:12]}"


def estimate_seconds(spec: GridSpec, tiers: list[Tier]) -> dict:
    """A rough wall-time estimate from the profiles: real tiers spend ~the budget per request, replay tiers
    the local compute of the steps they take; plus the teacher (teacher_steps per image at the batch p50)."""
    from abcd_edge.formats.profile import load_profile

    total_req = len(spec.samplers) * spec.seeds * spec.requests_per_seed
    n_rho_runs = spec.runs_per_request
    out, tot = {}, 0.0
    p50_local = None
    for t in tiers:
        bp = load_profile(paths.from_portable(t.profile_path)).for_batch(spec.batch)
        if t.kind != "replay":
            p50_local = bp.step.p50_ms if p50_local is None else min(p50_local, bp.step.p50_ms)
    for t in tiers:
        bp = load_profile(paths.from_portable(t.profile_path)).for_batch(spec.batch)
        s = 0.0
        for b in spec.budgets:
            ms = parse_budget(b).ms
            if t.kind == "replay":
                steps = ms / max(bp.step.p50_ms, 1e-6)
                ms = steps * (p50_local or bp.step.p50_ms)
            s += total_req * n_rho_runs * ms * 1.05 / 1e3
        out[t.name] = round(s, 1)
        tot += s
    teacher_images = spec.seeds * spec.requests_per_seed * spec.batch
    step_ms = p50_local or 10.0
    teacher_s = teacher_images / spec.batch * spec.teacher_steps * step_ms / 1e3 * 0.8
    out["teacher"] = round(teacher_s, 1)
    out["total"] = round(tot + teacher_s, 1)
    return out


def bench_main(grid: str | None = None, out: str | Path | None = None, profiles: Any = None, budgets: Any = None,
               samplers: Any = None, quality: Any = None, methods: Any = None, seeds: int | None = None,
               samples: int | None = None, resume: bool = True, batch: int | None = None,
               artifact: str | None = None, controller: str | None = None, teacher_steps: int | None = None,
               prompts: str | None = None, guidance: float | None = None, evaluation_net: str | None = None,
               max_steps: int | None = None, progress: bool = True) -> Path:
    """Parse the grid, run it (resuming from ``out``/results.csv), write the outputs; return ``out``."""
    spec = parse_grid_args(grid, profiles, budgets, samplers, quality, methods, seeds, samples, batch, artifact,
                           controller, teacher_steps, prompts, guidance, evaluation_net, max_steps)
    out = Path(out) if out else Path("bench") / (grid or "quick")
    return run_grid(spec, out, resume=resume, progress=progress)


def run_grid(spec: GridSpec, out: Path, resume: bool = True, quality: Quality | None | str = "auto",
             progress: bool = True, tiers: list[Tier] | None = None, log: Callable[[str], None] | None = None) -> Path:
    """Run (or resume) the grid into ``out``; write results.csv, features/, bench.json, summary.md, plots."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):   # the metrics are small matrices; see summary.summarize
        return _run_grid(spec, Path(out), resume, quality, progress, tiers, log)


def _keep_finished_blocks(csv_path: Path, rows: list[dict]) -> tuple[list[dict], set[str]]:
    """Drop the rows of blocks that did not finish (a crash mid-block: no block-end row), keep the rest."""
    by_block: dict[str, list[dict]] = {}
    for r in rows:
        by_block.setdefault(row_block_key(r), []).append(r)
    done, keep = set(), []
    for bk, rs in by_block.items():
        if any(r["status"] == "block-end" for r in rs):
            done.add(bk)
            keep.extend(rs)
    if len(keep) != len(rows):
        write_csv(csv_path, keep)
    return keep, done


def _run_grid(spec, out: Path, resume, quality, progress, tiers, log) -> Path:
    from tqdm import tqdm

    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.device import hardware
    from abcd_edge.formats.manifest import load_manifest, manifest_hash

    log = log or (lambda s: print(f"abcd-edge bench: {s}", file=sys.stderr))
    validate_spec(spec)
    artifact = Path(spec.artifact)
    if not (artifact / "manifest.json").is_file():
        raise UserError(f"artifact {str(artifact)!r} has no manifest.json; export one with "
                        "`abcd-edge export --model demo --out export/demo`")
    manifest = load_manifest(artifact)
    mhash = manifest_hash(artifact)
    text = BenchText.for_spec(spec, manifest)
    if not manifest.batch_min <= spec.batch <= manifest.batch_max:
        raise UserError(f"--batch {spec.batch} is outside the artifact's batch range "
                        f"{manifest.batch_min}..{manifest.batch_max}")
    if spec.controller not in ("auto", "none") and not Path(spec.controller).is_dir():
        raise UserError(f"controller folder {spec.controller!r} does not exist")
    tiers = tiers or resolve_tiers(spec.tiers, mhash)
    if manifest.pipeline is not None and any(t.simulated for t in tiers):
        raise UserError(f"tier {next(t.name for t in tiers if t.simulated)!r} is a replay (simulated) tier: a "
                        "pipeline artifact is benched on real tiers only (its encode and decode are not replayed); "
                        "profile it on that device or prefix the profile with real:")
    controller_id = _controller_identity(spec, manifest.name)
    if quality == "auto":
        quality, qnote = Quality.for_manifest(manifest, spec.ref_seed, spec.ref_n, spec.evaluation_net)
    else:
        qnote = "" if quality is not None else "feature-FID not measured (no quality backend given)"
    if qnote:
        log(qnote)
    key = _config_key(spec, tiers, mhash, controller_id + "|" + (quality.description if quality else qnote))
    out.mkdir(parents=True, exist_ok=True)
    csv_path, meta_path = out / RESULTS_CSV, out / "bench.json"
    old_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    rows = read_csv(csv_path) if resume else []
    if rows and (old_meta or {}).get("config_key") != key:
        raise UserError(f"{csv_path} was made by another configuration (grid, tiers, artifact, controller or "
                        "feature net differ); use another --out, or --no-resume to start over")
    req = spec.requests_per_seed
    done_blocks: set[str] = set()
    if rows:
        rows, done_blocks = _keep_finished_blocks(csv_path, rows)
    else:
        write_csv(csv_path, [])
    feat_dir = out / FEATURES_DIR
    feat_dir.mkdir(exist_ok=True)
    prune_features(feat_dir, {row_block_key(r) for r in rows})
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    est = estimate_seconds(spec, tiers)
    meta = dict(config_key=key, grid=asdict(spec), samples_per_setting=spec.samples_per_setting,
                requests_per_seed=req, tiers=[dict(asdict(t), simulated=t.simulated) for t in tiers],
                artifact=paths.portable(artifact), manifest_hash=mhash, controller=controller_id,
                quality=quality.description if quality else qnote, teacher=f"{spec.teacher_steps}-step "
                "time-uniform DDIM from the same noise", estimate_s=est,
                command="abcd-edge " + " ".join(sys.argv[1:]),
                started_utc=(old_meta or {}).get("started_utc") if rows else started,
                resumed_utc=started if rows else None,
                machine=hardware.machine_info(), stepdrop={}, tier_sessions={}, finished_utc=None)
    if rows and old_meta:
        meta["stepdrop"] = old_meta.get("stepdrop", {})
        meta["tier_sessions"] = old_meta.get("tier_sessions", {})
    write_json_atomic(meta_path, meta)

    blocks = [(t, b, s, seed) for t in tiers for b in spec.budgets for s in spec.samplers for seed in range(spec.seeds)]
    todo = [blk for blk in blocks if block_key(blk[0].name, blk[1], blk[2], blk[3]) not in done_blocks]
    log(f"{len(blocks)} blocks ({len(blocks) - len(todo)} already done), {spec.samples_per_setting} images per "
        f"setting = {spec.seeds} seeds x {req} requests x batch {spec.batch}; estimate ~{est['total'] / 60:.1f} min")
    shape = (manifest.channels, manifest.resolution, manifest.resolution)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    teacher = TeacherCache(out / "teacher", mhash, spec.teacher_steps,
                           lambda: Rollouts.open(artifact, manifest, schedule, os.cpu_count() or 1, text.guidance),
                           text.prompt_for if text.prompts is not None else None,
                           {"prompts": list(text.prompts), "guidance": text.guidance} if text.prompts else None)
    if todo:   # every method's images are scored against the teacher (teacher PSNR); the oracle picks by it
        seeds_needed = sorted({rs for (_, _, _, seed) in todo for rs in spec.request_seeds(seed)})
        bar = tqdm(total=len(seeds_needed), desc=f"teacher ({spec.teacher_steps}-step DDIM)", unit="req",
                   disable=not progress, file=sys.stderr)
        teacher.get(seeds_needed, spec.batch, shape, progress=bar.update)
        bar.close()
    bar = tqdm(total=len(todo) * req * spec.runs_per_request, desc="bench", unit="req", disable=not progress,
               file=sys.stderr)
    try:
        for tier in tiers:
            tier_todo = [blk for blk in todo if blk[0].name == tier.name]
            if not tier_todo:
                continue
            with busy_core(tier.kind == "busy"):
                sess = open_tier(tier, spec, spec.batch, text)
                with sess:
                    if _controller_identity(spec, manifest.name) != controller_id:
                        raise UserError(f"the controller under {spec.controller!r} changed during the run "
                                        "(recalibrated?); rerun the bench with --no-resume once it is final")
                    cdir = Path(sess.controller_dir) if sess.controller_dir else None
                    meta["tier_sessions"][tier.name] = dict(
                        controller=paths.portable(cdir) if cdir else "rule-based",
                        ays=load_ays(cdir, sess.base.manifest_hash)[1],
                        overhead_scale=round(sess.overhead_scale, 4), local_step_p50_ms=sess.local_step_p50_ms,
                        minimum_ms={s: round(sess.minimum_ms(s), 3) for s in spec.samplers},
                        notes=list(sess.abcd.notes))
                    _run_tier(sess, spec, tier_todo, teacher, quality, feat_dir, csv_path, meta, bar)
                write_json_atomic(meta_path, meta)
    finally:
        bar.close()
    meta["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json_atomic(meta_path, meta)
    summarize(out, quality=quality if quality is not None else "auto", log=log)
    return out


def _run_tier(sess: TierSession, spec: GridSpec, todo, teacher: TeacherCache, quality: Quality | None,
              feat_dir: Path, csv_path: Path, meta: dict, bar) -> None:
    from abcd_edge.core.images import save_png, to_model_space
    from abcd_edge.quality import teacher_distance

    tier, batch = sess.tier, spec.batch
    examples = {("uniform", None), ("abcd", max(spec.quality))}
    m = sess.base.manifest
    shape = (m.channels, m.resolution, m.resolution)
    warmed = False
    for (_, budget, sampler, seed) in todo:
        bms = parse_budget(budget).ms
        minimum = sess.minimum_ms(sampler)
        bk = block_key(tier.name, budget, sampler, seed)
        rows: list[dict] = []

        def row(method, detail, rho, request, request_seed, status, **kw) -> dict:
            return make_row(tier, method, detail, budget, bms, sampler, rho, seed, request, request_seed, batch,
                            status, **kw)

        if bms < minimum:
            for mm in spec.methods:
                for rho in spec.rhos(mm):
                    rows.append(row(mm, f"budget below the tier's minimum {minimum:.2f} ms (one step + finishing "
                                    "at the p99)", rho, -1, -1, "infeasible"))
            rows.append(row("-", "", None, -1, -1, "block-end"))
            append_csv(csv_path, rows)
            bar.update(spec.requests_per_seed * spec.runs_per_request)
            continue
        sd_key = f"{tier.name}|{budget}|{sampler}"
        stepdrop = None
        if "stepdrop" in spec.methods:
            if sd_key not in meta["stepdrop"]:
                _, info = tune_stepdrop(sess, spec, teacher, bms, sampler, batch)
                meta["stepdrop"][sd_key] = info
            info = meta["stepdrop"][sd_key]
            stepdrop = {float(r): info[str(r)]["threshold_sigma"] for r in spec.quality if str(r) in info}
        plans = plan_methods(sess, spec, bms, sampler, batch, stepdrop)
        if not warmed:   # a couple of unrecorded requests per method so first-call effects stay out
            for p in plans:
                for w in range(spec.warmup_requests if p.status == "ok" else 0):
                    execute(sess, p, bms, sampler, 10**6 + w, batch, sess.clock_for("warm", p.method), None)
            warmed = True
        clocks = {(p.method, p.rho): sess.clock_for(budget, sampler, seed, p.method, p.rho) for p in plans}
        teach = teacher.get(spec.request_seeds(seed), batch, shape)
        feats: dict[str, list[np.ndarray]] = {}
        ontime: dict[str, list[np.ndarray]] = {}
        per_image: dict[str, dict[str, list[np.ndarray]]] = {}
        judge_prompts = quality is not None and quality.prompt_exact is not None and sess.text.prompts is not None
        order = list(range(len(plans)))
        for r, rs in enumerate(spec.request_seeds(seed)):
            rot = order[r % len(order):] + order[:r % len(order)]   # rotate so no method always runs first
            for j in rot:
                p = plans[j]
                if p.status != "ok":
                    if r == 0:
                        rows.append(row(p.method, p.detail, p.rho, -1, -1, p.status))
                    continue
                res = execute(sess, p, bms, sampler, rs, batch, clocks[(p.method, p.rho)], teach[rs])
                bar.update(1)
                if res is None:   # the runtime refused the budget
                    rows.append(row(p.method, p.detail, p.rho, r, rs, "refused",
                                    note="the runtime refused: budget below its minimum"))
                    continue
                if seed == 0 and r == 0 and (p.method, p.rho) in examples:   # the side-by-side picture
                    save_png(res.images[:1], feat_dir.parent / EXAMPLES_DIR / example_name(tier.name, budget, p.method),
                             scale=1)
                td = teacher_distance(to_model_space(res.images), teach[rs])
                rows.append(row(p.method, p.detail, p.rho, r, rs, "ok", res=res, teacher_mse=float(np.mean(td.mse)),
                                teacher_psnr=float(np.mean(td.psnr)), note=res.note))
                if quality is not None:
                    pk = stream_key(p.method, p.rho)
                    feats.setdefault(pk, []).append(np.asarray(quality.features(res.images), np.float32))
                    ontime.setdefault(pk, []).append(np.full(len(res.images), bool(res.deadline_met)))
                    if sess.text.prompts is not None:
                        n = len(res.images)
                        keep = {"prompt_set": np.full(n, sess.text.set_of(rs)), "steps": np.full(n, float(res.steps))}
                        if judge_prompts:
                            keep["prompt_exact"] = quality.prompt_exact(res.images, [sess.text.prompt_for(rs)] * n)
                        for name, arr in keep.items():
                            per_image.setdefault(name, {}).setdefault(pk, []).append(arr)
        save_block_features(feat_dir, bk, feats, ontime, per_image)
        rows.append(row("-", "", None, -1, -1, "block-end"))
        append_csv(csv_path, rows)
