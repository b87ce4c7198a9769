"""Compare two bench runs method by method: steps per request and feature-FID of their images.

For the reshaping check (issue 12): the static methods must give the same steps and the
same images (so the same feature-FID over all images) before and after a change; methods
whose result depends on the clock are shown for reference.

    python scripts/compare_bench.py BEFORE_DIR AFTER_DIR [--methods uniform,karras,logsnr,ays,stepdrop]
"""
from __future__ import annotations

import argparse
import csv
from collections import defaultdict
from pathlib import Path

import numpy as np

from abcd_edge.quality import FeatureNet, ReferenceStats


def load(folder: Path):
    steps = defaultdict(list)
    with open(folder / "results.csv") as f:
        for r in csv.DictReader(f):
            if r["status"] == "ok":
                key = (r["tier"], r["budget"], r["sampler"], r["method"], r["rho"])
                steps[key].append((int(r["seed"]), int(r["request"]), float(r["steps"])))
    feats = defaultdict(list)
    for p in sorted((folder / "features").glob("*.npz")):
        block, pk = p.stem.split("__")
        tier, budget, sampler, seed = block.rsplit("_", 3)
        method, rho = pk.rsplit("_", 1)
        with np.load(p) as z:
            feats[(tier, budget, sampler, method, rho)].append((int(seed), z["features"], z["on_time"]))
    return steps, feats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--methods", default="uniform,karras,logsnr,ays,stepdrop,buco-mwg,oracle,abcd")
    a = ap.parse_args()
    net = FeatureNet()
    ref = ReferenceStats.load_or_compute(4321, 2048, net)
    sb, fb = load(a.before)
    sa, fa = load(a.after)
    methods = a.methods.split(",")
    print("| setting | method | steps before | steps after | same steps | FID (all images) before | after | "
          "FID (on time) before | after |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in sorted(set(sb) | set(sa), key=lambda k: (k[0], k[1], k[2], methods.index(k[3]) if k[3] in methods else 99, k[4])):
        if key[3] not in methods:
            continue
        b, af = sorted(sb.get(key, [])), sorted(sa.get(key, []))
        same = b == af
        mb = np.mean([s for *_, s in b]) if b else float("nan")
        ma = np.mean([s for *_, s in af]) if af else float("nan")
        row = []
        for feats in (fb, fa):
            parts = sorted(feats.get(key, []), key=lambda t: t[0])
            if not parts:
                row.append(("–", "–"))
                continue
            allf = np.concatenate([p[1] for p in parts])
            ont = np.concatenate([p[1][p[2].astype(bool)] for p in parts])
            row.append((f"{ref.fid(allf):.3f}", f"{ref.fid(ont):.3f}" if len(ont) > 1 else "–"))
        print(f"| {' '.join(key[:3])} rho={key[4]} | {key[3]} | {mb:.2f} | {ma:.2f} | {'yes' if same else 'NO'} | "
              f"{row[0][0]} | {row[1][0]} | {row[0][1]} | {row[1][1]} |")


if __name__ == "__main__":
    main()
