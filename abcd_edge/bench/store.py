"""What a bench run keeps on disk: results.csv (one row per request, a ``block-end`` row per finished block)
and ``features/`` (the feature-net features of each block's images per method, with the on-time mask).

A block is (tier, budget, sampler, seed): the unit a resume keeps or redoes.
"""
from __future__ import annotations

import csv
import io
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np

from abcd_edge.bench.grid import ALL_RHO
from abcd_edge.io import write_bytes_atomic

RESULTS_CSV = "results.csv"
FEATURES_DIR = "features"
CSV_FIELDS = (
    "tier", "tier_kind", "simulated", "clock", "profile", "device_id", "method", "method_detail", "budget",
    "budget_ms", "sampler", "rho", "seed", "request", "request_seed", "batch", "status", "latency_ms",
    "utilisation", "deadline_met", "steps", "planned_steps", "exit_reason", "energy_mj", "teacher_mse",
    "teacher_psnr", "predicted_step_ms_mean", "measured_step_ms_mean", "cost_ape_sum", "cost_steps",
    "cost_covered", "correction", "note", "time_utc",
)


# ------------------------------------------------------------------------------------ results.csv

def read_csv(path: Path) -> list[dict]:
    """The complete rows of results.csv; a last line cut short by a kill is dropped from the file too."""
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_bytes_atomic(path, text.encode())
    return list(csv.DictReader(text.splitlines(keepends=True)))


def write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS))
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    write_bytes_atomic(path, buf.getvalue().encode())


def append_csv(path: Path, rows: list[dict]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_FIELDS))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        f.flush()
        os.fsync(f.fileno())


def block_key(tier: str, budget: str, sampler: str, seed: int) -> str:
    return f"{tier}|{budget}|{sampler}|{seed}"


def row_block_key(row: dict) -> str:
    return block_key(row["tier"], row["budget"], row["sampler"], int(row["seed"]))


def cost_terms(predicted: Sequence[float], measured: Sequence[float]) -> tuple[float, int, int] | None:
    """One request's cost-predictor error terms, as results.csv stores them: (sum over steps of
    |predicted - measured| / measured, steps, steps whose measured time <= predicted); None without
    a prediction for every step."""
    p, m = np.asarray(predicted, np.float64), np.asarray(measured, np.float64)
    if p.size == 0 or p.size != m.size:
        return None
    return float(np.sum(np.abs(p - m) / np.maximum(m, 1e-9))), int(m.size), int(np.sum(m <= p))


