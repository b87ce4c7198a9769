"""Evidence that the latent demo and its consistency twin are real: feature-FID and prompt accuracy vs steps.

Runs an exported text-to-image artifact through ONNX Runtime (``runtime.rollout.Rollouts``: the guided UNet as
the runtime steps it, the model's own scheduler timesteps, the VAE decode), ``--samples`` images per step count,
prompt i = the i-th caption of the shipped prompt set (``demo.captions.prompt_set``, a generator seed no model
trained on), noise from a fixed seed (the same noise and prompts at every step count). Judged by the evaluation
feature net (never what calibration optimises): feature-FID against its reference statistics (95 % bootstrap CI
over images) and prompt accuracy from its heads (``quality.prompt_accuracy``). Writes ``evaluation.json`` and
``evaluation.png`` (rows: prompts; columns: step counts) into ``--out``, and the table into its README.md (between
the evaluation markers, replaced on a rerun):

    python -m abcd_edge.demo.latent.evaluate --artifact export/demo-latent --steps 5,10,20,50 \\
        --out export/demo-latent-model
    python -m abcd_edge.demo.latent.evaluate --artifact export/demo-latent-lcm --steps 1,2,4,6 \\
        --out export/demo-latent-lcm-model
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from abcd_edge import paths
from abcd_edge.io import write_json_atomic

EVAL_NOISE_SEED = 31_337
GRID_PROMPTS = 6
FID_RESAMPLES = 100


def _fid_ci(ref, feats: np.ndarray, rng: np.random.Generator) -> list[float]:
    draws = [ref.fid_to_reference(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(FID_RESAMPLES)]
    return [round(float(np.quantile(draws, 0.025)), 3), round(float(np.quantile(draws, 0.975)), 3)]


def evaluate(artifact: Path, steps: list[int], samples: int, net_dir: Path, ref_seed: int, ref_n: int,
             threads: int, guidance: float | None = None, sampler: str | None = None, batch: int = 64,
             progress: bool = True) -> tuple[dict, np.ndarray]:
    """(the evaluation record, the grid images [prompts x steps] as uint8 NHWC)."""
    from tqdm import tqdm

    from abcd_edge.core.noise import NoiseSchedule
    from abcd_edge.core.placement import TimestepPlacement
    from abcd_edge.core.samplers import natural_sampler
    from abcd_edge.demo.captions import PROMPT_SEED, prompt_set
    from abcd_edge.formats.manifest import load_manifest, manifest_hash
    from abcd_edge.quality import FeatureNet, ReferenceStats, feature_kid, fit_images, prompt_accuracy
    from abcd_edge.runtime.rollout import Rollouts

    manifest = load_manifest(artifact)
    schedule = NoiseSchedule.from_config(manifest.scheduler_config)
    sampler = sampler or natural_sampler(manifest.prediction_type, manifest.scheduler_config)
    ro = Rollouts.open(artifact, manifest, schedule, threads, guidance)
    net = FeatureNet(net_dir, threads=threads)
    side = ro.image_resolution
    ref = ReferenceStats.load_or_compute(ref_seed, ref_n, net, cache_dir=net_dir, resolution=side)
    prompts = [c for _, c in prompt_set("any", samples)]
    shape = (manifest.channels, manifest.resolution, manifest.resolution)
    noise = np.random.default_rng(EVAL_NOISE_SEED).standard_normal((samples, *shape)).astype(np.float32)
    rows, grid = [], []
    bar = tqdm(total=len(steps) * samples, desc="evaluate", unit="img", disable=not progress)
    for n in steps:
        sigmas = TimestepPlacement(schedule, manifest.scheduler_config, sampler).plan(n)[0]
        t0 = time.monotonic()
        images = []
        for k in range(0, samples, batch):
            x0 = ro.x0(sampler, sigmas, noise[k:k + batch], ro.denoiser(prompts[k:k + batch]))
            images.append(ro.images(x0))
            bar.update(min(batch, samples - k))
        images = np.concatenate(images)
        fitted = fit_images(images, net.height, net.width)
        feats = net.features(fitted)
        row = {"steps": n, "fid": round(ref.fid_to_reference(feats), 3),
               "fid_ci95": _fid_ci(ref, feats, np.random.default_rng(n)),
               "kid": round(feature_kid(feats, ref.features).mean, 5),
               "wall_s": round(time.monotonic() - t0, 1)}
        if net.has_heads:
            row["prompt_accuracy"] = prompt_accuracy(net, fitted, prompts).as_dict()
        rows.append(row)
        grid.append(images[:GRID_PROMPTS])
    bar.close()
    record = {
        "artifact": paths.portable(artifact), "manifest_hash": manifest_hash(artifact), "sampler": sampler,
        "placement": "the model's own scheduler timesteps (diffusers)", "guidance": ro.guidance,
        "samples": samples, "noise_seed": EVAL_NOISE_SEED,
        "prompts": f"demo.captions.prompt_set('any', {samples}): the first captions of generator seed "
                   f"{PROMPT_SEED} (no model trains on it)",
        "judge": {"net": paths.portable(net_dir), "sha256": net.sha256, "reference_seed": ref_seed,
                  "reference_n": ref_n, "image_side": side},
        "chance": chance_accuracy(), "rows": rows,
    }
    # grid: one row per prompt, one column per step count
    stacked = np.stack(grid, axis=1).reshape(-1, *grid[0].shape[1:])
    return record, stacked


def chance_accuracy() -> dict:
    """What guessing gives, for reading prompt accuracy: the exact-match share of a predictor that ignores the
    image and answers the commonest (kinds set, colours set, count) of the prompt set."""
    from collections import Counter

    from abcd_edge.demo.captions import parse_caption, prompt_set

    targets = [parse_caption(c) for _, c in prompt_set("any", 2048)]
    keys = Counter((tuple(t.kinds), tuple(t.colours), t.count) for t in targets)
    return {"exact_commonest_answer": round(keys.most_common(1)[0][1] / len(targets), 4),
            "count_commonest": round(Counter(t.count for t in targets).most_common(1)[0][1] / len(targets), 4)}


def markdown(record: dict) -> str:
    """The README table: steps, FID [CI], KID, prompt accuracy [CI] and per attribute."""
    lines = ["| steps | feature-FID [95 % CI] | KID | prompt accuracy [95 % CI] | kinds | colours | count |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in record["rows"]:
        pa = r.get("prompt_accuracy")
        acc = (f"{pa['exact']:.3f} [{pa['exact_ci95'][0]:.3f}, {pa['exact_ci95'][1]:.3f}] | {pa['kinds']:.3f} | "
               f"{pa['colours']:.3f} | {pa['count']:.3f}") if pa else "– | – | – | –"
        lines.append(f"| {r['steps']} | {r['fid']:.2f} [{r['fid_ci95'][0]:.2f}, {r['fid_ci95'][1]:.2f}] | "
                     f"{r['kid']:.4f} | {acc} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- evaluation: written by abcd_edge.demo.latent.evaluate -->", "<!-- /evaluation -->"


def readme_section(record: dict) -> str:
    """The README's evaluation section: how it was measured, the table, chance, the grid."""
    j, ch = record["judge"], record["chance"]
    return "\n".join([
        BEGIN, "## Quality vs steps (`make evaluate-latent`)", "",
        f"`{record['command']}` ({record['wall_minutes']} min): {record['samples']} images per row, sampler "
        f"{record['sampler']} at {record['placement']}, guidance {record['guidance']}; prompts "
        f"{record['prompts']}; noise seed {record['noise_seed']}. Judge: `{j['net']}` (the evaluation net, never "
        f"what calibration optimises), reference statistics of {j['reference_n']} generator images (seed "
        f"{j['reference_seed']}); FID CI: bootstrap over images. Prompt accuracy: the share of images whose "
        "predicted shape kinds, colours and count all match the prompt (and per attribute).", "",
        markdown(record).rstrip(), "",
        f"Chance: answering the commonest (kinds, colours, count) of the prompts is exact for "
        f"{ch['exact_commonest_answer']:.3f}; the commonest count alone for {ch['count_commonest']:.3f}.", "",
        "`evaluation.png`: rows are the first prompts, columns the step counts, same noise per row.", END, ""])


