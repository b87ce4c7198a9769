"""The bench's metrics: success, bootstrap CIs over seeds, feature-FID of on-time images, the per-setting
cells, cost-predictor error, the wins table and the issue's goals; and the quality backend that scores
images (feature net + FID to the reference statistics)."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from abcd_edge import paths
from abcd_edge.bench.grid import ALL_RHO, METHODS, REF_N, REF_SEED, STATIC_METHODS
from abcd_edge.bench.store import (RESULTS_CSV, FEATURES_DIR, block_key, load_features, load_prompt_exact,
                                   read_csv, stream_key)
from abcd_edge.core.budget import parse_budget
from abcd_edge.errors import UserError

BOOTSTRAP = 1000
BOOTSTRAP_FID = 200


# ------------------------------------------------------------------------------------ quality backend

class Quality:
    """Feature extractor + reference statistics: ``features(uint8 NHWC)`` and ``fid(features)``; with a net that
    has prediction heads also ``prompt_exact(images, prompts)`` -> bool per image (prompt accuracy)."""

    def __init__(self, features: Callable[[np.ndarray], np.ndarray], fid: Callable[[np.ndarray], float],
                 description: str, prompt_exact: Callable[[np.ndarray, list[str]], np.ndarray] | None = None):
        self.features, self.fid, self.description = features, fid, description
        self.prompt_exact = prompt_exact

    @classmethod
    def default(cls, resolution: int, ref_seed: int = REF_SEED, ref_n: int = REF_N,
                net_dir: str | Path = paths.EVALNET_DIR) -> tuple["Quality | None", str]:
        """The evaluation feature net (default ``export/evalnet``: never what calibration optimises) and its
        reference statistics for images of side ``resolution`` (fitted to the net's input by an integer
        factor, ``core.images.fit_images``), or (None, why not)."""
        from threadpoolctl import threadpool_limits

        from abcd_edge.quality import FeatureNet, ReferenceStats, fit_images

        try:
            net = FeatureNet(net_dir)
            side = net.height if isinstance(net.height, int) else resolution
            fit_images(np.zeros((1, resolution, resolution, 3), np.uint8), side, side)
            with threadpool_limits(limits=1, user_api="blas"):
                ref = ReferenceStats.load_or_compute(ref_seed, ref_n, net, cache_dir=net_dir, resolution=resolution)
        except UserError as exc:
            return None, f"feature-FID not measured: {exc}"
        fitted = "" if side == resolution else f", {resolution}x{resolution} images fitted to its {side}x{side}"
        exact = _prompt_exact(net, side) if net.has_heads else None
        return cls(lambda images: net.features(fit_images(images, side, side)), ref.fid_to_reference,
                   f"feature-FID (evaluation net {paths.portable(Path(net_dir))} sha256 {net.sha256[:12]}{fitted}, "
                   f"reference: generator data seed {ref_seed}, n={ref_n})", exact), ""

    @classmethod
    def for_manifest(cls, manifest, ref_seed: int = REF_SEED, ref_n: int = REF_N,
                     net_dir: str | Path | None = None) -> tuple["Quality | None", str]:
        """:meth:`default` for the images an artifact makes (a pipeline's: its decoded image side)."""
        side = int(manifest.pipeline["image"]["resolution"]) if manifest.pipeline else int(manifest.resolution)
        return cls.default(side, ref_seed, ref_n, net_dir or paths.feature_net_dir("evaluation", side))


def _prompt_exact(net, side: int) -> Callable[[np.ndarray, list[str]], np.ndarray]:
    """Whether each image (fitted to the net's side) shows what its prompt names, by the net's heads."""
    from abcd_edge.quality import fit_images, score_prompts

    def exact(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        return score_prompts(net.predict(fit_images(images, side, side)), prompts, net.labels, resamples=1).per_image
    return exact


# ------------------------------------------------------------------------------------ pure functions

def success_rate(met: Sequence[bool]) -> float | None:
    met = list(met)
    return (sum(bool(m) for m in met) / len(met)) if met else None


def percentile_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], np.float64)
    if v.size == 0:
        return None
    a = (1 - level) / 2
    return float(np.quantile(v, a)), float(np.quantile(v, 1 - a))