def make_row(tier, method: str, detail: str, budget: str, budget_ms: float, sampler: str, rho: float | None,
             seed: int, request: int, request_seed: int, batch: int, status: str, res=None,
             teacher_mse: float | None = None, teacher_psnr: float | None = None, note: str = "") -> dict:
    """One results.csv row: a request of ``tier`` (a Tier) and its RunResult ``res`` (None: not served)."""
    clock = "simulated (profile replay)" if tier.simulated else "wall (monotonic)"
    row = dict(tier=tier.name, tier_kind=tier.kind, simulated=tier.simulated, clock=clock,
               profile=tier.profile_path, device_id=tier.device_id, method=method, method_detail=detail,
               budget=budget, budget_ms=budget_ms, sampler=sampler, rho=ALL_RHO if rho is None else rho,
               seed=seed, request=request, request_seed=request_seed, batch=batch, status=status,
               latency_ms="", utilisation="", deadline_met=False, steps="", planned_steps="", exit_reason="",
               energy_mj="", teacher_mse="" if teacher_mse is None else round(teacher_mse, 7),
               teacher_psnr="" if teacher_psnr is None else round(teacher_psnr, 4), predicted_step_ms_mean="",
               measured_step_ms_mean="", cost_ape_sum="", cost_steps="", cost_covered="", correction="",
               note=note, time_utc=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    if res is not None:
        row.update(latency_ms=round(res.latency_ms, 4), utilisation=float(f"{res.latency_ms / budget_ms:.6g}"),
                   deadline_met=bool(res.deadline_met), steps=round(float(res.steps), 4),
                   planned_steps=res.planned_steps, exit_reason=res.exit_reason,
                   energy_mj="" if res.energy_mj is None else res.energy_mj,
                   correction="" if res.correction is None else res.correction)
        if res.measured:
            row["measured_step_ms_mean"] = round(float(np.mean(res.measured)), 4)
        terms = cost_terms(res.predicted, res.measured)
        if terms is not None:
            ape_sum, steps, covered = terms
            row.update(predicted_step_ms_mean=round(float(np.mean(res.predicted)), 4),
                       cost_ape_sum=round(ape_sum, 6), cost_steps=steps, cost_covered=covered)
    return row


# ------------------------------------------------------------------------------------ features/

EXAMPLES_DIR = "examples"        # the first image of seed 0 per (tier, budget) for ABCD and time-uniform


def example_name(tier: str, budget: str, method: str) -> str:
    return f"{slug(tier)}__{slug(budget)}__{method}.png"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def stream_key(method: str, rho) -> str:
    """A (method, rho) stream as results.csv and the features files name it."""
    return f"{method}|{ALL_RHO if rho is None else rho}"


def features_path(feat_dir: Path, block: str, stream: str) -> Path:
    return Path(feat_dir) / f"{slug(block)}__{slug(stream)}.npz"


def prune_features(feat_dir: Path, kept_blocks: set[str]) -> None:
    """Delete the features of blocks not in ``kept_blocks`` (a fresh start, a dropped block)."""
    kept = {slug(b) for b in kept_blocks}
    for f in Path(feat_dir).glob("*.npz"):
        if f.name.split("__")[0] not in kept:
            f.unlink()


PER_IMAGE = ("prompt_exact", "prompt_set", "steps")   # what a text-to-image bench also keeps per image


def save_block_features(feat_dir: Path, block: str, feats: dict[str, list[np.ndarray]],
                        on_time: dict[str, list[np.ndarray]],
                        per_image: dict[str, dict[str, list[np.ndarray]]] | None = None) -> None:
    """Replace a block's features files: one per stream (an earlier run's, e.g. of a method now refused,
    does not survive); ``per_image`` adds arrays by name (``PER_IMAGE``: whether each image shows what its
    prompt names, the index of its prompt set, the steps its request took)."""
    for stale in Path(feat_dir).glob(f"{slug(block)}__*.npz"):
        stale.unlink()
    for stream, fs in feats.items():
        extra = {name: np.concatenate(by_stream[stream]) for name, by_stream in (per_image or {}).items()
                 if stream in by_stream}
        with open(features_path(feat_dir, block, stream), "wb") as f:
            np.savez(f, features=np.concatenate(fs), on_time=np.concatenate(on_time[stream]), **extra)


def load_features(feat_dir: Path, block: str, stream: str, on_time_only: bool = True) -> np.ndarray | None:
    """The features of a block's images for one stream (only the on-time ones unless asked); None when the
    file does not exist."""
    path = features_path(feat_dir, block, stream)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return z["features"][z["on_time"].astype(bool)] if on_time_only else z["features"]


def load_per_image(feat_dir: Path, block: str, stream: str) -> dict[str, np.ndarray] | None:
    """A block's stream per image: ``on_time`` and whichever of ``PER_IMAGE`` it has (None: no file)."""
    path = features_path(feat_dir, block, stream)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in ("on_time", *PER_IMAGE) if k in z.files}


def load_prompt_exact(feat_dir: Path, block: str, stream: str) -> np.ndarray | None:
    """Per on-time image of a block's stream: whether it shows what its prompt names (None: not measured)."""
    got = load_per_image(feat_dir, block, stream)
    if got is None or "prompt_exact" not in got:
        return None
    return got["prompt_exact"][got["on_time"].astype(bool)].astype(bool)