def write_readme_section(folder: Path, record: dict) -> None:
    """Replace (or append) the evaluation section of ``folder/README.md`` atomically."""
    from abcd_edge.io import write_bytes_atomic

    path = folder / "README.md"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + readme_section(record) + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + readme_section(record)
    write_bytes_atomic(path, text.encode())


def main(argv=None) -> None:
    from abcd_edge.core.images import save_png

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True, help="an exported text-to-image artifact")
    ap.add_argument("--steps", default="5,10,20,50", help="step counts, comma list")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--net", type=Path, default=paths.REPO_ROOT / "export" / "evalnet128",
                    help="the judging feature net (128 x 128, with prediction heads)")
    ap.add_argument("--ref-seed", type=int, default=paths.EVAL_REF_SEED)
    ap.add_argument("--ref-n", type=int, default=paths.REF_N)
    ap.add_argument("--guidance", type=float, default=None, help="default: the artifact's")
    ap.add_argument("--sampler", default=None, help="default: the model's own scheduler's")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="folder for evaluation.json and samples.png")
    a = ap.parse_args(argv)
    steps = [int(s) for s in a.steps.split(",") if s.strip()]
    t0 = time.monotonic()
    record, grid = evaluate(a.artifact, steps, a.samples, a.net, a.ref_seed, a.ref_n, a.threads, a.guidance,
                            a.sampler)
    record["wall_minutes"] = round((time.monotonic() - t0) / 60, 2)
    record["command"] = "python -m abcd_edge.demo.latent.evaluate " + " ".join(argv or __import__("sys").argv[1:])
    a.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(a.out / "evaluation.json", record)
    save_png(grid, a.out / "evaluation.png", scale=1, cols=len(steps))
    write_readme_section(a.out, record)
    print(markdown(record), end="")
    print(f"-> {a.out / 'evaluation.json'}, {a.out / 'evaluation.png'} (rows: prompts, columns: {a.steps} steps), "
          f"{a.out / 'README.md'}")


if __name__ == "__main__":
    main()