def bootstrap_ci(groups: Sequence[Any], stat: Callable[[list[Any]], float | None], n_boot: int = BOOTSTRAP,
                 seed: int = 0, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile CI of ``stat`` over resamples (with replacement) of ``groups`` (here: seeds)."""
    groups = list(groups)
    if not groups:
        return None
    if len(groups) == 1:
        v = stat(groups)
        return None if v is None else (v, v)
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(groups), len(groups))
        v = stat([groups[i] for i in idx])
        if v is not None:
            vals.append(v)
    return percentile_ci(vals, level)


def pooled_success(groups: list[tuple[int, int]]) -> float | None:
    """groups: (met, total) per seed -> pooled share."""
    tot = sum(g[1] for g in groups)
    return sum(g[0] for g in groups) / tot if tot else None


def pooled_cost_error(terms: Iterable[tuple[float, int, int]]) -> tuple[float | None, float | None]:
    """(MAPE, coverage) over all steps of requests given as their results.csv cost terms
    (ape_sum, steps, covered): MAPE of predicted vs measured step ms, share of steps measured <= predicted."""
    s = n = c = 0
    for ape_sum, steps, covered in terms:
        s, n, c = s + ape_sum, n + steps, c + covered
    return (s / n, c / n) if n else (None, None)


def fid_pool(fid_fn: Callable[[np.ndarray], float], parts: list[np.ndarray]) -> float | None:
    """FID of the pooled feature sets; None with fewer than 2 images."""
    x = [p for p in parts if len(p)]
    if not x:
        return None
    feats = np.concatenate(x)
    if len(feats) < 2:
        return None
    return float(fid_fn(feats))


def _f(v: str) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ------------------------------------------------------------------------------------ cells

@dataclass
class Cell:
    status: str
    n_requests: int = 0
    n_images: int = 0
    success: float | None = None
    success_ci: tuple | None = None
    fid: float | None = None
    fid_ci: tuple | None = None
    fid_all: float | None = None        # every image, late ones included: quality on a loaded machine
    fid_all_ci: tuple | None = None
    prompt_acc: float | None = None     # share of on-time images showing what their prompt names
    prompt_acc_ci: tuple | None = None
    n_on_time: int = 0
    n_refused: int = 0
    util: float | None = None
    util_ci: tuple | None = None
    steps: float | None = None
    psnr: float | None = None
    energy: float | None = None
    detail: str = ""


def compute_cells(out: Path, quality_fid: Callable | None = None) -> tuple[list[dict], dict]:
    """Per (tier, budget, sampler, rho, method): the metrics with bootstrap CIs over seeds."""
    rows = [r for r in read_csv(Path(out) / RESULTS_CSV) if r["status"] != "block-end"]
    meta = json.loads((Path(out) / "bench.json").read_text())
    spec = meta["grid"]
    quality_list = [float(q) for q in spec["quality"]]
    feat_dir = Path(out) / FEATURES_DIR
    cells = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tier"], r["budget"], r["sampler"], r["method"], r["rho"]), []).append(r)
    tiers = {t["name"]: t for t in meta["tiers"]}
    for (tier, budget, sampler, method, rho), rs in groups.items():
        for q in (quality_list if rho == ALL_RHO else [float(rho)]):
            statuses = {r["status"] for r in rs}
            st = "ok" if "ok" in statuses or "refused" in statuses else sorted(statuses)[0]
            cell = Cell(status=st, detail=rs[0]["method_detail"])
            if st == "ok":
                _fill_cell(cell, rs, quality_fid, feat_dir, (tier, budget, sampler), stream_key(method, rho))
            cells.append(dict(tier=tier, simulated=tiers.get(tier, {}).get("simulated", False), budget=budget,
                              budget_ms=parse_budget(budget).ms, sampler=sampler, rho=q, method=method,
                              shared=rho == ALL_RHO, **asdict(cell)))
    return cells, meta


def _fill_cell(cell: Cell, rs: list[dict], quality_fid, feat_dir: Path, setting: tuple[str, str, str],
               stream: str) -> None:
    served = [r for r in rs if r["status"] in ("ok", "refused")]
    by_seed: dict[int, list[dict]] = {}
    for r in served:
        by_seed.setdefault(int(r["seed"]), []).append(r)
    seeds = sorted(by_seed)
    succ_groups = [(sum(r["deadline_met"] == "True" for r in by_seed[s]), len(by_seed[s])) for s in seeds]
    cell.n_requests = len(served)
    cell.n_refused = sum(r["status"] == "refused" for r in served)
    cell.n_images = sum(int(r["batch"]) for r in served)
    cell.success = pooled_success(succ_groups)
    cell.success_ci = bootstrap_ci(succ_groups, pooled_success, seed=1)
    ok = [r for r in served if r["status"] == "ok"]
    utils = [_f(r["utilisation"]) for r in ok]
    cell.util = float(np.mean(utils)) if utils else None
    util_groups = [[_f(r["utilisation"]) for r in by_seed[s] if r["status"] == "ok"] for s in seeds]
    cell.util_ci = bootstrap_ci(util_groups, lambda g: float(np.mean(sum(g, []))) if sum(g, []) else None, seed=2)
    cell.steps = float(np.mean([_f(r["steps"]) for r in ok])) if ok else None
    ps = [_f(r["teacher_psnr"]) for r in ok if r["deadline_met"] == "True" and _f(r["teacher_psnr"]) is not None]
    cell.psnr = float(np.mean(ps)) if ps else None
    en = [_f(r["energy_mj"]) for r in ok if _f(r["energy_mj"]) is not None]
    cell.energy = float(np.mean(en)) if en else None
    if quality_fid is not None:
        for on_time_only in (True, False):
            per_seed = [f for f in (load_features(feat_dir, block_key(*setting, s), stream, on_time_only)
                                    for s in seeds) if f is not None]
            if not per_seed:
                continue
            fid = fid_pool(quality_fid, per_seed)
            ci = bootstrap_ci(per_seed, lambda g: fid_pool(quality_fid, g), n_boot=BOOTSTRAP_FID, seed=3)
            if on_time_only:
                cell.n_on_time, cell.fid, cell.fid_ci = int(sum(len(p) for p in per_seed)), fid, ci
            else:
                cell.fid_all, cell.fid_all_ci = fid, ci
    exact = [e for e in (load_prompt_exact(feat_dir, block_key(*setting, s), stream) for s in seeds) if e is not None]
    if exact and sum(len(e) for e in exact):
        share = lambda g: float(np.concatenate(g).mean()) if sum(len(e) for e in g) else None  # noqa: E731
        cell.prompt_acc, cell.prompt_acc_ci = share(exact), bootstrap_ci(exact, share, seed=4)


def prompt_set_rows(out: Path, meta: dict) -> list[dict]:
    """With labelled prompt sets (``--prompts easy=...,hard=...``): per (tier, budget, sampler, method, rho) and
    set, the images served, mean steps their requests took, the on-time share and the prompt accuracy of the
    on-time ones. Empty for one set or none."""
    from abcd_edge.bench.store import load_per_image
    from abcd_edge.bench.text import parse_prompt_sets

    spec = meta["grid"]
    if not spec.get("prompts"):
        return []
    labels = [label for label, _ in parse_prompt_sets(spec["prompts"])]
    if len(labels) < 2:
        return []
    rows = [r for r in read_csv(Path(out) / RESULTS_CSV) if r["status"] == "ok"]
    streams = sorted({(r["tier"], r["budget"], r["sampler"], r["method"], r["rho"]) for r in rows})
    feat_dir = Path(out) / FEATURES_DIR
    out_rows = []
    for tier, budget, sampler, method, rho in streams:
        parts = [load_per_image(feat_dir, block_key(tier, budget, sampler, s), stream_key(method, rho))
                 for s in range(int(spec["seeds"]))]
        parts = [p for p in parts if p is not None and "prompt_set" in p]
        if not parts:
            continue
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for i, label in enumerate(labels):
            sel = cat["prompt_set"] == i
            on = sel & cat["on_time"].astype(bool)
            acc = float(cat["prompt_exact"][on].mean()) if "prompt_exact" in cat and on.any() else None
            out_rows.append(dict(tier=tier, budget=budget, sampler=sampler, method=method, rho=rho, set=label,
                                 n=int(sel.sum()), steps=float(cat["steps"][sel].mean()) if sel.any() else None,
                                 on_time=float(cat["on_time"][sel].mean()) if sel.any() else None,
                                 prompt_acc=acc))
    return out_rows


SEED_CLAIMS = {"success_pp": 12.0, "fid_rel": -0.13}   # the abstract's: deadline adherence +12 pp, FID -13 %


def seed_claims(cells: list[dict]) -> list[dict]:
    """Per real-tier setting (tier, budget, sampler) at rho = 1: ABCD's success minus the fixed-step
    uniform baseline's (percentage points) and its on-time feature-FID relative to uniform's, beside the
    abstract's claims (+12 pp, -13 %)."""
    out = []
    for key, by in _by_setting(cells).items():
        a, u = by.get("abcd"), by.get("uniform")
        if key[3] != 1.0 or a is None or u is None or a["simulated"] or a["status"] != "ok" or u["status"] != "ok":
            continue
        d_pp = None if a["success"] is None or u["success"] is None else 100.0 * (a["success"] - u["success"])
        rel = None if not a["fid"] or not u["fid"] else a["fid"] / u["fid"] - 1.0
        out.append(dict(setting=f"{key[0]} {key[1]} {key[2]}", abcd_success=a["success"], uniform_success=u["success"],
                        success_pp=d_pp, abcd_fid=a["fid"], uniform_fid=u["fid"], fid_rel=rel,
                        abcd_prompt_acc=a.get("prompt_acc"), uniform_prompt_acc=u.get("prompt_acc")))
    return out


def predictor_errors(out: Path) -> list[dict]:
    """Per tier and method: MAPE of predicted vs measured step ms, and p99 coverage, over all steps."""
    acc: dict[tuple, list[tuple[float, int, int]]] = {}
    for r in read_csv(Path(out) / RESULTS_CSV):
        if r["status"] != "ok" or not r["cost_steps"]:
            continue
        acc.setdefault((r["tier"], r["method"]), []).append(
            (float(r["cost_ape_sum"]), int(r["cost_steps"]), int(r["cost_covered"])))
    out_rows = []
    for (t, m), terms in sorted(acc.items()):
        mape, coverage = pooled_cost_error(terms)
        out_rows.append(dict(tier=t, method=m, steps=sum(n for _, n, _ in terms), mape=mape, coverage=coverage))
    return out_rows


# ------------------------------------------------------------------------------------ comparisons

def _by_setting(cells: list[dict]) -> dict[tuple, dict[str, dict]]:
    by_setting: dict[tuple, dict[str, dict]] = {}
    for c in cells:
        if c["status"] == "ok":
            by_setting.setdefault((c["tier"], c["budget"], c["sampler"], c["rho"]), {})[c["method"]] = c
    return by_setting


def wins_table(cells: list[dict]) -> list[dict]:
    """For each baseline: share of feasible settings where ABCD is not worse on success nor feature-FID and
    better on one (win), the reverse (loss), or neither (mixed / tie). Point estimates."""
    by_setting = _by_setting(cells)
    out = []
    for b in [m for m in METHODS if m not in ("abcd",)]:
        n = w = lo = mixed = 0
        for _, ms in by_setting.items():
            a, x = ms.get("abcd"), ms.get(b)
            if not a or not x or a["success"] is None or x["success"] is None:
                continue
            fa = a["fid"] if a["fid"] is not None else math.inf
            fx = x["fid"] if x["fid"] is not None else math.inf
            if fa == math.inf and fx == math.inf:
                fa = fx = 0.0   # no quality measured: compare on success alone
            n += 1
            if a["success"] >= x["success"] and fa <= fx and (a["success"] > x["success"] or fa < fx):
                w += 1
            elif x["success"] >= a["success"] and fx <= fa and (x["success"] > a["success"] or fx < fa):
                lo += 1
            else:
                mixed += 1
        out.append(dict(baseline=b, settings=n, wins=w / n if n else None, losses=lo / n if n else None,
                        mixed=mixed / n if n else None))
    return out


def goals(cells: list[dict], meta: dict) -> dict:
    """The issue's goals: ABCD success >= 99.9 % on real tiers at budgets >= 3x p50 step; ABCD feature-FID <=
    0.9x the best static method's (among those ABCD matches or beats on success) on >= 80 % of settings."""
    from abcd_edge.formats.profile import load_profile

    batch = meta["grid"]["batch"]
    p50 = {}
    for t in meta["tiers"]:
        try:
            p50[t["name"]] = load_profile(paths.from_portable(t["profile_path"])).for_batch(batch).step.p50_ms
        except UserError:
            p50[t["name"]] = None
    g1 = []
    for c in cells:
        if c["method"] == "abcd" and c["status"] == "ok" and not c["simulated"] and p50.get(c["tier"]) \
                and c["budget_ms"] >= 3 * p50[c["tier"]]:
            g1.append(dict(setting=f"{c['tier']} {c['budget']} {c['sampler']} rho={c['rho']}", success=c["success"],
                           met=c["success"] is not None and c["success"] >= 0.999))
    g2 = []
    for k, ms in _by_setting(cells).items():
        a = ms.get("abcd")
        if not a or a["fid"] is None:
            continue
        cands = [ms[b] for b in STATIC_METHODS if b in ms and ms[b]["fid"] is not None and ms[b]["success"] is not None
                 and ms[b]["success"] <= a["success"]]
        best = min(cands, key=lambda c: c["fid"]) if cands else None
        g2.append(dict(setting=" ".join(map(str, k)), abcd_fid=a["fid"], best=best["method"] if best else None,
                       best_fid=best["fid"] if best else None,
                       met=bool(best and a["fid"] <= 0.9 * best["fid"])))
    share = sum(g["met"] for g in g2) / len(g2) if g2 else None
    return dict(success_goal=g1, success_goal_met=bool(g1) and all(g["met"] for g in g1),
                qub_goal=g2, qub_goal_share=share, qub_goal_met=share is not None and share >= 0.8)
